"""Fused ops vs their references: `pytest benchmarks --benchmark-only`.

Providers: `ref` (the eager PyTorch reference, in the input dtype as the DiT code runs it),
`ref_compiled` (torch.compile of the same reference, the honest competitor) and `kernel`
(the compiled dit_kernels op). Modes: `fwd` and `fwd_bwd`. Each record carries GB/s from the
op's minimal bytes and the fraction of the card's measured copy bandwidth in extra_info.

GPU shapes: DiT-XL/2 @ 256 px training (N=256, T=256, D=1152, bf16), MaskDiT-XL/2 tokens
(K=128), patchify at the latent (256, 4, 32, 32, p=2) and pixel (64, 3, 256, 256, p=16) shapes.
CPU shapes are small so the run takes minutes.
"""
import functools

import pytest
import torch

import dit_kernels as dk
from dit_kernels._ext import has_kernel

from common import DEVICE, ON_CUDA, SMOKE, record, run, time_fn

# ---- shapes (derived from the model registry: DiT-XL/2 @ 256 px) -------------------------------
if ON_CUDA:
    DTYPE = torch.bfloat16
    N, T, D, K = 256, 256, 1152, 128
    PATCH_SHAPES = {"latent": (256, 4, 32, 32, 2), "pixel": (64, 3, 256, 256, 16)}
else:
    DTYPE = torch.float32
    N, T, D, K = 2, 64, 384, 32
    PATCH_SHAPES = {"latent": (4, 4, 32, 32, 2), "pixel": (1, 3, 64, 64, 16)}

PROVIDERS = ["ref", "ref_compiled", "kernel"]
MODES = ["fwd", "fwd_bwd"]


