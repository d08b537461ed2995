"""GPU check, one command: training step speed and memory per speed switch, DeepSpeed, evaluation.

    python benchmarks/gpu_check.py [--wheels wheels/] [--steps 20] [--warmup 3] [--time-limit 420]
        [--variants eager,channels_last,bf16,bf16+channels_last,compile_losses,compile,compile+bf16+channels_last]
    python benchmarks/gpu_check.py --cpu-smoke      # the same code on CPU at a tiny size (CI)

Prints one table, a row per measurement:

* ``train``: colocated training (both branches in one process) at 640x192, batch 12, with the
  KITTI recipe ``configs/kitti_eigen_zhou.yaml`` (ResNet-18 depth and pose encoders, here from
  scratch, 4 scales, frames t-1/t+1), one row per variant of ``train.channels_last``, ``train.mixed_precision=bf16`` and
  ``train.compile`` (``compile``: networks and losses, ``compile_losses``: the losses only): samples/s and ms per step (median of ``--steps`` after ``--warmup`` untimed
  steps; the compiled variants compile in the warm-up, shown apart) and peak GPU memory
  (``torch.cuda.max_memory_allocated`` since the variant was built: its weights, optimiser state
  and the step's activations). The step is the trainer's own ``Trainer.train_step`` on an
  in-memory batch of random frames that already lies on the GPU (``benchmarks/trainer_steps.py``):
  data loading is not measured, augmentation (kornia, on the GPU) is;
* ``deepspeed``: the ZeRO-2 engine path (``train.deepspeed=zero2``: one engine per branch, a step
  of each per ``train_step``), when ``deepspeed`` imports;
* ``eval``: images/s of a depth network forward at 640x192 (``SupervisedBranch.infer``, eval mode,
  no gradients: what ``distill-depth evaluate`` runs per image), fp32 and bf16 + channels-last.

Each row catches its own failure and prints it in the table. Without CUDA (and without
``--cpu-smoke``) the script says that it needs CUDA and exits 0. Sections stop being started
once ``--time-limit`` seconds have passed (a row already started finishes; the compiled variants
run last, they take longest).

Packages the GPU machine may lack (kornia and braceexpand are needed; deepspeed, webdataset and
wandb optional) are installed with ``pip install --no-index --find-links DIR`` from ``--wheels
DIR``; docs/benchmarks.md says how to download that folder on a machine with network access.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trainer_steps, when run from elsewhere
import trainer_steps  # noqa: E402

REQUIRED = ("kornia", "braceexpand")
"""Modules the trainer imports (kornia: augmentation, geometry; braceexpand: shard names)."""
OPTIONAL = ("deepspeed", "webdataset", "wandb")
"""Modules of the optional paths (the DeepSpeed row; shards and W&B are not used here)."""

TRAIN_VARIANTS = "eager,channels_last,bf16,bf16+channels_last,compile_losses+bf16+channels_last,compile+bf16+channels_last,compile"
SMOKE_VARIANTS = "eager,bf16+channels_last"
SWITCHES = {"channels_last": "train.channels_last=true", "bf16": "train.mixed_precision=bf16",
            "compile": "train.compile=on", "compile_losses": "train.compile=losses"}
RECIPE = trainer_steps.REPO / "configs" / "kitti_eigen_zhou.yaml"
"""The KITTI recipe (ResNet-18 depth and pose encoders, 4 scales, frames t-1/t+1, batch 12)."""
FROM_SCRATCH = ["model.pretrained=none", "model.weights=null"]  # no ImageNet file needed; the same step time


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pip_install_command(wheels: str | Path, packages: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *packages]


def install_from_wheels(wheels: str | None) -> list[str]:
    """Install the missing packages from the ``wheels`` folder, each on its own (one without a
    wheel there does not stop the others); the lines to print."""
    lines = []
    for module in missing(REQUIRED + OPTIONAL):
        if wheels is None:
            need = "needed" if module in REQUIRED else "optional"
            lines.append(f"{module}: not installed ({need}); pass --wheels DIR to install it from wheels")
            continue
        result = subprocess.run(pip_install_command(wheels, [module]), capture_output=True, text=True)
        tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
        lines.append(f"{module}: pip install from {wheels}: {'ok' if result.returncode == 0 else 'FAILED'} ({tail[0]})")
    importlib.invalidate_caches()
    return lines


class Table:
    HEADER = ("section", "variant", "rate", "ms/step", "peak GiB", "note")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells: str) -> None:
        self.rows.append(tuple(cells))
        print("  ".join(cells), file=sys.stderr, flush=True)  # progress while the table grows

    def print(self) -> None:
        rows = [self.HEADER, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER) - 1)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def _peak(device) -> str:
    import torch

    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def _reset_peak(device) -> None:
    import torch

    trainer_steps.release_device_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_row(variant: str, args: argparse.Namespace, batch, device, extra: list[str] = ()) -> tuple[str, ...]:
    """(variant, samples/s, ms/step, peak GiB, note) of ``variant`` ('+'-joined switches)."""
    names = [] if variant == "eager" else variant.split("+")
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown switch {unknown[0]!r} (known: {', '.join(SWITCHES)}, or eager)")
    overrides = [*FROM_SCRATCH, f"data.batch_size={args.batch_size}", *(SWITCHES[n] for n in names), *extra]
    _reset_peak(device)
    with trainer_steps.in_memory_trainer(overrides, batch, RECIPE) as trainer:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            trainer_steps.timed_step(trainer)
        warmup_s = time.perf_counter() - t0
        times = [trainer_steps.timed_step(trainer) for _ in range(args.steps)]
        engines = [type(b.engine).__name__ for b in trainer.branches.values() if b.engine is not None]
        peak = _peak(device)
    median = statistics.median(times)
    note = f"warm-up {warmup_s:.1f} s, min {min(times) * 1e3:.0f} ms"
    if engines:
        note += f", engines {'+'.join(engines)}"
    return f"{args.batch_size / median:.1f} samples/s", f"{median * 1e3:.1f}", peak, note


def eval_row(variant: str, args: argparse.Namespace, device) -> tuple[str, ...]:
    """(images/s, ms per batch, peak GiB, note) of ``SupervisedBranch.infer`` at the check's size."""
    import contextlib

    import torch

    from distill_depth.branches import build_branch
    from distill_depth.config import load_config
    from distill_depth.train.speed import use_channels_last

    _reset_peak(device)
    torch.manual_seed(0)
    branch = build_branch("S", load_config(RECIPE, FROM_SCRATCH)).to(device).eval()
    if "channels_last" in variant:
        use_channels_last(branch)
    image = torch.rand(args.eval_batch, 3, args.height, args.width, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in variant
                else contextlib.nullcontext())
    times = []
    for i in range(args.warmup + args.steps):
        trainer_steps.sync(device)
        t0 = time.perf_counter()
        with autocast:
            branch.infer(image)
        trainer_steps.sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return (f"{args.eval_batch / median:.1f} images/s", f"{median * 1e3:.1f}", _peak(device),
            f"batch {args.eval_batch}, forward only")


