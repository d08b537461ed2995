"""Step-time benchmark: both branches colocated in 1 process vs split over 2 processes (S | U).

    .venv/bin/python benchmarks/step.py [--shards shards/train] [--steps 8] [--warmup 2] [--batch-size 4]

Runs the real trainer (``distill-depth train``) twice on this machine's CPU, reads each run's
``metrics.jsonl`` and prints, side by side: per-branch compute time per step (forward + loss +
backward + optimiser), wall time per step, samples/s, and the share of the step spent in the
exchange of predictions and, within it, waiting for the partner, and at the step-end
all-reduce (where the faster group idles until the slower one has finished its step). The first ``--warmup`` steps
are left out. Every process gets ``--threads`` OpenMP threads (default 1: on a shared 2-core
machine more threads per process thrash), so the split run uses twice the cores of the
colocated one; compare with ``--threads 2`` for the colocated run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_trainer(world: int, overrides: list[str], out: Path, threads: int) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    base.update(OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    port = _port()
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = (out.parent / f"{out.name}.rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "distill_depth.cli", "train", *overrides,
                                       f"train.output_dir={out}"], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        tail = (out.parent / f"{out.name}.rank0.log").read_text()[-2000:]
        raise SystemExit(f"trainer failed (exit codes {codes}):\n{tail}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(metrics: list[dict], warmup: int, samples_per_step: int) -> dict[str, float]:
    rows = [m for m in metrics if "time/step_s" in m and m["step"] > warmup]
    if not rows:
        raise SystemExit("no steps after warm-up: raise --steps")
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    step_s = mean("time/step_s")
    return {
        "S compute s/step": mean("S/compute_s"),
        "U compute s/step": mean("U/compute_s"),
        "wall s/step": step_s,
        "samples/s": samples_per_step / step_s,
        "exchange share": mean("time/exchange_s") / step_s,
        "wait share": mean("time/wait_s") / step_s,
        "step-end sync share": mean("time/sync_s") / step_s,
        "data s/step": mean("time/data_s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=str(REPO / "shards" / "train"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    args = parser.parse_args(argv)
    overrides = [
        f"data.train_shards={args.shards}", "data.val_shards=null", f"data.batch_size={args.batch_size}",
        "data.num_workers=1", f"train.max_steps={args.steps}", "train.log_every=1", "train.val_every=0",
        "train.image_every=0", f"train.ckpt_every={10 * args.steps}", "train.report_to=none", "train.resume=none",
    ]
    results = {}
    with tempfile.TemporaryDirectory(prefix="dd_bench_") as tmp:
        for label, world in (("colocated (1 proc)", 1), ("split S|U (2 procs)", 2)):
            start = time.perf_counter()
            metrics = run_trainer(world, overrides, Path(tmp) / f"world{world}", args.threads)
            results[label] = summarise(metrics, args.warmup, args.batch_size)
            print(f"{label}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    labels = list(results)
    print(f"\nbatch {args.batch_size}, steps {args.warmup + 1}..{args.steps}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s) per process, shards {args.shards}\n")
    print(f"{'':22}" + "".join(f"{label:>22}" for label in labels))
    for key in results[labels[0]]:
        cells = "".join(f"{results[label][key]:>22.3f}" for label in labels)
        print(f"{key:22}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
