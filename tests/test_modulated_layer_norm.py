"""modulated_layer_norm: compiled op vs modulated_layer_norm_ref."""
import pytest
import torch

import dit_kernels as dk
from dit_kernels._checks import per_sample
from conftest import TOLERANCES, assert_close, assert_lowp_close, devices, needs_cuda

pytestmark = pytest.mark.skipif(not dk.HAS_EXT, reason="dit_kernels extension not built")



OP = torch.ops.dit_kernels.modulated_layer_norm
LOWP = (torch.float16, torch.bfloat16)
SHAPES = [(2, 16, 384), (1, 97, 59), (3, 1, 1000)]  # (N, T, D): registry width, odd D + T, T = 1


def make_inputs(shape, dtype, device, mod_dtype=None, seed=0):
    """x (N, T, D) and (shift, scale) as strided views of one (N, 6D) adaLN output (row stride 6D)."""
    n, t, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g).to(device, dtype)
    m = (0.1 * torch.randn(n, 6 * d, generator=g)).to(device, mod_dtype or dtype)
    shift, scale = m.chunk(6, dim=1)[:2]  # (N, D) views, stride (6D, 1)
    return x, shift, scale


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def grads_of(fn, inputs, grad_out):
    """Gradients of fn(*inputs) w.r.t. inputs for the upstream gradient grad_out."""
    out = fn(*inputs)
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", devices())
def test_forward(device, dtype, shape):
    x, shift, scale = make_inputs(shape, dtype, device)
    y = dk.modulated_layer_norm(x, shift, scale, impl="ext")
    assert y.dtype == dtype and y.shape == x.shape
    ref32 = dk.modulated_layer_norm_ref(x.float(), shift.float(), scale.float()).to(dtype)
    if dtype == torch.float32:
        atol, rtol = TOLERANCES[dtype][:2]
        assert_close(y, ref32, atol, rtol, "y")
    else:
        ref32 = dk.modulated_layer_norm_ref(x.float(), shift.float(), scale.float())
        ref_lowp = dk.modulated_layer_norm_ref(x, shift, scale, upcast=False)
        assert_lowp_close(y, ref32, ref_lowp, TOLERANCES[dtype][0], "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", devices())
def test_backward(device, dtype):
    shape = (2, 33, 59)
    x, shift, scale = make_inputs(shape, dtype, device)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = grads_of(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x, shift, scale), grad_y)
    f32 = [t.float() for t in (x, shift, scale)]
    ref32 = grads_of(dk.modulated_layer_norm_ref, leaves(*f32), grad_y.float())
    for name, a, b in zip(("dx", "dshift", "dscale"), got, (ref32)):
        assert a.dtype == dtype
        if dtype == torch.float32:
            assert_close(a, b, *TOLERANCES[dtype][2:], name)
    if dtype in LOWP:
        ref_lowp = grads_of(lambda *a: dk.modulated_layer_norm_ref(*a, upcast=False), leaves(x, shift, scale), grad_y)
        for name, a, b, c in zip(("dx", "dshift", "dscale"), got, ref32, ref_lowp):
            assert_lowp_close(a, b, c, TOLERANCES[dtype][2], name)


@pytest.mark.parametrize("device", devices())
def test_registry_widths(device):
    """D of DiT-S/B/L/XL (1152 is neither a power of two nor a multiple of 256): fp32 forward and backward."""
    for d in (384, 768, 1024, 1152):
        x, shift, scale = make_inputs((2, 5, d), torch.float32, device, seed=d)
        g = torch.randn_like(x)
        got = grads_of(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x, shift, scale), g)
        want = grads_of(dk.modulated_layer_norm_ref, leaves(x, shift, scale), g)
        assert_close(dk.modulated_layer_norm(x, shift, scale, impl="ext"), dk.modulated_layer_norm_ref(x, shift, scale),
                     *TOLERANCES[torch.float32][:2], f"y D={d}")
        for name, a, b in zip(("dx", "dshift", "dscale"), got, want):
            assert_close(a, b, *TOLERANCES[torch.float32][2:], f"{name} D={d}")