def run_sections(args: argparse.Namespace, device, table: Table) -> None:
    start = time.perf_counter()

    def guarded(section: str, variant: str, measure) -> None:
        if time.perf_counter() - start > args.time_limit:
            table.add(section, variant, "-", "-", "-", f"skipped: --time-limit {args.time_limit:.0f} s reached")
            return
        try:
            table.add(section, variant, *measure())
        except Exception as exc:  # one broken row must not lose the table
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            table.add(section, variant, "-", "-", "-", f"FAILED: {type(exc).__name__}: {first}")
            if args.verbose:
                traceback.print_exc()

    batch = None
    try:
        batch = trainer_steps.random_batch(args.batch_size, args.height, args.width, device)
    except Exception as exc:
        table.add("train", "batch", "-", "-", "-", f"FAILED: {type(exc).__name__}: {exc}")
    variants = [v for v in args.variants.split(",") if v]
    eager = [v for v in variants if "compile" not in v]
    compiled = [v for v in variants if "compile" in v]
    sections = set(args.sections.split(","))
    if "train" in sections and batch is not None:
        for variant in eager:
            guarded("train", variant, lambda v=variant: train_row(v, args, batch, device))
    if "eval" in sections:
        for variant in ("fp32", "bf16+channels_last"):
            guarded("eval", variant, lambda v=variant: eval_row(v, args, device))
    if "deepspeed" in sections and batch is not None:
        if importlib.util.find_spec("deepspeed") is None:
            table.add("deepspeed", "zero2", "-", "-", "-", "skipped: deepspeed is not installed (--wheels DIR)")
        else:
            guarded("deepspeed", "zero2", lambda: train_row("eager", args, batch, device, ["train.deepspeed=zero2"]))
    if "train" in sections and batch is not None:
        for variant in compiled:
            guarded("train", variant, lambda v=variant: train_row(v, args, batch, device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="folder of wheels to pip install missing packages from (--no-index)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run on CPU at a tiny size (64x32, batch 1, 2 steps): the measuring code, for CI")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--eval-batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--variants", help=f"training variants, '+'-joined switches (default {TRAIN_VARIANTS})")
    parser.add_argument("--sections", default="train,eval,deepspeed")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds after which no new row is started (default 420)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failed rows")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = (dict(batch_size=1, height=32, width=64, eval_batch=1, steps=2, warmup=1, variants=SMOKE_VARIANTS)
                if smoke else
                dict(batch_size=12, height=192, width=640, eval_batch=12, steps=20, warmup=3, variants=TRAIN_VARIANTS))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    if not smoke and not torch.cuda.is_available():
        print("gpu_check needs CUDA (torch.cuda.is_available() is False on this machine); nothing measured. "
              "`--cpu-smoke` runs the same code on CPU at a tiny size.")
        return 0
    for line in install_from_wheels(args.wheels):
        print(line)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device("cpu" if smoke else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"gpu_check: {name}, torch {torch.__version__}, Python {sys.version.split()[0]}; train: colocated S+U, "
          f"batch {args.batch_size}, {args.width}x{args.height}, median of {args.steps} steps after {args.warmup}")
    table = Table()
    run_sections(args, device, table)
    print()
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
