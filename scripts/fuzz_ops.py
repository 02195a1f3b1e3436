"""Differential fuzzing of every dit_kernels op and its backward: reference vs compiled kernel.

  python scripts/fuzz_ops.py --cases 2000 --seed 0              # C++ CPU kernels vs the references
  python scripts/fuzz_ops.py --cases 500 --seed 1 --emulated    # CUDA kernels (tests/cuda_emu) vs the references
  python scripts/fuzz_ops.py --replay '<case json>' [--emulated]  # one case, in this process, with a traceback

A case (a JSON dict: op, seed, shapes, dtypes, memory layouts, special values, id patterns, one
deliberate misuse or none) is built into tensors by `build_case` and run by `run_case`:
  - valid input: the op with impl="ext" and impl="ref", forward and backward, must agree: non-finite
    values (NaN, +-inf) at the same places, finite values within "2 x the reference's own rounding
    error + atol" of the float64 reference (exact for the permutations patchify / unpatchify);
  - a misuse (wrong dtype, shape, rank, patch size, out-of-range or repeated ids, ...): a
    ValueError / TypeError / RuntimeError whose message names the offending argument.
Cases run in a worker subprocess; a crash (segfault, abort) or a hang (--timeout) of the worker is
recorded as a failure with its case, and a fresh worker takes the next case. The summary gives the
cases per op and outcome and a reproducer line per failure.

The space of cases is written once (`draw_case`, against a small "draw" interface) and drawn either
by random.Random (this script) or by hypothesis (tests/test_fuzz_ops.py, a fixed-seed slice in CI).
"""
import argparse
import collections
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPS = ("modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm", "patchify", "unpatchify",
       "gather_tokens", "scatter_tokens", "sde_step", "sde_step_table")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Hidden sizes: tiny, odd (scalar paths), multiples of 8 (vector paths), DiT widths, past the register cache.
HIDDEN = (1, 2, 3, 7, 8, 16, 59, 64, 96, 127, 384, 768, 1152, 1600, 2049, 4096)
MOD_LAYOUTS = ("full", "chunk", "shared1d", "shared2d", "expand", "inner_strided", "offset")
ROW_LAYOUTS = ("contig", "offset", "row_padded", "inner_strided", "transposed", "expand_t")
SPECIALS = ("none", "none", "none", "nan", "inf", "large", "constant_rows")
ERROR_TYPES = ("ValueError", "TypeError", "RuntimeError")


# ---------------------------------------------------------------------------------------------------------
#                                              Case space
# ---------------------------------------------------------------------------------------------------------

class RandomDraw:
    """The draw interface over random.Random (for long runs)."""

    def __init__(self, rng):
        self.rng = rng

    def choice(self, name, options):
        return self.rng.choice(list(options))

    def integer(self, name, lo, hi):
        return self.rng.randint(lo, hi)


def _misuse(d, options):
    """None most of the time, else one deliberate misuse of the op's arguments."""
    return d.choice("misuse_kind", options) if d.integer("misuse", 0, 5) == 0 else None


