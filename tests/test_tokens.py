"""Masked-token ops: random masks, gather_tokens / scatter_tokens kernels vs references."""
import pytest
import torch
from torch.library import opcheck

import dit_kernels as dk
from dit_kernels import has_kernel
from dit_kernels.ops import tokens as tokens_mod

from conftest import TOLERANCES, assert_close, cpu_kernel_only, devices, needs_cuda

OPS = torch.ops.dit_kernels if dk.HAS_EXT else None


def _needs_kernel(op, device):
    if not has_kernel(op, device):
        pytest.skip(f"no compiled {op} for {device}")


def _data(n, t, k, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    ids_keep, ids_restore, mask = dk.random_token_mask(n, t, k, generator=g, device=device)
    x = torch.randn(n, t, d, generator=g, device=device).to(dtype)
    kept = torch.randn(n, k, d, generator=g, device=device).to(dtype)
    return ids_keep, ids_restore, mask, x, kept


# ---- random_token_mask --------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep", [0, 5, 16])
def test_random_token_mask_invariants(device, keep):
    n, t = 6, 16
    g = torch.Generator(device=device).manual_seed(3)
    ids_keep, ids_restore, mask = dk.random_token_mask(n, t, keep, generator=g, device=device)
    assert ids_keep.device.type == ids_restore.device.type == mask.device.type == torch.device(device).type
    assert ids_keep.shape == (n, keep) and ids_keep.dtype == torch.int64 and ids_keep.is_contiguous()
    assert ids_restore.shape == (n, t) and mask.shape == (n, t) and mask.dtype == torch.float32
    # K distinct ids in [0, T) per sample
    s = ids_keep.sort(dim=1).values
    assert bool((s[:, 1:] > s[:, :-1]).all()) and bool((ids_keep >= 0).all()) and bool((ids_keep < t).all())
    # ids_restore is a permutation and inverts the shuffle on the kept positions
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(t, device=device).expand(n, t))
    assert torch.equal(ids_restore.gather(1, ids_keep), torch.arange(keep, device=device).expand(n, keep))
    # mask: T - K removed per sample, 0 exactly at the kept ids, 1 iff ids_restore >= K
    assert torch.equal(mask.sum(1), torch.full((n,), float(t - keep), device=device))
    assert float(mask.gather(1, ids_keep).abs().sum()) == 0.0
    assert torch.equal(mask.bool(), ids_restore >= keep)
    # same generator state -> same mask; a rejected keep raises
    g2 = torch.Generator(device=device).manual_seed(3)
    ids2, _, _ = dk.random_token_mask(n, t, keep, generator=g2, device=device)
    assert torch.equal(ids_keep, ids2)
    with pytest.raises(ValueError):
        dk.random_token_mask(n, t, t + 1)


# ---- gather ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 59])
def test_gather_matches_ref(device, dtype, d):
    _needs_kernel("gather_tokens", device)
    ids, _, _, x, _ = _data(3, 20, 7, d, dtype, device)
    x = x.requires_grad_()
    out = dk.gather_tokens(x, ids, impl="ext")
    ref = dk.gather_tokens_ref(x, ids)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)  # pure row copies: bit-exact
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("device", devices())
def test_gather_strided_input(device):
    _needs_kernel("gather_tokens", device)
    ids, _, _, _, _ = _data(2, 9, 4, 8, torch.float32, device)
    big = torch.randn(2, 9, 40, device=device)
    x = big[:, :, 3:35]  # row stride 40, unit inner stride, unaligned base
    assert torch.equal(dk.gather_tokens(x, ids, impl="ext"), dk.gather_tokens_ref(x, ids))
    xt = torch.randn(9, 2, 16, device=device).transpose(0, 1)  # (N, T, D) with N stride < T stride
    assert torch.equal(dk.gather_tokens(xt, ids, impl="ext"), dk.gather_tokens_ref(xt, ids))


