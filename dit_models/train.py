"""Train DiT (DDPM), SiT (interpolant transport), MaskDiT (EDM + masking) or SD-DiT with DDP.

Single process (CPU or one GPU):
    python -m dit_models.train --method sit --model SiT-S/2 --data digits --max-steps 2000
Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node 8 -m dit_models.train --method ddpm --model DiT-XL/2 --data /path/to/latents
Quickstart (small SiT on the embedded digits, a few minutes on a laptop CPU; writes samples, a loss plot and
the evaluation score):
    python -m dit_models.train --quickstart

Recipes (defaults as published in the DiT, SiT and MaskDiT papers and code; SD-DiT: assumed): AdamW lr 1e-4,
betas (0.9, 0.999), weight decay 0, constant LR, no clipping; EMA 0.9999 per step initialised as an exact copy;
label dropout 0.1; global batch 256 (DiT/SiT) or 1024 (MaskDiT/SD-DiT); MaskDiT mask ratio 0.5 + MAE 0.1;
SD-DiT mask ratio 0.2.

Exact resume: every random draw of a step (data augmentation, diffusion time/noise, label dropout, masks)
comes from RNGs re-seeded at the start of the step from (seed, rank, step), and the data order from a
DistributedSampler seeded by (seed, epoch); checkpoints hold model, EMA, optimizer, step, epoch, args (a
plain dict) and RNG states, written atomically. N steps straight == N/2 steps + --resume + N/2 steps.

Preemption: SIGTERM / SIGUSR1 save a checkpoint at the next step boundary and exit 0. `--resume auto` (or bare
`--resume`) continues the newest complete checkpoint of --run-dir, else of the newest numbered folder
<results-dir>/NNN-<method>-<model>, and starts a new run when there is none: a requeued job re-runs the same
command line (give --run-dir when several runs of one method/model share a results folder). A resumed run
takes its settings from the checkpoint (apply_checkpoint_args). A NaN/inf loss or gradient skips the step
(--on-nonfinite skip, counted in the checkpoint and the summary) or stops the run (stop).
"""
import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time

import torch

from dit_models import utils
from dit_models.builders import build_model_from_args, model_config
from dit_models.cli import (nonnegative_float, nonnegative_int, parser as tool_parser, positive_float, positive_int,
                            probability, run_cli)
from dit_models.data import UnreadableImageError
from dit_models.methods import METHODS, MethodUnavailable, add_flags, get_method
from dit_models.metrics import REPORT_NUM_SAMPLES
from dit_models.quickstart import QUICKSTART, evaluate_run
from dit_models.utils import derive_seed


def build_objective(args):
    """The training loss of args.method (dit_models/methods/<method>.py)."""
    return get_method(args.method).objective(args)


# ---------------------------------------------------------------------------------------------------------
#                                          Argument groups
# ---------------------------------------------------------------------------------------------------------