def draw_case(d, op=None, max_numel=1 << 16):
    """One case (a JSON-able dict) for `op` (drawn when None); tensors stay below ~max_numel elements."""
    op = op or d.choice("op", OPS)
    case = {"op": op, "seed": d.integer("seed", 0, 2**31 - 1), "dtype": d.choice("dtype", DTYPES),
            "special": d.choice("special", SPECIALS)}
    if op in ("modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm"):
        dd = d.choice("d", HIDDEN)
        n = d.choice("n", (0, 1, 1, 2, 3))
        t = d.choice("t", (0, 1, 1, 2, 5, 9, 17, 70))
        while n * t * dd > max_numel and t > 1:
            t //= 2
        case.update(n=n, t=t, d=dd, x_layout=d.choice("x_layout", ROW_LAYOUTS),
                    mod_layout=d.choice("mod_layout", MOD_LAYOUTS),
                    mod_dtype=d.choice("mod_dtype", ("same", "same", "float32")),
                    eps=d.choice("eps", (1e-6, 1e-6, 1e-5, 0.0)), grad=d.choice("grad", (True, True, False)))
        if op == "modulated_layer_norm":
            case["branch"] = d.choice("branch", ("same", "same", "bfloat16", "float16"))  # out_dtype
            case["misuse"] = _misuse(d, ("x_int", "x_rank", "shift_shape", "scale_dtype", "out_dtype", "shift_list",
                                         "mod_half_with_fp32_x", "mixed_mod_dtypes"))
        else:
            case["branch"] = d.choice("branch", ("same", "same", "bfloat16", "float16"))  # y dtype
            case["y_layout"] = d.choice("y_layout", ROW_LAYOUTS)
            case["grad_outputs"] = d.choice("grad_outputs", ("all", "all", "first", "second"))
            case["misuse"] = _misuse(d, ("y_shape", "y_dtype", "gate_shape", "x_rank", "gate_int",
                                         "mod_half_with_fp32_x", "mixed_mod_dtypes"))
    elif op in ("patchify", "unpatchify"):
        p = d.choice("p", (1, 2, 2, 3, 4, 8))
        case.update(p=p, n=d.choice("n", (0, 1, 2, 3)), c=d.choice("c", (1, 3, 4, 8)),
                    h=p * d.choice("h", (0, 1, 2, 3, 5)), w=p * d.choice("w", (1, 2, 3, 4, 7)),
                    layout=d.choice("layout", ("contig", "offset", "channels_last", "sliced", "transposed")),
                    grad=d.choice("grad", (True, True, False)))
        if op == "unpatchify":
            case["extra_c"] = d.choice("extra_c", (0, 0, 1, 3))  # C_all = c + extra_c; keep the first c
            case["misuse"] = _misuse(d, ("p_zero", "p_float", "tokens", "features", "channels_zero", "channels_big",
                                         "hw_not_divisible", "y_int"))
        else:
            case["misuse"] = _misuse(d, ("p_zero", "p_float", "hw_not_divisible", "x_rank", "x_int"))
    elif op in ("gather_tokens", "scatter_tokens"):
        dd = d.choice("d", HIDDEN)
        t = d.choice("t", (1, 2, 5, 16, 64, 256))
        n = d.choice("n", (0, 1, 2, 3))
        while n * t * dd > max_numel and t > 1:
            t //= 2
        case.update(n=n, t=t, d=dd, k=d.integer("k", 0, t), layout=d.choice("layout", ROW_LAYOUTS),
                    ids=d.choice("ids", ("perm", "perm", "perm", "sorted", "ids_view", "oob_high", "oob_neg", "dup")),
                    grad=d.choice("grad", (True, True, False)))
        if op == "scatter_tokens":
            case["fill"] = d.choice("fill", ("token1d", "token3d", "per_token", "per_token_strided"))
            case["fill_dtype"] = d.choice("fill_dtype", ("same", "same", "float32", "float64"))
            case["misuse"] = _misuse(d, ("ids_int32", "ids_rows", "k_gt_t", "fill_shape", "no_length", "length_mismatch",
                                         "kept_int"))
        else:
            case["misuse"] = _misuse(d, ("ids_int32", "ids_rows", "k_gt_t", "x_rank", "x_int", "ids_3d"))
        if case["misuse"] == "k_gt_t":
            case["k"] = t + 1
    else:  # sde_step, sde_step_table
        b = d.choice("b", (0, 1, 2, 3))
        c = d.choice("c", (1, 3, 4, 5))
        spatial = d.choice("spatial", ((), (1,), (7,), (4, 4), (3, 5), (8, 8), (2, 3, 5)))
        case.update(b=b, c=c, spatial=list(spatial), cfg=d.choice("cfg", (False, True)),
                    extra_c=d.choice("extra_c", (0, 0, 1, 4)),
                    out_dtype=d.choice("out_dtype", ("same", "same", "float32", "bfloat16")),
                    out_layout=d.choice("out_layout", ("contig", "channel_slice", "offset", "channels_last")),
                    x_layout=d.choice("x_layout", ("contig", "offset", "transposed")),
                    guided=d.choice("guided", (None, None, 0, 1, 3, 9)), noise=d.choice("noise", ("given", "given", "none")),
                    cfg_scale=d.choice("cfg_scale", (1.0, 4.0, 0.0, -1.5)),
                    coefs=d.choice("coefs", ((1.0, -0.1, 0.3), (0.5, 2.0, 0.0), (1.0, 0.0, 1.0), (-2.0, 1e-3, 1e3))))
        if op == "sde_step_table":
            case["steps"] = d.choice("steps", (1, 2, 10))
            case["step"] = d.choice("step", (0, 1, 9, "oob", "neg"))
            case["coeffs_dtype"] = d.choice("coeffs_dtype", ("float32", "float64"))
            case["misuse"] = _misuse(d, ("out_shape", "noise_shape", "guided_neg", "x_int", "coeffs_shape", "coeffs_dtype",
                                         "step_dtype", "step_numel"))
        else:
            case["misuse"] = _misuse(d, ("out_shape", "noise_shape", "guided_neg", "x_int", "x_rank", "out_int"))
    return case


# ---------------------------------------------------------------------------------------------------------
#                                           Building inputs
# ---------------------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def _dtype(name):
    return getattr(_torch(), name)


class Inputs:
    """Deterministic random tensors for one case."""

    def __init__(self, seed):
        torch = _torch()
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)

    def values(self, shape, dtype, special="none", scale=1.0, offset=0.0):
        torch = _torch()
        v = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale + offset
        if v.numel() and special in ("nan", "inf", "large"):
            flat = v.view(-1)
            for _ in range(self.rng.randint(1, 3)):
                i = self.rng.randrange(flat.numel())
                flat[i] = {"nan": float("nan"), "inf": self.rng.choice((1, -1)) * float("inf"), "large": 6e4}[special]
        if special == "constant_rows" and v.dim() >= 1 and v.numel():
            v[..., :] = v[..., :1]  # every row constant: variance 0 (LayerNorm statistics edge case)
        return v.to(dtype)

    def layout(self, t, kind):
        """The same values with another memory layout (the op must not care)."""
        torch = _torch()
        if kind == "contig" or t.dim() == 0:
            return t.clone()
        if kind == "offset":  # storage offset of 1..3 elements: breaks 16-byte alignment
            k = self.rng.randint(1, 3)
            buf = torch.empty(t.numel() + k, dtype=t.dtype)
            view = buf[k:].view(t.shape)
            view.copy_(t)
            return view
        if kind == "row_padded":  # rows of D inside rows of D + 3: unit inner stride, odd row stride
            buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
            view = buf[..., : t.shape[-1]]
            view.copy_(t)
            return view
        if kind in ("inner_strided", "sliced"):  # stride 2 in the last dimension
            buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            view = buf[..., ::2]
            view.copy_(t)
            return view
        if kind == "transposed":  # last two dimensions swapped in memory
            if t.dim() < 2:
                return t.clone()
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if kind == "channels_last":
            if t.dim() == 4:
                return t.contiguous(memory_format=torch.channels_last)
            return t.clone()
        if kind == "expand_t":  # (N, 1, D) broadcast over T: stride 0 (values change: row 0 repeated)
            if t.dim() != 3 or t.shape[1] == 0:
                return t.clone()
            return t[:, :1].clone().expand(t.shape)
        raise ValueError(kind)

    def modulation(self, n, d, dtype, layout, special, count=1):
        """`count` modulation tensors (N, D) in `layout` (shared layouts give (D,) / (1, D) / stride 0)."""
        torch = _torch()
        out = []
        base = self.values((n, count * d), dtype, special, scale=0.5)
        for i in range(count):
            m = base[:, i * d : (i + 1) * d]
            if layout == "full":
                m = m.contiguous()
            elif layout == "chunk":
                pass  # a strided view of one (N, count*D) tensor, as Linear(...).chunk(count, dim=1)
            elif layout in ("shared1d", "shared2d", "expand"):
                row = self.values((d,), dtype, special, scale=0.5)
                m = row if layout == "shared1d" else row[None] if layout == "shared2d" else row.expand(n, d)
            elif layout == "inner_strided":
                m = self.layout(m.contiguous(), "inner_strided")
            elif layout == "offset":
                m = self.layout(m.contiguous(), "offset")
            out.append(m)
        return out


