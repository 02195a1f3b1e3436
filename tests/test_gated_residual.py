"""gated_residual and gated_residual_modulated_layer_norm: compiled ops vs their references."""
import pytest
import torch

import dit_kernels as dk
from conftest import TOLERANCES, assert_close, assert_lowp_close, devices, needs_cuda

pytestmark = pytest.mark.skipif(not dk.HAS_EXT, reason="dit_kernels extension not built")



OPS = torch.ops.dit_kernels
LOWP = (torch.float16, torch.bfloat16)
SHAPES = [(2, 16, 384), (1, 97, 59), (3, 1, 1000)]  # (N, T, D): registry width, odd D + T, T = 1
GR_NAMES = ("dx", "dy", "dgate")
FUSED_NAMES = ("dx", "dy", "dgate", "dshift", "dscale")


def make_inputs(shape, dtype, device, mod_dtype=None, seed=0):
    """x, y (N, T, D) and (gate, shift, scale) as strided views of one (N, 6D) adaLN output."""
    n, t, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g).to(device, dtype)
    y = torch.randn(n, t, d, generator=g).to(device, dtype)
    m = (0.1 * torch.randn(n, 6 * d, generator=g)).to(device, mod_dtype or dtype)
    _, _, gate, shift, scale, _ = m.chunk(6, dim=1)  # (N, D) views, stride (6D, 1)
    return x, y, gate, shift, scale


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def gr(x, y, gate, shift=None, scale=None, impl="ext"):
    return dk.gated_residual(x, y, gate, impl=impl)


def fused(x, y, gate, shift, scale, impl="ext"):
    return dk.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, impl=impl)


def fused_ref(*a, upcast=True):
    return dk.gated_residual_modulated_layer_norm_ref(*a, upcast=upcast)


