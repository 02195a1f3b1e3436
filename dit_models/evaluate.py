"""Evaluate class-conditional samples on the embedded digits data.

A small CNN classifier is trained once on the digits training split (seconds on a CPU; cached on disk) and
gives two numbers for a set of conditional samples:
  accuracy   fraction of samples that the classifier assigns to their conditioning class;
  fd         Frechet distance between the classifier's 64-d penultimate features of the samples and of the
             360 held-out real digits (an FID analogue; lower is better). `fd_real` (the 1438 training digits
             vs the held-out ones) is the floor that real data reaches under the same estimator.
These are digits-sized proxies for FID/IS, useful to compare methods trained on the same budget; they are
not comparable with ImageNet numbers.

By default a checkpoint gets the report the quickstart prints (dit_models.metrics.digits_report): the
Frechet distance at cfg 1 (fidelity: guidance trades closeness to the data for adherence) and the class
accuracy at cfg 3 (adherence), 2000 samples each, with the evaluation sampler (the in-training sampler,
sampler_defaults(fast=True): 20 NFE of UniPC, bh1 for SiT and bh2 for SD-DiT, of DPM-Solver++(2M) for
DDPM and MaskDiT); any sampler flag overrides it (--sampler alone selects that sampler's published
settings), and --cfg-scale scores one setting.

    python -m dit_models.evaluate --ckpt results/000-sit-SiT-S-4/checkpoints/0008000.pt
    python -m dit_models.evaluate --ckpt ... --cfg-scale 1.5 --num-samples 1000 --num-sampling-steps 250
    python -m dit_models.evaluate --npz samples.npz          # arr_0 uint8 (N, H, W, 3|1) + labels (N,)
"""
import argparse
import json
import os
import sys

import numpy as np

from dit_models.cli import nonnegative_float, parser as tool_parser, positive_int, run_cli
from dit_models.generation import add_sampler_args, load_model_for_sampling, sampler_opts_from_args
from dit_models.metrics import REPORT_NUM_SAMPLES, digits_report, evaluate_model, format_report, score_samples


def get_parser():
    p = tool_parser("evaluate", "Score conditional digits samples: class accuracy + Frechet distance")
    p.add_argument("--ckpt", default=None, help="a dit_models.train checkpoint (trained on digits)")
    p.add_argument("--npz", default=None, help="samples .npz (arr_0 uint8 (N,H,W,C) and labels (N,))")
    p.add_argument("--num-samples", type=positive_int, default=REPORT_NUM_SAMPLES, help="per guidance setting")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None,
                   help="score this one guidance scale (default: the report, FD at cfg 1 and accuracy at cfg 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    add_sampler_args(p)
    return p


def main(args):
    if (args.ckpt is None) == (args.npz is None):
        raise ValueError("give exactly one of --ckpt or --npz")
    if args.npz:
        if not os.path.isfile(args.npz):
            raise FileNotFoundError(f"no such file: {args.npz}")
        d = np.load(args.npz)
        if "labels" not in d:
            raise ValueError(f"{args.npz} has no 'labels' array; class accuracy needs the conditioning labels")
        x = d["arr_0"]
        res = score_samples(x, d["labels"], size=x.shape[1])
    else:
        model, method, margs = load_model_for_sampling(args.ckpt, method=None, device="cpu")
        if not str(margs.get("data", "digits")).startswith("digits"):
            raise ValueError(f"{args.ckpt} was not trained on digits (data={margs.get('data')!r})")
        kw = dict(method_args=argparse.Namespace(**margs), seed=args.seed, size=int(margs.get("input_size", 16)),
                  sampler_opts=sampler_opts_from_args(args, method, fast=True), progress=True)
        if args.cfg_scale is None:
            res = digits_report(method, model, num_samples=args.num_samples, **kw)
            print(format_report(res), file=sys.stderr)
        else:
            res = evaluate_model(method, model, args.num_samples, args.cfg_scale, **kw)
        res = {k: v for k, v in res.items() if not k.startswith("_")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return res


def cli(argv=None):
    return run_cli(main, get_parser().parse_args(argv), errors=(FileNotFoundError, ValueError, ImportError))


if __name__ == "__main__":
    cli()