# ---- scatter --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "dtype,fill_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("d", [64, 59])
@pytest.mark.parametrize("fill_form", ["token", "token3d", "per_token"])
def test_scatter_matches_ref(device, dtype, fill_dtype, d, fill_form):
    _needs_kernel("scatter_tokens", device)
    n, t, k = 3, 20, 7
    ids, _, mask, x, kept = _data(n, t, k, d, dtype, device)
    shape = {"token": (d,), "token3d": (1, 1, d), "per_token": (n, t, d)}[fill_form]
    fill = torch.randn(shape, device=device, dtype=fill_dtype, requires_grad=True)
    kept = kept.requires_grad_()
    out = dk.scatter_tokens(kept, ids, fill, t, impl="ext")
    ref = dk.scatter_tokens_ref(kept, ids, fill, t)
    assert out.dtype == dtype and out.shape == (n, t, d)
    assert torch.equal(out, ref)  # copies (and one rounding of the fill): bit-exact
    g = torch.randn(n, t, d, device=device).to(dtype)
    dkept, dfill = torch.autograd.grad(out, (kept, fill), g)
    assert dkept.dtype == dtype and dfill.dtype == fill_dtype and dfill.shape == fill.shape
    assert torch.equal(dkept, dk.gather_tokens_ref(g, ids))
    m = mask.unsqueeze(-1)  # (N, T, 1), 1 = filled
    if fill_form == "per_token":
        assert torch.equal(dfill, (g * m.to(dtype)).to(fill_dtype))
    else:
        exact = (g.double() * m.double()).sum((0, 1)).reshape(shape)  # fp64 ground truth
        _, _, gatol, grtol = TOLERANCES[fill_dtype if fill_dtype == dtype else dtype]
        assert_close(dfill.double(), exact, gatol, grtol, name="dfill")
        if fill_dtype == torch.float32:  # fp32 accumulation: much tighter than the output dtype
            assert_close(dfill.double(), exact, 1e-4, 1e-5, name="dfill fp32")


@pytest.mark.parametrize("device", devices())
def test_scatter_strided_and_cast_fill(device):
    _needs_kernel("scatter_tokens", device)
    n, t, k, d = 2, 8, 3, 16
    ids, _, _, _, kept = _data(n, t, k, d, torch.float32, device)
    # per-token fill as a strided view (row stride 3D), as from a chunk of a wider projection
    fill = torch.randn(n, t, 3 * d, device=device).chunk(3, dim=-1)[1]
    assert torch.equal(dk.scatter_tokens(kept, ids, fill, impl="ext"), dk.scatter_tokens_ref(kept, ids, fill))
    # fp16 token with fp32 rows: cast by the wrapper, gradient comes back as fp16
    tok = torch.randn(d, device=device, dtype=torch.float16, requires_grad=True)
    out = dk.scatter_tokens(kept, ids, tok, t, impl="ext")
    assert torch.equal(out, dk.scatter_tokens_ref(kept, ids, tok, t))
    out.sum().backward()
    assert tok.grad.dtype == torch.float16
    assert torch.equal(tok.grad, torch.full_like(tok, float(n * (t - k))))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [0, 6])  # K = 0 (all fill) and K = T (no fill)
def test_edge_k(device, k):
    _needs_kernel("scatter_tokens", device)
    n, t, d = 2, 6, 5
    ids, _, _, x, kept = _data(n, t, k, d, torch.float32, device)
    x.requires_grad_()
    out = dk.gather_tokens(x, ids, impl="ext")
    assert out.shape == (n, k, d) and torch.equal(out, dk.gather_tokens_ref(x, ids))
    out.sum().backward()
    expected = torch.zeros_like(x).scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), 1.0)  # 1 at kept rows
    assert torch.equal(x.grad, expected)
    kept.requires_grad_()
    tok = torch.randn(d, device=device, requires_grad=True)
    y = dk.scatter_tokens(kept, ids, tok, t, impl="ext")
    assert torch.equal(y, dk.scatter_tokens_ref(kept, ids, tok, t))
    y.sum().backward()
    assert torch.equal(tok.grad, torch.full_like(tok, float(n * (t - k))))
    assert torch.equal(kept.grad, torch.ones_like(kept))


