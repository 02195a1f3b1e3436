"""sde_euler_maruyama_step / sde_euler_maruyama_step_table: fused CFG + Euler-Maruyama update.

Kernel vs reference with explicit noise (dtype mixes, CFG on/off, guided channels, learned-sigma
channels, strided out), the CPU generator stream, the CUDA Philox stream (against a NumPy
Philox4x32-10 reference), the device-table variant, opcheck, torch.compile, bad inputs and
CUDA-graph replay.
"""
import math

import numpy as np
import pytest
import torch

from conftest import TOLERANCES, assert_close, cpu_kernel_only, devices, needs_cuda
from dit_kernels import HAS_EXT, has_kernel
from dit_kernels.ops.sde_step import (
    sde_euler_maruyama_step,
    sde_euler_maruyama_step_ref,
    sde_euler_maruyama_step_table,
    sde_euler_maruyama_step_table_ref,
)

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
COEFS = (0.97, 0.031, 0.21)  # coef_x, coef_out, noise_std of a typical SiT step


def _inputs(device, x_dtype=torch.float32, out_dtype=None, b=2, c=4, hw=(8, 8), cfg=True, extra_c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *hw, generator=g).to(device, x_dtype)
    rows = 2 * b if cfg else b
    out = torch.randn(rows, c + extra_c, *hw, generator=g).to(device, out_dtype or x_dtype)
    z = torch.randn(b, c, *hw, generator=g).to(device)
    return x, out, z


def _tol(dtype):
    return TOLERANCES[dtype][:2]