def run(fn, inputs, grad_outs):
    """Outputs of fn(*inputs) and the gradients w.r.t. inputs for the upstream grads grad_outs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, inputs, grad_outs)


def upstream(shape, dtype, device, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(device, dtype) for _ in range(k))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", devices())
def test_forward(device, dtype, shape):
    x, y, gate, shift, scale = make_inputs(shape, dtype, device)
    out = dk.gated_residual(x, y, gate, impl="ext")
    x_new, h = fused(x, y, gate, shift, scale)
    assert out.dtype == x_new.dtype == h.dtype == dtype
    f32 = [t.float() for t in (x, y, gate, shift, scale)]
    want = (dk.gated_residual_ref(*f32[:3]), *fused_ref(*f32))
    if dtype == torch.float32:
        for name, a, b in zip(("out", "x_new", "h"), (out, x_new, h), want):
            assert_close(a, b, *TOLERANCES[dtype][:2], name)
        # x_new is the same rounding of x + gate*y in both ops.
        assert torch.equal(out, x_new)
    else:
        lowp = (dk.gated_residual_ref(x, y, gate, upcast=False), *fused_ref(x, y, gate, shift, scale, upcast=False))
        for name, a, b, c in zip(("out", "x_new", "h"), (out, x_new, h), want, lowp):
            assert_lowp_close(a, b, c, TOLERANCES[dtype][0], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", devices())
def test_backward(device, dtype):
    shape = (2, 33, 59)
    inputs = make_inputs(shape, dtype, device)
    f32 = [t.float() for t in inputs]
    go = upstream(shape, dtype, device, 2)
    cases = [
        ("gated_residual", gr, dk.gated_residual_ref, 3, GR_NAMES, go[:1]),
        ("fused", fused, fused_ref, 5, FUSED_NAMES, go),
    ]
    for op, fn, ref_fn, k, names, grad_outs in cases:
        _, got = run(fn, leaves(*inputs[:k]), grad_outs)
        _, ref32 = run(ref_fn, leaves(*f32[:k]), tuple(g.float() for g in grad_outs))
        if dtype == torch.float32:
            for name, a, b in zip(names, got, ref32):
                assert_close(a, b, *TOLERANCES[dtype][2:], f"{op} {name}")
        else:
            _, ref_lowp = run(lambda *a: ref_fn(*a, upcast=False), leaves(*inputs[:k]), grad_outs)
            for name, a, b, c in zip(names, got, ref32, ref_lowp):
                assert a.dtype == dtype
                assert_lowp_close(a, b, c, TOLERANCES[dtype][2], f"{op} {name}")


@pytest.mark.parametrize("device", devices())
def test_registry_widths(device):
    """D of DiT-S/B/L/XL (1152 is neither a power of two nor a multiple of 256): fp32 forward and backward."""
    for d in (384, 768, 1024, 1152):
        shape = (2, 5, d)
        inputs = make_inputs(shape, torch.float32, device, seed=d)
        go = upstream(shape, torch.float32, device, 2)
        for k, fn, ref_fn, names in ((3, gr, dk.gated_residual_ref, GR_NAMES), (5, fused, fused_ref, FUSED_NAMES)):
            outs, got = run(fn, leaves(*inputs[:k]), go[: k // 2])
            ref_outs, want = run(ref_fn, leaves(*inputs[:k]), go[: k // 2])
            for name, a, b in zip(("out",) * len(outs), outs, ref_outs):
                assert_close(a, b, *TOLERANCES[torch.float32][:2], f"{name} D={d}")
            for name, a, b in zip(names, got, want):
                assert_close(a, b, *TOLERANCES[torch.float32][2:], f"{name} D={d}")


@pytest.mark.parametrize("device", devices())
def test_mixed_dtype_and_shared_modulation(device):
    """bf16 activations with fp32 (N, D) views; shared (D,) modulation sums grads over all rows."""
    shape = (2, 9, 59)
    x, y, gate, shift, scale = make_inputs(shape, torch.bfloat16, device, mod_dtype=torch.float32)
    go = upstream(shape, torch.bfloat16, device, 2)
    outs, got = run(fused, leaves(x, y, gate, shift, scale), go)
    assert [t.dtype for t in outs] == [torch.bfloat16] * 2
    assert [t.dtype for t in got] == [torch.bfloat16] * 2 + [torch.float32] * 3
    ref_outs, ref32 = run(fused_ref, leaves(x.float(), y.float(), gate, shift, scale), tuple(g.float() for g in go))
    low = [x, y, gate.bfloat16(), shift.bfloat16(), scale.bfloat16()]
    low_outs, ref_lowp = run(lambda *a: fused_ref(*a, upcast=False), leaves(*low), go)
    for name, a, b, c in zip(("x_new", "h") + FUSED_NAMES, outs + got, ref_outs + ref32, low_outs + ref_lowp):
        assert_lowp_close(a, b, c, TOLERANCES[torch.bfloat16][2], name)
    out = dk.gated_residual(x, y, gate, impl="ext")
    assert out.dtype == torch.bfloat16
    assert_lowp_close(out, dk.gated_residual_ref(x.float(), y.float(), gate), dk.gated_residual_ref(x, y, gate.bfloat16(), upcast=False), 5e-2, "out")

    x, y, gate, shift, scale = make_inputs(shape, torch.float32, device)
    shared = [t[0].clone() for t in (gate, shift, scale)]  # (D,)
    go = upstream(shape, torch.float32, device, 2)
    for k, fn, ref_fn, names in ((3, gr, dk.gated_residual_ref, GR_NAMES), (5, fused, fused_ref, FUSED_NAMES)):
        outs, got = run(fn, leaves(x, y, *shared[: k - 2]), go[: k // 2])
        ref_outs, want = run(ref_fn, leaves(x, y, *shared[: k - 2]), go[: k // 2])
        for name, a, b in zip(("out",) * len(outs) + names, outs + got, ref_outs + want):
            assert a.shape == b.shape
            assert_close(a, b, *TOLERANCES[torch.float32][2:], name)


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    """Raw ops read chunk(6) views and padded (N, T, D) rows as they are, forward and backward."""
    shape = (2, 5, 59)
    x, y, gate, shift, scale = make_inputs(shape, torch.float32, device)
    assert gate.stride() == (6 * 59, 1)

    def padded(t):
        buf = torch.zeros(2, 5, 64, device=device)
        buf[..., :59] = t
        return buf[..., :59]  # rows of stride 64: not contiguous

    xp, yp = padded(x), padded(y)
    tol = TOLERANCES[torch.float32]
    assert_close(OPS.gated_residual(xp, yp, gate), dk.gated_residual_ref(x, y, gate), *tol[:2], "out")
    x_new, h, _, _ = OPS.gated_residual_modulated_layer_norm(xp, yp, gate, shift, scale, 1e-6)
    want = fused_ref(x, y, gate, shift, scale)
    assert_close(x_new, want[0], *tol[:2], "x_new")
    assert_close(h, want[1], *tol[:2], "h")
    go = upstream(shape, torch.float32, device, 2)
    _, got = run(fused, leaves(xp, yp, gate, shift, scale), tuple(padded(g) for g in go))
    _, ref = run(fused_ref, leaves(x, y, gate, shift, scale), go)
    for name, a, b in zip(FUSED_NAMES, got, ref):
        assert_close(a, b, *tol[2:], name)
    # Non-unit inner stride goes through the public wrapper (one copy there).
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert_close(dk.gated_residual(xt, y, gate, impl="ext"), dk.gated_residual_ref(x, y, gate), *tol[:2], "out (x.T)")


@pytest.mark.parametrize("device", devices())
def test_backward_none_grads(device):
    """The fused backward op takes None for an unused output's gradient (same as zeros)."""
    x, y, gate, shift, scale = make_inputs((2, 7, 59), torch.float32, device)
    x_new, _, mean, rstd = OPS.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, 1e-6)
    g = torch.randn_like(x)
    bwd = OPS._gated_residual_modulated_layer_norm_backward
    for args in ((None, g), (g, None), (None, None)):
        zeros = tuple(torch.zeros_like(x) if a is None else a for a in args)
        got = bwd(*args, x_new, y, gate, scale, mean, rstd)
        want = bwd(*zeros, x_new, y, gate, scale, mean, rstd)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    # Only h used: autograd through the public op still matches the reference.
    _, got = run(lambda *a: fused(*a)[1], leaves(x, y, gate, shift, scale), (g,))
    _, want = run(lambda *a: fused_ref(*a)[1], leaves(x, y, gate, shift, scale), (g,))
    for name, a, b in zip(FUSED_NAMES, got, want):
        assert_close(a, b, *TOLERANCES[torch.float32][2:], name)


