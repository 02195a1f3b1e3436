"""The CUDA kernels, run on the CPU by the emulation in tests/cuda_emu (see its build.py).

Each CUDA op (registered as ``torch.ops.dit_emu.<op>``, same schema as ``dit_kernels``) is compared
with the CPU kernel (``torch.ops.dit_kernels.<op>``, itself tested against the references) on
shapes that take every code path: vectorised and scalar rows, rows longer than the register cache,
several backward tiles, the shared-memory opt-in, strided modulation views, grid-stride loops
(the emulated device has 2 SMs), mixed branch dtypes. Every case also runs under three thread
schedules (ascending, descending, random) and must give bit-identical results: a missing barrier
or a reliance on warp lockstep shows up as a difference. Self-tests at the end show the emulator
catches such bugs.

Skipped where a real GPU is present (the CUDA tests run there instead).
"""
import pytest
import torch

import dit_kernels  # noqa: F401  (registers the dit_kernels ops and their CPU kernels)
from conftest import EMULATE_CUDA, HAS_CUDA, TOLERANCES, assert_close, cuda_emulation
from test_sde_step import _check_normal, _noise_of, _philox_normals_ref

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: the CUDA tests run the real kernels")
# Under DIT_EMULATE_CUDA=1 the CPU kernels are the emulated ones: comparing them would prove nothing.
vs_cpu_kernels = pytest.mark.skipif(EMULATE_CUDA, reason="DIT_EMULATE_CUDA=1 replaced the CPU kernels")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ORDERS = (0, 1, 2)  # ascending, descending, random thread and block schedules


@pytest.fixture(scope="module", autouse=True)
def emu():
    cuda_emulation().load()
    torch.ops.dit_emu._emu_configure(0, 0, 2)
    yield torch.ops.dit_emu
    torch.ops.dit_emu._emu_configure(0, 0, 2)


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def run_emulated(name, *args):
    """Runs dit_emu.<name> under every schedule; asserts identical results and untouched inputs."""
    snapshots = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    results = []
    for order in ORDERS:
        torch.ops.dit_emu._emu_configure(order, 1234 + order, 2)
        results.append(_tensors(getattr(torch.ops.dit_emu, name)(*args)))
    torch.ops.dit_emu._emu_configure(0, 0, 2)
    for order, res in zip(ORDERS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], res)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name} output {i} depends on the thread schedule (order {order})")
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    for i, (a, s) in enumerate(zip(inputs, snapshots)):
        assert torch.equal(a, s), f"{name} modified its input {i}"
    return results[0]


def compare_with_cpu(name, *args, grad=False):
    """Emulated CUDA kernel vs CPU kernel: same dtypes and shapes, values within the dtype tolerance."""
    got = run_emulated(name, *args)
    want = _tensors(getattr(torch.ops.dit_kernels, name)(*args))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name} output {i}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        if g.is_floating_point():
            atol, rtol = TOLERANCES[g.dtype][2:] if grad else TOLERANCES[g.dtype][:2]
            assert_close(g, w, atol, rtol, name=f"{name} output {i}")
        else:
            assert torch.equal(g, w), f"{name} output {i}"
    return got if len(got) > 1 else got[0]


def _offset(t, elements):
    """A contiguous copy of t whose data starts `elements` past an allocation (breaks 16-byte alignment)."""
    if elements == 0:
        return t.clone()
    buf = torch.empty(t.numel() + elements, dtype=t.dtype)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


def _modulation(n, d, dtype, count=3):
    """count (N, D) strided views of one (N, count*D) tensor, as Linear(c, count*D)(...).chunk(count) gives."""
    return torch.randn(n, count * d, dtype=dtype).mul_(0.5).chunk(count, dim=1)


# ---- modulated LayerNorm ------------------------------------------------------------------------

