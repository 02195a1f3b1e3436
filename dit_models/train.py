"""Train DiT (DDPM), SiT (interpolant transport), MaskDiT (EDM + masking) or SD-DiT with DDP.

Single process (CPU or one GPU):
    python -m dit_models.train --method sit --model SiT-S/2 --data digits --max-steps 2000
Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node 8 -m dit_models.train --method ddpm --model DiT-XL/2 --data /path/to/latents
Quickstart (small SiT on the embedded digits, a few minutes on a laptop CPU; writes samples, a loss plot and
the evaluation score):
    python -m dit_models.train --quickstart

Recipes (defaults as published, diffusion_transport.md A7/B9, maskdit_sddit.md 1.7/2.5): AdamW lr 1e-4,
betas (0.9, 0.999), weight decay 0, constant LR, no clipping; EMA 0.9999 per step initialised as an exact copy;
label dropout 0.1; global batch 256 (DiT/SiT) or 1024 (MaskDiT/SD-DiT); MaskDiT mask ratio 0.5 + MAE 0.1;
SD-DiT mask ratio 0.2.

Exact resume: every random draw of a step (data augmentation, diffusion time/noise, label dropout, masks)
comes from RNGs re-seeded at the start of the step from (seed, rank, step), and the data order from a
DistributedSampler seeded by (seed, epoch); checkpoints hold model, EMA, optimizer, step, epoch, args (a
plain dict) and RNG states, written atomically. N steps straight == N/2 steps + --resume + N/2 steps.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from dit_models import utils
from dit_models.builders import METHODS, MethodUnavailable, accepts_kwarg, build_model_from_args, model_config
from dit_models.data import UnreadableImageError
from dit_models.metrics import REPORT_NUM_SAMPLES
from dit_models.utils import derive_seed

DEFAULT_MODEL = {"ddpm": "DiT-XL/2", "sit": "SiT-XL/2", "maskdit": "MaskDiT-XL/2", "sddit": "SD-DiT-XL/2"}
DEFAULT_GLOBAL_BATCH = {"ddpm": 256, "sit": 256, "maskdit": 1024, "sddit": 1024}
DEFAULT_MASK_RATIO = {"maskdit": 0.5, "sddit": 0.2}

# Quickstart preset: a 4-block, width-128 SiT (Linear, velocity) with 4x4 patches (16 tokens) on 16x16 digits,
# 8000 steps of batch 32 (about 4 minutes on 2 cores). Higher LR and a shorter EMA than the paper recipe
# (1e-4 / 0.9999), which is sized for millions of steps. Chosen from the recipes in docs/results.md: FD about
# 9.5 at cfg 1 (real digits 8.8), class accuracy 1.00 at cfg 3, sampled with DPM-Solver++(2M) in 20 evaluations.
QUICKSTART = dict(method="sit", model="SiT-S/4", depth=4, hidden_size=128, num_heads=4, data="digits",
                  global_batch_size=32, lr=1e-3, ema_decay=0.995, max_steps=8000, log_every=500,
                  ckpt_every=2000, sample_every=2000, sample_cfg_scale=3.0, precision="fp32")


# ---------------------------------------------------------------------------------------------------------
#                                       Models and objectives
# ---------------------------------------------------------------------------------------------------------

class Objective:
    """The training loss of a method: __call__(model, x, y) -> (scalar loss, {name: float tensor})."""

    extra_modules = {}  # trainable modules besides the model (none here; SD-DiT keeps its heads in the loss)

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def after_step(self, model, step, max_steps):
        pass

    def __call__(self, model, x, y, step):
        raise NotImplementedError


class DDPMObjective(Objective):
    """DiT: t ~ U{0..T-1}, hybrid MSE + VB loss with learned variance (diffusion_transport A4)."""

    def __init__(self, args):
        from dit_models.diffusion import create_diffusion

        self.diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule,
                                          learn_sigma=args.learn_sigma, diffusion_steps=args.diffusion_steps)

    def __call__(self, model, x, y, step):
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        d = self.diffusion.training_losses(model, x, t, dict(y=y))
        logs = {k: d[k].mean().detach() for k in ("mse", "vb") if k in d}
        return d["loss"].mean(), logs


class TransportObjective(Objective):
    """SiT: interpolant path x_t = alpha_t x1 + sigma_t x0, velocity/score/noise regression (B3)."""

    def __init__(self, args):
        from dit_models.transport import create_transport

        self.transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps,
                                          args.sample_eps)

    def __call__(self, model, x, y, step):
        d = self.transport.training_losses(model, x, dict(y=y))
        return d["loss"].mean(), {}


def _loss_kwargs(cls, args, names):
    return {k: getattr(args, a) for k, a in names.items() if getattr(args, a, None) is not None and accepts_kwarg(cls, k)}


class _LossDictObjective(Objective):
    """Objectives whose loss object returns {"loss": (N,), <terms>...}: log the mean of every term."""

    def __call__(self, model, x, y, step):
        d = self.loss(model, x, y, step=step)
        logs = {k: v.mean().detach() for k, v in d.items() if k != "loss" and torch.is_tensor(v) and v.is_floating_point()}
        return d["loss"].mean(), logs


class MaskDiTObjective(_LossDictObjective):
    """MaskDiT: EDM DSM on visible tokens + 0.1 x MAE on masked tokens (maskdit_sddit 1.4)."""

    def __init__(self, args):
        try:
            from dit_models.models.maskdit import MaskDiTLoss
        except ImportError as e:
            raise MethodUnavailable(f"--method maskdit is not available in this build: {e}") from e
        self.loss = MaskDiTLoss(**_loss_kwargs(MaskDiTLoss, args, dict(
            mask_ratio="mask_ratio", mae_loss_coef="mae_loss_coef", P_mean="P_mean", P_std="P_std",
            label_dropout="class_dropout_prob")))


class SDDiTObjective(_LossDictObjective):
    """SD-DiT: EDM generative loss + teacher-student discriminative loss (maskdit_sddit 2.4)."""

    def __init__(self, args):
        try:
            from dit_models.models.sd_dit import SDDiTLoss
        except ImportError as e:
            raise MethodUnavailable(f"--method sddit is not available in this build: {e}") from e
        self.loss = SDDiTLoss(**_loss_kwargs(SDDiTLoss, args, dict(
            mask_ratio="mask_ratio", P_mean="P_mean", P_std="P_std", dis_loss_coef="dis_loss_coef",
            label_dropout="class_dropout_prob")))

    def after_step(self, model, step, max_steps):
        self.loss.update_teacher(utils.unwrap(model), step, max_steps)


def build_objective(args):
    return {"ddpm": DDPMObjective, "sit": TransportObjective, "maskdit": MaskDiTObjective,
            "sddit": SDDiTObjective}[args.method](args)


# ---------------------------------------------------------------------------------------------------------
#                                          Argument groups
# ---------------------------------------------------------------------------------------------------------

def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--method", choices=METHODS, default="ddpm", help="ddpm = DiT, sit = SiT transport, maskdit, sddit")
    g.add_argument("--model", default=None, help="registry name, e.g. DiT-XL/2, SiT-S/2 (default: the XL/2 of the method)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    g.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for CFG (paper: 0.1)")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT/SiT learned variance channels (default: True for ddpm and sit, as published)")
    g.add_argument("--depth", type=int, default=None, help="override the registry depth (tests/laptops only)")
    g.add_argument("--hidden-size", type=int, default=None, help="override the registry width (tests/laptops only)")
    g.add_argument("--num-heads", type=int, default=None, help="override the registry heads (tests/laptops only)")
    g.add_argument("--decoder-depth", type=int, default=None, help="MaskDiT/SD-DiT decoder depth override")
    g.add_argument("--decoder-hidden-size", type=int, default=None, help="MaskDiT/SD-DiT decoder width override")
    g.add_argument("--decoder-num-heads", type=int, default=None, help="MaskDiT/SD-DiT decoder heads override")
    g.add_argument("--model-kwargs", type=json.loads, default=None,
                   help='extra constructor arguments as JSON, e.g. \'{"head_out_dim": 256}\' (SD-DiT head)')
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="dit_kernels fused model path and fused AdamW on CUDA (--no-fused: plain PyTorch)")
    return g


def add_method_args(parser):
    g = parser.add_argument_group("noise process (ddpm / sit / edm)")
    g.add_argument("--noise-schedule", default="linear", choices=["linear", "squaredcos_cap_v2"], help="ddpm")
    g.add_argument("--diffusion-steps", type=int, default=1000, help="ddpm: T")
    g.add_argument("--path-type", default="Linear", choices=["Linear", "GVP", "VP"], help="sit")
    g.add_argument("--prediction", default="velocity", choices=["velocity", "score", "noise"], help="sit")
    g.add_argument("--loss-weight", default=None, choices=[None, "velocity", "likelihood"], help="sit")
    g.add_argument("--train-eps", type=float, default=None, help="sit (default per path/prediction, B4)")
    g.add_argument("--sample-eps", type=float, default=None, help="sit (default per path/prediction, B4)")
    g.add_argument("--mask-ratio", type=float, default=None, help="maskdit 0.5 / sddit 0.2 by default")
    g.add_argument("--mae-loss-coef", type=float, default=None, help="maskdit MAE weight (paper: 0.1)")
    g.add_argument("--dis-loss-coef", type=float, default=None, help="sddit discriminative loss weight (default 1)")
    g.add_argument("--P-mean", type=float, default=None, help="edm: ln sigma mean (-1.2)")
    g.add_argument("--P-std", type=float, default=None, help="edm: ln sigma std (1.2)")
    return g


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_method_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | digits32 | ImageFolder path | extract_latents folder")
    g.add_argument("--image-size", type=int, default=256, help="ImageFolder resolution (pixels)")
    g.add_argument("--vae", default="none", help="ImageFolder: none (pixel space) | ema | mse | diffusers path")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for file datasets")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="ImageFolder: decode every image once before training and leave out (counted, named) those "
                        "that fail; default: stop with an error naming the first unreadable file")
    g = p.add_argument_group("optimisation")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--global-batch-size", type=int, default=None, help="256 (ddpm/sit), 1024 (maskdit/sddit)")
    g.add_argument("--epochs", type=int, default=1400, help="used when --max-steps is not given")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant (paper) or cosine decay to 0 at the last step")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (0 = none, paper)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = off (paper)")
    g.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="default: tf32 for ddpm/sit (reference train.py), bf16 for maskdit/sddit on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g = p.add_argument_group("feedback")
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=50_000)
    g.add_argument("--sample-every", type=int, default=10_000, help="EMA sample grid every N steps (0 = off)")
    g.add_argument("--sample-cfg-scale", type=float, default=4.0, help="CFG of in-training samples (SiT: 4.0)")
    g.add_argument("--resume", default=None, help="checkpoint file or run folder: continue the run exactly")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--quickstart", action="store_true",
                   help="small SiT on digits + samples + loss plot + evaluation (override any flag, e.g. --max-steps 20)")
    g.add_argument("--eval-samples", type=int, default=REPORT_NUM_SAMPLES,
                   help="quickstart: samples per guidance setting of the digits report (as dit_models.evaluate)")
    return p


def resolve_args(args, parser=None, argv=None):
    """Fills method-dependent defaults and the quickstart preset (explicit flags always win)."""
    if args.quickstart:
        given = _explicit_dests(parser, argv) if parser is not None else set()
        for k, v in QUICKSTART.items():
            if k not in given:
                setattr(args, k, v)
    if args.model is None:
        args.model = DEFAULT_MODEL[args.method]
    if args.global_batch_size is None:
        args.global_batch_size = DEFAULT_GLOBAL_BATCH[args.method]
    if args.learn_sigma is None and args.method in ("ddpm", "sit"):
        args.learn_sigma = True
    if args.mask_ratio is None and args.method in DEFAULT_MASK_RATIO:
        args.mask_ratio = DEFAULT_MASK_RATIO[args.method]
    if args.precision is None:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        args.precision = ("tf32" if args.method in ("ddpm", "sit") else "bf16") if cuda else "fp32"
    return args


def _explicit_dests(parser, argv):
    """Destinations of the flags written on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    given = set()
    for a in parser._actions:
        for s in a.option_strings:
            if any(x == s or x.startswith(s + "=") for x in argv):
                given.add(a.dest)
    return given