def json_object(text):
    """--model-kwargs: a JSON object ({"name": value, ...})."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--method", choices=tuple(METHODS), default="ddpm",
                   help=", ".join(f"{m.name} = {m.family}" for m in METHODS.values()))
    g.add_argument("--model", default=None,
                   help="registry name, e.g. DiT-XL/2, SiT-S/2 (default: " +
                        ", ".join(f"{m.default_model} for {m.name}" for m in METHODS.values()) + ")")
    g.add_argument("--num-classes", type=positive_int, default=None, help="default: the dataset's class count")
    g.add_argument("--class-dropout-prob", type=probability, default=0.1, help="label dropout for CFG (paper: 0.1)")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT/SiT learned variance channels (default: True for ddpm and sit, as published)")
    g.add_argument("--depth", type=positive_int, default=None, help="override the registry depth (tests/laptops only)")
    g.add_argument("--hidden-size", type=positive_int, default=None, help="override the registry width (tests/laptops only)")
    g.add_argument("--num-heads", type=positive_int, default=None, help="override the registry heads (tests/laptops only)")
    g.add_argument("--decoder-depth", type=positive_int, default=None, help="MaskDiT/SD-DiT decoder depth override")
    g.add_argument("--decoder-hidden-size", type=positive_int, default=None, help="MaskDiT/SD-DiT decoder width override")
    g.add_argument("--decoder-num-heads", type=positive_int, default=None, help="MaskDiT/SD-DiT decoder heads override")
    g.add_argument("--model-kwargs", type=json_object, default=None,
                   help='extra constructor arguments as JSON, e.g. \'{"head_out_dim": 256}\' (SD-DiT head)')
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="dit_kernels fused model path and fused AdamW on CUDA (--no-fused: plain PyTorch)")
    return g


def add_method_args(parser):
    """The noise-process flags every method adds (dit_models/methods/<method>.py, train_flags)."""
    g = parser.add_argument_group("noise process (ddpm / sit / edm)")
    add_flags(g, "train_flags")
    return g


def get_parser():
    p = tool_parser("train", __doc__.split("\n\n")[0])
    add_model_args(p)
    add_method_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | digits32 | ImageFolder path | extract_latents folder")
    g.add_argument("--image-size", type=positive_int, default=256, help="ImageFolder resolution (pixels)")
    g.add_argument("--vae", default="none", help="ImageFolder: none (pixel space) | ema | mse | diffusers path")
    g.add_argument("--num-workers", type=nonnegative_int, default=4, help="DataLoader workers for file datasets")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="ImageFolder: decode every image once before training and leave out (counted, named) those "
                        "that fail; default: stop with an error naming the first unreadable file")
    g = p.add_argument_group("optimisation")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--global-batch-size", type=positive_int, default=None,
                   help=", ".join(f"{m.global_batch_size} ({m.name})" for m in METHODS.values()))
    g.add_argument("--epochs", type=positive_int, default=1400, help="used when --max-steps is not given")
    g.add_argument("--max-steps", type=positive_int, default=None)
    g.add_argument("--lr", type=positive_float, default=1e-4)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant (paper) or cosine decay to 0 at the last step")
    g.add_argument("--warmup-steps", type=nonnegative_int, default=0, help="linear LR warm-up steps (0 = none, paper)")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    g.add_argument("--ema-decay", type=probability, default=0.9999)
    g.add_argument("--grad-clip", type=nonnegative_float, default=0.0, help="max grad norm; 0 = off (paper)")
    g.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="default on CUDA: " + ", ".join(f"{m.cuda_precision} for {m.name}" for m in METHODS.values())
                        + " (the reference recipes); fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g = p.add_argument_group("feedback")
    g.add_argument("--log-every", type=positive_int, default=100)
    g.add_argument("--ckpt-every", type=positive_int, default=50_000)
    g.add_argument("--sample-every", type=nonnegative_int, default=10_000, help="EMA sample grid every N steps (0 = off)")
    g.add_argument("--sample-cfg-scale", type=nonnegative_float, default=4.0, help="CFG of in-training samples (SiT: 4.0)")
    # bare `--resume` means `--resume auto` (a requeued job re-runs one command line)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint file, run folder, or auto (also bare --resume): the newest complete checkpoint of "
                        "--run-dir, else of the newest <results-dir>/NNN-<method>-<model> folder, skipping torn "
                        "files; a new run when there is none, so one command line serves the first start and every "
                        "requeue. The run's settings come from the checkpoint; given flags may change only steps, LR "
                        "schedule, intervals and machine settings")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--quickstart", action="store_true",
                   help="small SiT on digits + samples + loss plot + evaluation (override any flag, e.g. --max-steps 20)")
    g.add_argument("--eval-samples", type=positive_int, default=REPORT_NUM_SAMPLES,
                   help="quickstart: samples per guidance setting of the digits report (as dit_models.evaluate)")
    add_preemption_args(p)
    return p


def add_preemption_args(parser):
    """Preemption and numerics flags (--resume is declared with the training flags)."""
    g = parser.add_argument_group("preemption and numerics")
    g.add_argument("--run-dir", default=None,
                   help="run folder to write (created if missing) instead of a new numbered one under --results-dir; "
                        "with --resume auto, the run to continue (recommended on clusters)")
    g.add_argument("--dist-timeout", type=positive_float, default=600.0,
                   help="seconds a collective may wait: when a process dies the others stop with an error within it")
    g.add_argument("--on-nonfinite", choices=["skip", "stop"], default="skip",
                   help="a NaN/inf loss or gradient: skip the step (weights, EMA, optimizer state unchanged; counted) "
                        "or stop with an error")
    return g


def resolve_args(args, parser=None, argv=None):
    """Fills method-dependent defaults and the quickstart preset (explicit flags always win).

    --quickstart: the preset (dit_models.quickstart.QUICKSTART) becomes the parser's defaults and argv is parsed
    again, so every flag written on the command line keeps its value. Without a parser the preset is applied as is.
    """
    if args.quickstart:
        if parser is None:
            for k, v in QUICKSTART.items():
                setattr(args, k, v)
        else:
            old = {k: parser.get_default(k) for k in QUICKSTART}
            parser.set_defaults(**QUICKSTART)
            try:
                args = parser.parse_args(argv)
            finally:
                parser.set_defaults(**old)
    m = get_method(args.method)
    for k, v in dict(model=m.default_model, global_batch_size=m.global_batch_size, **m.train_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.precision is None:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        args.precision = m.cuda_precision if cuda else "fp32"
    if parser is not None:
        args._given = given_flags(argv)
    return args


def given_flags(argv=None):
    """The destinations of the flags written on the command line (argv; None: sys.argv[1:]), found by parsing
    it again with every default suppressed: a value equal to the default still counts as given, and the
    quickstart preset (parser defaults) does not."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------