class Case:
    """A built case: `call(impl, tensors)` runs the op; `tensors` are its inputs by name."""

    def __init__(self, call, tensors, grad_names=(), expect_error=None, exact=False, compare=None, unspecified=None):
        self.call, self.tensors, self.grad_names = call, tensors, list(grad_names)
        self.expect_error = expect_error  # the argument a misuse must name, or None for a valid input
        self.exact = exact  # permutations: bit-exact
        self.compare = compare  # output indices to compare (None: all)
        self.unspecified = unspecified  # why a kernel's result is not compared (documented behaviour)
        # set by the builders where needed: grad_outputs, error_dtype, atol_factor, skip_grads, nan_outputs


def _row_case(case, emulated):
    """modulated_layer_norm, gated_residual, gated_residual_modulated_layer_norm."""
    torch = _torch()
    import dit_kernels as dk

    op, n, t, d, misuse = case["op"], case["n"], case["t"], case["d"], case["misuse"]
    inp = Inputs(case["seed"])
    dtype = _dtype(case["dtype"])
    branch = dtype if case["branch"] == "same" else _dtype(case["branch"])
    mod_dtype = dtype if case["mod_dtype"] == "same" else torch.float32
    if branch != dtype and dtype != torch.float32:
        branch = dtype  # a mixed branch exists only for a float32 x
    if branch != dtype:
        mod_dtype = torch.float32  # the kernels' rule for mixed branches (see csrc/common.h)
    special = case["special"]
    if special == "constant_rows" and case["eps"] == 0.0:
        special = "none"  # variance 0 with eps 0 is 0/0: undefined, whatever either implementation rounds to
    x = inp.layout(inp.values((n, t, d), dtype, special, scale=2.0, offset=0.5), case["x_layout"])
    count = 1 if op == "gated_residual" else 2 if op == "modulated_layer_norm" else 3
    mods = inp.modulation(n, d, mod_dtype, case["mod_layout"], special if special != "constant_rows" else "none", count)
    expect = None
    tensors = {"x": x}
    if op != "modulated_layer_norm":
        tensors["y"] = inp.layout(inp.values((n, t, d), branch, special if special != "constant_rows" else "none"),
                                  case["y_layout"])
    names = ["shift", "scale"] if op == "modulated_layer_norm" else ["gate"] if op == "gated_residual" else \
        ["gate", "shift", "scale"]
    tensors.update(zip(names, mods))
    out_dtype = None if branch == dtype else branch
    eps = case["eps"]
    if misuse == "x_int":
        tensors["x"], expect = torch.zeros(n, t, d, dtype=torch.int32), "x"
    elif misuse == "x_rank":
        tensors["x"], expect = x.reshape(n * t, d), "x"
    elif misuse == "shift_shape":
        tensors["shift"], expect = torch.zeros(n + 1, d + 1, dtype=mod_dtype), "shift"
    elif misuse == "scale_dtype":
        tensors["scale"], expect = torch.zeros(n, d, dtype=torch.int64), "scale"
    elif misuse == "out_dtype":
        out_dtype, expect = (torch.float64 if dtype != torch.float64 else torch.float16), "out_dtype"
    elif misuse == "shift_list":
        tensors["shift"], expect = [0.0] * d, "shift"
    elif misuse == "gate_int":
        tensors["gate"], expect = torch.zeros(n, d, dtype=torch.int32), "gate"
    elif misuse == "gate_shape":
        tensors["gate"], expect = torch.zeros(n, d + 1, dtype=mod_dtype), "gate"
    elif misuse == "y_shape":
        tensors["y"], expect = torch.zeros(n, t + 1, d, dtype=branch), "y"
    elif misuse == "y_dtype":
        tensors["y"], expect = torch.zeros(n, t, d, dtype=torch.float64 if dtype != torch.float64 else torch.float32), "y"
    elif misuse == "mod_half_with_fp32_x":
        # float16 modulation with a float32 x: the kernels accept only x's dtype or float32
        name = names[-1]
        tensors["x"] = x.float()
        if "y" in tensors:
            tensors["y"] = tensors["y"].float()
        tensors[name], expect, out_dtype = mods[-1].to(torch.float16), name, None
        for other in names[:-1]:
            tensors[other] = tensors[other].float()
    elif misuse == "mixed_mod_dtypes":
        # two modulation tensors of different (each allowed) dtypes: x bfloat16, one of them float32
        tensors["x"] = x.to(torch.bfloat16)
        if "y" in tensors:
            tensors["y"] = tensors["y"].to(torch.bfloat16)
        out_dtype = None
        for nm in names:
            tensors[nm] = tensors[nm].to(torch.bfloat16)
        if len(names) == 1:
            expect = None  # a single modulation tensor cannot disagree with itself: a valid case
            tensors[names[0]] = tensors[names[0]].float()
        else:
            tensors[names[-1]], expect = tensors[names[-1]].float(), names[-1]

    def call(impl, ts):
        # the float64 "truth" run (every input cast to float64) has no branch dtype
        od = None if ts["x"].dtype == torch.float64 != tensors["x"].dtype else out_dtype
        if op == "modulated_layer_norm":
            return (dk.modulated_layer_norm(ts["x"], ts["shift"], ts["scale"], eps, out_dtype=od, impl=impl),)
        if op == "gated_residual":
            return (dk.gated_residual(ts["x"], ts["y"], ts["gate"], impl=impl),)
        return tuple(dk.gated_residual_modulated_layer_norm(ts["x"], ts["y"], ts["gate"], ts["shift"], ts["scale"], eps,
                                                            impl=impl))

    grads = [k for k, v in tensors.items() if case["grad"] and isinstance(v, torch.Tensor) and v.is_floating_point()]
    c = Case(call, tensors, grads, expect)
    # float64 rows keep float32 statistics (mean, rstd in the op schema): held to a float32 reference's error
    c.error_dtype = torch.float32 if dtype == torch.float64 else None
    # A constant row has variance 0: rstd = 1/sqrt(eps) amplifies the rounding of its mean (the LayerNorm
    # output is ill-conditioned there), differently in every summation order: atol scaled by that factor.
    # Gradients through xhat (dx, dy, dgate, dscale) are that rounding noise times the upstream gradient
    # (dscale = sum_t g * xhat, exactly 0 in exact arithmetic): not compared; dshift (a plain sum) is.
    # Rows of D <= 2 are as degenerate (the LayerNorm output is 0 or +-1 whatever x; its backward is pure
    # cancellation, amplified by the float32 statistics of a float64 x).
    if special == "constant_rows" and eps > 0:
        # (the mean's rounding grows with D in a sequential sum: found 0.3 vs the reference's 0 at D = 4096)
        c.atol_factor = max(1.0, float(x.abs().max()) / eps**0.5 * max(1.0, d / 256)) if x.numel() else 1.0
        if op == "modulated_layer_norm":
            c.skip_grads = {"x", "scale"}
    if d <= 2:
        c.skip_grads = {"x", "y", "gate", "scale"}
    if dtype == torch.float64 and special == "large":
        # float64 backward recomputes xhat from the float32 mean: off by |mean| * 2^-24 * rstd, large next to a
        # 6e4 entry (a documented precision limit of the float64 path, reported; not a float32/16-bit issue)
        c.skip_grads = {"x", "y", "gate", "scale"}
    if op == "gated_residual_modulated_layer_norm":
        c.grad_outputs = case["grad_outputs"]
    return c