@pytest.mark.parametrize("device", devices())
def test_empty_shapes(device):
    _needs_kernel("scatter_tokens", device)
    ids = torch.zeros(0, 3, dtype=torch.int64, device=device)
    assert dk.gather_tokens(torch.randn(0, 5, 4, device=device), ids, impl="ext").shape == (0, 3, 4)
    assert dk.scatter_tokens(torch.randn(0, 3, 4, device=device), ids, torch.randn(4, device=device), 5,
                             impl="ext").shape == (0, 5, 4)
    ids = torch.tensor([[1, 0]], device=device)
    assert dk.scatter_tokens(torch.randn(1, 2, 0, device=device), ids, torch.randn(0, device=device), 3,
                             impl="ext").shape == (1, 3, 0)


# ---- autograd, registration, compile ----------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_gradcheck_fp64(device):
    _needs_kernel("scatter_tokens", device)
    n, t, k, d = 2, 7, 3, 5
    ids, _, _, x, kept = _data(n, t, k, d, torch.float64, device)
    x.requires_grad_()
    kept.requires_grad_()
    tok = torch.randn(d, dtype=torch.float64, device=device, requires_grad=True)
    fill = torch.randn(n, t, d, dtype=torch.float64, device=device, requires_grad=True)

    def gather(x):
        return dk.gather_tokens(x, ids, impl="ext")

    def scatter(kept, f):
        return dk.scatter_tokens(kept, ids, f, t, impl="ext")

    assert torch.autograd.gradcheck(gather, (x,))
    assert torch.autograd.gradgradcheck(gather, (x,))
    for f in (tok, fill):
        assert torch.autograd.gradcheck(scatter, (kept, f))
        assert torch.autograd.gradgradcheck(scatter, (kept, f))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    _needs_kernel("scatter_tokens", device)
    n, t, k, d = 2, 6, 3, 8
    ids, _, _, x, kept = _data(n, t, k, d, torch.float32, device)
    x.requires_grad_()
    kept.requires_grad_()
    tok = torch.randn(d, device=device, requires_grad=True)
    fill = torch.randn(n, t, d, device=device, requires_grad=True)
    grad = torch.randn(n, t, d, device=device)
    cases = [
        (OPS.gather_tokens, (x, ids)),
        (OPS._gather_tokens_backward, (kept.detach(), ids, t)),
        (OPS.scatter_tokens, (kept, ids, tok, t)),
        (OPS.scatter_tokens, (kept, ids, fill, t)),
        (OPS.scatter_tokens, (kept.detach().bfloat16(), ids, tok.detach(), t)),  # fp32 token, bf16 rows
        (OPS._scatter_tokens_backward, (grad, ids, True, torch.float32)),
        (OPS._scatter_tokens_backward, (grad, ids, False, torch.float32)),
    ]
    for op, args in cases:
        opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph_parity(device):
    _needs_kernel("scatter_tokens", device)
    n, t, k, d = 2, 8, 4, 16
    ids, _, _, x, _ = _data(n, t, k, d, torch.float32, device)
    tok = torch.randn(d, device=device)
    w = torch.randn(d, d, device=device) / d**0.5

    def f(x, tok, w):
        h = dk.gather_tokens(x, ids) @ w  # (N, K, D) encoder stand-in
        y = dk.scatter_tokens(h, ids, tok, t)  # (N, T, D) with mask tokens
        return (y * y).sum(-1)

    # Inductor on CUDA; on the CPU aot_eager (Dynamo + fake + AOT autograd) keeps the suite fast
    # (inductor on CPU also passes, ~20 s).
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    grads = []
    for fn in (f, compiled):
        args = [a.clone().requires_grad_() for a in (x, tok, w)]
        out = fn(*args)
        out.sum().backward()
        grads.append((out.detach(),) + tuple(a.grad for a in args))
    for a, b in zip(*grads):
        assert_close(a, b, 1e-5, 1e-5, name="compiled vs eager")


