"""Sample a PNG grid from a trained DiT / SiT / MaskDiT / SD-DiT (our checkpoints or the released ones).

    python -m dit_models.sample --ckpt results/000-sit-SiT-S-2/checkpoints/0002000.pt --cfg-scale 2.0
    python -m dit_models.sample --ckpt results/.../0002000.pt --sampler sde --diffusion-form sigma
    python -m dit_models.sample --method ddpm --ckpt DiT-XL-2-256x256.pt --vae mse --cfg-scale 4.0  # released DiT
    python -m dit_models.sample --method sit --ckpt SiT-XL-2-256x256.pt --vae mse --sampler ode
    python -m dit_models.sample --method maskdit --model MaskDiT-XL/2 --ckpt imagenet256-...pt --vae mse

Samplers per method (defaults as published): ddpm: "ddpm" (250 respaced ancestral steps) or "ddim" (eta 0);
sit: "ode" (dopri5 with torchdiffeq, else built-in heun; 250 steps) or "sde" (Euler-Maruyama, diffusion form
"sigma", last step "Mean" 0.04, 250 steps); maskdit / sddit: "edm" (Heun, 40 steps = 79 NFE, sigma in
[0.002, 80], rho 7, S_churn 0). Every method also has "dpm++": DPM-Solver++ multistep (dit_models/multistep.py),
one network evaluation per step, 20 steps unless --num-sampling-steps says otherwise (--solver-order 1/2/3,
--time-spacing time_uniform (default) | logSNR | karras for ddpm and sit; EDM uses its own sigma grid). Guidance: --cfg-scale (1 = off) on all channels of eps / velocity / F by
default; --guided-channels 3 reproduces the public DiT/SiT 3-channel guidance (needed for FID 2.27 / 2.06).
"""
import os
import sys

import torch

from dit_models import utils
from dit_models.cli import nonnegative_float, parser as tool_parser, positive_int, run_cli
from dit_models.methods import METHODS, MethodUnavailable
from dit_models.generation import add_sampler_args, decode, generate, load_model_for_sampling, sampler_opts_from_args

IMAGENET_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT sample.py


def default_out(ckpt_path):
    """<run>/sample.png for a checkpoint of a dit_models.train run (<run>/checkpoints/<step>.pt), else ./sample.png."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(folder) == "checkpoints":
        return os.path.join(os.path.dirname(folder), "sample.png")
    return "sample.png"


def parse_labels(text, num_classes):
    try:
        labels = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"--class-labels {text!r}: expected comma-separated integers, e.g. 207,360") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes - 1}]")
    return labels


def get_parser():
    p = tool_parser("sample", "Sample a PNG grid from a DiT / SiT / MaskDiT / SD-DiT checkpoint")
    p.add_argument("--ckpt", required=True, help="dit_models.train checkpoint or a released DiT/SiT/MaskDiT file")
    p.add_argument("--method", default=None, choices=tuple(METHODS),
                   help="needed for released files (our checkpoints know their method)")
    p.add_argument("--model", default=None, help="registry name for released MaskDiT files")
    p.add_argument("--num-heads", type=positive_int, default=None, help="released files with a non-registry width")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="released files: 256 or 512 (checked against pos_embed)")
    p.add_argument("--num-classes", type=positive_int, default=None)
    p.add_argument("--class-labels", default=None, help="comma-separated labels (default: every class of a small "
                   "dataset, else DiT's 8 demo classes)")
    p.add_argument("--samples-per-class", type=positive_int, default=None, help="default: fill a 10-16 wide grid")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=4.0,
                   help="4.0 for visuals (DiT/SiT sample.py), 1.5 for FID")
    p.add_argument("--vae", default=None, help="ema | mse | diffusers path; default mse for latent models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="PNG path (default: sample.png in the checkpoint's run folder, "
                   "or in the current folder for a released file)")
    add_sampler_args(p)
    return p


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        print("warning: --cuda-graph needs CUDA; ignored on the CPU", file=sys.stderr)
        args.cuda_graph = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    model, method, margs = load_model_for_sampling(args.ckpt, args.method, device, args.model, args.num_heads,
                                                   args.image_size, args.num_classes)
    opts = sampler_opts_from_args(args, method)
    K = model.num_classes
    if args.class_labels:
        labels = parse_labels(args.class_labels, K)
    else:
        labels = list(range(K)) if K <= 16 else [v for v in IMAGENET_DEMO_LABELS if v < K]
    per = args.samples_per_class or (max(1, 40 // len(labels)) if len(labels) <= 16 else 1)
    ncol = len(labels) if len(labels) <= 16 else 8
    labels = torch.tensor([l for _ in range(per) for l in labels], dtype=torch.long)
    vae = None
    if margs.get("data_kind") == "latents":
        from dit_models.data import load_vae

        vae = load_vae(args.vae or "mse", device)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        x = generate(method, model, labels, opts, args.cfg_scale, gen, margs, args.batch_size, progress=True)
        imgs = decode(x, vae)
    path = utils.save_image_grid(imgs.float().cpu(), args.out or default_out(args.ckpt), nrow=ncol, labels=labels)
    print(f"{method} {margs.get('model')}: {len(labels)} samples ({opts['sampler']}, {opts['num_sampling_steps']} steps, "
          f"cfg {args.cfg_scale}) -> {path}")
    return path


def cli(argv=None):
    return run_cli(main, get_parser().parse_args(argv), errors=(FileNotFoundError, ValueError, ImportError,
                                                                MethodUnavailable))


if __name__ == "__main__":
    cli()