def _patch_case(case, emulated):
    torch = _torch()
    import dit_kernels as dk

    op, p, n, c, h, w, misuse = case["op"], case["p"], case["n"], case["c"], case["h"], case["w"], case["misuse"]
    inp = Inputs(case["seed"])
    dtype = _dtype(case["dtype"])
    expect = None
    if op == "patchify":
        x = inp.layout(inp.values((n, c, h, w), dtype, case["special"]), case["layout"])
        args = {"x": x}
        pp = p
        if misuse == "p_zero":
            pp, expect = 0, "patch_size"
        elif misuse == "p_float":
            pp, expect = float(p), "patch_size"
        elif misuse == "hw_not_divisible":
            if p == 1:
                pp = 2
            args["x"], expect = inp.values((n, c, pp * 2 + 1, w + 1), dtype), "patch_size"
        elif misuse == "x_rank":
            args["x"], expect = x.reshape(n * c, h, w), "x"
        elif misuse == "x_int":
            args["x"], expect = torch.zeros(n, c, h, w, dtype=torch.int64), "x"

        def call(impl, ts):
            return (dk.patchify(ts["x"], pp, impl=impl),)
    else:
        c_all = c + case["extra_c"]
        hh, ww = h // p, w // p
        y = inp.layout(inp.values((n, hh * ww, p * p * c_all), dtype, case["special"]), case["layout"])
        args = {"y": y}
        pp, height, width, channels = p, h, w, c
        if misuse == "p_zero":
            pp, expect = 0, "patch_size"
        elif misuse == "p_float":
            pp, expect = float(p), "patch_size"
        elif misuse == "tokens":
            args["y"], expect = inp.values((n, hh * ww + 1, p * p * c_all), dtype), "token"
        elif misuse == "features":
            if p == 1:
                pp, height, width = 2, 2 * h, 2 * w
                args["y"] = inp.values((n, hh * ww, 4 * c_all + 1), dtype)
            else:
                args["y"] = inp.values((n, hh * ww, p * p * c_all + 1), dtype)
            expect = "p*p"
        elif misuse == "channels_zero":
            channels, expect = 0, "channels"
        elif misuse == "channels_big":
            channels, expect = c_all + 1, "channels"
        elif misuse == "hw_not_divisible":
            if p == 1:
                pp = 2
            height, expect = pp * hh + 1, "patch_size"
        elif misuse == "y_int":
            args["y"], expect = torch.zeros(n, hh * ww, p * p * c_all, dtype=torch.int32), "y"

        def call(impl, ts):
            return (dk.unpatchify(ts["y"], pp, height, width, channels, impl=impl),)
    grads = list(args) if case["grad"] else []
    return Case(call, args, grads, expect, exact=True)


def _ids(inp, case, n, t, k):
    """(N, K) ids in the case's pattern; returns (ids, what goes wrong or None)."""
    torch = _torch()
    rows = [torch.randperm(t, generator=inp.gen)[:k] for _ in range(n)]
    ids = torch.stack(rows) if n else torch.zeros(0, k, dtype=torch.int64)
    kind = case["ids"] if not case.get("misuse") else "perm"  # one thing wrong at a time
    if kind == "sorted":
        ids = ids.sort(dim=1).values
    elif kind == "ids_view":  # a non-contiguous view (every other column of a wider tensor)
        wide = torch.zeros(n, 2 * k, dtype=torch.int64)
        wide[:, ::2] = ids
        ids = wide[:, ::2]
    bad = None
    if n and k:
        if kind == "oob_high":
            ids[inp.rng.randrange(n), inp.rng.randrange(k)] = t + inp.rng.choice((0, 5))
            bad = "out of range"
        elif kind == "oob_neg":
            ids[inp.rng.randrange(n), inp.rng.randrange(k)] = -1
            bad = "out of range"
        elif kind == "dup" and k >= 2:
            r = inp.rng.randrange(n)
            ids[r, 1] = ids[r, 0]
            bad = "repeated"
    return ids, bad


