"""SD-DiT: Self-supervised Discrimination in Diffusion Transformers (Zhu et al., CVPR 2024, arXiv 2403.17004).

No official code is
public; this is the project's working definition on top of the MaskDiT backbone (models/maskdit.py):
- the student encoder sees a [CLS] token plus the visible tokens (mask ratio 0.2) of x_s = x + sigma_s eps;
- the decoder gets, in token order, the encoded visible tokens and the ORIGINAL invisible tokens (patch
  embedding + pos-embed of x_s, bypassing the encoder), both through the MaskDiT bridge; no mask tokens;
- generative loss: EDM loss on the full image; discriminative loss: iBOT-style cross-entropy between the
  EMA teacher's (x_T = x + sigma_min eps, all tokens, no grad) and the student's prototype distributions,
  averaged over the visible tokens and [CLS]; total = gen + lambda * dis;
- inference: student encoder + decoder on all tokens (teacher and heads unused).

Where each default comes from ([E] established / [W] working definition / [D] default, not from the paper --
check against arXiv 2403.17004 sections 3-4 before attributing a result to SD-DiT):
    teacher = EMA of the student encoder                      [E]
    teacher view at the cleanest noise level                  [E]  value sigma_teacher = 0.002          [D]
    encoder on visible tokens, decoder gets original invisible tokens, no mask tokens            [W]
    discriminative CE over visible tokens + [CLS]; total loss = sum                               [W]
    [CLS] and each visible token weigh equally in that mean                                       [D]
    same eps for student and teacher views                                                        [D]
    ln sigma_s ~ N(-1.2, 1.2^2), sigma_data = 0.5 (MaskDiT)                                       [D]
    mask_ratio = 0.2 (third-party summaries)                                                      [D]
    [CLS] prepended, never masked, no pos-embed, dropped before the decoder; kept at inference   [D]
    invisible tokens pass the shared bridge; decoder pos-embed added to all slots                 [D]
    generative loss uniform over the image                                                        [D]
    teacher on all T tokens (iBOT convention), outputs read at the student's positions            [D]
    LayerNorm (no affine) on encoder outputs before the head                                      [D]
    head: 3-layer MLP (2048, GELU) -> 256 bottleneck -> l2 norm -> weight-normalized (g = 1)
          Linear to K = 8192 prototypes; one head for [CLS] and patch tokens                      [D] (iBOT)
    student_temp 0.1; teacher_temp 0.04 -> 0.07 linear warm-up over 37,500 steps
          (30 epochs of ImageNet at batch 1024); centering momentum 0.9, one center               [D] (iBOT)
    dis_loss_coef lambda = 1.0                                                                    [D]
    teacher momentum cosine 0.996 -> 1.0 over training                                            [D] (iBOT)
    backbone = MaskDiT layout (encoder DiT-X, decoder 8 x 512 x 16 heads)                         [D]

Public API (used by dit_models/train.py, method "sddit")
------------------------------------------------------
    SDDiT_models: {"SD-DiT-{S,B,L,XL}/{2,4}"} -> factory(**kwargs) -> SDDiT
    SDDiT(..MaskDiT backbone kwargs.., head_out_dim=8192, head_hidden_dim=2048, head_bottleneck_dim=256,
          head_nlayers=3, use_cls_token=True, cls_at_inference=True)
        .forward(x, sigma, class_labels=None) -> D_x                                      (sampling / eval)
        .forward(x_s, sigma_s, class_labels, mask_ratio=r, generator=g, x_teacher=x_T, sigma_teacher=s_T)
            -> dict(D_x, student_logits (N, 1+K, P), teacher_logits (N, 1+K, P), mask (N, T) or None)
        .forward_with_cfg(x, sigma, class_labels, cfg_scale) -> D_x
        .update_teacher(momentum)                 teacher <- m teacher + (1 - m) student (encoder, [CLS], head)
        .teacher                                  SDDiTTeacher (requires_grad False), .center buffer (1, P)
    SDDiTLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5, mask_ratio=0.2, sigma_teacher=0.002, dis_loss_coef=1.0,
              student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=37500,
              center_momentum=0.9, momentum_teacher=0.996, momentum_teacher_final=1.0, label_dropout=0.1)
        (model, x, y, step=None, generator=None) -> dict(loss=(N,), gen=(N,), dis=(N,), sigma=(N,))
            (in train mode also updates model.center)
        .update_teacher(model, step, total_steps) -> momentum used; call after each optimizer step.
    The 0.9999 sampling EMA of train.py is separate from the teacher EMA.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dit_kernels
from dit_models.edm import SIGMA_DATA, edm_coefficients, edm_loss_weight, precondition, sample_sigma
from dit_models.models.dit import SIZES as DIT_SIZES
from dit_models.models.dit import run_dit_trunk, size_registry
from dit_models.models.maskdit import DECODER, EncoderDecoderDiT, _unwrap, drop_labels, labels_to_one_hot

__all__ = ["ProjectionHead", "SDDiTTeacher", "SDDiT", "SDDiTLoss", "SDDiT_models"]


#################################################################################
#                               Projection head                                 #
#################################################################################

class ProjectionHead(nn.Module):
    """iBOT/DINO head: MLP (GELU) -> bottleneck -> l2 norm -> weight-normalized prototypes (no bias, g = 1)."""

    def __init__(self, in_dim, out_dim=8192, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        """x (N, L, D) -> prototype scores (N, L, P) in fp32 (cosine similarities)."""
        x = self.mlp(x)  # (N, L, bottleneck)
        # fp32: the scores are divided by temperatures down to 0.04 before the softmax.
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)
            w = F.normalize(self.last_layer.weight.float(), dim=1)  # weight norm with fixed g = 1
            return F.linear(x, w)  # (N, L, P)


#################################################################################
#                                  SD-DiT model                                 #
#################################################################################

class SDDiTTeacher(nn.Module):
    """EMA teacher: copies of the student's embedders, pos-embed, [CLS], encoder blocks and head. No grad."""

    def __init__(self, student):
        super().__init__()
        self.x_embedder = copy.deepcopy(student.x_embedder)
        self.t_embedder = copy.deepcopy(student.t_embedder)
        self.y_embedder = copy.deepcopy(student.y_embedder)
        self.pos_embed = nn.Parameter(student.pos_embed.detach().clone(), requires_grad=False)
        self.cls_token = None if student.cls_token is None else nn.Parameter(student.cls_token.detach().clone())
        self.blocks = copy.deepcopy(student.blocks)
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)

    def student_pairs(self, student):
        """[(teacher_param, student_param)] matched by name."""
        return [(p, student.get_parameter(name)) for name, p in self.named_parameters()]