# ---------------------------------------------------------------------------------------------------------
#                                            Training loop
# ---------------------------------------------------------------------------------------------------------

def set_precision(precision, device):
    """fp32: TF32 off (reference README numbers); tf32: TF32 matmul/cudnn; bf16: autocast (fp32 master weights)."""
    tf32 = precision == "tf32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def lr_at(args, step, max_steps):
    """Learning rate of (0-based) step: linear warm-up over --warmup-steps, then constant or cosine to 0."""
    warmup = getattr(args, "warmup_steps", 0) or 0
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if getattr(args, "lr_schedule", "constant") == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr


def make_run_dir(results_dir, method, model_name):
    os.makedirs(results_dir, exist_ok=True)
    existing = [d for d in os.listdir(results_dir) if d[:3].isdigit()]
    idx = max([int(d[:3]) for d in existing], default=-1) + 1
    run = os.path.join(results_dir, f"{idx:03d}-{method}-{model_name.replace('/', '-')}")
    os.makedirs(run, exist_ok=False)
    return run


def resolved_config(args, dataset):
    cfg = dict(vars(args))
    cfg.update(input_size=dataset.resolution, in_channels=dataset.channels, num_classes=args.num_classes,
               data_kind=dataset.kind)
    return cfg


def main(args):
    """Trains a model; returns a dict of output paths (run_dir, checkpoint, samples, loss_plot, ...)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dit_models.data import StepBatches, build_dataset

    rank, world, local_rank, device = utils.setup_distributed(args.device)
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    local_batch = args.global_batch_size // world

    # Data first: the model's input size, channels and class count come from it.
    dataset = build_dataset(args.data, args.image_size, args.vae, device, skip_bad_images=args.skip_bad_images)
    batches = StepBatches(dataset, local_batch, rank, world, args.seed, args.num_workers)
    if args.num_classes is None:
        args.num_classes = dataset.num_classes
    elif args.num_classes != dataset.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} does not match the dataset ({dataset.num_classes} classes in {args.data})")

    # Resume: reuse the run folder of the checkpoint.
    ckpt = None
    if args.resume:
        ckpt_path = utils.latest_checkpoint(args.resume)
        ckpt = utils.load_training_checkpoint(ckpt_path)
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
        old = ckpt.get("args", {})
        for k in ("method", "model", "depth", "hidden_size", "num_heads", "num_classes", "data"):
            if k in old and old[k] != getattr(args, k):
                raise ValueError(f"--resume: checkpoint was trained with {k}={old[k]!r}, got {getattr(args, k)!r}")
    cfg = resolved_config(args, dataset)
    # Same initial weights on every rank (DDP also broadcasts them); bad model flags fail before any output.
    utils.seed_everything(derive_seed(args.seed, 10**9))
    model = build_model_from_args(args, dataset.resolution, dataset.channels).to(device)
    # Record the decoder size the model got (builders.shrunk_decoder may derive it from the encoder flags), so
    # that the checkpoint rebuilds the same model whatever the defaults become.
    for key, value in model_config(model).items():
        if key.startswith("decoder_") and cfg.get(key) is None:
            cfg[key] = value
    objective = build_objective(args)

    if args.dry_run:
        if rank == 0:
            print(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            print(f"data: {dataset.describe()}")
            print(f"model: {args.model} {json.dumps(model_config(model))}, {utils.count_params(model):,} parameters")
        utils.cleanup_distributed()
        return {"config": cfg}

    if rank == 0:
        if ckpt is None:
            run_dir = make_run_dir(args.results_dir, args.method, args.model)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    else:
        run_dir = None
    if utils.is_distributed():  # share the run folder name with the other ranks
        box = [run_dir]
        torch.distributed.broadcast_object_list(box, src=0)
        run_dir = box[0]
    logger = utils.create_logger(run_dir, rank)
    logger.info(f"command: {' '.join(sys.argv)}")
    logger.info(f"run folder: {run_dir}; {world} process(es), device {device}, precision {args.precision}")
    logger.info(f"data: {dataset.describe()}")

    # Model, EMA (an exact copy), optimizer.
    ema = copy.deepcopy(model).to(device)
    utils.requires_grad(ema, False)
    ema.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=(device.type == "cuda" and args.fused) or None)
    logger.info(f"{args.method} {args.model}: {utils.count_params(model):,} parameters "
                f"({utils.count_params(model, True):,} trainable), config {json.dumps(model_config(model))}")

    # loss: mean over ranks and each log interval; step_loss: every step of rank 0 (the plot of a short run)
    start_step, history = 0, {"step": [], "loss": [], "step_loss": []}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        objective.load_state_dict(ckpt.get("objective", {}))
        start_step = int(ckpt["step"])
        history = dict(history, **ckpt.get("history", {}))
        utils.set_rng_states(ckpt.get("rng", {}).get(rank) if isinstance(ckpt.get("rng"), dict) else None)
        logger.info(f"resumed from {ckpt_path} at step {start_step}")
    ema_updater = utils.EMA(model, ema)

    train_model = model
    if utils.is_distributed():
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=args.method in ("maskdit", "sddit"))
    if args.compile:
        train_model = torch.compile(train_model)
    model.train()

    max_steps = args.max_steps if args.max_steps is not None else args.epochs * batches.steps_per_epoch
    autocast = set_precision(args.precision, device)
    logger.info(f"training steps {start_step} -> {max_steps} ({batches.steps_per_epoch} steps/epoch, "
                f"global batch {args.global_batch_size}, {local_batch} per process)")

    sample_labels = _sample_labels(args.num_classes, device)
    outputs = {"run_dir": run_dir, "checkpoint": None, "samples": None, "loss_plot": None, "log": os.path.join(run_dir, "log.txt")}
    running = torch.zeros((), device=device)
    running_logs, n_running, step_losses = {}, 0, []
    timer = utils.Timer(device)
    t_start = time.time()
    step = start_step

    def save_checkpoint(step, epoch):
        rng = [None] * world
        states = utils.get_rng_states()
        if utils.is_distributed():
            torch.distributed.all_gather_object(rng, states)
        else:
            rng = [states]
        if rank == 0:
            path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
            utils.save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "objective": objective.state_dict(), "step": step, "epoch": epoch, "args": cfg,
                               "history": history, "rng": dict(enumerate(rng))}, path)
            outputs["checkpoint"] = path
            logger.info(f"saved checkpoint {path}")
        utils.barrier()

    epoch = start_step // batches.steps_per_epoch
    for epoch, step, x, y in batches.iterate(start_step, max_steps):
        # Every random draw of this step comes from (seed, rank, step): exact resume.
        utils.seed_everything(derive_seed(args.seed, rank, step))
        gen = torch.Generator().manual_seed(derive_seed(args.seed, rank, step, 1))
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        x = dataset.augment(x, gen)
        # Free the previous step's gradients before the forward: they would otherwise sit beside the
        # activations at the memory peak (2.5 GiB for DiT-XL/2).
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, logs = objective(train_model, x, y, step)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, max_steps)
        opt.step()
        ema_updater.update(args.ema_decay)
        objective.after_step(model, step, max_steps)

        running += loss.detach().float()
        step_losses.append(loss.detach().float())  # read back at the next log line: no per-step host sync
        for k, v in logs.items():
            running_logs[k] = running_logs.get(k, 0) + v.float()
        n_running += 1
        done = step + 1
        if done % args.log_every == 0 or done == max_steps:
            dt = timer.lap()
            avg = utils.all_reduce_mean(running / n_running).item()  # loss averaged over ranks (D4 #19)
            extras = " ".join(f"{k}={utils.all_reduce_mean(v / n_running).item():.4f}" for k, v in running_logs.items())
            sps = n_running / max(dt, 1e-9)
            history["step"].append(done)
            history["loss"].append(avg)
            history["step_loss"].extend(torch.stack(step_losses).tolist())
            step_losses = []
            if not math.isfinite(avg):
                raise FloatingPointError(f"loss is {avg} at step {done}; try --precision fp32 or a lower --lr")
            logger.info(f"step {done:7d}/{max_steps} ({100.0 * done / max_steps:5.1f}%) epoch {epoch} loss {avg:.4f} "
                        f"{extras + ' ' if extras else ''}| {sps:.2f} steps/s {sps * args.global_batch_size:.1f} img/s "
                        f"| elapsed {time.time() - t_start:.0f}s eta {(max_steps - done) / max(sps, 1e-9):.0f}s")
            running.zero_()
            running_logs, n_running = {}, 0
        if args.sample_every and (done % args.sample_every == 0 or done == max_steps):
            if rank == 0:
                outputs["samples"] = _write_samples(args, ema, sample_labels, device, run_dir, done)
                logger.info(f"EMA samples -> {outputs['samples']}")
            utils.barrier()
        if done % args.ckpt_every == 0 and done != max_steps:
            save_checkpoint(done, epoch)
        step = done

    if step >= start_step and max_steps > start_step:
        save_checkpoint(max_steps, epoch)
    elif rank == 0:
        logger.info("nothing to train: the checkpoint is already at --max-steps")
    if rank == 0:
        outputs["loss_plot"] = utils.plot_loss_curve(history["step"], history["loss"], os.path.join(run_dir, "loss.png"),
                                                     history["step_loss"],
                                                     f"{args.method} {args.model} on {dataset.name}")
        with open(os.path.join(run_dir, "loss.csv"), "w") as f:
            f.write("step,loss\n" + "".join(f"{s},{l:.6f}\n" for s, l in zip(history["step"], history["loss"])))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    outputs["final_loss"] = history["loss"][-1] if history["loss"] else None
    outputs["history"] = history
    outputs["train_time_s"] = time.time() - t_start
    outputs["ema"], outputs["model"] = ema, model
    return outputs


def _sample_labels(num_classes, device, per_class=None):
    """Fixed labels for in-training grids: every class in order, at most 64 images."""
    n = min(64, max(8, num_classes * (per_class or max(1, 32 // max(num_classes, 1)))))
    return (torch.arange(n, device=device) % max(num_classes, 1)).long()


@torch.no_grad()
def _write_samples(args, ema, labels, device, run_dir, step):
    from dit_models.generation import generate, sampler_defaults

    opts = sampler_defaults(args.method)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(args.seed, 12345))
    x = generate(args.method, ema, labels, opts, cfg_scale=args.sample_cfg_scale, generator=gen, method_args=args,
                 batch_size=64)
    path = os.path.join(run_dir, "samples", f"{step:07d}.png")
    return utils.save_image_grid(x, path, nrow=max(8, min(16, args.num_classes)), labels=labels.tolist())


def print_summary(out, args, eval_result=None):
    lines = ["", "=" * 72, f"done: {args.method} {args.model} on {args.data}, {out.get('train_time_s', 0):.0f}s of training",
             f"  final loss     {out['final_loss']:.4f}" if out.get("final_loss") is not None else "  final loss     -",
             f"  run folder     {out['run_dir']}",
             f"  checkpoint     {out['checkpoint']}",
             f"  EMA samples    {out['samples']}",
             f"  loss plot      {out['loss_plot'] or '(matplotlib not installed)'}",
             f"  log            {out['log']}"]
    if eval_result is not None:
        from dit_models.metrics import format_report

        lines.append(f"  evaluation     {format_report(eval_result)}")
        lines.append(f"                 -> {eval_result['path']}, samples {eval_result['grid']}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def quickstart_eval(out, args):
    """The digits report (dit_models.metrics.digits_report, as `python -m dit_models.evaluate` gives it) of the
    EMA model of a finished run, with a class-labelled grid of its samples."""
    from dit_models.generation import sampler_defaults
    from dit_models.metrics import digits_report

    res = digits_report(args.method, out["ema"], method_args=args, num_samples=args.eval_samples,
                        sampler_opts=sampler_defaults(args.method), seed=args.seed,
                        size=getattr(out["ema"], "input_size", 16), progress=True)
    path = os.path.join(out["run_dir"], "eval.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=2)
    res["path"] = path
    res["grid"] = utils.save_image_grid(res["_samples"][:100], os.path.join(out["run_dir"], "eval_samples.png"),
                                        nrow=10, labels=res["_labels"][:100])
    return res


def cli(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    args = resolve_args(args, parser, argv)
    try:
        out = main(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError, MethodUnavailable) as e:
        msg = str(e).strip()
        if isinstance(e, UnreadableImageError):  # re-raised from a DataLoader worker: keep the original line
            msg = msg.splitlines()[-1].split("UnreadableImageError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        utils.cleanup_distributed()
        sys.exit(2)
    if args.dry_run:
        return out
    rank = int(os.environ.get("RANK", "0"))
    eval_result = None
    if args.quickstart and rank == 0 and args.data.startswith("digits"):
        eval_result = quickstart_eval(out, args)
    if rank == 0:
        print_summary(out, args, eval_result)
    utils.cleanup_distributed()
    return out


if __name__ == "__main__":
    cli()