def _token_case(case, emulated):
    torch = _torch()
    import dit_kernels as dk

    op, n, t, d, k, misuse = case["op"], case["n"], case["t"], case["d"], case["k"], case["misuse"]
    inp = Inputs(case["seed"])
    dtype = _dtype(case["dtype"])
    ids, bad = _ids(inp, case, n, t, min(k, t))
    expect = unspecified = None
    if op == "gather_tokens":
        x = inp.layout(inp.values((n, t, d), dtype, case["special"]), case["layout"])
        ts = {"x": x, "ids_keep": ids}
        if misuse == "ids_int32":
            ts["ids_keep"], expect = ids.int(), "ids_keep"
        elif misuse == "ids_rows":
            ts["ids_keep"], expect = torch.zeros(n + 1, k, dtype=torch.int64), "ids_keep"
        elif misuse == "k_gt_t":
            ts["ids_keep"], expect = torch.zeros(n, t + 1, dtype=torch.int64), "ids_keep"
        elif misuse == "x_rank":
            ts["x"], expect = x.reshape(-1), "x"
        elif misuse == "x_int":
            ts["x"], expect = torch.zeros(n, t, d, dtype=torch.int32), "x"
        elif misuse == "ids_3d":
            ts["ids_keep"], expect = ids[..., None], "ids_keep"

        def call(impl, ts):
            return (dk.gather_tokens(ts["x"], ts["ids_keep"], impl=impl),)
        grads = ["x"] if case["grad"] else []
    else:
        kept = inp.layout(inp.values((n, min(k, t), d), dtype, case["special"]), case["layout"])
        fill_dtype = dtype if case["fill_dtype"] == "same" else _dtype(case["fill_dtype"])
        kind = case["fill"]
        if kind == "token1d":
            fill = inp.values((d,), fill_dtype)
        elif kind == "token3d":
            fill = inp.values((1, 1, d), fill_dtype)
        else:
            fill = inp.values((n, t, d), fill_dtype, case["special"])
            if kind == "per_token_strided":
                fill = inp.layout(fill, "row_padded")
        length = t
        ts = {"kept": kept, "ids_keep": ids, "fill": fill}
        if misuse == "ids_int32":
            ts["ids_keep"], expect = ids.int(), "ids_keep"
        elif misuse == "ids_rows":
            ts["ids_keep"], expect = torch.zeros(n + 1, kept.shape[1], dtype=torch.int64), "ids_keep"
        elif misuse == "k_gt_t":
            ts["kept"] = inp.values((n, t + 1, d), dtype)
            ts["ids_keep"], expect = torch.zeros(n, t + 1, dtype=torch.int64), "ids_keep"
            if kind.startswith("per_token"):
                ts["fill"] = inp.values((n, t, d), fill_dtype)
        elif misuse == "fill_shape":
            ts["fill"], expect = inp.values((d + 1,), fill_dtype), "fill"
        elif misuse == "no_length":  # (D,): with N = 1 a (1, 1, D) fill is read as per-token (T = 1)
            ts["fill"], length, expect = inp.values((d,), fill_dtype), None, "length"
        elif misuse == "length_mismatch":
            if not kind.startswith("per_token"):
                ts["fill"] = inp.values((n, t, d), fill_dtype)
            if n == 1 and t == 1:  # (1, 1, D) would be read as the broadcast token
                ts["fill"] = inp.values((1, 2, d), fill_dtype)
            length, expect = ts["fill"].shape[1] + 1, "length"
        elif misuse == "kept_int":
            ts["kept"], expect = torch.zeros(n, kept.shape[1], d, dtype=torch.int32), "kept"

        def call(impl, ts):
            return (dk.scatter_tokens(ts["kept"], ts["ids_keep"], ts["fill"], length, impl=impl),)
        grads = ["kept", "fill"] if case["grad"] else []
    if bad and expect is None:
        gathers_only = op == "gather_tokens" and not grads  # a forward gather reads repeated ids fine
        if bad == "out of range":
            expect = "ids_keep"
        elif not gathers_only:
            if emulated:
                # Documented (dit_kernels/ops/tokens.py): CUDA kernels do not detect repeated ids (no host
                # sync); which duplicate wins is unspecified. DIT_KERNELS_DEBUG=1 validates them.
                unspecified = "repeated ids on CUDA: undetected by design (DIT_KERNELS_DEBUG=1 checks them)"
            else:
                expect = "ids_keep"  # the CPU kernels raise on a repeated id in every op that scatters
    # Copies are bit-exact; the gradient of a broadcast fill token is an fp32 sum (another order than the reference's)
    exact = op == "gather_tokens" or case["fill"].startswith("per_token")
    return Case(call, ts, grads, expect, exact=exact, unspecified=unspecified)