class SDDiT(EncoderDecoderDiT):
    """SD-DiT: MaskDiT backbone without mask tokens + [CLS] token + projection head + EMA teacher encoder."""

    def __init__(
        self,
        *args,
        head_out_dim=8192,          # K prototypes                      [D]
        head_hidden_dim=2048,       # head MLP width                    [D]
        head_bottleneck_dim=256,    # head bottleneck                   [D]
        head_nlayers=3,             # head MLP layers                   [D]
        use_cls_token=True,         # [CLS] in the encoder              [W]
        cls_at_inference=True,      # keep [CLS] in the encoder at eval (as in training)  [D]
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        D = self.hidden_size
        self.cls_at_inference = cls_at_inference
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if use_cls_token else None
        self.head = ProjectionHead(D, head_out_dim, head_hidden_dim, head_bottleneck_dim, head_nlayers)
        self.register_buffer("center", torch.zeros(1, head_out_dim))
        self.initialize_weights()
        self.teacher = SDDiTTeacher(self)  # exact copy at init

    def initialize_weights(self):
        super().initialize_weights()  # also xavier-inits the head's Linears; overridden below
        if self.pos_embed.device.type == "meta":
            return
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.head.initialize_weights()
        if "teacher" in self._modules:  # re-init keeps the teacher an exact copy
            with torch.no_grad():
                for t, s in self.teacher.student_pairs(self):
                    t.copy_(s)

    # ------------------------------------------------------------------------------------------

    def _with_cls(self):
        return self.cls_token is not None and (self.training or self.cls_at_inference)

    def merge_tokens(self, h_vis, ids_keep, fill):
        """Decoder input: h_vis (N, K, Dd) at ids_keep, rows of fill (N, T, Dd) elsewhere."""
        if self.fused:
            return dit_kernels.scatter_tokens(h_vis, ids_keep, fill)  # (N, T, Dd)
        return dit_kernels.scatter_tokens_ref(h_vis, ids_keep, fill)  # (N, T, Dd)

    def student_encode(self, x_in, c_noise, class_labels, ids_keep=None):
        """Student encoder + bridge.

        Returns:
            dec_in (N, T, Dd): bridge(encoder(visible)) at ids_keep, bridge(original tokens) elsewhere.
            z (N, [1+]K, D): encoder outputs ([CLS] first when used) for the discriminative head.
            c (N, D): conditioning.
        """
        N = x_in.shape[0]
        tokens = self.embed_tokens(x_in)  # (N, T, D)
        c = self.embed_condition(c_noise, class_labels)  # (N, D)
        x = tokens if ids_keep is None else self.gather(tokens, ids_keep)  # (N, K, D)
        n_cls = 0
        if self._with_cls():
            x = torch.cat([self.cls_token.to(x.dtype).expand(N, -1, -1), x], dim=1)  # (N, 1+K, D), no pos-embed
            n_cls = 1
        z, h = self.encode(x, c)  # (N, 1+K, D) residual stream, bridge-modulated LN
        h_vis = self.decoder_layer.linear(h[:, n_cls:])  # (N, K, Dd), [CLS] dropped
        if ids_keep is None:
            return h_vis, z, c
        # Invisible slots: the unmodified input tokens through the same bridge (no mask tokens).
        fill = self.decoder_layer(tokens, c, fused=self.fused).to(h_vis.dtype)  # (N, T, Dd)
        return self.merge_tokens(h_vis, ids_keep, fill), z, c  # (N, T, Dd)

    def network(self, x_in, c_noise, class_labels, ids_keep=None, return_z=False):
        """Raw network F (student encoder + decoder) -> F_x (N, C, H, W) [, encoder outputs z]."""
        H, W = x_in.shape[-2:]
        dec_in, z, c = self.student_encode(x_in, c_noise, class_labels, ids_keep)
        F_x = self.decode(dec_in, c, H, W)  # (N, C, H, W)
        return (F_x, z) if return_z else F_x

    def head_logits(self, z, head):
        return head(F.layer_norm(z, z.shape[-1:], eps=1e-6))  # (N, L, P)

    @torch.no_grad()
    def teacher_logits(self, x_T, sigma_T, class_labels, ids_keep=None):
        """Teacher encoder on all T tokens (+[CLS]) of x_T at noise level sigma_T; scores at the student's
        positions ([CLS] first, then ids_keep order) -> (N, [1+]K, P)."""
        t = self.teacher
        N, _, H, W = x_T.shape
        sigma = torch.as_tensor(sigma_T, device=x_T.device, dtype=torch.float32).reshape(-1).expand(N)
        _, _, c_in, c_noise = edm_coefficients(sigma)
        x_in = (c_in.reshape(-1, 1, 1, 1) * x_T.float()).to(t.x_embedder.proj.weight.dtype)
        tokens = t.x_embedder(x_in, fused=self.fused) + t.pos_embed  # (N, T, D)
        c = t.t_embedder(c_noise)
        if t.y_embedder is not None:
            c = c + t.y_embedder(labels_to_one_hot(class_labels, self.num_classes, N, x_T.device))
        n_cls = 0
        if t.cls_token is not None:
            tokens = torch.cat([t.cls_token.to(tokens.dtype).expand(N, -1, -1), tokens], dim=1)  # (N, 1+T, D)
            n_cls = 1
        z, _ = run_dit_trunk(t.blocks, tokens, c, final_adaLN=None, fused=self.fused)  # (N, 1+T, D)
        if ids_keep is not None:
            z_tok = self.gather(z[:, n_cls:].contiguous(), ids_keep)  # (N, K, D)
            z = torch.cat([z[:, :n_cls], z_tok], dim=1)  # (N, 1+K, D)
        return self.head_logits(z, t.head)

    def forward(self, x, sigma, class_labels=None, mask_ratio=0.0, generator=None, x_teacher=None,
                sigma_teacher=None):
        """D(x; sigma, y), or the training outputs when x_teacher is given.

        Args:
            x: (N, C, H, W) noisy latents x_s; sigma: (N,) or scalar.
            class_labels: (N,) int64 (num_classes = null), (N, K) one-hot, or None (null).
            mask_ratio: fraction of tokens hidden from the student encoder (train mode only).
            generator: torch.Generator for the token shuffle.
            x_teacher, sigma_teacher: teacher view x_T and its noise level (training).
        Returns:
            D_x (N, C, H, W) fp32, or dict(D_x, student_logits, teacher_logits, mask) with logits
            (N, [1+]K, P) fp32 (teacher without grad) and mask (N, T) float 1 = invisible (or None).
        """
        ids_keep = mask = None
        if self.training and mask_ratio > 0:
            N, T = x.shape[0], self.num_patches
            ids_keep, _, mask = dit_kernels.random_token_mask(N, T, int(T * (1 - mask_ratio)), generator=generator,
                                                              device=x.device)
        enc = {}

        def F_x(x_in, c_noise):
            out, enc["z"] = self.network(x_in, c_noise, class_labels, ids_keep, return_z=True)
            return out

        D_x, _ = precondition(F_x, x, sigma, self.sigma_data)
        z = enc["z"]
        if x_teacher is None:
            return D_x
        student_logits = self.head_logits(z, self.head)  # (N, [1+]K, P)
        teacher_logits = self.teacher_logits(x_teacher, sigma_teacher, class_labels, ids_keep)
        return dict(D_x=D_x, student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student (encoder, embedders, [CLS], head)."""
        pairs = self.teacher.student_pairs(self)
        teacher_params = [t for t, _ in pairs]
        student_params = [s.detach().to(t.dtype) for t, s in pairs]
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


#################################################################################
#                                    Loss                                       #
#################################################################################

class SDDiTLoss:
    """SD-DiT objective: L = L_gen (EDM) + lambda L_dis (student-teacher cross-entropy), plus the teacher/center
    schedules.

    Called as ``loss(model, x, y, step=None, generator=None)``:
        x: (N, C, H, W) clean latents; y: (N,) int64 labels, (N, K) one-hot, or None.
        step: training step (teacher-temperature warm-up; None = step 0).
        generator: torch.Generator on x's device (sigma, eps, label dropout, mask, in this order).
    Returns dict(loss=(N,), gen=(N,), dis=(N,), sigma=(N,)); train on loss.mean(). In train mode the call
    also updates model.center (EMA of the batch-mean teacher scores, all-reduced under torch.distributed).
    After each optimizer step call ``update_teacher(model, step, total_steps)``.
    """

    def __init__(
        self,
        P_mean=-1.2,                        # student ln sigma ~ N(P_mean, P_std^2)                  [D]
        P_std=1.2,                          #                                                        [D]
        sigma_data=SIGMA_DATA,
        mask_ratio=0.2,                     # fraction of tokens hidden from the student encoder    [D]
        sigma_teacher=0.002,                # teacher view noise level (sigma_min)                  [D]
        dis_loss_coef=1.0,                  # lambda                                                [D]
        student_temp=0.1,                   # tau_s                                                 [D]
        teacher_temp=0.07,                  # tau_T after warm-up                                   [D]
        warmup_teacher_temp=0.04,           # tau_T at step 0                                       [D]
        warmup_teacher_temp_steps=37500,    # ~30 ImageNet epochs at batch 1024                     [D]
        center_momentum=0.9,                # C <- m C + (1 - m) batch mean                         [D]
        momentum_teacher=0.996,             # teacher EMA momentum at step 0 (cosine to final)      [D]
        momentum_teacher_final=1.0,         #                                                       [D]
        label_dropout=0.1,                  # CFG null-label probability                            (MaskDiT)
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.mask_ratio = mask_ratio
        self.sigma_teacher = sigma_teacher
        self.dis_loss_coef = dis_loss_coef
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.center_momentum = center_momentum
        self.momentum_teacher = momentum_teacher
        self.momentum_teacher_final = momentum_teacher_final
        self.label_dropout = label_dropout

    def teacher_temp_at(self, step=None):
        """Linear warm-up warmup_teacher_temp -> teacher_temp over warmup_teacher_temp_steps, then constant."""
        step = 0 if step is None else step
        if step >= self.warmup_teacher_temp_steps:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_teacher_temp_steps

    def teacher_momentum_at(self, step, total_steps):
        """Cosine schedule: momentum_teacher at step 0 -> momentum_teacher_final at total_steps."""
        x = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return self.momentum_teacher_final - (self.momentum_teacher_final - self.momentum_teacher) * (math.cos(math.pi * x) + 1) / 2

    def discriminative_loss(self, student_logits, teacher_logits, center, step=None):
        """Per-sample mean over tokens of -sum_k P_T log P_s (fp32). Logits (N, L, P), center (1, P)."""
        tau_T = self.teacher_temp_at(step)
        log_p_s = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (N, L, P)
        p_t = F.softmax((teacher_logits.float() - center) / tau_T, dim=-1).detach()  # (N, L, P)
        return -(p_t * log_p_s).sum(-1).mean(1)  # (N,)

    @torch.no_grad()
    def update_center(self, net, teacher_logits):
        batch_center = teacher_logits.float().mean(dim=(0, 1)).unsqueeze(0)  # (1, P)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        net.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def __call__(self, model, x, y, step=None, generator=None):
        N, device = x.shape[0], x.device
        net = _unwrap(model)
        sigma = sample_sigma(N, self.P_mean, self.P_std, generator, device)  # (N,)
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        x_s = x.float() + sigma.reshape(-1, 1, 1, 1) * eps  # student view
        x_T = x.float() + self.sigma_teacher * eps  # teacher view: same eps, cleanest level
        if y is not None and self.label_dropout > 0:
            drop = torch.rand(N, generator=generator, device=device) < self.label_dropout
            y = drop_labels(y, drop, net.num_classes)
        out = model(x_s.to(x.dtype), sigma, y, mask_ratio=self.mask_ratio, generator=generator,
                    x_teacher=x_T.to(x.dtype), sigma_teacher=self.sigma_teacher)
        weight = edm_loss_weight(sigma, self.sigma_data).reshape(-1, 1, 1, 1)
        gen = (weight * (out["D_x"].float() - x.float()) ** 2).mean(dim=(1, 2, 3))  # (N,) full image
        dis = self.discriminative_loss(out["student_logits"], out["teacher_logits"], net.center, step)  # (N,)
        if net.training:
            self.update_center(net, out["teacher_logits"])
        return dict(loss=gen + self.dis_loss_coef * dis, gen=gen, dis=dis, sigma=sigma)

    def update_teacher(self, model, step, total_steps):
        """EMA update of the teacher after an optimizer step; returns the momentum used."""
        m = self.teacher_momentum_at(step, total_steps)
        _unwrap(model).update_teacher(m)
        return m


#################################################################################
#                                 SD-DiT Configs                                #
#################################################################################

# The DiT sizes, patches 2 and 4, with MaskDiT's 8 x 512 decoder.
SDDiT_models = size_registry(SDDiT, "SD-DiT", DIT_SIZES, (2, 4), **DECODER)
