"""patchify / unpatchify: compiled ops are exact permutations, bit-identical to the references."""
import pytest
import torch

import dit_kernels as dk
from conftest import devices, needs_cuda

pytestmark = pytest.mark.skipif(not dk.HAS_EXT, reason="dit_kernels extension not built")



OPS = torch.ops.dit_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, p): DiT latent, h != w, a 1 x 3 grid, p = 1, N = 1 with T = 48
IMAGES = [(2, 4, 8, 8, 2), (1, 3, 12, 8, 4), (2, 2, 2, 6, 2), (1, 5, 4, 3, 1), (1, 4, 16, 12, 2)]


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def tokens(n, c_all, hh, ww, p, **kw):
    """(N, T, p*p*C_all) tokens for an hh x ww image."""
    return randn(n, (hh // p) * (ww // p), p * p * c_all, **kw)


def leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", devices())
def test_forward_exact(device, dtype):
    for n, c, hh, ww, p in IMAGES:
        x = randn(n, c, hh, ww, dtype=dtype, device=device)
        out = dk.patchify(x, p, impl="ext")
        assert out.shape == (n, (hh // p) * (ww // p), c * p * p) and out.is_contiguous()
        assert torch.equal(out, dk.patchify_ref(x, p))
        y = tokens(n, 2 * c, hh, ww, p, dtype=dtype, device=device)
        for channels in (None, c, 1):  # all, the DiT learn_sigma half, one
            img = dk.unpatchify(y, p, hh, ww, channels, impl="ext")
            assert img.dtype == dtype and img.is_contiguous()
            assert torch.equal(img, dk.unpatchify_ref(y, p, hh, ww, channels))


@pytest.mark.parametrize("device", devices())
def test_conv_layout(device):
    """patchify matches Conv2d(k = s = p) features: P @ W.view(D, C*p*p).T == conv(x) flattened."""
    x = randn(2, 4, 8, 12, device=device, dtype=torch.float64)
    conv = torch.nn.Conv2d(4, 16, 2, stride=2, bias=False).to(device, torch.float64)
    want = conv(x).flatten(2).transpose(1, 2)  # (N, T, D)
    got = dk.patchify(x, 2, impl="ext") @ conv.weight.reshape(16, -1).T
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", devices())
def test_backward_exact(device):
    for n, c, hh, ww, p in IMAGES[:3]:
        x = randn(n, c, hh, ww, device=device)
        g = randn(n, (hh // p) * (ww // p), c * p * p, device=device, seed=1)
        xs = leaf(x)
        (got,) = torch.autograd.grad(dk.patchify(xs, p, impl="ext"), xs, g)
        xr = leaf(x)
        (want,) = torch.autograd.grad(dk.patchify_ref(xr, p), xr, g)
        assert torch.equal(got, want)

        y = tokens(n, 2 * c, hh, ww, p, device=device)
        gi = randn(n, c, hh, ww, device=device, seed=2)
        ys, yr = leaf(y), leaf(y)
        (got,) = torch.autograd.grad(dk.unpatchify(ys, p, hh, ww, c, impl="ext"), ys, gi)
        (want,) = torch.autograd.grad(dk.unpatchify_ref(yr, p, hh, ww, c), yr, gi)
        assert torch.equal(got, want)
        # Dropped channels (c >= C) get exact zeros.
        assert not got.view(n, -1, p * p, 2 * c)[..., c:].any()


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    """Non-contiguous x (channels_last, a slice) and y (padded rows) give the same exact results."""
    x = randn(2, 4, 8, 12, device=device)
    for xv in (x.to(memory_format=torch.channels_last), randn(2, 6, 8, 12, device=device)[:, 1:5]):
        assert not xv.is_contiguous()
        assert torch.equal(dk.patchify(xv, 2, impl="ext"), dk.patchify_ref(xv, 2))
        assert torch.equal(OPS.patchify(xv, 2), dk.patchify_ref(xv, 2))
    y = tokens(2, 8, 8, 12, 2, device=device)
    yp = torch.zeros(2, y.shape[1], y.shape[2] + 5, device=device)
    yp[..., : y.shape[2]] = y
    yv = yp[..., : y.shape[2]]
    assert torch.equal(OPS.unpatchify(yv, 2, 8, 12, 4), dk.unpatchify_ref(y, 2, 8, 12, 4))
    assert torch.equal(dk.unpatchify(yv.transpose(0, 1).contiguous().transpose(0, 1), 2, 8, 12, 4, impl="ext"),
                       dk.unpatchify_ref(y, 2, 8, 12, 4))
    # Backward ops on strided gradients.
    g = randn(2, 4, 8, 12, device=device).to(memory_format=torch.channels_last)
    assert torch.equal(OPS._unpatchify_backward(g, 2, 8), OPS._unpatchify_backward(g.contiguous(), 2, 8))
    gt = yp[..., :16]
    assert torch.equal(OPS._patchify_backward(gt, 2, 8, 12), OPS._patchify_backward(gt.contiguous(), 2, 8, 12))


def test_gradcheck():
    x = randn(1, 2, 4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: dk.patchify(t, 2, impl="ext"), (leaf(x),))
    y = tokens(1, 3, 4, 6, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: dk.unpatchify(t, 2, 4, 6, 2, impl="ext"), (leaf(y),))


@needs_cuda
def test_gradcheck_cuda():
    x = randn(1, 2, 4, 6, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda t: dk.patchify(t, 2, impl="ext"), (leaf(x),))
    y = tokens(1, 3, 4, 6, 2, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda t: dk.unpatchify(t, 2, 4, 6, 2, impl="ext"), (leaf(y),))


@needs_cuda
def test_cpu_cuda_agree():
    """CUDA and CPU kernels give the same bits."""
    x = randn(2, 4, 16, 12, dtype=torch.bfloat16)
    assert torch.equal(dk.patchify(x.cuda(), 2, impl="ext").cpu(), dk.patchify(x, 2, impl="ext"))
    y = tokens(2, 8, 16, 12, 2, dtype=torch.bfloat16)
    assert torch.equal(dk.unpatchify(y.cuda(), 2, 16, 12, 4, impl="ext").cpu(), dk.unpatchify(y, 2, 16, 12, 4, impl="ext"))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x = randn(2, 3, 4, 6, device=device)
    torch.library.opcheck(OPS.patchify, (leaf(x), 2))
    torch.library.opcheck(OPS._patchify_backward, (randn(2, 6, 12, device=device), 2, 4, 6))
    y = tokens(2, 4, 4, 6, 2, device=device)
    torch.library.opcheck(OPS.unpatchify, (leaf(y), 2, 4, 6, 3))
    torch.library.opcheck(OPS._unpatchify_backward, (randn(2, 3, 4, 6, device=device), 2, 4))


def test_compile():
    """torch.compile(fullgraph=True) of patchify -> tokens -> unpatchify: forward and backward match eager."""
    x, w = randn(2, 4, 8, 12), randn(32, 16, seed=3)

    def fn(x):
        t = dk.patchify(x, 2, impl="ext") @ w.T  # (N, T, 32) features (a, b, c) with C_all = 8
        return dk.unpatchify(t, 2, 8, 12, channels=4, impl="ext")  # (N, 4, 8, 12)

    xe, xc = leaf(x), leaf(x)
    out_e = fn(xe)
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(xc)
    torch.testing.assert_close(out_c, out_e)
    g = randn(*out_e.shape, seed=4)
    torch.testing.assert_close(torch.autograd.grad(out_c, xc, g)[0], torch.autograd.grad(out_e, xe, g)[0])


@pytest.mark.parametrize("device", devices())
def test_empty(device):
    x = leaf(randn(0, 4, 8, 8, device=device))
    out = dk.patchify(x, 2, impl="ext")
    assert out.shape == (0, 16, 16)
    assert torch.autograd.grad(out.sum(), x)[0].shape == x.shape
    y = leaf(tokens(0, 8, 8, 8, 2, device=device))
    img = dk.unpatchify(y, 2, 8, 8, 4, impl="ext")
    assert img.shape == (0, 4, 8, 8)
    assert torch.autograd.grad(img.sum(), y)[0].shape == y.shape


def test_bad_inputs():
    x = randn(2, 4, 8, 8)
    y = tokens(2, 8, 8, 8, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        dk.patchify(x[0], 2, impl="ext")
    with pytest.raises(ValueError, match="must divide"):
        dk.patchify(randn(2, 4, 8, 6), 4, impl="ext")
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        dk.patchify(x, 0, impl="ext")
    with pytest.raises(TypeError, match="float32"):
        dk.patchify(x.long(), 2, impl="ext")
    with pytest.raises(ValueError, match="tokens"):
        dk.unpatchify(y, 2, 8, 4, impl="ext")
    with pytest.raises(ValueError, match="channels must be"):
        dk.unpatchify(y, 2, 8, 8, channels=9, impl="ext")
    with pytest.raises(ValueError, match="multiple of p"):
        dk.unpatchify(y[..., :-1], 2, 8, 8, impl="ext")
    # Raw ops check too (C++ TORCH_CHECK -> RuntimeError).
    with pytest.raises(RuntimeError, match="must divide"):
        OPS.patchify(randn(2, 4, 8, 6), 4)
    with pytest.raises(RuntimeError, match="must be float32"):
        OPS.patchify(x.int(), 2)
    with pytest.raises(RuntimeError, match="channels must be"):
        OPS.unpatchify(y, 2, 8, 8, 0)
    with pytest.raises(RuntimeError, match="tokens"):
        OPS.unpatchify(y, 2, 8, 4, 8)
    with pytest.raises(RuntimeError, match="all_channels"):
        OPS._unpatchify_backward(x, 2, 3)


def test_impl_dispatch():
    """impl='ext' raises without a kernel for the device (meta); impl='ref' runs anywhere."""
    x = torch.empty(2, 4, 8, 8, device="meta")
    y = torch.empty(2, 16, 32, device="meta")
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        dk.patchify(x, 2, impl="ext")
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        dk.unpatchify(y, 2, 8, 8, impl="ext")
    assert dk.patchify(x, 2, impl="ref").shape == (2, 16, 16)
    assert dk.unpatchify(y, 2, 8, 8, 4, impl="ref").shape == (2, 4, 8, 8)


def test_double_backward_raises():
    x = leaf(randn(1, 2, 4, 4, dtype=torch.float64))
    (dx,) = torch.autograd.grad(dk.patchify(x, 2, impl="ext").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()
    y = leaf(tokens(1, 2, 4, 4, 2, dtype=torch.float64))
    (dy,) = torch.autograd.grad(dk.unpatchify(y, 2, 4, 4, impl="ext").square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dy.sum().backward()