#                                            Training loop
# ---------------------------------------------------------------------------------------------------------

def set_precision(precision, device):
    """fp32: TF32 off (reference README numbers); tf32: TF32 matmul/cudnn; bf16: autocast (fp32 master weights)."""
    tf32 = precision == "tf32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def lr_at(args, step, max_steps):
    """Learning rate of (0-based) step: linear warm-up over --warmup-steps, then constant or cosine to 0."""
    warmup = getattr(args, "warmup_steps", 0) or 0
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if getattr(args, "lr_schedule", "constant") == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr


def make_run_dir(results_dir, method, model_name):
    os.makedirs(results_dir, exist_ok=True)
    existing = [d for d in os.listdir(results_dir) if d[:3].isdigit()]
    idx = max([int(d[:3]) for d in existing], default=-1) + 1
    run = os.path.join(results_dir, f"{idx:03d}-{method}-{model_name.replace('/', '-')}")
    os.makedirs(run, exist_ok=False)
    return run


def resolved_config(args, dataset):
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    cfg.update(input_size=dataset.resolution, in_channels=dataset.channels, num_classes=args.num_classes,
               data_kind=dataset.kind)
    return cfg


def main(args, outputs=None):
    """Trains a model; returns a dict of output paths (run_dir, checkpoint, samples, loss_plot, ...).

    outputs: a dict to fill as the run goes (cli reads it after Ctrl-C: where the last checkpoint is).
    """
    from dit_models.data import StepBatches, build_dataset

    outputs = {} if outputs is None else outputs
    rank, world, _, device = utils.setup_distributed(args.device, getattr(args, "dist_timeout", None))
    resume = _read_resume(args, rank)  # before the data: the run's settings (data included) may come from it
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    # Data first: the model's input size, channels and class count come from it.
    dataset = build_dataset(args.data, args.image_size, args.vae, device, skip_bad_images=args.skip_bad_images)
    batches = StepBatches(dataset, args.global_batch_size // world, rank, world, args.seed, args.num_workers)
    if args.num_classes is None:
        args.num_classes = dataset.num_classes
    elif args.num_classes != dataset.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} does not match the dataset ({dataset.num_classes} classes in {args.data})")
    cfg = resolved_config(args, dataset)
    model, objective = _build(args, dataset, device, cfg)
    if args.dry_run:
        if rank == 0:
            print(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            print(f"data: {dataset.describe()}")
            print(f"model: {args.model} {json.dumps(model_config(model))}, {utils.count_params(model):,} parameters")
        utils.cleanup_distributed()
        return {"config": cfg}

    run_dir, created = _open_run_dir(args, resume["run_dir"], rank)
    outputs["run_dir"] = run_dir
    run = None
    try:
        run = _Run(args, cfg, dataset, batches, model, objective, rank, world, device, run_dir, outputs)
        for note in resume["notes"]:
            run.logger.info(note)
        if resume["ckpt"] is not None:
            run.load(resume["ckpt"], resume["path"])
        run.train()
    except BaseException:
        # A run that fails before its first checkpoint leaves no numbered folder behind (issue 22.5).
        if created and rank == 0 and not utils.checkpoint_files(run_dir):
            for handler in (run.logger.handlers if run is not None else []):
                handler.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            outputs["run_dir"] = None
            print(f"removed the run folder {run_dir} (no checkpoint was written)", file=sys.stderr)
        raise
    if rank == 0:
        run.write_summary_files()
    return run.outputs


# Flags that describe this invocation or this machine: never taken from the checkpoint.
RESUME_LOCAL = {"resume", "run_dir", "results_dir", "device", "num_workers", "dist_timeout", "dry_run", "quickstart",
                "eval_samples"}
# Flags a resumed run may change: when given they win over the checkpoint's value (otherwise it is taken).
RESUME_MAY_CHANGE = {"max_steps", "epochs", "lr", "lr_schedule", "warmup_steps", "grad_clip", "log_every",
                     "ckpt_every", "sample_every", "sample_cfg_scale", "precision", "compile", "fused",
                     "skip_bad_images", "on_nonfinite"}


def _read_resume(args, rank=0):
    """What --resume continues: {"ckpt", "path", "run_dir", "notes"}; ckpt/path None for a new run (no
    --resume, or --resume auto without a complete checkpoint). Rank 0 decides and tells the others (it may
    create run folders meanwhile). The checkpoint's settings replace args' (apply_checkpoint_args)."""
    found = None
    if rank == 0:
        try:
            found = _find_resume(args)
        except (FileNotFoundError, ValueError) as e:  # raised on every rank below, none waits for rank 0
            found = {"error": e}
    if utils.is_distributed():
        box = [None if found is None else {k: v for k, v in found.items() if k != "ckpt"}]
        torch.distributed.broadcast_object_list(box, src=0)
        if rank != 0:
            found = dict(box[0], ckpt=None)
            if found.get("path") is not None:
                found["ckpt"] = utils.load_training_checkpoint(found["path"])
    if "error" in found:
        raise found["error"]
    if found["ckpt"] is not None:
        found["notes"] += apply_checkpoint_args(args, found["ckpt"].get("args", {}), found["path"])
    return found


def _find_resume(args):
    notes = []
    resume, run_dir, path, ckpt = args.resume, getattr(args, "run_dir", None), None, None
    if resume == "auto":
        run_dir = run_dir or newest_run_dir(args.results_dir, args.method, args.model)
        if run_dir is not None and utils.checkpoint_files(run_dir):
            try:
                path, ckpt = utils.newest_complete_checkpoint(run_dir, log=notes.append)
            except FileNotFoundError as e:
                notes.append(f"--resume auto: {e}; starting the run again")
        if ckpt is None:
            notes.append(f"--resume auto: no checkpoint in {run_dir or args.results_dir!r}: a new run")
    elif resume:
        if os.path.isdir(resume):
            path, ckpt = utils.newest_complete_checkpoint(resume, log=notes.append)
        else:
            path, ckpt = utils.latest_checkpoint(resume), utils.load_training_checkpoint(resume)
        if run_dir is None:  # <run>/checkpoints/NNNNNNN.pt
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    elif run_dir is not None and utils.checkpoint_files(run_dir):
        raise ValueError(f"--run-dir {run_dir} already holds checkpoints: add --resume auto to continue it, "
                         "or choose another folder")
    if run_dir is not None and ckpt is not None:
        for name in utils.remove_stale_temp_files(os.path.join(run_dir, "checkpoints")):
            notes.append(f"removed {name} (a checkpoint write that was cut short)")
    return {"ckpt": ckpt, "path": path, "run_dir": run_dir, "notes": notes}


def newest_run_dir(results_dir, method, model):
    """The numbered folder <results_dir>/NNN-<method>-<model> with the highest number (None: none)."""
    pattern = re.compile(r"(\d+)-" + re.escape(f"{method}-{model.replace('/', '-')}"))
    runs = [(int(m.group(1)), d) for d in (os.listdir(results_dir) if os.path.isdir(results_dir) else [])
            if (m := pattern.fullmatch(d)) and os.path.isdir(os.path.join(results_dir, d))]
    return os.path.join(results_dir, max(runs)[1]) if runs else None


def apply_checkpoint_args(args, old, path):
    """Takes the run's settings from its checkpoint's args dict (old): flags not given on the command line get
    the checkpoint's value; given ones may differ only in RESUME_MAY_CHANGE (they win, and are named in the
    returned notes). Every other difference is listed in one ValueError. args._given holds the flags written
    on the command line (resolve_args); without it (a programmatic caller) every value counts as given."""
    given = getattr(args, "_given", None)
    conflicts, changed = [], []
    for key, value in old.items():
        if key in RESUME_LOCAL or key.startswith("_") or not hasattr(args, key):
            continue  # this machine's settings, or not a flag (input_size, data_kind, ...)
        mine = getattr(args, key)
        if given is not None and key not in given:
            setattr(args, key, value)
        elif mine != value and not (given is None and mine is None):
            if key in RESUME_MAY_CHANGE:
                changed.append(f"--{key.replace('_', '-')} {mine} (checkpoint: {value})")
            else:
                conflicts.append(f"  --{key.replace('_', '-')}: checkpoint {value!r}, given {mine!r}")
        elif given is None and mine is None:
            setattr(args, key, value)
    if conflicts:
        raise ValueError(f"--resume {path}: the run was trained with other settings, which cannot change on resume:\n"
                         + "\n".join(conflicts) + "\nleave these flags out (the run's settings come from the checkpoint) "
                         "or start a new run")
    return [f"resuming with the checkpoint's settings; changed: {', '.join(changed)}"] if changed else []


def _open_run_dir(args, run_dir, rank):
    """(run folder, whether this call created it): run_dir (a resumed run or --run-dir), else a new numbered one
    under --results-dir. Rank 0 creates it and tells the others."""
    created = False
    if rank == 0:
        if run_dir is None:
            run_dir, created = make_run_dir(args.results_dir, args.method, args.model), True
        else:
            created = not os.path.isdir(run_dir)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    if utils.is_distributed():  # share the run folder name with the other ranks
        box = [run_dir]
        torch.distributed.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return run_dir, created


def _build(args, dataset, device, cfg):
    """The model (same initial weights on every rank; DDP also broadcasts them) and the objective. Bad model
    flags fail here, before any output."""
    utils.seed_everything(derive_seed(args.seed, 10**9))
    model = build_model_from_args(args, dataset.resolution, dataset.channels).to(device)
    # Record the decoder size the model got (derived from the encoder flags when not given), so that the
    # checkpoint rebuilds the same model whatever the defaults become.
    for key, value in model_config(model).items():
        if key.startswith("decoder_") and cfg.get(key) is None:
            cfg[key] = value
    return model, build_objective(args)


class _Run:
    """One training run: run folder and logger, EMA, optimizer, the step loop and its checkpoints."""

    def __init__(self, args, cfg, dataset, batches, model, objective, rank, world, device, run_dir, outputs=None):
        self.args, self.cfg, self.dataset, self.batches = args, cfg, dataset, batches
        self.model, self.objective, self.rank, self.world, self.device = model, objective, rank, world, device
        self.run_dir = run_dir
        self.logger = logger = utils.create_logger(run_dir, rank)
        logger.info(f"command: {' '.join(sys.argv)}")
        logger.info(f"run folder: {run_dir}; {world} process(es), device {device}, precision {args.precision}")
        logger.info(f"data: {dataset.describe()}")

        # EMA (an exact copy) and optimizer.
        self.ema = copy.deepcopy(model).to(device)
        utils.requires_grad(self.ema, False)
        self.ema.eval()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                     fused=(device.type == "cuda" and args.fused) or None)
        logger.info(f"{args.method} {args.model}: {utils.count_params(model):,} parameters "
                    f"({utils.count_params(model, True):,} trainable), config {json.dumps(model_config(model))}")
        # loss: mean over ranks and each log interval; step_loss: every step of rank 0 (the plot of a short run)
        self.start_step, self.history = 0, {"step": [], "loss": [], "step_loss": []}
        self.skipped_steps = 0  # non-finite loss or gradient (--on-nonfinite skip)
        self.outputs = {} if outputs is None else outputs
        self.outputs.update(run_dir=run_dir, checkpoint=None, samples=None, loss_plot=None, stopped_by=None,
                            skipped_steps=0, log=os.path.join(run_dir, "log.txt"))

    def load(self, ckpt, ckpt_path):
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.objective.load_state_dict(ckpt.get("objective", {}))
        self.start_step = int(ckpt["step"])
        self.skipped_steps = self.outputs["skipped_steps"] = int(ckpt.get("skipped_steps", 0))
        self.outputs["checkpoint"] = ckpt_path
        self.history = dict(self.history, **ckpt.get("history", {}))
        utils.set_rng_states(ckpt.get("rng", {}).get(self.rank) if isinstance(ckpt.get("rng"), dict) else None)
        self.logger.info(f"resumed from {ckpt_path} at step {self.start_step}")

    def train_model(self):
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = self.model
        if utils.is_distributed():
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      find_unused_parameters=get_method(self.args.method).find_unused_parameters)
        if self.args.compile:
            net = torch.compile(net)
        self.model.train()
        return net

    def save_checkpoint(self, step, epoch):
        rng = [None] * self.world
        states = utils.get_rng_states()
        if utils.is_distributed():
            torch.distributed.all_gather_object(rng, states)
        else:
            rng = [states]
        if self.rank == 0:
            path = os.path.join(self.run_dir, "checkpoints", f"{step:07d}.pt")
            utils.save_atomic({"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                               "objective": self.objective.state_dict(), "step": step, "epoch": epoch, "args": self.cfg,
                               "history": self.history, "rng": dict(enumerate(rng)),
                               "skipped_steps": self.skipped_steps}, path)
            self.outputs["checkpoint"] = path
            self.logger.info(f"saved checkpoint {path}")
        self.saved_step = step
        utils.barrier()

    def train(self):
        args, device, rank, logger, history = self.args, self.device, self.rank, self.logger, self.history
        ema_updater = utils.EMA(self.model, self.ema)
        train_model = self.train_model()
        start_step, batches = self.start_step, self.batches
        max_steps = args.max_steps if args.max_steps is not None else args.epochs * batches.steps_per_epoch
        autocast = set_precision(args.precision, device)
        logger.info(f"training steps {start_step} -> {max_steps} ({batches.steps_per_epoch} steps/epoch, "
                    f"global batch {args.global_batch_size}, {args.global_batch_size // self.world} per process)")
        sample_labels = _sample_labels(args.num_classes, device)
        running = torch.zeros((), device=device)
        running_logs, n_running, n_interval, step_losses = {}, 0, 0, []
        timer = utils.Timer(device)
        t_start = time.time()
        step = start_step
        epoch = start_step // batches.steps_per_epoch
        self.saved_step = start_step if self.outputs["checkpoint"] else None
        with utils.StopSignals(device) as stop:
            for epoch, step, x, y in batches.iterate(start_step, max_steps):
                # Every random draw of this step comes from (seed, rank, step): exact resume.
                utils.seed_everything(derive_seed(args.seed, rank, step))
                gen = torch.Generator().manual_seed(derive_seed(args.seed, rank, step, 1))
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                x = self.dataset.augment(x, gen)
                # Free the previous step's gradients before the forward: they would otherwise sit beside the
                # activations at the memory peak (2.5 GiB for DiT-XL/2).
                self.opt.zero_grad(set_to_none=True)
                with autocast:
                    loss, logs = self.objective(train_model, x, y, step)
                loss.backward()
                done = step + 1
                # One host read per step, agreed across ranks. A skipped step leaves weights, EMA, optimizer
                # state (Adam's step count) and the objective's state as they were; the LR schedule follows the
                # step number, so the steps after it get the LR they would have had.
                if utils.nonfinite_step(loss, self.params):
                    self._nonfinite(loss, done, max_steps)
                    step_losses.append(torch.tensor(float("nan")))
                else:
                    if args.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip)
                    for group in self.opt.param_groups:
                        group["lr"] = lr_at(args, step, max_steps)
                    self.opt.step()
                    ema_updater.update(args.ema_decay)
                    self.objective.after_step(self.model, step, max_steps)
                    running += loss.detach().float()
                    step_losses.append(loss.detach().float())  # read back at the next log line
                    for k, v in logs.items():
                        running_logs[k] = running_logs.get(k, 0) + v.float()
                    n_running += 1
                n_interval += 1
                if done % args.log_every == 0 or done == max_steps:
                    dt = timer.lap()
                    sps = n_interval / max(dt, 1e-9)
                    history["step_loss"].extend(torch.stack(step_losses).tolist())
                    step_losses = []
                    if n_running:  # the same on every rank: skipped steps are agreed
                        avg = utils.all_reduce_mean(running / n_running).item()  # loss averaged over ranks
                        extras = " ".join(f"{k}={utils.all_reduce_mean(v / n_running).item():.4f}"
                                          for k, v in running_logs.items())
                        history["step"].append(done)
                        history["loss"].append(avg)
                        loss_text = f"loss {avg:.4f} {extras + ' ' if extras else ''}"
                    else:
                        loss_text = "loss - (every step of the interval skipped) "
                    skipped = f"({self.skipped_steps} skipped) " if self.skipped_steps else ""
                    logger.info(f"step {done:7d}/{max_steps} ({100.0 * done / max_steps:5.1f}%) epoch {epoch} {loss_text}"
                                f"{skipped}| {sps:.2f} steps/s {sps * args.global_batch_size:.1f} img/s "
                                f"| elapsed {time.time() - t_start:.0f}s eta {(max_steps - done) / max(sps, 1e-9):.0f}s")
                    running.zero_()
                    running_logs, n_running, n_interval = {}, 0, 0
                if args.sample_every and (done % args.sample_every == 0 or done == max_steps):
                    if rank == 0:
                        self.outputs["samples"] = _write_samples(args, self.ema, sample_labels, device, self.run_dir, done)
                        logger.info(f"EMA samples -> {self.outputs['samples']}")
                    utils.barrier()
                if done % args.ckpt_every == 0 and done != max_steps:
                    self.save_checkpoint(done, epoch)
                step = done
                if done != max_steps and stop.requested():  # SIGTERM / SIGUSR1: checkpoint here and exit 0
                    if self.saved_step != done:
                        self.save_checkpoint(done, epoch)
                    self.outputs["stopped_by"] = stop.received
                    logger.info(f"{stop.received}: stopped at step {done}/{max_steps}, checkpoint "
                                f"{self.outputs['checkpoint']}; the same command with --resume auto (or --resume "
                                f"{self.run_dir}) continues it")
                    break

        if self.outputs["stopped_by"] is None:
            if step >= start_step and max_steps > start_step:
                self.save_checkpoint(max_steps, epoch)
            elif rank == 0:
                logger.info("nothing to train: the checkpoint is already at --max-steps")
        if self.skipped_steps:
            logger.info(f"{self.skipped_steps} step(s) skipped for a non-finite loss or gradient")
        self.outputs.update(final_loss=history["loss"][-1] if history["loss"] else None, history=history,
                            train_time_s=time.time() - t_start, ema=self.ema, model=self.model,
                            skipped_steps=self.skipped_steps)

    def _nonfinite(self, loss, step, max_steps):
        """A NaN/inf loss or gradient at (1-based) step: counted and logged, or FloatingPointError with
        --on-nonfinite stop."""
        self.skipped_steps += 1
        self.outputs["skipped_steps"] = self.skipped_steps
        what = f"non-finite loss or gradient at step {step}/{max_steps} (loss {loss.item():.4g})"
        if getattr(self.args, "on_nonfinite", "skip") == "stop":
            last = self.outputs["checkpoint"] or "none written yet"
            raise FloatingPointError(f"{what}; stopped (--on-nonfinite stop). Try --precision fp32, a lower --lr or "
                                     f"--grad-clip 1; last checkpoint: {last}")
        self.logger.warning(f"{what}: step skipped, weights, EMA and optimizer state unchanged "
                            f"({self.skipped_steps} skipped so far)")

    def write_summary_files(self):
        """Loss plot and CSV, and the resolved configuration, in the run folder."""
        args, history, run_dir = self.args, self.history, self.run_dir
        self.outputs["loss_plot"] = utils.plot_loss_curve(history["step"], history["loss"],
                                                          os.path.join(run_dir, "loss.png"), history["step_loss"],
                                                          f"{args.method} {args.model} on {self.dataset.name}")
        with open(os.path.join(run_dir, "loss.csv"), "w") as f:
            f.write("step,loss\n" + "".join(f"{s},{l:.6f}\n" for s, l in zip(history["step"], history["loss"])))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(self.cfg, f, indent=2, sort_keys=True, default=str)


