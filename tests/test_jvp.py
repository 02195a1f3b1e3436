"""Forward-mode AD (torch.func.jvp) through the compiled ops and a fused DiT (dit_kernels/ops/_forward_ad.py)."""
import pytest
import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

import dit_kernels as dk
from conftest import assert_close
from dit_models.models.dit import DiT

pytestmark = pytest.mark.skipif(not dk.HAS_EXT, reason="dit_kernels extension not built")

N, T, D = 2, 6, 40

# torch's fused attention kernels (flash / memory-efficient, CPU and CUDA) have no forward-AD formula; the math
# backend does. Every JVP through a whole network runs under this (README: forward-mode AD).
MATH_ATTENTION = SDPBackend.MATH


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _mods(k, dtype=torch.float32, seed=1):
    """k strided (N, D) views of one (N, 6D) adaLN output, as the models pass them."""
    return (0.3 * _randn(N, 6 * D, dtype=dtype, seed=seed)).chunk(6, dim=1)[:k]


def _ids(seed=2):
    return dk.random_token_mask(N, T, 4, generator=torch.Generator().manual_seed(seed))[0]


# (name, fused fn, reference fn, primals): every fused op, the kernel path against its reference.
def _cases():
    x, y = _randn(N, T, D), _randn(N, T, D, seed=3)
    gate, shift, scale = _mods(3)
    img = _randn(N, 3, 4, 6, seed=4)
    tok = _randn(N, 6, 16, seed=5)
    kept = _randn(N, 4, D, seed=6)
    fill = _randn(D, seed=7)
    ids = _ids()
    return [
        ("modulated_layer_norm", lambda x, s, c: dk.modulated_layer_norm(x, s, c),
         lambda x, s, c: dk.modulated_layer_norm_ref(x, s, c), (x, shift, scale)),
        ("gated_residual", dk.gated_residual, dk.gated_residual_ref, (x, y, gate)),
        ("gated_residual_modulated_layer_norm", dk.gated_residual_modulated_layer_norm,
         dk.gated_residual_modulated_layer_norm_ref, (x, y, gate, shift, scale)),
        ("patchify", lambda a: dk.patchify(a, 2), lambda a: dk.patchify_ref(a, 2), (img,)),
        ("unpatchify", lambda a: dk.unpatchify(a, 2, 4, 6, channels=3),
         lambda a: dk.unpatchify_ref(a, 2, 4, 6, channels=3), (tok,)),
        ("gather_tokens", lambda a: dk.gather_tokens(a, ids), lambda a: dk.gather_tokens_ref(a, ids), (x,)),
        ("scatter_tokens", lambda k, f: dk.scatter_tokens(k, ids, f, T),
         lambda k, f: dk.scatter_tokens_ref(k, ids, f, T), (kept, fill)),
    ]


CASES = {c[0]: c for c in _cases()}


def _tangents(primals, seed=10):
    return tuple(_randn(*p.shape, dtype=p.dtype, seed=seed + i) for i, p in enumerate(primals))


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(CASES))
def test_op_jvp_matches_reference(name):
    _, fused, ref, primals = CASES[name]
    tangents = _tangents(primals)
    p_fused, t_fused = torch.func.jvp(fused, primals, tangents)
    p_ref, t_ref = torch.func.jvp(ref, primals, tangents)
    plain = fused(*primals)
    for a, b, c in zip(_flat(p_fused), _flat(p_ref), _flat(plain)):
        assert torch.equal(a, c), f"{name}: jvp's primal differs from the plain kernel call"
        assert_close(a, b, 1e-5, 1e-5, f"{name} primal")
    for a, b in zip(_flat(t_fused), _flat(t_ref)):
        assert_close(a, b, 1e-5, 1e-5, f"{name} tangent")