# ---- NumPy Philox4x32-10 + Box-Muller: the documented CUDA noise stream --------------------
_M32 = 0xFFFFFFFF


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Vectorised Philox4x32-10 on uint64 arrays holding 32-bit words."""
    m = np.uint64(_M32)
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & m, (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & m
    return c0, c1, c2, c3


def _philox_normals_ref(seed, offset, numel):
    """z[e] for the CUDA kernel: counter (offset // 4, e // 4), lane e % 4, Box-Muller pairs (0,1), (2,3)."""
    k = np.arange((numel + 3) // 4, dtype=np.uint64)
    blk = offset // 4
    ctr = (np.full_like(k, blk & _M32), np.full_like(k, blk >> 32), k & np.uint64(_M32), k >> np.uint64(32))
    words = np.stack(_philox4x32_10(*ctr, seed & _M32, seed >> 32), axis=1)  # (G, 4)
    # u = fmaf(float(w), 2^-32, 2^-33): exact in fp64, then one rounding to fp32
    u = (words.astype(np.float32).astype(np.float64) * 2.0**-32 + 2.0**-33).astype(np.float32).astype(np.float64)
    r = np.sqrt(np.maximum(-2.0 * np.log(u[:, [0, 2]]), 0.0))
    ang = 2.0 * np.pi * u[:, [1, 3]]
    z = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=-1)  # (G, pair, [cos, sin])
    return torch.from_numpy(z.reshape(-1)[:numel].copy())


def test_philox_reference_known_answers():
    # Random123 known-answer vectors for Philox4x32-10 (also what at::philox_engine returns).
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((_M32,) * 4, (_M32, _M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        got = _philox4x32_10(*(np.array([v], dtype=np.uint64) for v in ctr), *key)
        assert tuple(int(w[0]) for w in got) == want
    # First normals of seed 42 at offset 8, from the kernel's device functions compiled for the host.
    want = torch.tensor([-0.3369619, -0.5187488, 0.1485668, -0.9952152, 1.2609462, 1.2267585,
                         -0.6834787, 1.0841740, -0.4902950, 0.6254805, 1.1784743, 0.4731229], dtype=torch.float64)
    assert_close(_philox_normals_ref(42, 8, 12), want, atol=1e-6, rtol=0)


# ---- kernel vs reference with explicit noise ------------------------------------------------
DTYPE_MIXES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # fp32 state, bf16 network output (autocast sampling)
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]


@needs_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("x_dtype,out_dtype", DTYPE_MIXES)
@pytest.mark.parametrize("cfg,guided", [(False, None), (True, None), (True, 3), (True, 0)])
def test_matches_reference(device, x_dtype, out_dtype, cfg, guided):
    x, out, z = _inputs(device, x_dtype, out_dtype, cfg=cfg, hw=(5, 7) if guided == 3 else (8, 8))
    got = sde_euler_maruyama_step(x, out, *COEFS, cfg_scale=4.0, guided_channels=guided, noise=z, impl="ext")
    want = sde_euler_maruyama_step_ref(x, out, *COEFS, cfg_scale=4.0, guided_channels=guided, noise=z)
    for g, w, name in zip(got, want, ("x_next", "x_mean")):
        assert g.dtype == x_dtype and g.shape == x.shape and g.is_contiguous()
        assert_close(g, w, *_tol(x_dtype), name=name)
    if not cfg or guided == 0:  # guidance off: the result must not read the uncond rows
        unguided = sde_euler_maruyama_step_ref(x, out[: x.shape[0]], *COEFS, noise=z)
        assert_close(got[1], unguided[1], *_tol(x_dtype), name="unguided")


@needs_ext
@pytest.mark.parametrize("device", devices())
def test_strided_out_and_noise_dtypes(device):
    x, out, z = _inputs(device, cfg=True, extra_c=4)
    # learned-sigma split: out.chunk(2, dim=1)[0] is a strided view (batch stride 2C*HW)
    eps_part = out.chunk(2, dim=1)[0]
    assert not eps_part.is_contiguous()
    # spatially transposed out: not a contiguous spatial block -> copied internally
    out_t = out.transpose(2, 3).contiguous().transpose(2, 3)
    for o in (eps_part, out_t):
        for noise in (z, z.to(torch.bfloat16), z.double()):
            got = sde_euler_maruyama_step(x, o, *COEFS, 1.5, 3, noise=noise, impl="ext")
            want = sde_euler_maruyama_step_ref(x, o, *COEFS, 1.5, 3, noise=noise)
            assert_close(got[0], want[0], *_tol(torch.float32), name="x_next")
    # non-contiguous x and noise
    xt, zt = x.transpose(2, 3), z.transpose(2, 3)
    ot = out.transpose(2, 3)
    got = sde_euler_maruyama_step(xt, ot, *COEFS, 1.5, None, noise=zt, impl="ext")
    want = sde_euler_maruyama_step_ref(xt, ot, *COEFS, 1.5, None, noise=zt)
    assert_close(got[0], want[0], *_tol(torch.float32), name="x_next transposed")


@needs_ext
@pytest.mark.parametrize("device", devices())
def test_empty_and_degenerate_shapes(device):
    x = torch.zeros(0, 4, 3, 3, device=device)
    out = torch.zeros(0, 8, 3, 3, device=device)
    xn, xm = sde_euler_maruyama_step(x, out, *COEFS, impl="ext")
    assert xn.shape == x.shape and xm.shape == x.shape
    x, out, z = _inputs(device, b=3, c=1, hw=(1,), cfg=True, extra_c=0)  # (B, C, 1)
    got = sde_euler_maruyama_step(x, out, *COEFS, 2.0, None, noise=z, impl="ext")
    want = sde_euler_maruyama_step_ref(x, out, *COEFS, 2.0, None, noise=z)
    assert_close(got[0], want[0], *_tol(torch.float32))


# ---- CPU generator stream ------------------------------------------------------------------
@needs_ext
@cpu_kernel_only
def test_cpu_generator_matches_reference_and_advances():
    x, out, _ = _inputs("cpu")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a1 = sde_euler_maruyama_step(x, out, *COEFS, 4.0, 3, generator=g1, impl="ext")
    r1 = sde_euler_maruyama_step_ref(x, out, *COEFS, 4.0, 3, generator=g2)
    a2 = sde_euler_maruyama_step(x, out, *COEFS, 4.0, 3, generator=g1, impl="ext")
    r2 = sde_euler_maruyama_step_ref(x, out, *COEFS, 4.0, 3, generator=g2)
    assert_close(a1[0], r1[0], *_tol(torch.float32))
    assert_close(a2[0], r2[0], *_tol(torch.float32))
    assert not torch.equal(a1[0], a2[0])  # successive calls draw fresh noise
    assert torch.equal(a1[1], a2[1])  # x_mean is noise-free
    torch.manual_seed(11)  # default generator path
    d1 = sde_euler_maruyama_step(x, out, *COEFS, 4.0, 3, impl="ext")[0]
    torch.manual_seed(11)
    d2 = sde_euler_maruyama_step_ref(x, out, *COEFS, 4.0, 3)[0]
    assert_close(d1, d2, *_tol(torch.float32))


def _noise_of(step_fn, device, shape, **kw):
    """z drawn by the op: x = 0, coef_out = 0, noise_std = 1 -> x_next = z."""
    x = torch.zeros(shape, device=device)
    out = torch.zeros((2 * shape[0],) + tuple(shape[1:]), device=device)
    return step_fn(x, out, 1.0, 0.0, 1.0, 4.0, None, **kw)[0].double().cpu().flatten()


def _check_normal(z, z_other):
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(n)
    for a, b in ((z[1:], z[:-1]), (z, z_other)):  # neighbour elements, neighbour seed
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(n)
    # Kolmogorov-Smirnov against N(0, 1); 1.95 / sqrt(n) is the 0.1% critical value
    zs = z.sort().values
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.95 / math.sqrt(n), d


@needs_ext
@cpu_kernel_only
def test_cpu_noise_moments():
    shape = (16, 4, 32, 32)
    z = _noise_of(sde_euler_maruyama_step, "cpu", shape, generator=torch.Generator().manual_seed(123), impl="ext")
    z2 = _noise_of(sde_euler_maruyama_step, "cpu", shape, generator=torch.Generator().manual_seed(124), impl="ext")
    _check_normal(z, z2)


# ---- CUDA Philox stream --------------------------------------------------------------------
@needs_ext
@needs_cuda
def test_cuda_philox_stream_matches_numpy_reference_and_advances_offset():
    gen = torch.Generator("cuda").manual_seed(2024)
    gen.set_offset(8)
    numel = 4 * 5 * 7 + 2  # not a multiple of 4: exercises the scalar path and the tail
    z = _noise_of(sde_euler_maruyama_step, "cuda", (1, 1, numel), generator=gen, impl="ext")
    assert gen.get_offset() == 12  # a fixed increment of 4 per call
    assert_close(z, _philox_normals_ref(2024, 8, numel), atol=2e-3, rtol=1e-3, name="philox z")
    # launch-configuration independence: a longer (vectorised) tensor repeats the same prefix
    gen.set_offset(8)
    z_long = _noise_of(sde_euler_maruyama_step, "cuda", (2, 4, 64, 64), generator=gen, impl="ext")
    assert_close(z_long[:numel], z, atol=0, rtol=0)
    z_next = _noise_of(sde_euler_maruyama_step, "cuda", (1, 1, numel), generator=gen, impl="ext")
    assert not torch.equal(z_next, z)
    # default generator
    torch.cuda.manual_seed(77)
    d = _noise_of(sde_euler_maruyama_step, "cuda", (1, 1, numel), impl="ext")
    assert_close(d, _philox_normals_ref(77, 0, numel), atol=2e-3, rtol=1e-3)


@needs_ext
@needs_cuda
def test_cuda_noise_moments_and_seed_independence():
    shape = (16, 4, 32, 32)
    z = _noise_of(sde_euler_maruyama_step, "cuda", shape, generator=torch.Generator("cuda").manual_seed(5), impl="ext")
    z2 = _noise_of(sde_euler_maruyama_step, "cuda", shape, generator=torch.Generator("cuda").manual_seed(6), impl="ext")
    _check_normal(z, z2)
    assert torch.isfinite(z).all()
    same = _noise_of(sde_euler_maruyama_step, "cuda", shape, generator=torch.Generator("cuda").manual_seed(5), impl="ext")
    assert torch.equal(z, same)


# ---- device-table variant ------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
def test_table_matches_scalar_op(device, table_dtype):
    x, out, z = _inputs(device, out_dtype=torch.bfloat16)
    coeffs = torch.tensor([[0.9, 0.1, 0.3], list(COEFS), [1.0, 0.04, 0.0]], dtype=table_dtype, device=device)
    for k in range(3):
        step = torch.tensor(k, device=device)
        got = sde_euler_maruyama_step_table(x, out, coeffs, step, 4.0, 3, noise=z, impl="ext")
        row = [float(v) for v in coeffs[k].float()]  # the kernel computes in fp32 for fp32 x
        want = sde_euler_maruyama_step(x, out, *row, 4.0, 3, noise=z, impl="ext")
        ref = sde_euler_maruyama_step_table_ref(x, out, coeffs, step, 4.0, 3, noise=z)
        for a, b, r in zip(got, want, ref):
            assert_close(a, b, 0, 0, name=f"table vs scalar, step {k}")
            assert_close(a, r, *_tol(torch.float32), name=f"table vs ref, step {k}")
    # strided table (a column slice of a wider table)
    wide = torch.cat([coeffs, coeffs], dim=1)[:, 1:4]
    wide[:] = coeffs
    got = sde_euler_maruyama_step_table(x, out, wide, torch.tensor([1], device=device), 4.0, 3, noise=z, impl="ext")
    assert_close(got[0], sde_euler_maruyama_step(x, out, *COEFS, 4.0, 3, noise=z)[0], *_tol(torch.float32))


@needs_ext
@cpu_kernel_only
def test_table_bad_step_cpu_raises():
    x, out, z = _inputs("cpu")
    coeffs = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="outside"):
        sde_euler_maruyama_step_table(x, out, coeffs, torch.tensor(3), noise=z, impl="ext")


@needs_ext
@needs_cuda
def test_table_bad_step_cuda_gives_nan():
    x, out, z = _inputs("cuda")
    coeffs = torch.ones(3, 3, dtype=torch.float64, device="cuda")
    xn, xm = sde_euler_maruyama_step_table(x, out, coeffs, torch.tensor(-1, device="cuda"), noise=z, impl="ext")
    assert torch.isnan(xn).all() and torch.isnan(xm).all()


# ---- registration: opcheck, compile, autograd ------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, out, z = _inputs(device, out_dtype=torch.bfloat16, hw=(4, 4))
    coeffs = torch.tensor([list(COEFS)], dtype=torch.float64, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dit_kernels.sde_euler_maruyama_step, (x, out, *COEFS, 2.0, 3, z, None),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.dit_kernels.sde_euler_maruyama_step_table,
                          (x, out, coeffs, step, 2.0, 3, z, None), test_utils=tests)
    # noise drawn in the op: deterministic only with noise_std = 0, so check schema and fakes
    torch.library.opcheck(torch.ops.dit_kernels.sde_euler_maruyama_step, (x, out, 1.0, 0.5, 0.0, 2.0, 3, None, None),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_compile_fullgraph_matches_eager():
    x, out, z = _inputs("cpu", out_dtype=torch.bfloat16)
    coeffs = torch.tensor([[0.9, 0.1, 0.3], list(COEFS)], dtype=torch.float64)
    step = torch.tensor(1)

    def fn(x, out, z):
        xn, _ = sde_euler_maruyama_step(x, out, *COEFS, 4.0, 3, noise=z)
        return sde_euler_maruyama_step_table(xn, out, coeffs, step, 4.0, 3, noise=z)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x, out, z)
    want = fn(x, out, z)
    for a, b in zip(got, want):
        assert_close(a, b, 0, 0)


@needs_ext
@pytest.mark.parametrize("device", devices())
def test_backward_raises(device):
    x, out, z = _inputs(device)
    x.requires_grad_(True)
    xn, _ = sde_euler_maruyama_step(x, out, *COEFS, noise=z, impl="ext")
    with pytest.raises(RuntimeError, match="inference-only"):
        xn.sum().backward()


# ---- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ref"] + (["ext"] if HAS_EXT and has_kernel("sde_euler_maruyama_step", "cpu") else []))
def test_bad_inputs(impl):
    x, out, z = _inputs("cpu")
    with pytest.raises(ValueError, match="out must have shape"):
        sde_euler_maruyama_step(x, out[:3], *COEFS, impl=impl)
    with pytest.raises(ValueError, match="out must have shape"):
        sde_euler_maruyama_step(x, out[:, :3], *COEFS, impl=impl)
    with pytest.raises(ValueError, match="out must have shape"):
        sde_euler_maruyama_step(x, out[..., :4], *COEFS, impl=impl)
    with pytest.raises(ValueError, match="noise must have the shape"):
        sde_euler_maruyama_step(x, out, *COEFS, noise=z[:1], impl=impl)
    with pytest.raises(TypeError, match="x must be float"):
        sde_euler_maruyama_step(x.long(), out, *COEFS, impl=impl)
    with pytest.raises(ValueError, match="guided_channels"):
        sde_euler_maruyama_step(x, out, *COEFS, guided_channels=-1, impl=impl)
    with pytest.raises(ValueError, match="x must have shape"):
        sde_euler_maruyama_step(x[0, 0, 0], out[0, 0, 0], *COEFS, impl=impl)
    coeffs = torch.ones(2, 3)
    with pytest.raises(ValueError, match="coeffs must have shape"):
        sde_euler_maruyama_step_table(x, out, coeffs[:, :2], torch.tensor(0), impl=impl)
    with pytest.raises(TypeError, match="coeffs must be"):
        sde_euler_maruyama_step_table(x, out, coeffs.half(), torch.tensor(0), impl=impl)
    with pytest.raises(TypeError, match="step must be"):
        sde_euler_maruyama_step_table(x, out, coeffs, torch.tensor(0.0), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        sde_euler_maruyama_step(x, out, *COEFS, impl="fast")


@needs_ext
def test_op_level_checks():
    """The C++ op validates on its own (callers may bypass the Python wrapper)."""
    x, out, z = _inputs("cpu")
    op = torch.ops.dit_kernels.sde_euler_maruyama_step
    with pytest.raises(RuntimeError, match="out must have shape"):
        op(x, out[:3], *COEFS, 1.0, 4, None, None)
    with pytest.raises(RuntimeError, match="guided_channels"):
        op(x, out, *COEFS, 1.0, -2, None, None)
    with pytest.raises(RuntimeError, match="noise must have the shape"):
        op(x, out, *COEFS, 1.0, 4, z[:1], None)
    with pytest.raises(RuntimeError, match="step must be"):
        torch.ops.dit_kernels.sde_euler_maruyama_step_table(x, out, torch.ones(2, 3), torch.tensor([0, 1]), 1.0, 4,
                                                            None, None)


# ---- CUDA graphs ---------------------------------------------------------------------------
def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


@needs_ext
@needs_cuda
def test_cuda_graph_replay_draws_fresh_noise_and_matches_eager():
    x, out, _ = _inputs("cuda")
    args = (*COEFS, 4.0, 3)
    graph, (xn, _) = _capture(lambda: sde_euler_maruyama_step(x, out, *args, impl="ext"))
    torch.cuda.manual_seed(7)
    graph.replay()
    r1 = xn.clone()
    graph.replay()
    r2 = xn.clone()
    assert not torch.equal(r1, r2)  # each replay advances the philox offset
    torch.cuda.manual_seed(7)
    e1 = sde_euler_maruyama_step(x, out, *args, impl="ext")[0]
    e2 = sde_euler_maruyama_step(x, out, *args, impl="ext")[0]
    assert torch.equal(r1, e1) and torch.equal(r2, e2)


@needs_ext
@needs_cuda
def test_cuda_graph_whole_loop_with_table():
    x0, out, _ = _inputs("cuda")
    coeffs = torch.tensor([[0.9, 0.1, 0.3], list(COEFS), [1.0, 0.04, 0.0]], dtype=torch.float64, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    x_static = x0.clone()

    def loop():
        step.zero_()
        x = x_static
        for _ in range(coeffs.shape[0]):
            x, _ = sde_euler_maruyama_step_table(x, out, coeffs, step, 2.0, None, impl="ext")
            step.add_(1)
        return x

    graph, y = _capture(loop)
    torch.cuda.manual_seed(3)
    graph.replay()
    r1 = y.clone()
    graph.replay()
    assert not torch.equal(r1, y)
    torch.cuda.manual_seed(3)
    x = x0
    for k in range(coeffs.shape[0]):  # the same loop with host scalars
        x, _ = sde_euler_maruyama_step(x, out, *coeffs[k].tolist(), 2.0, None, impl="ext")
    assert torch.equal(r1, x)