@pytest.mark.parametrize("device", devices())
def test_determinism(device):
    _needs_kernel("scatter_tokens", device)
    n, t, k, d = (16, 64, 32, 96) if device == "cuda" else (4, 64, 32, 24)
    ids, _, _, _, _ = _data(n, t, k, d, torch.bfloat16, device)
    grad = torch.randn(n, t, d, device=device).bfloat16()
    outs = [OPS._scatter_tokens_backward(grad, ids, False, torch.float32) for _ in range(3)]
    for dkept, dfill in outs[1:]:
        assert torch.equal(dkept, outs[0][0]) and torch.equal(dfill, outs[0][1])
    if device == "cpu":  # the partition does not depend on the thread count
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(OPS._scatter_tokens_backward(grad, ids, False, torch.float32)[1], outs[0][1])
        finally:
            torch.set_num_threads(prev)


# ---- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_python_errors():
    x = torch.randn(2, 5, 4)
    ids = torch.tensor([[0, 3], [1, 2]])
    with pytest.raises(TypeError, match="int64"):
        dk.gather_tokens(x, ids.int())
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        dk.gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="T = 5"):
        dk.gather_tokens(x, torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="N, T, D"):
        dk.gather_tokens(x[0], ids)
    with pytest.raises(TypeError):
        dk.gather_tokens(x.int(), ids)
    kept = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match="length"):
        dk.scatter_tokens(kept, ids, torch.randn(4))
    with pytest.raises(ValueError, match="fill"):
        dk.scatter_tokens(kept, ids, torch.randn(3), 5)
    with pytest.raises(ValueError, match="fill"):
        dk.scatter_tokens(kept, ids, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="length"):
        dk.scatter_tokens(kept, ids, torch.randn(2, 5, 4), length=6)
    with pytest.raises(ValueError, match="impl"):
        dk.gather_tokens(x, ids, impl="fast")


@cpu_kernel_only  # the CUDA kernels assert on the device instead (tests/test_cuda_emulation.py)
def test_bad_ids_cpu_kernels_raise():
    _needs_kernel("scatter_tokens", "cpu")
    x = torch.randn(2, 5, 4)
    kept = torch.randn(2, 2, 4)
    tok = torch.randn(4)
    oob = torch.tensor([[0, 5], [1, 2]])
    neg = torch.tensor([[0, -1], [1, 2]])
    dup = torch.tensor([[3, 3], [1, 2]])
    for bad in (oob, neg):
        with pytest.raises(RuntimeError, match="out of range"):
            dk.gather_tokens(x, bad, impl="ext")
        with pytest.raises(RuntimeError, match="out of range"):
            dk.scatter_tokens(kept, bad, tok, 5, impl="ext")
        with pytest.raises(RuntimeError, match="out of range"):
            OPS._gather_tokens_backward(kept, bad, 5)
    with pytest.raises(RuntimeError, match="repeats"):
        dk.scatter_tokens(kept, dup, tok, 5, impl="ext")
    with pytest.raises(RuntimeError, match="repeats"):
        OPS._scatter_tokens_backward(x, dup, False, torch.float32)
    with pytest.raises(RuntimeError, match="fill dtype"):
        OPS.scatter_tokens(kept, oob, tok.half(), 5)
    # gather forward is well defined with repeated ids; its backward (a scatter) is not and raises
    xg = x.clone().requires_grad_()
    out = dk.gather_tokens(xg, dup, impl="ext")
    assert torch.equal(out, dk.gather_tokens_ref(x, dup))
    with pytest.raises(RuntimeError, match="repeats"):
        out.sum().backward()


def test_debug_mode_checks_ids(monkeypatch):
    monkeypatch.setattr(tokens_mod, "_DEBUG", True)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="repeats"):
        dk.gather_tokens(x, torch.tensor([[3, 3], [1, 2]]), impl="ref")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        dk.scatter_tokens(torch.randn(2, 2, 4), torch.tensor([[0, 7], [1, 2]]), torch.randn(4), 5)
    ids, _, _ = dk.random_token_mask(2, 5, 2)
    dk.gather_tokens(x, ids)  # valid ids pass