def _sde_case(case, emulated):
    torch = _torch()
    import dit_kernels as dk

    op, b, ch, misuse = case["op"], case["b"], case["c"], case["misuse"]
    spatial = tuple(case["spatial"])
    inp = Inputs(case["seed"])
    dtype = _dtype(case["dtype"])
    out_dtype = dtype if case["out_dtype"] == "same" else _dtype(case["out_dtype"])
    rows = 2 * b if case["cfg"] else b
    c_out = ch + case["extra_c"]
    x = inp.layout(inp.values((b, ch, *spatial), dtype, case["special"]), case["x_layout"])
    out = inp.values((rows, c_out + (1 if case["out_layout"] == "channel_slice" else 0), *spatial), out_dtype,
                     case["special"])
    if case["out_layout"] == "channel_slice":
        out = out[:, 1:]  # a channel slice: contiguous spatial block, channel stride > C_out
    else:
        out = inp.layout(out, case["out_layout"])
    noise = inp.values((b, ch, *spatial), dtype) if case["noise"] == "given" else None
    ts = {"x": x, "out": out, "noise": noise}
    guided = case["guided"]
    coef_x, coef_out, noise_std = case["coefs"]
    cfg_scale = case["cfg_scale"]
    expect = None
    if op == "sde_step_table":
        steps = case["steps"]
        cdt = _dtype(case["coeffs_dtype"])
        ts["coeffs"] = torch.tensor([[coef_x + 0.01 * i, coef_out, noise_std] for i in range(steps)], dtype=cdt)
        step = {"oob": steps, "neg": -1}.get(case["step"], case["step"])
        if case["step"] not in ("oob", "neg"):
            step = min(step, steps - 1)
        step_oob = not 0 <= step < steps
        ts["step"] = torch.tensor([step], dtype=torch.int64)
    if misuse == "out_shape":
        ts["out"], expect = out[..., :0] if spatial else out[:, :0], "out"
        if not spatial:
            ts["out"] = torch.zeros(2 * b + 1, c_out, dtype=out_dtype)  # neither B nor 2B rows
    elif misuse == "noise_shape":
        ts["noise"], expect = inp.values((b + 1, ch, *spatial), dtype), "noise"
    elif misuse == "guided_neg":
        guided, expect = -1, "guided_channels"
    elif misuse == "x_int":
        ts["x"], expect = torch.zeros(b, ch, *spatial, dtype=torch.int32), "x"
    elif misuse == "x_rank":
        ts["x"], expect = torch.zeros(b, dtype=dtype), "x"
    elif misuse == "out_int":
        ts["out"], expect = torch.zeros(rows, c_out, *spatial, dtype=torch.int64), "out"
    elif misuse == "coeffs_shape":
        ts["coeffs"], expect = torch.zeros(3, dtype=torch.float32), "coeffs"
    elif misuse == "coeffs_dtype":
        ts["coeffs"], expect = ts["coeffs"].half(), "coeffs"
    elif misuse == "step_dtype":
        ts["step"], expect = ts["step"].int(), "step"
    elif misuse == "step_numel":
        ts["step"], expect = torch.zeros(2, dtype=torch.int64), "step"
    seed = case["seed"]

    def call(impl, ts):
        # CPU kernel: noise from this CPU generator, as the reference draws it. The emulated CUDA kernel
        # draws in-kernel Philox noise from the (emulated) default CUDA generator: x_next is not compared.
        g = torch.Generator().manual_seed(seed) if ts["noise"] is None and not emulated else None
        if op == "sde_step":
            return tuple(dk.sde_euler_maruyama_step(ts["x"], ts["out"], coef_x, coef_out, noise_std, cfg_scale, guided,
                                                    ts["noise"], g, impl=impl))
        return tuple(dk.sde_euler_maruyama_step_table(ts["x"], ts["out"], ts["coeffs"], ts["step"], cfg_scale, guided,
                                                      ts["noise"], g, impl=impl))

    unspecified = None
    compare = None
    if ts["noise"] is None and emulated:
        compare = [1]  # CUDA draws in-kernel Philox noise, not torch.randn: compare x_mean only
    c = Case(call, ts, (), expect, compare=compare)
    if op == "sde_step_table" and step_oob and expect is None:
        if emulated:
            c.nan_outputs = True  # documented: a step outside the table yields NaN outputs on CUDA (no host sync)
        else:
            c.expect_error = "step"
    return c


def build_case(case, emulated=False):
    op = case["op"]
    if op in ("modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm"):
        return _row_case(case, emulated)
    if op in ("patchify", "unpatchify"):
        return _patch_case(case, emulated)
    if op in ("gather_tokens", "scatter_tokens"):
        return _token_case(case, emulated)
    return _sde_case(case, emulated)


# ---------------------------------------------------------------------------------------------------------
#                                              Running
# ---------------------------------------------------------------------------------------------------------

class CaseFailure(AssertionError):
    pass


# Relative atol (times max(1, max|truth|)) on top of 2 x the reference's own error, per output dtype.
# float64: the LayerNorm ops keep float32 statistics (mean, rstd in the op schema), so their float64
# backward is float32-accurate (~1e-7 relative); gated residual, tokens, patchify and sde_step meet it easily.
ATOL = {"float64": 2e-7, "float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


def _forward_backward(case_obj, impl, tensors, grad_out_seed):
    """Outputs, then the gradients of the grad_names inputs (None where the op gives none)."""
    torch = _torch()
    ts = {k: (v.detach().requires_grad_(True) if k in case_obj.grad_names and v.is_floating_point() else v)
          for k, v in tensors.items()}
    outs = case_obj.call(impl, ts)
    grads = []
    if case_obj.grad_names:
        g = torch.Generator().manual_seed(grad_out_seed)
        used = [i for i in range(len(outs))]
        which = getattr(case_obj, "grad_outputs", "all")
        if which == "first":
            used = [0]
        elif which == "second":
            used = [1]
        gouts = [torch.randn(outs[i].shape, generator=g, dtype=torch.float64).to(outs[i].dtype) for i in used]
        inputs = [ts[k] for k in case_obj.grad_names if ts[k].requires_grad]
        grads = list(torch.autograd.grad([outs[i] for i in used], inputs, gouts, allow_unused=True))
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs)]
    return [o.detach() for o in outs], grads


def _as64(tensors):
    torch = _torch()
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in tensors.items()}


