"""One-shot GPU check of the foundation CUDA kernels (csrc/cuda/{modulated_layer_norm,gated_residual,patchify}_kernel.cu).

Compares every CUDA op with the CPU op on the same inputs (awkward D, N = 1, T = 1, all dtypes,
fp32 modulation with half x, chunk(6) strided / shared / misaligned modulation, rows longer than
the register cache, D large enough for the opt-in shared-memory path), checks bit-wise determinism
of the backward reductions and CUDA-graph capture, then prints GB/s at the DiT-XL/2 shapes.

    python scripts/check_foundation_cuda.py            # exits 1 on any mismatch
    python scripts/check_foundation_cuda.py --no-bench
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import dit_kernels  # noqa: E402  (loads the extension)

ops = torch.ops.dit_kernels
FAIL = []
# Max error relative to max(1, max|expected|); loose enough for fp32 reduction-order differences.
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(name, got, exp, dtype, terms=0.0):
    """terms: the magnitude of the terms that cancel in exp (e.g. rstd * |dy * (1 + scale)| in a
    LayerNorm dx), where it exceeds |exp|: at D = 1, rstd = 1/sqrt(eps) = 1000 and dx is rounding
    noise of size 1e-8 * 1000, whatever order the kernel sums in (seen on the H200, 2026-11-30)."""
    got, exp = got.detach().cpu().double(), exp.detach().cpu().double()
    if got.shape != exp.shape:
        FAIL.append(f"{name}: shape {tuple(got.shape)} vs {tuple(exp.shape)}")
        return
    if got.numel() == 0:
        return
    if not torch.isfinite(got).all():
        FAIL.append(f"{name}: non-finite values")
        return
    err = (got - exp).abs().max().item() / max(1.0, exp.abs().max().item(), float(terms))
    if err > TOL[dtype]:
        FAIL.append(f"{name}: rel err {err:.3g} > {TOL[dtype]:.1g}")


def modulation(n, d, dtype, kind, device, k=6):
    """k modulation tensors (N, D): 'chunk' (views of an (N, k*D) tensor), 'shared' (stride 0),
    'contig', or 'misaligned' (offset by one element)."""
    g = torch.Generator().manual_seed(n * 1000 + d)
    if kind == "chunk":
        base = (0.1 * torch.randn(n, k * d, generator=g, dtype=torch.float64)).to(dtype).to(device)
        return list(base.chunk(k, dim=1))
    if kind == "shared":
        return [(0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype).to(device).expand(n, d) for _ in range(k)]
    if kind == "misaligned":
        out = []
        for _ in range(k):
            buf = (0.1 * torch.randn(n * d + 1, generator=g, dtype=torch.float64)).to(dtype).to(device)
            out.append(buf[1:].view(n, d))
        return out
    return [(0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype).to(device) for _ in range(k)]


def rand(shape, dtype, seed, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
    if misaligned:
        buf = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
        out = buf[1:].view(shape)
        out.copy_(t.to(dtype))
        return out
    return t.to(dtype).cuda()


def check_norm_ops(shape, dtype, mod_dtype, kind, misaligned=False):
    n, t, d = shape
    tag = f"{shape} {str(dtype)[6:]}/{str(mod_dtype)[6:]} {kind}{' misaligned' if misaligned else ''}"
    x = rand(shape, dtype, 1, misaligned)
    y = rand(shape, dtype, 2, misaligned)
    dout = rand(shape, dtype, 3, misaligned)
    dh = rand(shape, dtype, 4, misaligned)
    shift, scale, gate, shift2, scale2, _ = modulation(n, d, mod_dtype, kind, "cuda")
    cpu = lambda ts: [u.cpu() for u in ts]  # noqa: E731
    eps = 1e-6

    # modulated_layer_norm
    res = ops.modulated_layer_norm(x, shift, scale, eps)
    exp = ops.modulated_layer_norm(*cpu([x, shift, scale]), eps)
    for nm, a, b in zip(("y", "mean", "rstd"), res, exp):
        close(f"mln fwd {nm} {tag}", a, b, dtype if nm == "y" else torch.float32)
    _, mean, rstd = exp
    res = ops._modulated_layer_norm_backward(dh, x, scale, mean.cuda(), rstd.cuda())
    exp = ops._modulated_layer_norm_backward(*cpu([dh, x, scale]), mean, rstd)
    dx_terms = rstd.max().item() * dh.abs().max().item() * (1 + scale.abs().max().item())
    for nm, a, b in zip(("dx", "dshift", "dscale"), res, exp):
        close(f"mln bwd {nm} {tag}", a, b, dtype, terms=dx_terms if nm == "dx" else 0.0)
    again = ops._modulated_layer_norm_backward(dh, x, scale, mean.cuda(), rstd.cuda())
    if not all(torch.equal(a, b) for a, b in zip(res, again)):
        FAIL.append(f"mln bwd not deterministic {tag}")

    # gated_residual
    close(f"gr fwd {tag}", ops.gated_residual(x, y, gate), ops.gated_residual(*cpu([x, y, gate])), dtype)
    res = ops._gated_residual_backward(dout, y, gate)
    exp = ops._gated_residual_backward(*cpu([dout, y, gate]))
    for nm, a, b in zip(("dy", "dgate"), res, exp):
        close(f"gr bwd {nm} {tag}", a, b, dtype)

    # gated_residual_modulated_layer_norm
    res = ops.gated_residual_modulated_layer_norm(x, y, gate, shift2, scale2, eps)
    exp = ops.gated_residual_modulated_layer_norm(*cpu([x, y, gate, shift2, scale2]), eps)
    for nm, a, b in zip(("x_new", "h", "mean", "rstd"), res, exp):
        close(f"grmln fwd {nm} {tag}", a, b, dtype if nm in ("x_new", "h") else torch.float32)
    x_new, _, mean, rstd = exp
    x_new_c = x_new.cuda()
    for gx, gh in ((dout, dh), (None, dh), (dout, None), (None, None)):
        sub = f"{tag} grad_x_new={'y' if gx is not None else 'n'} grad_h={'y' if gh is not None else 'n'}"
        res = ops._gated_residual_modulated_layer_norm_backward(
            gx, gh, x_new_c, y, gate, scale2, mean.cuda(), rstd.cuda())
        exp = ops._gated_residual_modulated_layer_norm_backward(
            None if gx is None else gx.cpu(), None if gh is None else gh.cpu(), x_new, y.cpu(), gate.cpu(),
            scale2.cpu(), mean, rstd)
        terms = rstd.max().item() * dh.abs().max().item() * (1 + scale2.abs().max().item())
        for nm, a, b in zip(("dx", "dy", "dgate", "dshift", "dscale"), res, exp):
            close(f"grmln bwd {nm} {sub}", a, b, dtype, terms=terms if nm in ("dx", "dy") else 0.0)


def check_patch_ops(n, c, h, w, p, dtype, c_all=None):
    tag = f"N={n} C={c} {h}x{w} p={p} {str(dtype)[6:]}"
    x = rand((n, c, h, w), dtype, 5)
    got = ops.patchify(x, p)
    if not torch.equal(got.cpu(), ops.patchify(x.cpu(), p)):
        FAIL.append(f"patchify {tag}")
    if not torch.equal(ops._patchify_backward(got, p, h, w).cpu(), x.cpu()):
        FAIL.append(f"_patchify_backward(patchify) != id {tag}")
    c_all = c_all or c
    tok = rand((n, (h // p) * (w // p), p * p * c_all), dtype, 6)
    img = ops.unpatchify(tok, p, h, w, c)
    if not torch.equal(img.cpu(), ops.unpatchify(tok.cpu(), p, h, w, c)):
        FAIL.append(f"unpatchify {tag} C_all={c_all}")
    back = ops._unpatchify_backward(img, p, c_all)
    if not torch.equal(back.cpu(), ops._unpatchify_backward(img.cpu(), p, c_all)):
        FAIL.append(f"_unpatchify_backward {tag} C_all={c_all}")


def check_autograd_and_graphs():
    from dit_kernels import gated_residual_modulated_layer_norm, modulated_layer_norm

    x = torch.randn(2, 3, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    y = torch.randn(2, 3, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    mod = (0.1 * torch.randn(2, 21, dtype=torch.float64, device="cuda")).requires_grad_()
    try:
        torch.autograd.gradcheck(lambda a, m: modulated_layer_norm(a, m[:, :7], m[:, 7:14], impl="ext"), (x, mod))
        torch.autograd.gradcheck(
            lambda a, b, m: torch.cat([o.flatten() for o in gated_residual_modulated_layer_norm(
                a, b, m[:, :7], m[:, 7:14], m[:, 14:], impl="ext")]), (x, y, mod))
    except Exception as e:  # noqa: BLE001
        FAIL.append(f"gradcheck on CUDA: {e}")
    # CUDA-graph capture of forward + backward kernels (launch on the current stream, no syncs).
    xs = torch.randn(4, 16, 1152, device="cuda", dtype=torch.bfloat16)
    ys = torch.randn_like(xs)
    m6 = torch.randn(4, 6 * 1152, device="cuda", dtype=torch.bfloat16).chunk(6, dim=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.gated_residual_modulated_layer_norm(xs, ys, m6[0], m6[1], m6[2], 1e-6)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            xn, h, mu, rs = ops.gated_residual_modulated_layer_norm(xs, ys, m6[0], m6[1], m6[2], 1e-6)
            grads = ops._gated_residual_modulated_layer_norm_backward(ys, xs, xn, ys, m6[0], m6[2], mu, rs)
        g.replay()
        torch.cuda.synchronize()
        ref = ops.gated_residual_modulated_layer_norm(xs, ys, m6[0], m6[1], m6[2], 1e-6)
        if not torch.equal(ref[1], h):
            FAIL.append("graph replay output differs from eager")
        del grads
    except Exception as e:  # noqa: BLE001
        FAIL.append(f"CUDA graph capture: {e}")


def bench(fn, nbytes, iters=30):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    return ms * 1e3, nbytes / ms / 1e6  # us, GB/s


def run_bench():
    from dit_kernels import gated_residual_modulated_layer_norm_ref, modulated_layer_norm_ref

    print(f"\n== bandwidth on {torch.cuda.get_device_name()} (median of 30, no L2 flush)")
    n, t, d = 256, 256, 1152
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        x = torch.randn(n, t, d, device="cuda", dtype=dtype)
        y, dy, dh = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
        m6 = (0.1 * torch.randn(n, 6 * d, device="cuda", dtype=dtype)).chunk(6, dim=1)
        pas = x.numel() * es
        _, mean, rstd = ops.modulated_layer_norm(x, m6[0], m6[1], 1e-6)
        rows = [
            ("mln fwd", lambda: ops.modulated_layer_norm(x, m6[0], m6[1], 1e-6), 2 * pas),
            ("mln fwd (eager ref)", lambda: modulated_layer_norm_ref(x, m6[0], m6[1], upcast=False), 2 * pas),
            ("mln bwd", lambda: ops._modulated_layer_norm_backward(dy, x, m6[1], mean, rstd), 3 * pas),
            ("gated_residual fwd", lambda: ops.gated_residual(x, y, m6[2]), 3 * pas),
            ("gated_residual bwd", lambda: ops._gated_residual_backward(dy, y, m6[2]), 3 * pas),
            ("grmln fwd", lambda: ops.gated_residual_modulated_layer_norm(x, y, m6[2], m6[3], m6[4], 1e-6), 4 * pas),
            ("grmln fwd (eager ref)", lambda: gated_residual_modulated_layer_norm_ref(
                x, y, m6[2], m6[3], m6[4], upcast=False), 4 * pas),
            ("grmln bwd", lambda: ops._gated_residual_modulated_layer_norm_backward(
                dy, dh, x, y, m6[2], m6[4], mean, rstd), 6 * pas),
            ("copy (x.clone)", lambda: x.clone(), 2 * pas),
        ]
        for name, fn, nbytes in rows:
            us, gbs = bench(fn, nbytes)
            print(f"  {str(dtype)[6:]:8s} {name:24s} {us:9.1f} us {gbs:8.0f} GB/s")
    for (n, c, h, p) in ((256, 4, 32, 2), (64, 3, 256, 16)):
        x = torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16)
        tok = ops.patchify(x, p)
        nbytes = 2 * x.numel() * 2
        for name, fn in (("patchify", lambda: ops.patchify(x, p)), ("unpatchify", lambda: ops.unpatchify(tok, p, h, h, c)),
                         ("patchify (torch ref)", lambda: x.reshape(n, c, h // p, p, h // p, p).permute(0, 2, 4, 1, 3, 5).contiguous())):
            us, gbs = bench(fn, nbytes)
            print(f"  bf16     {name:20s} N={n} C={c} {h}x{h} p={p}: {us:8.1f} us {gbs:8.0f} GB/s")


def main(args):
    assert torch.cuda.is_available(), "needs a CUDA device"
    want = {"modulated_layer_norm", "_modulated_layer_norm_backward", "gated_residual", "_gated_residual_backward",
            "gated_residual_modulated_layer_norm", "_gated_residual_modulated_layer_norm_backward",
            "patchify", "_patchify_backward", "unpatchify", "_unpatchify_backward"}
    missing = want - dit_kernels._ext.KERNELS["cuda"]
    assert not missing, f"CUDA kernels missing: {sorted(missing)}"
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    shapes = [(2, 5, 59), (1, 1, 1), (3, 7, 1152), (2, 3, 1000), (1, 9, 8), (2, 17, 384), (1, 3, 4096), (2, 33, 512)]
    for dtype in dtypes:
        for shape in shapes:
            for mod_dtype in {dtype, torch.float32}:
                check_norm_ops(shape, dtype, mod_dtype, "chunk")
        check_norm_ops((2, 6, 1152), dtype, dtype, "shared")
        check_norm_ops((2, 6, 1152), dtype, dtype, "contig")
        check_norm_ops((2, 6, 1152), dtype, dtype, "misaligned", misaligned=True)
    # Shared-memory opt-in path of the backward (nq * D * 4 B > 48 KB) and long rows (cache overflow).
    check_norm_ops((2, 9, 9000), torch.float32, torch.float32, "chunk")
    check_norm_ops((1, 5, 3000), torch.float64, torch.float64, "chunk")
    check_norm_ops((1, 3, 5000), torch.bfloat16, torch.float32, "chunk")
    # Many samples, one token (finalize over a single tile) and many tokens per sample.
    check_norm_ops((700, 1, 64), torch.bfloat16, torch.bfloat16, "chunk")
    check_norm_ops((1, 1100, 72), torch.float32, torch.float32, "chunk")
    # Empty tensors return without launching.
    for shape in ((0, 4, 8), (2, 0, 8)):
        check_norm_ops(shape, torch.float32, torch.float32, "contig")
    for dtype in dtypes:
        check_patch_ops(2, 4, 8, 8, 2, dtype)
        check_patch_ops(1, 3, 12, 20, 4, dtype, c_all=5)
        check_patch_ops(2, 4, 6, 10, 2, dtype, c_all=8)
        check_patch_ops(1, 1, 5, 7, 1, dtype)
    check_patch_ops(3, 3, 32, 48, 16, torch.bfloat16, c_all=6)
    check_autograd_and_graphs()
    torch.cuda.synchronize()
    print("FAILURES:" if FAIL else "all foundation CUDA checks passed")
    for f in FAIL[:50]:
        print("  " + f)
    if not args.no_bench:
        run_bench()
    return 1 if FAIL else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the bandwidth table")
    sys.exit(main(parser.parse_args()))