# ---- CUDA only ------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_vector_paths_and_no_sync():
    _needs_kernel("scatter_tokens", "cuda")
    n, t, k = 4, 32, 13
    for dtype, d in [(torch.bfloat16, 1152), (torch.float16, 72), (torch.float32, 36), (torch.float64, 10),
                     (torch.bfloat16, 59)]:
        ids, _, mask, x, kept = _data(n, t, k, d, dtype, "cuda")
        tok32 = torch.randn(d, device="cuda")
        xs = torch.randn(n, t, d + 1, device="cuda").to(dtype)[:, :, 1:]  # misaligned: scalar path
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids2, _, _ = dk.random_token_mask(n, t, k, device="cuda")
            out = dk.gather_tokens(x, ids2, impl="ext")
            outs = dk.gather_tokens(xs, ids, impl="ext")
            y = dk.scatter_tokens(kept, ids, tok32, t, impl="ext")
            dkept, dfill = OPS._scatter_tokens_backward(x, ids, False, torch.float32)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(out, dk.gather_tokens_ref(x, ids2))
        assert torch.equal(outs, dk.gather_tokens_ref(xs, ids))
        assert torch.equal(y, dk.scatter_tokens_ref(kept, ids, tok32, t))
        assert torch.equal(dkept, dk.gather_tokens_ref(x, ids))
        exact = (x.double() * mask.unsqueeze(-1).double()).sum((0, 1))
        assert_close(dfill.double(), exact, 1e-3, 1e-5, name=f"dfill {dtype} D={d}")


@needs_cuda
def test_cuda_matches_cpu_kernel():
    _needs_kernel("scatter_tokens", "cuda")
    ids, _, _, x, kept = _data(3, 40, 17, 200, torch.bfloat16, "cpu")
    fill = torch.randn(3, 40, 200).bfloat16()
    for args in [(kept, ids, fill, 40)]:
        cpu = OPS.scatter_tokens(*args)
        gpu = OPS.scatter_tokens(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        assert torch.equal(cpu, gpu.cpu())
    g = torch.randn(3, 40, 200).bfloat16()
    for per_token in (True, False):
        c = OPS._scatter_tokens_backward(g, ids, per_token, torch.float32)
        r = OPS._scatter_tokens_backward(g.cuda(), ids.cuda(), per_token, torch.float32)
        assert torch.equal(c[0], r[0].cpu())
        assert_close(r[1].cpu(), c[1], 1e-4, 1e-5, name="dfill cpu vs cuda")


@needs_cuda
def test_cuda_graph_capture():
    _needs_kernel("scatter_tokens", "cuda")
    n, t, k, d = 4, 16, 6, 64
    ids, _, _, x, kept = _data(n, t, k, d, torch.bfloat16, "cuda")
    tok = torch.randn(d, device="cuda")
    grad = torch.randn(n, t, d, device="cuda").bfloat16()

    def step():
        return (
            OPS.gather_tokens(x, ids),
            OPS.scatter_tokens(kept, ids, tok, t),
            *OPS._scatter_tokens_backward(grad, ids, False, torch.float32),
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new_ids, _, _, new_x, new_kept = _data(n, t, k, d, torch.bfloat16, "cuda", seed=1)
    ids.copy_(new_ids)
    x.copy_(new_x)
    kept.copy_(new_kept)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert torch.equal(got, want)


def test_fill_form_disambiguation():
    d = 4
    kept = torch.randn(1, 1, d)
    ids = torch.tensor([[0]])
    fill = torch.randn(1, 1, d, requires_grad=True)
    for impl in ("ref", "auto"):
        y = dk.scatter_tokens(kept, ids, fill, 5, impl=impl)  # (1, 1, D) + length: broadcast token
        assert y.shape == (1, 5, d) and torch.equal(y[0, 1:], fill[0].detach().expand(4, d))
        (g,) = torch.autograd.grad(y.sum(), fill)
        assert g.shape == fill.shape and torch.equal(g, torch.full_like(g, 4.0))
        assert torch.equal(dk.scatter_tokens(kept, ids, fill, impl=impl), kept)  # N = T = 1 per-token
        kept3 = torch.randn(3, 1, d)
        ids3 = torch.zeros(3, 1, dtype=torch.int64)
        assert torch.equal(dk.scatter_tokens(kept3, ids3, torch.randn(3, 1, d), impl=impl), kept3)  # (N, 1, D)