@pytest.mark.parametrize("device", devices())
def test_mixed_dtype_and_shared_modulation(device):
    """bf16 x with fp32 (N, D) views, and shared (D,) modulation: y in x.dtype, grads in the modulation dtype."""
    shape = (2, 9, 59)
    x, shift, scale = make_inputs(shape, torch.bfloat16, device, mod_dtype=torch.float32)
    grad_y = torch.randn(shape).to(device, torch.bfloat16)
    xs = leaves(x, shift, scale)
    y = dk.modulated_layer_norm(*xs, impl="ext")
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y, xs, grad_y)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    ref_in = leaves(x.float(), shift, scale)
    ref_y = dk.modulated_layer_norm_ref(*ref_in)
    ref = torch.autograd.grad(ref_y, ref_in, grad_y.float())
    ref_lowp = grads_of(lambda *a: dk.modulated_layer_norm_ref(*a, upcast=False), leaves(x, shift.bfloat16(), scale.bfloat16()), grad_y)
    assert_lowp_close(y, ref_y, dk.modulated_layer_norm_ref(x, shift.bfloat16(), scale.bfloat16(), upcast=False), 5e-2, "y")
    for name, a, b, c in zip(("dx", "dshift", "dscale"), got, ref, ref_lowp):
        assert_lowp_close(a, b, c, TOLERANCES[torch.bfloat16][2], name)

    # Shared (D,) modulation in fp32: grads are summed over every (n, t) row.
    x, shift, scale = make_inputs(shape, torch.float32, device)
    shift1, scale1 = shift[0].clone(), scale[0].clone()
    got = grads_of(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x, shift1, scale1), grad_y.float())
    ref = grads_of(dk.modulated_layer_norm_ref, leaves(x, shift1, scale1), grad_y.float())
    for name, a, b in zip(("dx", "dshift", "dscale"), got, ref):
        assert a.shape == b.shape
        assert_close(a, b, *TOLERANCES[torch.float32][2:], name)


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    """The raw op reads chunk(6) views (row stride 6D) and x with padded rows as they are."""
    x, shift, scale = make_inputs((2, 5, 59), torch.float32, device)
    assert shift.stride() == (6 * 59, 1) and not shift.is_contiguous()
    # The wrapper hands such views to the op as they are (no copy).
    assert per_sample("shift", shift, 2, 59).data_ptr() == shift.data_ptr()
    assert per_sample("shift", shift[0], 2, 59).stride() == (0, 1)
    x_pad = torch.randn(2, 5, 64, device=device)
    x_pad[..., :59] = x
    x_view = x_pad[..., :59]  # (N, T, D) rows of stride 64: not contiguous
    ref = dk.modulated_layer_norm_ref(x, shift, scale)
    y, mean, rstd = OP(x_view, shift, scale, 1e-6)
    assert_close(y, ref, *TOLERANCES[torch.float32][:2], "y (strided x)")
    assert_close(mean, x.mean(-1), 1e-6, 1e-5, "mean")
    assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-6), 1e-5, 1e-5, "rstd")
    # x with a non-unit inner stride goes through the public wrapper (one copy there).
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert_close(dk.modulated_layer_norm(xt, shift, scale, impl="ext"), ref, *TOLERANCES[torch.float32][:2], "y (x.T)")
    # Strided backward: dx, dshift, dscale from the same views.
    g = torch.randn_like(x)
    got = grads_of(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x_view, shift, scale), g)
    want = grads_of(dk.modulated_layer_norm_ref, leaves(x, shift, scale), g)
    for name, a, b in zip(("dx", "dshift", "dscale"), got, want):
        assert_close(a, b, *TOLERANCES[torch.float32][2:], name)


def test_gradcheck():
    fn = lambda *a: dk.modulated_layer_norm(*a, impl="ext")  # noqa: E731
    x, shift, scale = make_inputs((2, 3, 7), torch.float64, "cpu", seed=0)
    assert torch.autograd.gradcheck(fn, leaves(x, shift, scale))
    x, shift, scale = make_inputs((2, 3, 5), torch.float64, "cpu", seed=1)
    assert torch.autograd.gradcheck(fn, leaves(x, shift[0], scale[0]))  # shared (D,)


@needs_cuda
def test_gradcheck_cuda():
    x, shift, scale = make_inputs((2, 3, 7), torch.float64, "cuda")
    assert torch.autograd.gradcheck(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x, shift, scale))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, shift, scale = make_inputs((2, 5, 59), torch.float32, device)
    torch.library.opcheck(OP, (*leaves(x, shift, scale), 1e-6))
    torch.library.opcheck(OP, (x, shift, scale, 1e-6))
    _, mean, rstd = OP(x, shift, scale, 1e-6)
    torch.library.opcheck(torch.ops.dit_kernels._modulated_layer_norm_backward, (torch.randn_like(x), x, scale, mean, rstd))