def test_gradcheck():
    x, y, gate, shift, scale = make_inputs((2, 3, 7), torch.float64, "cpu", seed=0)
    assert torch.autograd.gradcheck(gr, leaves(x, y, gate))
    assert torch.autograd.gradcheck(fused, leaves(x, y, gate, shift, scale))
    x, y, gate, shift, scale = make_inputs((2, 3, 5), torch.float64, "cpu", seed=1)
    assert torch.autograd.gradcheck(fused, leaves(x, y, gate[0], shift[0], scale[0]))  # shared (D,)


@needs_cuda
def test_gradcheck_cuda():
    x, y, gate, shift, scale = make_inputs((2, 3, 7), torch.float64, "cuda")
    assert torch.autograd.gradcheck(gr, leaves(x, y, gate))
    assert torch.autograd.gradcheck(fused, leaves(x, y, gate, shift, scale))


@needs_cuda
def test_cpu_cuda_agree():
    """CUDA and CPU kernels agree (fp32, D = 1152), forward and backward; mixed devices raise."""
    shape = (2, 37, 1152)
    inputs = make_inputs(shape, torch.float32, "cpu")
    go = upstream(shape, torch.float32, "cpu", 2)
    outs_c, got_c = run(fused, leaves(*inputs), go)
    outs_g, got_g = run(fused, leaves(*(t.cuda() for t in inputs)), tuple(g.cuda() for g in go))
    for name, a, b in zip(("x_new", "h") + FUSED_NAMES, outs_g + got_g, outs_c + got_c):
        assert_close(a.cpu(), b, *TOLERANCES[torch.float32][2:], name)
    x, y, gate, shift, scale = inputs
    with pytest.raises(ValueError, match="one device"):
        fused(x.cuda(), y.cuda(), gate.cuda(), shift, scale.cuda())
    with pytest.raises(RuntimeError):
        OPS.gated_residual(x.cuda(), y.cuda(), gate)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, y, gate, shift, scale = make_inputs((2, 5, 59), torch.float32, device)
    torch.library.opcheck(OPS.gated_residual, tuple(leaves(x, y, gate)))
    torch.library.opcheck(OPS._gated_residual_backward, (torch.randn_like(x), y, gate))
    torch.library.opcheck(OPS.gated_residual_modulated_layer_norm, (*leaves(x, y, gate, shift, scale), 1e-6))
    x_new, _, mean, rstd = OPS.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, 1e-6)
    g = torch.randn_like(x)
    bwd = OPS._gated_residual_modulated_layer_norm_backward
    torch.library.opcheck(bwd, (g, g, x_new, y, gate, scale, mean, rstd))
    torch.library.opcheck(bwd, (None, g, x_new, y, gate, scale, mean, rstd))