def _compare(name, got, ref, truth, exact, ref_low=None, atol_factor=1.0, input_dtype=None):
    """got (kernel) vs ref (reference, same dtypes) and truth (the reference in float64); ref_low: a
    lower-precision reference run whose error the kernel may also reach (see Case.error_dtype)."""
    torch = _torch()
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise CaseFailure(f"{name}: kernel {got.dtype}{tuple(got.shape)} vs reference {ref.dtype}{tuple(ref.shape)}")
    g, r, tr = got.double(), ref.double(), truth.double()
    if exact:
        if not torch.equal(torch.nan_to_num(g, nan=1.2345), torch.nan_to_num(r, nan=1.2345)):
            diff = (g - r).abs().nan_to_num(nan=float("inf"))
            i = tuple(int(v) for v in (diff == diff.max()).nonzero()[0])
            raise CaseFailure(f"{name}: not bit-exact: at {i} kernel {g[i].item()!r} reference {r[i].item()!r}")
        return
    # Non-finite values where (and only where) the reference has them; +-inf of the same sign where both
    # are infinite. NaN against +-inf is accepted: gradients through an infinite input differ in how
    # 0 * inf and inf - inf meet (e.g. the LayerNorm backward of a row holding inf: NaN in the reference,
    # -inf in some kernel elements), and either says "not a number you can use".
    bad = torch.isfinite(g) != torch.isfinite(r)
    bad |= torch.isinf(r) & torch.isinf(g) & (g != r)
    # ...unless the reference overflowed an intermediate (a 16-bit cast of a gradient) where the float64 truth
    # is finite and the kernel within range of it: then the kernel is right (found in float16 with 6e4 entries)
    rescued = torch.isfinite(g) & ~torch.isfinite(r) & torch.isfinite(tr)
    rescued &= (g - tr).abs() <= 0.01 * tr.abs() + ATOL[str(got.dtype).replace("torch.", "")]
    bad &= ~rescued
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise CaseFailure(f"{name}: non-finite mismatch at {i}: kernel {g[i].item()!r} reference {r[i].item()!r} "
                          f"({int(bad.sum())} of {bad.numel()} elements)")
    finite = torch.isfinite(r) & torch.isfinite(tr)
    if not finite.any():
        return
    err_k = (g - tr).abs()[finite].max().item()
    err_r = (r - tr).abs()[finite].max().item()
    if ref_low is not None:
        low = ref_low.double()
        ok = finite & torch.isfinite(low)
        if ok.any():  # the float64 kernels' float32 statistics: 4x (not 2x) an all-float32 computation's error
            err_r = max(err_r, 2 * (low - tr).abs()[ok].max().item())
    scale = max(1.0, tr.abs()[finite].max().item())
    # a float32 output of a 16-bit computation (dgate, dshift of half x) carries the inputs' precision
    atol = max(ATOL[str(got.dtype).replace("torch.", "")], ATOL.get(input_dtype, 0.0)) * scale * atol_factor
    if err_k > 2 * err_r + atol:
        diff = torch.where(finite, (g - tr).abs(), torch.zeros_like(g))
        i = tuple(int(v) for v in (diff == diff.max()).nonzero()[0])
        raise CaseFailure(f"{name}: kernel error {err_k:.3g} > 2 x reference error {err_r:.3g} + {atol:.3g}; worst at {i}: "
                          f"kernel {g[i].item()!r} reference {r[i].item()!r} float64 {tr[i].item()!r}")


def _check_error(e, expected):
    msg = str(e)
    if type(e).__name__ not in ERROR_TYPES and not isinstance(e, (ValueError, TypeError, RuntimeError)):
        raise CaseFailure(f"misuse of {expected!r}: {type(e).__name__} (not ValueError/TypeError/RuntimeError): {msg}")
    if expected.lower() not in msg.lower():
        raise CaseFailure(f"misuse of {expected!r}: the error does not name it: {type(e).__name__}: "
                          f"{msg.splitlines()[0] if msg else ''}")


