"""Count the bytes autograd saves for backward in one training forward (device independent).

Peak training memory = parameters + gradients + optimizer state + EMA + the activations saved for
backward (+ transient workspace). The last term is what the fused kernels and the model code
control, and it can be counted on any device: this script runs one forward of a model under the
chosen precision with `torch.autograd.graph.saved_tensors_hooks`, sums the distinct storages
that autograd keeps, and scales to the target batch.

    PYTHONPATH=. python scripts/activation_memory.py --model DiT-XL/2 --batch 1 --scale-to 64

Caveats: SDPA on CPU saves what the CPU flash backend saves (q, k, v, out, logsumexp), like the
CUDA flash backend; parameters and their bf16 autocast copies are reported apart from
activations (autocast's weight copies are freed after backward); workspace and allocator slack
are not counted, so the GPU peak is this figure plus a few GiB.
"""
import argparse
import sys

import torch


def _storage_key(t):
    try:
        return (t.untyped_storage().data_ptr(), t.device)
    except (RuntimeError, NotImplementedError):
        return (id(t), t.device)


def saved_bytes(fn, params):
    """Run fn() under saved-tensor hooks; return (bytes of the distinct non-parameter storages kept
    for backward, {dtype: bytes}, fn's output)."""
    param_keys = {_storage_key(p) for p in params}
    seen = {}

    def pack(t):
        key = _storage_key(t)
        if key not in param_keys and key not in seen:
            seen[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by_dtype = {}
    for t in seen.values():
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.untyped_storage().nbytes()
    return sum(by_dtype.values()), by_dtype, out


def main(argv=None):
    import dit_kernels
    from dit_models.builders import build_model
    from dit_models.train import build_objective, get_parser, resolve_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--method", default="ddpm", choices=["ddpm", "sit", "maskdit", "sddit"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scale-to", type=int, default=64)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mlp-recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="fused path: recompute the MLP GELU in backward (DiT.mlp_recompute)")
    p.add_argument("--branch-dtype", action=argparse.BooleanOptionalAction, default=True,
                   help="fused path under autocast: bf16 branch tensors beside the fp32 residual (default); "
                        "--no-branch-dtype reproduces the earlier layout that cast them to fp32")
    args = p.parse_args(argv)
    if not args.branch_dtype:
        import dit_models.models.dit as dit_module

        dit_module.branch_dtype = lambda x: x.dtype

    torch.manual_seed(0)
    model = build_model(args.method, args.model, args.latent, 4, 1000)
    model.fused = args.fused
    model.mlp_recompute = args.mlp_recompute
    model.train()
    params = list(model.parameters())

    # The objective exactly as `python -m dit_models.train --method ... --precision bf16` builds it.
    objective = build_objective(resolve_args(get_parser().parse_args(
        ["--method", args.method, "--model", args.model, "--device", "cpu"])))

    def loss_fn(batch):
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 4, args.latent, args.latent, generator=g)
        y = torch.randint(0, 1000, (batch,), generator=g)
        return lambda: objective(model, x, y, 0)[0]

    # Batch-independent saved storages (autocast's bf16 weight copies) cancel in the difference.
    totals = {}
    for batch in (args.batch, 2 * args.batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            total, by_dtype, loss = saved_bytes(loss_fn(batch), params)
        del loss  # frees the graph (no backward needed to count what it keeps)
        totals[batch] = (total, by_dtype)
    (t1, d1), (t2, d2) = totals[args.batch], totals[2 * args.batch]
    per_image = (t2 - t1) / args.batch
    per_dtype = {k: (d2.get(k, 0) - d1.get(k, 0)) / args.batch for k in d2}
    fixed = t1 - per_image * args.batch

    n_params = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    gib = 1024 ** 3
    act = per_image * args.scale_to / gib
    state = (n_params * 4 + n_train * 8 + n_params * 4) / gib  # fp32 weights, AdamW m + v, EMA
    grads = n_train * 4 / gib
    print(f"{args.model} method={args.method} precision={args.precision} fused={args.fused} "
          f"mlp_recompute={args.mlp_recompute} branch_dtype={args.branch_dtype} "
          f"(dit_kernels.HAS_EXT={dit_kernels.HAS_EXT})")
    print(f"  activations saved for backward: {per_image / 2**20:.1f} MiB per image -> {act:.2f} GiB at batch "
          f"{args.scale_to} (" + ", ".join(f"{k.replace('torch.', '')} {v * args.scale_to / gib:.2f}"
                                          for k, v in sorted(per_dtype.items()) if v) + " GiB)")
    print(f"  batch-independent saved tensors (autocast weight copies): {fixed / gib:.2f} GiB")
    print(f"  fp32 weights + AdamW state + EMA: {state:.2f} GiB; gradients: {grads:.2f} GiB")
    print(f"  predicted peak (end of forward, grads freed by zero_grad(set_to_none)): "
          f"{state + fixed / gib + act:.2f} GiB + allocator/workspace slack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