def test_compile():
    """torch.compile(fullgraph=True) of a DiT half-block hand-off: forward and backward match eager."""
    x, y, gate, shift, scale = make_inputs((2, 8, 64), torch.float32, "cpu")
    g2 = torch.randn(2, 64)

    def fn(x, y, gate, shift, scale):
        x = dk.gated_residual(x, y, gate, impl="ext")
        x, h = dk.gated_residual_modulated_layer_norm(x, h_to_y(x), gate, shift, scale, impl="ext")
        return x + h * 0.5

    def h_to_y(x):
        return torch.tanh(x) * g2[:, None]

    eager_in, comp_in = leaves(x, y, gate, shift, scale), leaves(x, y, gate, shift, scale)
    out_e = fn(*eager_in)
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(*comp_in)
    assert_close(out_c, out_e, 1e-5, 1e-5, "compiled out")
    go = torch.randn_like(out_e)
    got, want = torch.autograd.grad(out_c, comp_in, go), torch.autograd.grad(out_e, eager_in, go)
    for name, a, b in zip(FUSED_NAMES, got, want):
        assert_close(a, b, 1e-5, 1e-5, name)


@pytest.mark.parametrize("device", devices())
def test_backward_deterministic(device, num_threads):
    """Two runs are bit-identical, and (CPU) so are runs on 1 and on several threads."""
    shape = (3, 64, 384)
    inputs = make_inputs(shape, torch.float32, device)
    go = upstream(shape, torch.float32, device, 2)
    for k, fn in ((3, gr), (5, fused)):
        runs = []
        for threads in (1, max(2, num_threads), max(2, num_threads)):
            torch.set_num_threads(threads)
            runs.append(run(fn, leaves(*inputs[:k]), go[: k // 2])[1])
        for other in runs[1:]:
            for u, v in zip(runs[0], other):
                assert torch.equal(u, v)


@pytest.mark.parametrize("device", devices())
def test_empty(device):
    for shape in [(0, 4, 8), (2, 0, 8)]:
        inputs = leaves(*make_inputs(shape, torch.float32, device))
        out = dk.gated_residual(*inputs[:3], impl="ext")
        x_new, h = fused(*inputs)
        assert out.shape == x_new.shape == h.shape == shape
        grads = torch.autograd.grad(out.sum() + x_new.sum() + h.sum(), inputs)
        assert [tuple(g.shape) for g in grads] == [shape, shape] + [(shape[0], 8)] * 3
        assert not any(g.any() for g in grads)


def test_bad_inputs():
    x, y, gate, shift, scale = make_inputs((2, 4, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must have shape"):
        dk.gated_residual(x[0], y[0], gate, impl="ext")
    with pytest.raises(ValueError, match="y must have the shape"):
        dk.gated_residual(x, y[:, :3], gate, impl="ext")
    with pytest.raises(ValueError, match="gate must have shape"):
        dk.gated_residual(x, y, gate[:, :7], impl="ext")
    with pytest.raises(ValueError, match="shift must have shape"):
        fused(x, y, gate, torch.zeros(3, 8), scale)
    with pytest.raises(TypeError, match="float32"):
        dk.gated_residual(x.long(), y.long(), gate, impl="ext")
    with pytest.raises(TypeError, match="dtype of x"):
        dk.gated_residual(x, y.double(), gate, impl="ext")
    with pytest.raises(ValueError, match="one device"):
        fused(x, y, gate, shift.to("meta"), scale)
    # Raw ops check too (C++ TORCH_CHECK -> RuntimeError).
    with pytest.raises(RuntimeError, match="gate must have shape"):
        OPS.gated_residual(x, y, torch.zeros(3, 8))
    with pytest.raises(RuntimeError, match="must be float32"):
        OPS.gated_residual(x.int(), y.int(), gate)
    with pytest.raises(RuntimeError, match="dtype of gate"):
        OPS.gated_residual_modulated_layer_norm(x, y, gate, shift.double(), scale, 1e-6)
    with pytest.raises(RuntimeError, match="modulation dtype"):
        OPS.gated_residual(x.half(), y.half(), gate.bfloat16())


def test_impl_dispatch():
    """impl='ext' raises without a kernel for the device (meta); impl='ref' runs anywhere."""
    x, y, gate, shift, scale = (t.to("meta") for t in make_inputs((2, 4, 8), torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        dk.gated_residual(x, y, gate, impl="ext")
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        fused(x, y, gate, shift, scale, impl="ext")
    assert dk.gated_residual(x, y, gate, impl="ref").shape == (2, 4, 8)
    assert fused(x, y, gate, shift, scale, impl="ref")[1].shape == (2, 4, 8)


def test_double_backward_raises():
    inputs = leaves(*make_inputs((2, 3, 8), torch.float64, "cpu"))
    for k, fn in ((3, gr), (5, fused)):
        out = fn(*inputs[:k])
        out = out if isinstance(out, tuple) else (out,)
        (dy,) = torch.autograd.grad(sum(o.square().sum() for o in out), inputs[1], create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            dy.sum().backward()
