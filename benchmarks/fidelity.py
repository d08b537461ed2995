"""Fidelity benchmark: does mutual distillation beat the single branches on our synthetic data?

    python benchmarks/fidelity.py --quick          # a few minutes: S-only, U-only, mutual
    python benchmarks/fidelity.py                  # ~30 min on a 2-core CPU: + the ablations
    python benchmarks/fidelity.py --runs mutual,sup_only --steps 300 --work /tmp/fid

Steps (all through the public commands, each in its own process):
  1. `distill-depth synth`: train drives (seed 1000) and held-out test drives (seed 2000, other
     scenes, other date folder), small resolution.
  2. `distill-depth make-shards` for each.
  3. `distill-depth train --config configs/bench_<run>.yaml` for every run, the same number of
     steps, the same seed, the same data.
  4. `distill-depth evaluate --protocol dense` on the test shards (exact synthetic ground truth),
     median scaling `auto` (on only for the U-only run, which has no metric signal).
Prints one table (rows = runs; columns = metrics of branch S, then branch U) and writes the whole
result as JSON (default `<work>/fidelity.json`). The work folder is reused: data and finished runs
are not made again (delete it, or pass --fresh, to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = ("sup_only", "self_only", "mutual", "no_point_filtering", "same_augmentation", "one_way", "no_distillation")
QUICK_RUNS = ("sup_only", "self_only", "mutual")
TABLE_METRICS = (("abs_rel", "AbsRel"), ("sq_rel", "SqRel"), ("rmse", "RMSE"), ("rmse_log", "RMSElog"),
                 ("a1", "d1"), ("ause", "AUSE"))


@dataclass
class Plan:
    height: int
    width: int
    train_drives: int
    train_frames: int
    test_drives: int
    test_frames: int
    steps: int
    batch_size: int


FULL = Plan(height=64, width=192, train_drives=3, train_frames=40, test_drives=1, test_frames=24, steps=100, batch_size=4)
QUICK = Plan(height=64, width=192, train_drives=2, train_frames=14, test_drives=1, test_frames=8, steps=30, batch_size=4)


def _cli(*args: str, log: Path) -> None:
    """Run `distill-depth ARGS` in a child process; its output goes to ``log``; raise on failure."""
    command = [sys.executable, "-m", "distill_depth.cli", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("WANDB_MODE", "disabled")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"`distill-depth {args[0]}` failed (exit {result.returncode}); log {log}:\n" + "\n".join(tail))


def make_data(work: Path, plan: Plan) -> tuple[Path, Path]:
    """Synthetic train / held-out test drives and their shards (skipped when already there)."""
    shards = {}
    for split, seed, drives, frames in (("train", 1000, plan.train_drives, plan.train_frames),
                                        ("test", 2000, plan.test_drives, plan.test_frames)):
        raw, out = work / "raw" / split, work / "shards" / split
        if not (out / "manifest.json").is_file():
            if not raw.is_dir():
                _cli("synth", "--out", str(raw), "--drives", str(drives), "--frames", str(frames), "--seed", str(seed),
                     "--height", str(plan.height), "--width", str(plan.width), log=work / "logs" / f"synth_{split}.log")
            _cli("make-shards", "--kitti-root", str(raw), "--out", str(out), "--workers", "1", "--no-progress",
                 log=work / "logs" / f"shards_{split}.log")
        shards[split] = out
    return shards["train"], shards["test"]


def train_and_evaluate(run: str, work: Path, plan: Plan, train_shards: Path, test_shards: Path) -> dict:
    """One run: train (unless its export exists) and evaluate on the test shards."""
    config = REPO / "configs" / f"bench_{run}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config for run {run!r}: {config}")
    run_dir = work / "runs" / run
    timings = {}
    if not (run_dir / "export" / "config.yaml").is_file():
        start = time.perf_counter()
        _cli("train", "--config", str(config), f"data.train_shards={train_shards}", f"train.output_dir={run_dir}",
             f"train.max_steps={plan.steps}", f"data.batch_size={plan.batch_size}", log=work / "logs" / f"train_{run}.log")
        timings["train_s"] = round(time.perf_counter() - start, 1)
    result_file = work / "eval" / f"{run}.json"
    start = time.perf_counter()
    _cli("evaluate", "--checkpoint", str(run_dir), "--shards", str(test_shards), "--protocol", "dense",
         "--branch", "auto", "--median-scaling", "auto", "--json", str(result_file), "--batch-size", "8",
         log=work / "logs" / f"eval_{run}.log")
    timings["eval_s"] = round(time.perf_counter() - start, 1)
    report = json.loads(result_file.read_text())
    return {"config": str(config.relative_to(REPO)), "median_scaling": report["median_scaling"]["applied"],
            "num_images": report["num_images"], "mean": report["mean"], "timings": timings}


def format_table(results: dict[str, dict]) -> str:
    """Rows = runs; columns = the metrics of branch S, then branch U ('-': branch not trained)."""
    cells = [f"{branch} {title}" for branch in ("S", "U") for _, title in TABLE_METRICS]
    width = max(len(c) for c in cells) + 1
    first = max(len("run (ms = median-scaled)"), *(len(r) + 5 for r in results))
    lines = ["run (ms = median-scaled)".ljust(first) + "".join(c.rjust(width) for c in cells)]
    lines.append("-" * len(lines[0]))
    for run, result in results.items():
        name = run + (" (ms)" if result.get("median_scaling") else "")
        row = []
        for branch in ("S", "U"):
            mean = result.get("mean", {}).get(branch)
            for key, _ in TABLE_METRICS:
                value = None if mean is None else mean.get(key)
                row.append(("-" if value is None else f"{value:.4f}").rjust(width))
        lines.append(name.ljust(first) + "".join(row))
    return "\n".join(lines)


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit, so that subprocess.run kills the running child instead of orphaning it."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few steps, the three core runs")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (overrides the plan)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (default: $TMPDIR/distill_depth_fidelity[_quick], outside the repo)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default <work>/fidelity.json)")
    parser.add_argument("--fresh", action="store_true", help="delete finished runs and evaluations first")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.steps is not None:
        plan = Plan(**{**plan.__dict__, "steps": args.steps})
    runs = tuple(args.runs.split(",")) if args.runs else (QUICK_RUNS if args.quick else RUNS)
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    default_work = Path(tempfile.gettempdir()) / ("distill_depth_fidelity_quick" if args.quick else "distill_depth_fidelity")
    work = args.work or default_work
    if args.fresh:
        import shutil

        for sub in ("runs", "eval"):
            shutil.rmtree(work / sub, ignore_errors=True)
    # A run folder from a different step budget must not be reused silently.
    stamp = work / "plan.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != plan.__dict__:
        parser.error(f"{work} was made with another plan ({stamp}); pass --fresh or another --work")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(plan.__dict__))

    start = time.perf_counter()
    train_shards, test_shards = make_data(work, plan)
    print(f"data ready in {time.perf_counter() - start:.0f} s: {train_shards}, {test_shards}", flush=True)
    results: dict[str, dict] = {}
    for run in runs:
        try:
            results[run] = train_and_evaluate(run, work, plan, train_shards, test_shards)
            print(f"{run}: done {results[run]['timings']}", flush=True)
        except (RuntimeError, FileNotFoundError) as exc:
            results[run] = {"error": str(exc)}
            print(f"{run}: FAILED: {exc}", file=sys.stderr, flush=True)
    output = {"plan": plan.__dict__, "protocol": "dense", "runs": results,
              "total_s": round(time.perf_counter() - start, 1)}
    result_file = args.json or work / "fidelity.json"
    result_file.write_text(json.dumps(output, indent=2))
    print(format_table({r: v for r, v in results.items()}))
    print(f"total {output['total_s']:.0f} s; wrote {result_file}")
    return 1 if any("error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