@pytest.mark.parametrize("name", ["modulated_layer_norm", "gated_residual_modulated_layer_norm", "scatter_tokens"])
def test_op_forward_ad_gradcheck(name):
    """float64 forward AD against finite differences (kernel path)."""
    _, fused, _, primals = CASES[name]
    inputs = tuple(p.double().requires_grad_() for p in primals)
    assert torch.autograd.gradcheck(fused, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def test_partial_tangents_and_branch_dtype():
    """Tangents on some inputs only (the others None inside jvp) and bf16 h beside an fp32 residual."""
    x, y = _randn(N, T, D), _randn(N, T, D, seed=3).bfloat16()
    gate, shift, scale = _mods(3)

    def fused(y, scale):
        return dk.gated_residual_modulated_layer_norm(x, y, gate, shift, scale)

    def ref(y, scale):
        return dk.gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale)

    tangents = (_randn(N, T, D, seed=11).bfloat16(), _randn(N, D, seed=12))
    (xn, h), (dxn, dh) = torch.func.jvp(fused, (y, scale), tangents)
    _, (dxn_ref, dh_ref) = torch.func.jvp(ref, (y, scale), tangents)
    assert dxn.dtype == torch.float32 and dh.dtype == torch.bfloat16
    assert_close(dxn, dxn_ref, 1e-5, 1e-5, "x_new tangent")
    assert_close(dh.float(), dh_ref.float(), 2e-2, 2e-2, "h tangent (bf16)")


def _tiny_dit(fused, depth=2):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                num_classes=10, learn_sigma=False, fused=fused).eval()  # eval: no label dropout
    with torch.no_grad():  # leave adaLN-Zero's zero init: every path must carry signal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _dit_inputs():
    x = _randn(2, 4, 8, 8, seed=20)
    t = torch.tensor([0.3, 0.8])
    y = torch.tensor([1, 7])
    return x, t, y, _randn(2, 4, 8, 8, seed=21)


def test_dit_jvp_fused_equals_plain():
    model = _tiny_dit(fused=True)
    x, t, y, v = _dit_inputs()
    outs = {}
    for fused in (True, False):
        model.fused = fused
        with sdpa_kernel(MATH_ATTENTION):
            outs[fused] = torch.func.jvp(lambda x, t: model(x, t, y), (x, t), (v, torch.ones_like(t)))
    assert_close(outs[True][0], outs[False][0], 1e-5, 1e-5, "primal")
    assert_close(outs[True][1], outs[False][1], 1e-4, 1e-4, "tangent")
    assert outs[True][1].abs().max() > 1e-3  # the tangent carries signal


def meanflow_loss(model, x, t, r, y, v):
    """MeanFlow-style loss: u(z, r, t) regressed on v - (t - r) du/dt (README example)."""
    z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * v  # noisy state (SiT convention)

    def u(z, t):
        return model(z, t, y)  # a one-time-argument network stands in for u(z, r, t)

    u_pred, dudt = torch.func.jvp(u, (z, t), (v - x, torch.ones_like(t)))
    target = (v - x) - (t - r)[:, None, None, None] * dudt
    return (u_pred - target.detach()).pow(2).mean()


def test_meanflow_loss_grads_fused_equal_plain():
    model = _tiny_dit(fused=True)
    x, t, y, v = _dit_inputs()
    r = torch.tensor([0.1, 0.5])
    grads = {}
    for fused in (True, False):
        model.fused = fused
        model.zero_grad()
        with sdpa_kernel(MATH_ATTENTION):
            loss = meanflow_loss(model, x, t, r, y, v)
        loss.backward()
        grads[fused] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for k in grads[True]:
        assert_close(grads[True][k], grads[False][k], 1e-4, 1e-4, k)


def test_compiled_jvp_matches_eager():
    """torch.compile of torch.func.jvp through a fused DiT (the ops take their reference formulas there)."""
    model = _tiny_dit(fused=True, depth=1)  # one block: tracing time grows with depth
    x, t, y, v = _dit_inputs()

    def jvp(x, t, v):
        with sdpa_kernel(MATH_ATTENTION):
            return torch.func.jvp(lambda x, t: model(x, t, y), (x, t), (v, torch.ones_like(t)))

    torch._dynamo.reset()
    out, tangent = torch.compile(jvp, fullgraph=True, backend="eager")(x, t, v)
    out_ref, tangent_ref = jvp(x, t, v)
    assert_close(out, out_ref, 1e-5, 1e-5, "primal")
    assert_close(tangent, tangent_ref, 1e-4, 1e-4, "tangent")
    assert tangent.abs().max() > 1e-3
