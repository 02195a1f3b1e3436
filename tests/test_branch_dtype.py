"""Branch dtype of the adaLN ops: an fp32 residual stream x with fp16/bf16 y, h and their grads
(the layout of bf16 autocast training; csrc/common.h DIT_DISPATCH_BRANCH_TYPES).

The mixed kernels must compute exactly what the fp32 kernels compute on the upcast branch tensors,
rounded once to the branch dtype: that is checked bit for bit (same fp32 arithmetic, one rounding),
which also pins the semantics against the references.
"""
import pytest
import torch

import dit_kernels as dk
from conftest import TOLERANCES, assert_close, devices

pytestmark = pytest.mark.skipif(not dk.HAS_EXT, reason="dit_kernels extension not built")

OPS = torch.ops.dit_kernels
BRANCH = [torch.bfloat16, torch.float16]
SHAPES = [(2, 16, 384), (1, 7, 59)]  # vectorised width and an odd width (scalar path on CUDA)


def make_inputs(shape, branch, device, seed=0):
    """x fp32 (N, T, D); y (N, T, D) in the branch dtype; gate, shift, scale fp32 strided (N, D) views."""
    n, t, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g).to(device)
    y = torch.randn(n, t, d, generator=g).to(device, branch)
    m = (0.1 * torch.randn(n, 6 * d, generator=g)).to(device)
    _, _, gate, shift, scale, _ = m.chunk(6, dim=1)
    return x, y, gate, shift, scale


def grads(fn, inputs, grad_outs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, inputs, grad_outs)


def assert_same(a, b, name):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
    assert torch.equal(a, b), f"{name}: max diff {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("branch", BRANCH)
@pytest.mark.parametrize("device", devices())
def test_modulated_layer_norm_out_dtype(device, branch, shape):
    x, _, _, shift, scale = make_inputs(shape, branch, device)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(shape, generator=g).to(device, branch)

    (y,), (dx, dshift, dscale) = grads(
        lambda a, b, c: dk.modulated_layer_norm(a, b, c, out_dtype=branch, impl="ext"), (x, shift, scale), (dy,)
    )
    (y32,), (dx32, dshift32, dscale32) = grads(
        lambda a, b, c: dk.modulated_layer_norm(a, b, c, impl="ext"), (x, shift, scale), (dy.float(),)
    )
    assert_same(y, y32.to(branch), "y")
    for name, a, b in (("dx", dx, dx32), ("dshift", dshift, dshift32), ("dscale", dscale, dscale32)):
        assert_same(a, b, name)
    # and the reference agrees within the branch dtype's rounding
    assert_close(y, dk.modulated_layer_norm_ref(x, shift, scale, out_dtype=branch), *TOLERANCES[branch][:2], "y vs ref")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("branch", BRANCH)
@pytest.mark.parametrize("device", devices())
def test_gated_residual_branch(device, branch, shape):
    x, y, gate, _, _ = make_inputs(shape, branch, device)
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(shape, generator=g).to(device)

    (out,), (dx, dy, dgate) = grads(lambda a, b, c: dk.gated_residual(a, b, c, impl="ext"), (x, y, gate), (dout,))
    (out32,), (dx32, dy32, dgate32) = grads(
        lambda a, b, c: dk.gated_residual(a, b, c, impl="ext"), (x, y.float(), gate), (dout,)
    )
    assert out.dtype == torch.float32 and dy.dtype == branch
    assert_same(out, out32, "out")
    assert_same(dx, dx32, "dx")
    assert_same(dy, dy32.to(branch), "dy")
    assert_same(dgate, dgate32, "dgate")
    assert_close(out, dk.gated_residual_ref(x, y, gate), *TOLERANCES[torch.float32][:2], "out vs ref")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("branch", BRANCH)