def _sample_labels(num_classes, device, per_class=None):
    """Fixed labels for in-training grids: every class in order, at most 64 images."""
    n = min(64, max(8, num_classes * (per_class or max(1, 32 // max(num_classes, 1)))))
    return (torch.arange(n, device=device) % max(num_classes, 1)).long()


@torch.no_grad()
def _write_samples(args, ema, labels, device, run_dir, step):
    from dit_models.generation import generate, sampler_defaults

    opts = sampler_defaults(args.method)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(args.seed, 12345))
    x = generate(args.method, ema, labels, opts, cfg_scale=args.sample_cfg_scale, generator=gen, method_args=args,
                 batch_size=64)
    path = os.path.join(run_dir, "samples", f"{step:07d}.png")
    return utils.save_image_grid(x, path, nrow=max(8, min(16, args.num_classes)), labels=labels.tolist())


def _no_plot_reason(out):
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "(matplotlib not installed)"
    return "(no loss values: no step was trained)" if not out.get("history", {}).get("step_loss") else "-"


def print_summary(out, args, eval_result=None):
    lines = ["", "=" * 72, f"done: {args.method} {args.model} on {args.data}, {out.get('train_time_s', 0):.0f}s of training",
             f"  final loss     {out['final_loss']:.4f}" if out.get("final_loss") is not None else "  final loss     -",
             f"  run folder     {out['run_dir']}",
             f"  checkpoint     {out['checkpoint']}",
             f"  EMA samples    {out['samples']}",
             f"  loss plot      {out['loss_plot'] or _no_plot_reason(out)}",
             f"  log            {out['log']}"]
    if out.get("skipped_steps"):
        lines.append(f"  skipped steps  {out['skipped_steps']} (non-finite loss or gradient)")
    if out.get("stopped_by"):
        lines.append(f"  stopped by     {out['stopped_by']}: the same command with --resume auto continues the run")
    if eval_result is not None:
        from dit_models.metrics import format_report

        lines.append(f"  evaluation     {format_report(eval_result)}")
        lines.append(f"                 -> {eval_result['path']}, samples {eval_result['grid']}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def cli(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    args = resolve_args(args, parser, argv)
    outputs = {}  # filled as the run goes: what Ctrl-C and a failed rank report

    def last_checkpoint():
        if outputs.get("checkpoint"):
            return f"last checkpoint {outputs['checkpoint']} (continue with --resume auto or --resume {outputs['checkpoint']})"
        return "no checkpoint was written" + (f" in {outputs['run_dir']}" if outputs.get("run_dir") else "")

    def run(args):
        try:
            return main(args, outputs)
        except UnreadableImageError as e:  # re-raised from a DataLoader worker: keep the original line
            raise ValueError(str(e).strip().splitlines()[-1].split("UnreadableImageError: ", 1)[-1]) from None
        except RuntimeError as e:
            if not _peer_failure(e):
                raise
            raise RankFailure(f"a process of the distributed run failed or stopped answering (--dist-timeout "
                              f"{args.dist_timeout:g} s): {str(e).strip().splitlines()[0]}; {last_checkpoint()}") from e

    out = run_cli(run, args, errors=(FileNotFoundError, NotADirectoryError, ValueError, ImportError,
                                     MethodUnavailable, FloatingPointError, RankFailure),
                  interrupted=last_checkpoint, cleanup=_cleanup_after_error)
    if args.dry_run:
        return out
    rank = int(os.environ.get("RANK", "0"))
    eval_result = None
    if args.quickstart and rank == 0 and args.data.startswith("digits") and not out.get("stopped_by"):
        eval_result = evaluate_run(out, args)
    if rank == 0:
        print_summary(out, args, eval_result)
    utils.cleanup_distributed()
    return out


def _peer_failure(e):
    """Whether an error is a collective's (a process of the run died or timed out): torch raises DistError, or
    from inside DDP's backward a plain RuntimeError of the gloo/NCCL transport."""
    if isinstance(e, torch.distributed.DistError):
        return True
    words = ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out", "Timeout")
    return utils.is_distributed() and any(w in str(e) for w in words)


class RankFailure(RuntimeError):
    """Another process of a distributed run died or timed out (a collective raised)."""


def _cleanup_after_error():
    # After a peer died, tearing down the process group may wait for it: abort instead.
    if utils.is_distributed():
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass


if __name__ == "__main__":
    cli()