def _rand(*shape, dtype=DTYPE, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _modulation(n, d, parts=6, dtype=DTYPE):
    """(N, parts*D) adaLN output chunked into strided (N, D) views, as the model produces them."""
    return _rand(n, parts * d, dtype=dtype, scale=0.1).chunk(parts, dim=1)


# ---- op table: inputs, reference, kernel, minimal bytes ------------------------------------------
# Minimal bytes (what GB/s divides by): fwd = every input element the outputs depend on, read once
# (unpatchify with channels = C reads C of C_all columns), + every output written once; fwd_bwd adds
# the backward: every cotangent read, the tensors its formula re-reads (`bwd_reads`: ("in", i) or
# ("out", i) of the forward), every input gradient written (a gradient that is the cotangent itself,
# like gated_residual's dx, is not). Statistics and workspaces an implementation keeps are not
# minimal. tests/test_bench_bytes.py checks each formula against the references on the CPU.
# `graph`: host overhead exceeds the GPU time of a call (small ops): time a CUDA-graph replay.
def _mln_case():
    x = _rand(N, T, D)
    shift, scale = _modulation(N, D)[:2]
    act = N * T * D * x.element_size()
    mod = N * D * x.element_size()  # one (N, D) modulation tensor
    return dict(
        inputs=(x, shift, scale),
        ref=lambda x, s, c: dk.modulated_layer_norm_ref(x, s, c, upcast=False),
        kernel=lambda x, s, c: dk.modulated_layer_norm(x, s, c, impl="ext"),
        op="modulated_layer_norm",
        bytes_fwd=2 * act + 2 * mod,  # read x, shift, scale; write y
        bwd_reads=[("in", 0), ("in", 2)],  # x, scale
        bytes_fwd_bwd=5 * act + 5 * mod,  # + read dy, x, scale; write dx, dshift, dscale
    )


def _gr_case():
    x, y = _rand(N, T, D), _rand(N, T, D)
    gate = _modulation(N, D)[2]
    act = N * T * D * x.element_size()
    mod = N * D * x.element_size()
    return dict(
        inputs=(x, y, gate),
        ref=lambda x, y, g: dk.gated_residual_ref(x, y, g, upcast=False),
        kernel=lambda x, y, g: dk.gated_residual(x, y, g, impl="ext"),
        op="gated_residual",
        bytes_fwd=3 * act + mod,  # read x, y, gate; write out
        bwd_reads=[("in", 1), ("in", 2)],  # y, gate
        bytes_fwd_bwd=6 * act + 3 * mod,  # + read dout, y, gate; write dy, dgate (dx is dout itself)
    )


def _grmln_case(x_dtype=None, y_dtype=None):
    x, y = _rand(N, T, D, dtype=x_dtype or DTYPE), _rand(N, T, D, dtype=y_dtype or DTYPE)
    mods = _modulation(N, D, dtype=x_dtype or DTYPE)
    xa, ya = N * T * D * x.element_size(), N * T * D * y.element_size()  # residual / branch tensors
    mod = N * D * mods[0].element_size()
    upcast = x_dtype is not None  # the autocast layout runs the reference as the model does
    return dict(
        inputs=(x, y, mods[2], mods[3], mods[4]),
        ref=lambda x, y, g, s, c: dk.gated_residual_modulated_layer_norm_ref(x, y, g, s, c, upcast=upcast),
        kernel=lambda x, y, g, s, c: dk.gated_residual_modulated_layer_norm(x, y, g, s, c, impl="ext"),
        op="gated_residual_modulated_layer_norm",
        bytes_fwd=2 * xa + 2 * ya + 3 * mod,  # read x, y, gate, shift, scale; write x_new, h
        bwd_reads=[("out", 0), ("in", 1), ("in", 2), ("in", 4)],  # x_new, y, gate, scale
        # + read dx_new, dh, x_new, y, gate, scale; write dx, dy, dgate, dshift, dscale
        bytes_fwd_bwd=5 * xa + 5 * ya + 8 * mod,
    )


def _grmln_autocast_case():
    """The layout of bf16 autocast training: fp32 residual x, bf16 branch y (and h, dh, dy), fp32 modulation."""
    return _grmln_case(torch.float32, torch.bfloat16)


def _patchify_case(which):
    n, c, h, w, p = PATCH_SHAPES[which]
    x = _rand(n, c, h, w)
    nbytes = x.numel() * x.element_size()
    return dict(
        inputs=(x,),
        ref=lambda x: dk.patchify_ref(x, p).contiguous(),
        kernel=lambda x: dk.patchify(x, p, impl="ext"),
        op="patchify",
        bytes_fwd=2 * nbytes,
        bwd_reads=[],
        bytes_fwd_bwd=4 * nbytes,
        graph=True,
    )


def _unpatchify_case(which):
    n, c, h, w, p = PATCH_SHAPES[which]
    c_all = 2 * c if which == "latent" else c  # DiT's learned-sigma head emits 2C channels
    y = _rand(n, (h // p) * (w // p), p * p * c_all)
    out_bytes = n * c * h * w * y.element_size()
    return dict(
        inputs=(y,),
        ref=lambda y: dk.unpatchify_ref(y, p, h, w, c).contiguous(),
        kernel=lambda y: dk.unpatchify(y, p, h, w, channels=c, impl="ext"),
        op="unpatchify",
        bytes_fwd=2 * out_bytes,  # read the C kept of C_all channels, write the image
        bwd_reads=[],
        bytes_fwd_bwd=3 * out_bytes + y.numel() * y.element_size(),  # + read dout, write dy (zeros for C..C_all)
        graph=True,
    )


def _gather_case():
    x = _rand(N, T, D)
    ids_keep, _, _ = dk.random_token_mask(N, T, K, device=DEVICE)
    row = D * x.element_size()
    ids = ids_keep.numel() * ids_keep.element_size()
    return dict(
        inputs=(x, ids_keep),
        ref=dk.gather_tokens_ref,
        kernel=lambda x, i: dk.gather_tokens(x, i, impl="ext"),
        op="gather_tokens",
        bytes_fwd=2 * N * K * row + ids,  # read ids and the kept rows, write them
        bwd_reads=[("in", 1)],  # ids
        bytes_fwd_bwd=3 * N * K * row + N * T * row + 2 * ids,  # + read dout, ids; write dx (zeros included)
        graph=True,
    )


def _scatter_case():
    kept = _rand(N, K, D)
    token = _rand(D)
    ids_keep, _, _ = dk.random_token_mask(N, T, K, device=DEVICE)
    row = D * kept.element_size()
    ids = ids_keep.numel() * ids_keep.element_size()
    return dict(
        inputs=(kept, ids_keep, token),
        ref=lambda k, i, f: dk.scatter_tokens_ref(k, i, f, T),
        kernel=lambda k, i, f: dk.scatter_tokens(k, i, f, length=T, impl="ext"),
        op="scatter_tokens",
        bytes_fwd=N * K * row + ids + row + N * T * row,  # read kept, ids, the token; write all rows
        bwd_reads=[("in", 1)],  # ids
        # + read dout, ids; write dkept, dtoken
        bytes_fwd_bwd=2 * N * K * row + 2 * ids + 2 * row + 2 * N * T * row,
        graph=True,
    )


CASES = {
    "modulated_layer_norm": _mln_case,
    "gated_residual": _gr_case,
    "gated_residual_modulated_layer_norm": _grmln_case,
    "gated_residual_modulated_layer_norm[fp32 x, bf16 y]": _grmln_autocast_case,
    "patchify[latent]": functools.partial(_patchify_case, "latent"),
    "patchify[pixel]": functools.partial(_patchify_case, "pixel"),
    "unpatchify[latent]": functools.partial(_unpatchify_case, "latent"),
    "unpatchify[pixel]": functools.partial(_unpatchify_case, "pixel"),
    "gather_tokens": _gather_case,
    "scatter_tokens": _scatter_case,
}


@functools.lru_cache(maxsize=None)
def _compiled(case_name):
    return torch.compile(CASES[case_name]()["ref"])


def _make_step(case, case_name, provider, mode):
    fn = {"ref": case["ref"], "kernel": case["kernel"]}.get(provider) or _compiled(case_name)
    inputs = case["inputs"]
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    diff = [t for t in leaves if t.requires_grad]

    def step():
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, diff, grads)

    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_op(benchmark, case_name, provider, mode):
    case = CASES[case_name]()
    if provider == "kernel" and not has_kernel(case["op"], DEVICE):
        pytest.skip(f"no compiled {case['op']} kernel for {DEVICE}")
    if provider == "ref_compiled" and SMOKE:
        pytest.skip("smoke run: compile provider skipped")
    benchmark.group = f"{case_name}:{mode}"
    step = _make_step(case, case_name, provider, mode)
    seconds = time_fn(step, warmup=3, rounds=30 if ON_CUDA else 5, graph=case.get("graph", False))
    record(benchmark, case_name, provider, mode, seconds, nbytes=case[f"bytes_{mode}"],
           dtype=str(DTYPE).replace("torch.", ""), shape=dict(N=N, T=T, D=D, K=K))
    run(benchmark, step)