# (N, T, D, misalign): vector rows, odd D (scalar path), rows past the register cache, many tiles,
# D whose backward needs the >48 KB shared-memory opt-in (fp32: 12 B per column with a gate).
# The specialised (packs-per-lane tier) kernels take every aligned D <= 1280 (16-bit) / 1152 (fp32):
# 64 and 32 (smallest tiers, partial packs), 1152 (DiT-XL: a half-full last pack for 16-bit types)
# with T past one backward work item (64 rows), 768 (DiT-B: full packs); 1600 and fp64 take the
# generic kernels.
ROW_SHAPES = [(2, 5, 64, 0), (1, 3, 59, 0), (2, 3, 1600, 0), (2, 40, 32, 0), (1, 2, 128, 1), (2, 70, 1152, 0),
              (1, 9, 768, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@vs_cpu_kernels
def test_modulated_layer_norm(dtype, shape):
    n, t, d, misalign = shape
    torch.manual_seed(0)
    x = _offset(torch.randn(n, t, d, dtype=dtype) * 2 + 0.5, misalign)
    shift, scale = _modulation(n, d, dtype, 2)
    y, mean, rstd = compare_with_cpu("modulated_layer_norm", x, shift, scale, 1e-6, None)
    grad_y = torch.randn_like(y)
    compare_with_cpu("_modulated_layer_norm_backward", grad_y, x, scale, mean, rstd, grad=True)


@vs_cpu_kernels
def test_modulated_layer_norm_broadcast_modulation_and_branch_dtype():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 96)
    shift = torch.randn(96).expand(2, 96)  # row stride 0
    scale = torch.randn(2, 96)
    y, mean, rstd = compare_with_cpu("modulated_layer_norm", x, shift, scale, 1e-6, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    compare_with_cpu("_modulated_layer_norm_backward", torch.randn_like(y), x, scale, mean, rstd, grad=True)


# ---- gated residual (+ modulated LayerNorm) -----------------------------------------------------

BRANCH = [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


def _residual_inputs(dtypes, shape, seed, mod_count):
    """x (misaligned by shape[3] elements), the branch y, and mod_count modulation views."""
    xd, yd = dtypes
    n, t, d, misalign = shape
    torch.manual_seed(seed)
    x = _offset(torch.randn(n, t, d, dtype=xd), misalign)
    y = torch.randn(n, t, d, dtype=yd)
    return (x, y) + tuple(_modulation(n, d, xd, mod_count))


@pytest.mark.parametrize("dtypes", BRANCH, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@vs_cpu_kernels
def test_gated_residual(dtypes, shape):
    x, y, gate = _residual_inputs(dtypes, shape, 2, 1)
    out = compare_with_cpu("gated_residual", x, y, gate)
    compare_with_cpu("_gated_residual_backward", torch.randn_like(out), y, gate, grad=True)


@pytest.mark.parametrize("dtypes", BRANCH, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@vs_cpu_kernels
def test_gated_residual_modulated_layer_norm(dtypes, shape):
    x, y, gate, shift, scale = _residual_inputs(dtypes, shape, 3, 3)
    x_new, h, mean, rstd = compare_with_cpu("gated_residual_modulated_layer_norm", x, y, gate, shift, scale, 1e-6)
    g_x, g_h = torch.randn_like(x_new), torch.randn_like(h)
    bwd = "_gated_residual_modulated_layer_norm_backward"
    compare_with_cpu(bwd, g_x, g_h, x_new, y, gate, scale, mean, rstd, grad=True)
    compare_with_cpu(bwd, None, g_h, x_new, y, gate, scale, mean, rstd, grad=True)
    compare_with_cpu(bwd, g_x, None, x_new, y, gate, scale, mean, rstd, grad=True)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 4200), (torch.float64, 2100)])
@vs_cpu_kernels
def test_backward_shared_memory_opt_in(dtype, d):
    """Column sums of 3 x D accumulators need more than 48 KB: the launch must opt in first."""
    x, y, gate, shift, scale = _residual_inputs((dtype, dtype), (1, 2, d, 0), 4, 3)
    x_new, h, mean, rstd = compare_with_cpu("gated_residual_modulated_layer_norm", x, y, gate, shift, scale, 1e-6)
    compare_with_cpu("_gated_residual_modulated_layer_norm_backward", torch.randn_like(x_new), torch.randn_like(h),
                     x_new, y, gate, scale, mean, rstd, grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_paths_are_each_deterministic(dtype):
    """Two backward implementations, chosen by the views' alignment: the specialised (tier) kernel
    when every tensor allows 16-byte packs, the generic one otherwise (here: a grad view one element
    past its allocation). They add the per-sample column sums in different orders (tier: per warp,
    the 8 warps, then 64-row items; generic: per column-owning thread over 8-row sub-tiles, then
    token tiles whose count follows the SM count), so they agree within the gradient tolerance but
    not bit for bit. Each is bitwise reproducible: under every thread schedule and on repeated
    calls; the tier kernel also whatever the device's SM count (its persistent grid changes, its
    partition into items does not), the generic one for a given SM count."""
    x, y, gate, shift, scale = _residual_inputs((dtype, dtype), (2, 70, 1152, 0), 5, 3)
    x_new, h, mean, rstd = run_emulated("gated_residual_modulated_layer_norm", x, y, gate, shift, scale, 1e-6)
    g_x, g_h = torch.randn_like(x_new), torch.randn_like(h)
    bwd = getattr(torch.ops.dit_emu, "_gated_residual_modulated_layer_norm_backward")
    args = (g_h, x_new, y, gate, scale, mean, rstd)
    tier = run_emulated("_gated_residual_modulated_layer_norm_backward", g_x, *args)
    generic = run_emulated("_gated_residual_modulated_layer_norm_backward", _offset(g_x, 1), *args)
    for i, (a, b) in enumerate(zip(generic, _tensors(bwd(_offset(g_x, 1), *args)))):
        assert torch.equal(a, b), f"generic backward output {i} differs between two calls"
    for sms in (1, 3, 7):
        torch.ops.dit_emu._emu_configure(0, 0, sms)
        got = _tensors(bwd(g_x, *args))
        for i, (a, b) in enumerate(zip(tier, got)):
            assert torch.equal(a, b), f"tier backward output {i} changed with {sms} SMs"
    torch.ops.dit_emu._emu_configure(0, 0, 2)
    for i, (a, b) in enumerate(zip(tier, generic)):
        atol, rtol = TOLERANCES[a.dtype][2:]
        assert_close(a, b, atol, rtol, name=f"tier vs generic backward, output {i}")


# ---- patchify / unpatchify ----------------------------------------------------------------------

# The token-row transpose (16-byte vectors) takes the first two (DiT latent- and pixel-like) and the
# last (several token rows per CTA, a partial last batch); the others need the element kernels.
PATCH_CASES = [(2, 4, 8, 8, 2), (1, 3, 32, 32, 16), (2, 5, 6, 12, 3), (1, 1, 4, 4, 1), (5, 2, 16, 16, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PATCH_CASES, ids=str)
@vs_cpu_kernels
def test_patchify_and_unpatchify(dtype, case):
    n, c, h, w, p = case
    x = torch.randn(n, c, h, w).to(dtype)
    tokens = compare_with_cpu("patchify", x, p)
    compare_with_cpu("_patchify_backward", torch.randn_like(tokens), p, h, w)
    c_all = 2 * c  # learned-sigma head: keep the first half
    y = torch.randn(n, (h // p) * (w // p), p * p * c_all).to(dtype)
    img = compare_with_cpu("unpatchify", y, p, h, w, c)
    compare_with_cpu("_unpatchify_backward", torch.randn_like(img), p, c_all)


# ---- token gather / scatter ---------------------------------------------------------------------

def _ids(n, t, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(n)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 8, 64, 0), (3, 9, 4, 59, 0), (1, 300, 150, 8, 0), (2, 32, 13, 1152, 0),
                                   (2, 16, 8, 64, 1)], ids=str)
@vs_cpu_kernels
def test_gather_and_scatter_tokens(dtype, shape):
    n, t, k, d, misalign = shape
    torch.manual_seed(5)
    ids = _ids(n, t, k, 5)
    x = _offset(torch.randn(n, t, d).to(dtype), misalign)
    kept = compare_with_cpu("gather_tokens", x, ids)
    compare_with_cpu("_gather_tokens_backward", torch.randn_like(kept), ids, t)
    kept = _offset(kept, misalign)
    for fill in (torch.randn(d).to(dtype), torch.randn(d), torch.randn(n, t, d).to(dtype)):
        out = compare_with_cpu("scatter_tokens", kept, ids, fill, t)
        compare_with_cpu("_scatter_tokens_backward", torch.randn_like(out), ids, fill.dim() == 3, fill.dtype, grad=True)


@pytest.mark.parametrize("bad", [[[0, 5], [1, 2]], [[0, -1], [1, 2]]], ids=["past_T", "negative"])
def test_token_ids_out_of_range_trip_the_device_assert(bad):
    """Like torch.gather on CUDA: an id outside [0, T) is a device-side assert, not a wild access."""
    ids = torch.tensor(bad)
    x, kept = torch.randn(2, 5, 8), torch.randn(2, 2, 8)
    for call in (lambda: torch.ops.dit_emu.gather_tokens(x, ids),
                 lambda: torch.ops.dit_emu.scatter_tokens(kept, ids, torch.randn(8), 5),
                 lambda: torch.ops.dit_emu._gather_tokens_backward(kept, ids, 5),
                 lambda: torch.ops.dit_emu._scatter_tokens_backward(x, ids, False, torch.float32)):
        with pytest.raises(RuntimeError, match="device-side assert triggered: .*out of range"):
            call()


# ---- SDE Euler-Maruyama step --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial", [(4, 4), (3, 5)], ids=str)  # vectorised (S % 4 == 0) and scalar
@pytest.mark.parametrize("cfg", [False, True])
@vs_cpu_kernels
def test_sde_step_explicit_noise(dtype, spatial, cfg):
    torch.manual_seed(6)
    b, c = 2, 3
    x = torch.randn(b, c, *spatial).to(dtype)
    out = torch.randn(2 * b if cfg else b, 2 * c, *spatial).to(dtype)  # learned-sigma channels ignored
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(x.shape, dtype=acc)
    compare_with_cpu("sde_euler_maruyama_step", x, out, 0.9, -0.05, 0.1, 4.0, 2, z, None)
    coeffs = torch.tensor([[1.0, 0.1, 0.0], [0.95, -0.02, 0.3]], dtype=acc)
    compare_with_cpu("sde_euler_maruyama_step_table", x, out, coeffs, torch.tensor([1]), 4.0, 2, z, None)


def test_sde_step_table_step_out_of_range_gives_nan():
    """The CUDA table step cannot raise without a host sync: an out-of-range step poisons the result."""
    x, out = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    coeffs = torch.ones(3, 3, dtype=torch.float64)
    for step in (-1, 3):
        x_next, x_mean = torch.ops.dit_emu.sde_euler_maruyama_step_table(
            x, out, coeffs, torch.tensor(step), 1.0, 2, torch.randn(1, 2, 4, 4), None)
        assert x_next.isnan().all() and x_mean.isnan().all()


@pytest.mark.parametrize("spatial", [(8, 8), (3, 5)], ids=str)
def test_sde_step_in_kernel_philox_noise(spatial):
    """With coef_x = coef_out = 0 and noise_std = 1 the step returns the kernel's own z: it must be the
    documented Philox stream (test_sde_step's NumPy reference, pinned there to the Random123 answers),
    advance the generator offset by 4 per call, and repeat for the same state."""
    x = torch.zeros(2, 4, *spatial)
    out = torch.zeros_like(x)
    seed = 0x1234_5678_9ABC
    draws = []
    for order in ORDERS:  # the same generator state gives the same noise under every schedule
        torch.ops.dit_emu._emu_configure(order, order, 2)
        torch.ops.dit_emu._emu_manual_seed(seed, 8)
        draws.append(torch.ops.dit_emu.sde_euler_maruyama_step(x, out, 0.0, 0.0, 1.0, 1.0, 4, None, None))
    torch.ops.dit_emu._emu_configure(0, 0, 2)
    z1, mean = draws[0]
    assert all(torch.equal(z1, z) for z, _ in draws[1:])
    assert torch.equal(mean, torch.zeros_like(mean))
    assert_close(z1.reshape(-1), _philox_normals_ref(seed, 8, x.numel()), atol=2e-5, rtol=2e-5, name="philox z")
    z2, _ = torch.ops.dit_emu.sde_euler_maruyama_step(x, out, 0.0, 0.0, 1.0, 1.0, 4, None, None)  # offset now 12
    assert_close(z2.reshape(-1), _philox_normals_ref(seed, 12, x.numel()), atol=2e-5, rtol=2e-5, name="philox z")
    assert not torch.equal(z1, z2)


def test_run_emulated_detects_schedule_dependence_of_noise_offsets():
    """run_emulated's schedule check is exact: three draws from one generator differ (offset advances)."""
    x = torch.zeros(1, 1, 4, 4)
    torch.ops.dit_emu._emu_manual_seed(7, 0)
    with pytest.raises(AssertionError, match="depends on the thread schedule"):
        run_emulated("sde_euler_maruyama_step", x, torch.zeros_like(x), 0.0, 0.0, 1.0, 1.0, 1, None, None)


def test_sde_step_philox_statistics():
    """The emulated default generator with two seeds: normal moments, no neighbour/seed correlation, KS."""
    def op(x, out, coef_x, coef_out, noise_std, cfg_scale, guided):  # the raw op wants an int and both optionals
        return torch.ops.dit_emu.sde_euler_maruyama_step(x, out, coef_x, coef_out, noise_std, cfg_scale, x.shape[1], None, None)

    def draw(seed):
        torch.ops.dit_emu._emu_manual_seed(seed, 0)
        return _noise_of(op, "cpu", (16, 4, 32, 32))

    z, z2 = draw(5), draw(6)
    _check_normal(z, z2)
    assert torch.equal(z, draw(5))


# ---- the emulator itself ------------------------------------------------------------------------

def test_dit_kernels_cpu_ops_run_emulated_exactly_when_asked():
    """DIT_EMULATE_CUDA=1 must route the public ops through the emulation, and only then."""
    import dit_kernels as dk

    before = torch.ops.dit_emu._emu_stats()[0]
    dk.modulated_layer_norm(torch.randn(2, 3, 64), torch.randn(2, 64), torch.randn(2, 64))
    launched = torch.ops.dit_emu._emu_stats()[0] - before
    assert launched == (1 if EMULATE_CUDA else 0)


def test_emulator_detects_a_missing_barrier():
    """A block reduction that reads shared memory without __syncthreads gives schedule-dependent sums."""
    results = set()
    for order in ORDERS:
        torch.ops.dit_emu._emu_configure(order, 99, 2)
        results.add(torch.ops.dit_emu._emu_selftest(1))
    torch.ops.dit_emu._emu_configure(0, 0, 2)
    assert len(results) > 1
    for order in ORDERS:  # the correct version of the same kernel
        torch.ops.dit_emu._emu_configure(order, 99, 2)
        assert torch.ops.dit_emu._emu_selftest(0) == 256 * 255 // 2
    torch.ops.dit_emu._emu_configure(0, 0, 2)


@pytest.mark.parametrize("case,message", [
    (2, "warp shuffle with exited lanes"),
    (3, "deadlock"),
    (4, "dynamic shared memory"),
    (5, "static \\+ dynamic shared memory"),
    (6, "misaligned address"),
])
def test_emulator_reports_invalid_kernels(case, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dit_emu._emu_selftest(case)