def test_compile():
    """torch.compile(fullgraph=True) of a function using the public op: forward and backward match eager."""
    x, shift, scale = make_inputs((2, 8, 64), torch.float32, "cpu")

    def fn(x, shift, scale):
        return dk.modulated_layer_norm(x, shift, scale, impl="ext").square().sum(-1)

    eager_in, comp_in = leaves(x, shift, scale), leaves(x, shift, scale)
    out_e = fn(*eager_in)
    out_c = torch.compile(fn, fullgraph=True)(*comp_in)
    assert_close(out_c, out_e, 1e-5, 1e-5, "compiled y")
    g = torch.randn_like(out_e)
    for name, a, b in zip(("dx", "dshift", "dscale"), torch.autograd.grad(out_c, comp_in, g), torch.autograd.grad(out_e, eager_in, g)):
        assert_close(a, b, 1e-5, 1e-5, name)


@pytest.mark.parametrize("device", devices())
def test_backward_deterministic(device, num_threads):
    """Two runs are bit-identical, and (CPU) so are runs on 1 and on several threads."""
    x, shift, scale = make_inputs((3, 64, 384), torch.float32, device)
    g = torch.randn_like(x)
    runs = []
    for threads in (1, max(2, num_threads), max(2, num_threads)):
        torch.set_num_threads(threads)
        runs.append(grads_of(lambda *a: dk.modulated_layer_norm(*a, impl="ext"), leaves(x, shift, scale), g))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
def test_empty(device):
    for shape in [(0, 4, 8), (2, 0, 8)]:
        x, shift, scale = make_inputs(shape, torch.float32, device)
        xs = leaves(x, shift, scale)
        y = dk.modulated_layer_norm(*xs, impl="ext")
        assert y.shape == shape
        dx, dshift, dscale = torch.autograd.grad(y.sum(), xs)
        assert dx.shape == shape and dshift.shape == (shape[0], 8)
        assert not dshift.any() and not dscale.any()


def test_bad_inputs():
    x, shift, scale = make_inputs((2, 4, 8), torch.float32, "cpu")
    mln = dk.modulated_layer_norm
    with pytest.raises(ValueError, match="x must have shape"):
        mln(x[0], shift, scale, impl="ext")
    with pytest.raises(ValueError, match="shift must have shape"):
        mln(x, shift[:, :7], scale, impl="ext")
    with pytest.raises(ValueError, match="scale must have shape"):
        mln(x, shift, torch.zeros(3, 8), impl="ext")
    with pytest.raises(TypeError, match="float32"):
        mln(x.long(), shift, scale, impl="ext")
    with pytest.raises(ValueError, match="one device"):
        mln(x, shift.to("meta"), scale, impl="ext")
    # The raw op checks too (C++ TORCH_CHECK -> RuntimeError).
    with pytest.raises(RuntimeError, match="shift must have shape"):
        OP(x, torch.zeros(3, 8), scale, 1e-6)
    with pytest.raises(RuntimeError, match="must be float32"):
        OP(x.int(), shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match="modulation dtype"):
        OP(x.half(), shift.bfloat16(), scale.bfloat16(), 1e-6)


def test_impl_dispatch():
    """impl='ext' raises without a kernel for the device (meta); impl='ref' runs anywhere."""
    x, shift, scale = (t.to("meta") for t in make_inputs((2, 4, 8), torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        dk.modulated_layer_norm(x, shift, scale, impl="ext")
    assert dk.modulated_layer_norm(x, shift, scale, impl="ref").shape == (2, 4, 8)
    assert dk.modulated_layer_norm(x, shift, scale, impl="auto").device.type == "meta"
    with pytest.raises(ValueError, match="impl must be"):
        dk.modulated_layer_norm(x, shift, scale, impl="cuda")


def test_double_backward_raises():
    x, shift, scale = leaves(*make_inputs((2, 3, 8), torch.float64, "cpu"))
    (dx,) = torch.autograd.grad(dk.modulated_layer_norm(x, shift, scale, impl="ext").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()