@pytest.mark.parametrize("device", devices())
def test_fused_branch(device, branch, shape):
    x, y, gate, shift, scale = make_inputs(shape, branch, device)
    g = torch.Generator().manual_seed(5)
    dxn = torch.randn(shape, generator=g).to(device)
    dh = torch.randn(shape, generator=g).to(device, branch)

    fn = lambda *a: dk.gated_residual_modulated_layer_norm(*a, impl="ext")  # noqa: E731
    (x_new, h), grads_mixed = grads(fn, (x, y, gate, shift, scale), (dxn, dh))
    (x_new32, h32), grads32 = grads(fn, (x, y.float(), gate, shift, scale), (dxn, dh.float()))
    assert x_new.dtype == torch.float32 and h.dtype == branch
    assert_same(x_new, x_new32, "x_new")
    assert_same(h, h32.to(branch), "h")
    for name, a, b in zip(("dx", "dy", "dgate", "dshift", "dscale"), grads_mixed, grads32):
        assert_same(a, b.to(a.dtype), name)
    assert grads_mixed[1].dtype == branch

    x_ref, h_ref = dk.gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale)
    assert h_ref.dtype == branch
    assert_close(x_new, x_ref, *TOLERANCES[torch.float32][:2], "x_new vs ref")
    assert_close(h, h_ref, *TOLERANCES[branch][:2], "h vs ref")


@pytest.mark.parametrize("device", devices())
def test_fused_branch_one_grad(device):
    """Only h (or only x_new) used downstream: the absent gradient is None inside the op."""
    x, y, gate, shift, scale = make_inputs((2, 5, 64), torch.bfloat16, device)
    for use in ("h", "x_new"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        x_new, h = dk.gated_residual_modulated_layer_norm(*leaves, impl="ext")
        ((h.float() if use == "h" else x_new) ** 2).sum().backward()
        ref = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        x_new_r, h_r = dk.gated_residual_modulated_layer_norm(ref[0], ref[1].float(), *ref[2:], impl="ext")
        ((h_r.to(torch.bfloat16).float() if use == "h" else x_new_r) ** 2).sum().backward()
        for a, b in zip(leaves, ref):
            assert_close(a.grad, b.grad.to(a.grad.dtype), *TOLERANCES[a.grad.dtype][2:], f"{use}: grad")


@pytest.mark.parametrize("device", devices())
def test_opcheck_branch(device):
    x, y, gate, shift, scale = make_inputs((2, 3, 64), torch.bfloat16, device)
    x.requires_grad_()
    y.requires_grad_()
    torch.library.opcheck(OPS.gated_residual, (x, y, gate))
    torch.library.opcheck(OPS.gated_residual_modulated_layer_norm, (x, y, gate, shift, scale, 1e-6))
    torch.library.opcheck(OPS.modulated_layer_norm, (x, shift, scale, 1e-6, torch.bfloat16))


def test_compile_branch():
    """fullgraph compile of an autocast-style half block with bf16 branch tensors."""
    x, y, gate, shift, scale = make_inputs((2, 4, 32), torch.bfloat16, "cpu")

    def half_block(x, y, gate, shift, scale):
        h = dk.modulated_layer_norm(x, shift, scale, out_dtype=torch.bfloat16)
        x, h = dk.gated_residual_modulated_layer_norm(x, y * h, gate, shift, scale)
        return dk.gated_residual(x, h, gate)

    args = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    want = half_block(*args)
    want.sum().backward()
    want_grads = [a.grad for a in args]
    args2 = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    got = torch.compile(half_block, fullgraph=True, backend="aot_eager")(*args2)
    got.sum().backward()
    assert_same(got, want, "out")
    for a, b in zip(args2, want_grads):
        assert_same(a.grad, b, "grad")


def test_bad_branch_dtypes():
    x, y, gate, shift, scale = make_inputs((2, 3, 8), torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        dk.gated_residual(x.bfloat16(), y.half(), gate)  # half branch needs an fp32 x
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        dk.gated_residual_modulated_layer_norm(x.double(), y, gate.double(), shift.double(), scale.double())
    with pytest.raises(TypeError, match="out_dtype"):
        dk.modulated_layer_norm(x.bfloat16(), shift, scale, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        dk.modulated_layer_norm(x, shift, scale, out_dtype=torch.int32)
    # The C++ checks hold for direct op calls too (clear errors, no garbage).
    with pytest.raises(RuntimeError, match="modulation must be float32"):
        OPS.gated_residual(x, y, gate.bfloat16())
    with pytest.raises(RuntimeError, match="branch dtype"):  # empty tensors follow the same rule
        OPS.gated_residual(x[:, :0].half(), y[:, :0], gate.half())
    with pytest.raises(RuntimeError, match="branch"):
        OPS.gated_residual(x.half(), y, gate.half())
    with pytest.raises(RuntimeError, match="branch"):
        OPS._gated_residual_backward(x.bfloat16(), y.float(), gate)
    with pytest.raises(RuntimeError, match="branch"):
        OPS.modulated_layer_norm(x.bfloat16(), shift, scale, 1e-6, torch.float16)
