"""Fidelity benchmark: does mutual distillation beat the single branches on our synthetic data?

    python benchmarks/fidelity.py --quick          # ~3.5 min on an idle 2-core CPU: S-only, U-only, mutual
    python benchmarks/fidelity.py                  # ~30 min: + the ablations
    python benchmarks/fidelity.py --seeds 0,1,2 --jobs 2 --runs mutual,sup_only --steps 600 --work /tmp/fid
    python benchmarks/fidelity.py --failures --set data.labelled_fraction=0.25   # failure modes, scarce labels

Steps (all through the public commands, each in its own process):
  1. `distill-depth synth`: train drives (seed 1000) and held-out test drives (seed 2000, other
     streets, other date folder), small resolution, a 22-beam LiDAR (KITTI's density at 640x192).
  2. `distill-depth make-shards` for each (train with the stereo partner: U trains "MS").
  3. `distill-depth train --config configs/bench_<run>.yaml` for every run and every training
     seed: the same steps, data and seeds. Each branch draws its augmentation from its own
     random stream (``distill_depth.train.rng``), so S-only, one-way and no-distillation train S
     on identical random numbers: differences between runs come from the method, not from luck.
  4. `distill-depth evaluate --protocol dense` on the test shards (exact synthetic ground truth),
     twice: median scaling `auto` (metric, except a U without any metric signal) and `on` (the
     depth's structure only, scale factored out).
Prints one table (rows = runs; columns = metrics of branch S, then branch U; means over seeds),
the paired differences to the single-branch baselines, and writes everything as JSON (default
`<work>/fidelity.json`). The work folder is reused: data and finished runs are not made again
(delete it, or pass --fresh, to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = ("sup_only", "self_only", "mutual", "no_point_filtering", "same_augmentation", "one_way", "no_distillation")
DEFAULT_RUNS = RUNS[:-1]
"""``no_distillation`` is left out by default: with per-branch random streams its S equals
``sup_only``'s and its U equals ``self_only``'s exactly (it only re-checks that)."""
QUICK_RUNS = ("sup_only", "self_only", "mutual")
BASELINES = {"S": "sup_only", "U": "self_only"}
TABLE_METRICS = (("abs_rel", "AbsRel"), ("sq_rel", "SqRel"), ("rmse", "RMSE"), ("rmse_log", "RMSElog"),
                 ("a1", "d1"), ("ause", "AUSE"))


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    beams: int
    """LiDAR beams of the synthetic sensor (``distill-depth synth --beams``)."""
    train_drives: int
    train_frames: int
    test_drives: int
    test_frames: int
    steps: int
    batch_size: int
    failures: bool = False
    """Synthetic failure modes (moving cars, LiDAR dropout and noise, textureless patches) in train
    and test drives, and per-region evaluation (``evaluate --regions``)."""


# 22 beams over the HDL-64E's field of view: at 64 rows, one beam every ~2.8 rows, the density
# KITTI's 64 beams have at the standard 640x192 (64 beams at 64 rows would cover every row).
FULL = Plan(height=64, width=192, beams=22, train_drives=8, train_frames=50, test_drives=2, test_frames=24,
            steps=300, batch_size=4)
FAILURE_FLAGS = ("--moving-objects", "3", "--lidar-dropout", "--lidar-noise", "0.03", "--textureless")
"""What ``--failures`` passes to ``distill-depth synth``: the failures each branch has and the other may repair."""
QUICK = Plan(height=64, width=192, beams=22, train_drives=3, train_frames=30, test_drives=1, test_frames=24,
             steps=80, batch_size=4)


def _cli(*args: str, log: Path, threads: int = 2) -> None:
    """Run `distill-depth ARGS` in a child process; its output goes to ``log``; raise on failure."""
    command = [sys.executable, "-m", "distill_depth.cli", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
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
                     "--height", str(plan.height), "--width", str(plan.width), "--beams", str(plan.beams),
                     "--workers", "2", *(FAILURE_FLAGS if plan.failures else ()),
                     log=work / "logs" / f"synth_{split}.log")
            stereo = ["--stereo"] if split == "train" else []  # U trains with the stereo partner ("MS")
            _cli("make-shards", "--kitti-root", str(raw), "--out", str(out), "--workers", "2", "--no-progress", *stereo,
                 log=work / "logs" / f"shards_{split}.log")
        shards[split] = out
    return shards["train"], shards["test"]


def train_and_evaluate(run: str, seed: int, work: Path, plan: Plan, shards: tuple[Path, Path],
                       overrides: tuple[str, ...], threads: int) -> dict:
    """One (run, seed): train (unless its export exists), evaluate with median scaling auto and on."""
    config = REPO / "configs" / f"bench_{run}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config for run {run!r}: {config}")
    name = f"{run}_seed{seed}"
    run_dir = work / "runs" / name
    timings = {}
    if not (run_dir / "export" / "config.yaml").is_file():
        start = time.perf_counter()
        _cli("train", "--config", str(config), f"data.train_shards={shards[0]}", f"train.output_dir={run_dir}",
             f"train.max_steps={plan.steps}", f"data.batch_size={plan.batch_size}", f"train.seed={seed}", *overrides,
             log=work / "logs" / f"train_{name}.log", threads=threads)
        timings["train_s"] = round(time.perf_counter() - start, 1)
    result: dict = {"timings": timings}
    for scaling, key in (("auto", "auto"), ("on", "ms")):
        result_file = work / "eval" / f"{name}_{key}.json"
        start = time.perf_counter()
        _cli("evaluate", "--checkpoint", str(run_dir), "--shards", str(shards[1]), "--protocol", "dense",
             "--branch", "auto", "--median-scaling", scaling, "--json", str(result_file), "--batch-size", "8",
             *(("--regions",) if plan.failures else ()), log=work / "logs" / f"eval_{name}_{key}.log", threads=threads)
        timings[f"eval_{key}_s"] = round(time.perf_counter() - start, 1)
        report = json.loads(result_file.read_text())
        result[key] = report["mean"]
        if "regions" in report:
            result[f"{key}_regions"] = {
                output: {region: values.get("abs_rel") for region, values in by_region.items() if not values.get("absent")}
                for output, by_region in report["regions"].items()
            }
        if key == "auto":
            result["median_scaling"] = report["median_scaling"]["applied"]
            result["num_images"] = report["num_images"]
    return result


def summarize(per_seed: dict[int, dict]) -> dict:
    """Mean and (with several seeds) sample standard deviation over seeds of every number."""
    out: dict = {"seeds": sorted(per_seed)}
    for key in ("auto", "ms"):
        branches = sorted({b for r in per_seed.values() for b in r.get(key, {})})
        out[key] = {}
        out[f"{key}_std"] = {}
        for branch in branches:
            metrics = {m for r in per_seed.values() for m in r[key].get(branch, {})}
            values = {m: [r[key][branch][m] for r in per_seed.values()
                          if isinstance(r[key][branch].get(m), (int, float))] for m in metrics}
            out[key][branch] = {m: statistics.fmean(v) for m, v in values.items() if v}
            out[f"{key}_std"][branch] = {m: statistics.stdev(v) for m, v in values.items() if len(v) > 1}
    regions: dict = {}
    for result in per_seed.values():
        for output, by_region in result.get("auto_regions", {}).items():
            for region, value in by_region.items():
                regions.setdefault(output, {}).setdefault(region, []).append(value)
    if regions:
        out["regions_abs_rel"] = {o: {r: statistics.fmean(v) for r, v in rs.items()} for o, rs in regions.items()}
    first = next(iter(per_seed.values()))
    out["median_scaling"] = first.get("median_scaling", {})
    return out


def format_regions(results: dict[str, dict]) -> str:
    """AbsRel per region (rows = run and branch, columns = regions; mean over seeds, metric)."""
    rows = [(f"{run} {output}", by_region) for run, r in results.items()
            for output, by_region in r.get("regions_abs_rel", {}).items()]
    if not rows:
        return ""
    regions = sorted({region for _, by_region in rows for region in by_region})
    first = max(len("AbsRel per region"), *(len(name) for name, _ in rows)) + 1
    width = max(len(r) for r in regions) + 2
    lines = ["AbsRel per region".ljust(first) + "".join(r.rjust(width) for r in regions)]
    for name, by_region in rows:
        cells = [("-" if by_region.get(r) is None else f"{by_region[r]:.4f}").rjust(width) for r in regions]
        lines.append(name.ljust(first) + "".join(cells))
    return "\n".join(lines)


def paired_differences(results: dict[str, dict], per_seed: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """AbsRel of each two-branch run minus its single-branch baseline, seed by seed (negative =
    better): S against S-only, U against U-only; metric, or median-scaled where the U-only
    baseline has no scale of its own (monocular)."""
    diffs: dict[str, dict] = {}
    for run in results:
        if run in BASELINES.values():
            continue
        row = {}
        for branch, baseline in BASELINES.items():
            key = "ms" if results.get(baseline, {}).get("median_scaling", {}).get(branch) else "auto"
            pairs = [(r[key][branch]["abs_rel"], per_seed[baseline][s][key][branch]["abs_rel"])
                     for s, r in per_seed.get(run, {}).items()
                     if branch in r.get(key, {}) and s in per_seed.get(baseline, {})]
            if pairs:
                deltas = [a - b for a, b in pairs]
                row[branch] = {"vs": baseline, "metric": "abs_rel" + ("" if key == "auto" else " (median-scaled)"),
                               "per_seed": deltas, "mean": statistics.fmean(deltas)}
        if row:
            diffs[run] = row
    return diffs


def format_table(results: dict[str, dict]) -> str:
    """Rows = runs; per branch the `auto` metrics then AbsRel median-scaled ('-': branch not trained)."""
    cells = [f"{b} {t}" for b in ("S", "U") for t in [t for _, t in TABLE_METRICS] + ["AbsRel(ms)"]]
    width = max(len(c) for c in cells) + 1
    title = "run (U ms = U median-scaled)"
    first = max(len(title), *(len(r) + 7 for r in results))
    lines = [title.ljust(first) + "".join(c.rjust(width) for c in cells)]
    lines.append("-" * len(lines[0]))
    for run, result in results.items():
        name = run + (" (U ms)" if result.get("median_scaling", {}).get("U") else "")
        row = []
        for branch in ("S", "U"):
            mean = result.get("auto", {}).get(branch)
            values = [None if mean is None else mean.get(key) for key, _ in TABLE_METRICS]
            values.append(result.get("ms", {}).get(branch, {}).get("abs_rel"))
            row += [("-" if v is None else f"{v:.4f}").rjust(width) for v in values]
        lines.append(name.ljust(first) + "".join(row))
    return "\n".join(lines)


def format_differences(diffs: dict[str, dict]) -> str:
    lines = ["AbsRel minus the single-branch baseline, same seeds (negative = better):"]
    for run, row in diffs.items():
        parts = [f"{b} {d['mean']:+.4f} vs {d['vs']}" + (f" (per seed {', '.join(f'{x:+.4f}' for x in d['per_seed'])})"
                                                         if len(d["per_seed"]) > 1 else "")
                 for b, d in row.items()]
        lines.append(f"  {run}: " + "; ".join(parts))
    return "\n".join(lines)


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit, so that subprocess.run kills the running child instead of orphaning it."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few steps, the three core runs")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (overrides the plan)")
    parser.add_argument("--beams", type=int, default=None, help="LiDAR beams of the synthetic data (overrides the plan)")
    parser.add_argument("--failures", action="store_true",
                        help="synthetic failure modes in the drives (moving cars, LiDAR dropout/noise, textureless) "
                             "and AbsRel per region; another work folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), e.g. --set optim.lr=5e-4")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings at once; each gets cores/jobs OpenMP threads (default 1)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (default: $TMPDIR/distill_depth_fidelity[_quick], outside the repo)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default <work>/fidelity.json)")
    parser.add_argument("--fresh", action="store_true", help="delete finished runs and evaluations first")
    args = parser.parse_args(argv)
    args.runs = tuple(args.runs.split(",")) if args.runs else (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    args = _parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = replace(plan, **{k: v for k, v in (("steps", args.steps), ("beams", args.beams)) if v is not None},
                   failures=args.failures)
    default_work = Path(tempfile.gettempdir()) / ("distill_depth_fidelity" + ("_quick" if args.quick else "")
                                                  + ("_failures" if args.failures else ""))
    work = args.work or default_work
    if args.fresh:
        import shutil

        for sub in ("runs", "eval"):
            shutil.rmtree(work / sub, ignore_errors=True)
    # A run folder from another plan or other overrides must not be reused silently.
    stamp, settings = work / "plan.json", {**asdict(plan), "overrides": list(args.overrides)}
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        print(f"error: {work} was made with another plan ({stamp}); pass --fresh or another --work", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings))

    start = time.perf_counter()
    shards = make_data(work, plan)
    print(f"data ready in {time.perf_counter() - start:.0f} s: {shards[0]}, {shards[1]}", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(run, seed) for run in args.runs for seed in args.seeds]

    def one(job: tuple[str, int]) -> tuple[tuple[str, int], dict]:
        run, seed = job
        try:
            result = train_and_evaluate(run, seed, work, plan, shards, tuple(args.overrides), threads)
            print(f"{run} seed {seed}: done {result['timings']}", flush=True)
        except (RuntimeError, FileNotFoundError) as exc:
            result = {"error": str(exc)}
            print(f"{run} seed {seed}: FAILED: {exc}", file=sys.stderr, flush=True)
        return job, result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        finished = dict(pool.map(one, jobs))
    per_seed = {run: {seed: finished[(run, seed)] for seed in args.seeds if "error" not in finished[(run, seed)]}
                for run in args.runs}
    results = {run: summarize(seeds) if seeds else {"error": "every seed failed"} for run, seeds in per_seed.items()}
    diffs = paired_differences(results, per_seed)
    output = {"plan": asdict(plan), "overrides": list(args.overrides), "seeds": list(args.seeds), "protocol": "dense",
              "runs": results, "per_seed": per_seed, "paired_differences": diffs,
              "errors": {f"{r}_seed{s}": v["error"] for (r, s), v in finished.items() if "error" in v},
              "total_s": round(time.perf_counter() - start, 1)}
    result_file = args.json or work / "fidelity.json"
    result_file.write_text(json.dumps(output, indent=2))
    print(format_table(results))
    if diffs:
        print(format_differences(diffs))
    if plan.failures:
        print(format_regions(results))
    print(f"{len(args.seeds)} seed(s), {plan.steps} steps, {plan.height}x{plan.width}, {plan.beams}-beam LiDAR; "
          f"total {output['total_s']:.0f} s; wrote {result_file}")
    return 1 if output["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