def run_case(case, emulated=False):
    """Runs one case in this process. Returns the outcome: "equal", "error" (a clear error for a misuse),
    "unspecified" (documented undefined behaviour, ran without a crash); raises CaseFailure otherwise."""
    torch = _torch()
    c = build_case(case, emulated)
    gseed = case["seed"] ^ 0x5EED
    if c.expect_error is not None:
        try:
            _forward_backward(c, "ext", c.tensors, gseed)
        except Exception as e:  # noqa: BLE001
            _check_error(e, c.expect_error)
            return "error"
        raise CaseFailure(f"misuse of {c.expect_error!r} ({case.get('misuse') or case.get('ids') or case.get('step')}) "
                          "ran without an error")
    if c.unspecified:
        try:
            _forward_backward(c, "ext", c.tensors, gseed)
        except Exception as e:  # noqa: BLE001  (an error is fine too, if it is a clear one)
            _check_error(e, "ids_keep")
        import dit_kernels.ops.tokens as tokens_mod

        tokens_mod._DEBUG = True  # the documented way to catch them: a ValueError naming ids_keep
        try:
            _forward_backward(c, "ext", c.tensors, gseed)
        except ValueError as e:
            _check_error(e, "ids_keep")
        else:
            raise CaseFailure("DIT_KERNELS_DEBUG=1 did not catch the repeated ids")
        finally:
            tokens_mod._DEBUG = False
        return "unspecified"
    before = {k: v.clone() for k, v in c.tensors.items() if isinstance(v, torch.Tensor)}
    out_k, grad_k = _forward_backward(c, "ext", c.tensors, gseed)
    for name, v in before.items():
        if not torch.equal(torch.nan_to_num(v, nan=1.5), torch.nan_to_num(c.tensors[name], nan=1.5)):
            raise CaseFailure(f"the kernel modified its input {name}")
    if getattr(c, "nan_outputs", False):
        for i, o in enumerate(out_k):
            if o.numel() and not torch.isnan(o).all():
                raise CaseFailure(f"output {i}: a step outside the table must give NaN outputs")
        return "unspecified"
    out_r, grad_r = _forward_backward(c, "ref", c.tensors, gseed)
    if c.exact:
        out_t, grad_t = out_r, grad_r
    else:
        out_t, grad_t = _forward_backward(c, "ref", _as64(c.tensors), gseed)
    out_l = [None] * len(out_r)
    grad_l = [None] * len(grad_r)
    if getattr(c, "error_dtype", None) is not None:
        low = {k: (v.detach().to(c.error_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in c.tensors.items()}
        out_l, grad_l = _forward_backward(c, "ref", low, gseed)
    factor = getattr(c, "atol_factor", 1.0)
    idx = c.compare if c.compare is not None else range(len(out_r))
    if len(out_k) != len(out_r):
        raise CaseFailure(f"kernel gives {len(out_k)} outputs, reference {len(out_r)}")
    for i in idx:
        _compare(f"output {i}", out_k[i], out_r[i], out_t[i], c.exact, out_l[i], factor, case["dtype"])
    for name, gk, gr, gt, gl in zip(c.grad_names, grad_k, grad_r, grad_t, grad_l):
        if name in getattr(c, "skip_grads", ()):
            continue
        _compare(f"grad of {name}", gk, gr, gt, c.exact, gl, factor, case["dtype"])
    return "equal"


# ---------------------------------------------------------------------------------------------------------
#                                       Worker process and driver
# ---------------------------------------------------------------------------------------------------------

def _setup(emulated):
    """Imports the kernels (and swaps in the emulated CUDA kernels) in this process."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import dit_kernels

    if not dit_kernels.HAS_EXT:
        raise SystemExit(f"fuzz_ops: no compiled kernels ({dit_kernels._ext.EXT_ERROR})")
    if emulated:
        import importlib.util

        spec = importlib.util.spec_from_file_location("dit_cuda_emu_build", os.path.join(REPO, "tests", "cuda_emu", "build.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["dit_cuda_emu_build"] = module
        spec.loader.exec_module(module)
        module.override_cpu_kernels()


def worker_main(emulated):
    """Reads one JSON case per line on stdin, writes one JSON outcome per line on the protocol fd."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the kernels or torch print goes to stderr, not into the protocol
    _setup(emulated)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        if case.get("op") == "_crash":  # the self-test of crash recovery (tests/test_fuzz_ops.py)
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            res = {"outcome": run_case(case, emulated)}
        except CaseFailure as e:
            res = {"outcome": "fail", "message": str(e)}
        except Exception as e:  # noqa: BLE001  (an unexpected exception is a failure of the case)
            tb = traceback.format_exc().strip().splitlines()
            res = {"outcome": "fail", "message": f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                                 f"[{tb[-3].strip() if len(tb) > 2 else ''}]"}
        proto.write(json.dumps(res) + "\n")


class Runner:
    """A worker subprocess running cases; restarted after a crash or a hang, which become failures."""

    def __init__(self, emulated=False, timeout=60.0, start_timeout=900.0):
        self.emulated, self.timeout, self.start_timeout = emulated, timeout, start_timeout
        self.proc = None
        self.log = None

    def _start(self):
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + (["--emulated"] if self.emulated else [])
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, bufsize=1)
        ready = self._read(self.start_timeout)
        if ready is None or not ready.get("ready"):
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")

    def _stderr_tail(self, lines=6):
        if self.log is None:
            return ""
        self.log.seek(0)
        return " | ".join(self.log.read().strip().splitlines()[-lines:])

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"eof": True}

    def _kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case):
        """{"outcome": "equal" | "error" | "unspecified" | "fail" | "crash" | "hang", "message": ...}"""
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        res = self._read(self.timeout)
        if res is None:
            self._kill()
            return {"outcome": "hang", "message": f"no result within {self.timeout:.0f} s"}
        if res.get("eof"):
            rc = self.proc.wait()
            tail = self._stderr_tail()
            self.proc = None
            return {"outcome": "crash", "message": f"worker died (exit status {rc}): {tail}"}
        return res

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # every case has answered: a slow exit is not a finding
                self._kill()
            self.proc = None


def reproducer(case, emulated):
    return f"python scripts/fuzz_ops.py --replay '{json.dumps(case)}'" + (" --emulated" if emulated else "")


def fuzz(cases, seed, emulated=False, ops=None, timeout=60.0, max_numel=None, progress=True):
    """Runs `cases` random cases; returns (per-op outcome counts, failures [(case, result)])."""
    rng = random.Random(seed)
    draw = RandomDraw(rng)
    max_numel = max_numel or ((1 << 13) if emulated else (1 << 16))
    runner = Runner(emulated, timeout)
    counts = collections.defaultdict(collections.Counter)
    failures = []
    t0 = time.time()
    try:
        for i in range(cases):
            case = draw_case(draw, rng.choice(ops) if ops else None, max_numel)
            res = runner.run(case)
            counts[case["op"]][res["outcome"]] += 1
            if res["outcome"] in ("fail", "crash", "hang"):
                failures.append((case, res))
                print(f"FAIL [{res['outcome']}] {case['op']}: {res.get('message')}\n  {reproducer(case, emulated)}",
                      flush=True)
            if progress and (i + 1) % 200 == 0:
                print(f"... {i + 1}/{cases} cases, {len(failures)} failures, {time.time() - t0:.0f} s", flush=True)
    finally:
        runner.close()
    return counts, failures


def summary(counts, failures, emulated):
    kinds = ("equal", "error", "unspecified", "fail", "crash", "hang")
    lines = [f"{'op':40s}" + "".join(f"{k:>12s}" for k in kinds) + f"{'total':>8s}"]
    for op in OPS:
        if op in counts:
            c = counts[op]
            lines.append(f"{op:40s}" + "".join(f"{c[k]:12d}" for k in kinds) + f"{sum(c.values()):8d}")
    total = sum(sum(c.values()) for c in counts.values())
    lines.append(f"{total} cases ({'emulated CUDA' if emulated else 'C++ CPU'} kernels), {len(failures)} failures")
    for case, res in failures:
        lines.append(f"- [{res['outcome']}] {case['op']}: {res.get('message')}\n    {reproducer(case, emulated)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emulated", action="store_true", help="the CUDA kernels, emulated on the CPU (tests/cuda_emu)")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case before it counts as a hang "
                                                                 "(default 30, 120 emulated)")
    p.add_argument("--max-numel", type=int, default=None)
    p.add_argument("--replay", default=None, help="run one case (JSON) in this process, with a traceback")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.emulated)
    if args.replay:
        _setup(args.emulated)
        print(run_case(json.loads(args.replay), args.emulated))
        return 0
    ops = args.ops.split(",") if args.ops else None
    for op in ops or ():
        if op not in OPS:
            p.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    timeout = args.timeout or (120.0 if args.emulated else 30.0)
    counts, failures = fuzz(args.cases, args.seed, args.emulated, ops, timeout, args.max_numel)
    print(summary(counts, failures, args.emulated))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
