"""Fidelity benchmark: does mutual distillation beat the single branches on our synthetic data?

    python benchmarks/fidelity.py --quick --jobs 2   # ~8 min, 2-core CPU: S-only, U-only, mutual; fractions 1, 0.25
    python benchmarks/fidelity.py --jobs 2           # 3 seeds x fractions 1, 0.25, 0.05; 300 steps alone, then 100 alone or
                                                     # mutual at a tenth of the lr (48 min on the idle 2-core CPU)
    python benchmarks/fidelity.py --runs sup_only,mutual,one_way --seeds 0 --steps 600 --work /tmp/fid
    python benchmarks/fidelity.py --quick --data-seeds 1100,3000 --set loss.lambda_distill=0.2   # tune elsewhere

Every plan uses drives with failure modes (moving cars, LiDAR dropout and noise, textureless
patches; ``--no-failures`` for the static world) and reports AbsRel per region.

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
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below, also when loaded by path

from fidelity_report import (  # noqa: E402
    format_curve, format_differences, format_regions, format_table, fraction_curve, label,
    paired_differences, summarize, write_plots,
)
from fidelity_plan import (  # noqa: E402, F401 (u_reads_labels: part of this module's interface)
    FAILURE_FLAGS, FULL, FULL_FRACTIONS, FULL_SEEDS, QUICK, QUICK_FRACTIONS, QUICK_RUNS, QUICK_SEEDS, RUNS, Plan,
    plan_jobs, run_dir, stage_one_sources, u_reads_labels,
)


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
        with _CHILDREN_LOCK:
            if _STOPPING.is_set():  # a queued job of the pool after SIGTERM: start nothing new
                raise RuntimeError(f"`distill-depth {args[0]}` not started: the benchmark was stopped (SIGTERM)")
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            _CHILDREN.add(child)
        try:
            returncode = child.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(child)
    if returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"`distill-depth {args[0]}` failed (exit {returncode}); log {log}:\n" + "\n".join(tail))


def make_data(work: Path, plan: Plan) -> tuple[Path, Path]:
    """Synthetic train / held-out test drives and their shards (skipped when already there)."""
    shards = {}
    for split, seed, drives, frames in (("train", plan.train_seed, plan.train_drives, plan.train_frames),
                                        ("test", plan.test_seed, plan.test_drives, plan.test_frames)):
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


def train(run: str, seed: int, work: Path, plan: Plan, shards: tuple[Path, Path], overrides: tuple[str, ...],
          threads: int, fraction: float = 1.0, stage: int = 2) -> dict:
    """Train one (run, seed, labelled fraction) unless its export exists; returns its timings. A
    fraction below 1 keeps the LiDAR of that share of the training samples (``data.labelled_fraction``).
    Under ``--two-stage`` a stage-2 run starts each branch from the stage-1 single-branch run."""
    config = REPO / "configs" / f"bench_{run}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config for run {run!r}: {config}")
    folder = run_dir(work, run, fraction, seed, stage)
    if fraction < 1.0:
        overrides = (*overrides, f"data.labelled_fraction={fraction:g}")
    steps = plan.first_stage_steps if stage == 1 else plan.steps
    if stage == 2 and plan.first_stage_steps:
        overrides = (*overrides, *(f"train.init_{branch.lower()}={folder}"
                                   for branch, folder in stage_one_sources(run, fraction, seed, work, overrides).items()))
        if plan.second_stage_lr_factor != 1.0:
            overrides = (*overrides, "optim.schedule=step", "optim.milestones=[0]",
                         f"optim.decay_factor={plan.second_stage_lr_factor:g}")
    if (folder / "export" / "config.yaml").is_file():
        return {}
    start = time.perf_counter()
    _cli("train", "--config", str(config), f"data.train_shards={shards[0]}", f"train.output_dir={folder}",
         f"train.max_steps={steps}", f"data.batch_size={plan.batch_size}", f"train.seed={seed}", *overrides,
         log=work / "logs" / f"train_{folder.name}.log", threads=threads)
    return {"train_s": round(time.perf_counter() - start, 1)}


def train_and_evaluate(run: str, seed: int, work: Path, plan: Plan, shards: tuple[Path, Path],
                       overrides: tuple[str, ...], threads: int, fraction: float = 1.0) -> dict:
    """One (run, seed, labelled fraction): train (unless its export exists), evaluate with median
    scaling auto and on; evaluation is always on the whole test set."""
    timings = train(run, seed, work, plan, shards, overrides, threads, fraction)
    folder = run_dir(work, run, fraction, seed)
    name = folder.name
    result: dict = {"timings": timings}
    for scaling, key in (("auto", "auto"), ("on", "ms")):
        result_file = work / "eval" / f"{name}_{key}.json"
        start = time.perf_counter()
        export = folder / "export" / "config.yaml"
        fresh = result_file.is_file() and result_file.stat().st_mtime >= export.stat().st_mtime
        if not fresh:  # an evaluation newer than the run's export is reused, like the run itself
            _cli("evaluate", "--checkpoint", str(folder), "--shards", str(shards[1]), "--protocol", "dense",
                 "--branch", "auto", "--median-scaling", scaling, "--json", str(result_file), "--batch-size", "8",
                 *(("--regions",) if plan.failures else ()), log=work / "logs" / f"eval_{name}_{key}.log",
                 threads=threads)
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


_CHILDREN: set[subprocess.Popen] = set()
"""The trainings and evaluations running now, one per pool thread (``--jobs``)."""
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _exit_on_sigterm() -> None:
    """SIGTERM → kill every running child, start no queued one, then SystemExit. The children run
    in pool threads, which a signal in the main thread does not reach: without this they would
    go on training, and the pool would wait for them and then start the queued runs."""
    def handler(signum: int, frame: object) -> None:
        with _CHILDREN_LOCK:
            _STOPPING.set()
            for child in _CHILDREN:
                child.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few steps, the three core runs")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--seeds", default=None,
                        help=f"comma-separated training seeds (default {FULL_SEEDS}; --quick {QUICK_SEEDS})")
    parser.add_argument("--fractions", default=None,
                        help="comma-separated labelled fractions (data.labelled_fraction) of every run with "
                             f"branch S: the semi-supervised curve (default {FULL_FRACTIONS}; --quick {QUICK_FRACTIONS})")
    parser.add_argument("--two-stage", type=int, default=None, metavar="N",
                        help="S-only and U-only train N steps first; every run then continues --steps more from "
                             f"those weights (alone or mutually), paired by seed (default {FULL.first_stage_steps}; "
                             "--quick and 0: every run from scratch)")
    parser.add_argument("--stage2-lr-factor", type=float, default=None, metavar="F",
                        help="stage 2 of --two-stage trains at F x the learning rates "
                             f"(default {FULL.second_stage_lr_factor:g}; 1 = no decay)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (overrides the plan)")
    parser.add_argument("--data-seeds", default=None, metavar="TRAIN,TEST",
                        help="synth seeds of the train and test drives (default 1000,2000; tune settings on others)")
    parser.add_argument("--beams", type=int, default=None, help="LiDAR beams of the synthetic data (overrides the plan)")
    parser.add_argument("--no-failures", dest="failures", action="store_false",
                        help="drives without the synthetic failure modes (moving cars, LiDAR dropout/noise, "
                             "textureless patches) and no per-region AbsRel: the static, exact-LiDAR world")
    parser.add_argument("--failures", action="store_true", help=argparse.SUPPRESS)  # the default since 0.3
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), e.g. --set optim.lr=5e-4")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings at once; each gets cores/jobs OpenMP threads (default 1)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (default: $TMPDIR/distill_depth_fidelity[_quick], outside the repo)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default <work>/fidelity.json)")
    parser.add_argument("--fresh", action="store_true", help="delete finished runs and evaluations first")
    args = parser.parse_args(argv)
    args.runs = tuple(args.runs.split(",")) if args.runs else QUICK_RUNS
    args.seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    args.fractions = args.fractions or (QUICK_FRACTIONS if args.quick else FULL_FRACTIONS)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        args.fractions = tuple(sorted({float(f) for f in args.fractions.split(",")}, reverse=True))
    except ValueError:
        parser.error(f"--fractions must be comma-separated numbers, got {args.fractions!r}")
    if not all(0.0 < f <= 1.0 for f in args.fractions):
        parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    if args.data_seeds is not None:
        try:
            args.data_seeds = tuple(int(s) for s in args.data_seeds.split(","))
        except ValueError:
            args.data_seeds = ()
        if len(args.data_seeds) != 2:
            parser.error("--data-seeds takes TRAIN,TEST (two integers), e.g. 1100,3000")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.stage2_lr_factor is not None and not 0.0 < args.stage2_lr_factor <= 1.0:
        parser.error(f"--stage2-lr-factor must lie in (0, 1], got {args.stage2_lr_factor}")
    if args.two_stage is not None and args.two_stage < 0:
        parser.error(f"--two-stage must be >= 0 steps, got {args.two_stage}")
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
    if args.data_seeds:
        plan = replace(plan, train_seed=args.data_seeds[0], test_seed=args.data_seeds[1])
    if args.two_stage is not None:
        plan = replace(plan, first_stage_steps=args.two_stage)
    if args.stage2_lr_factor is not None:
        plan = replace(plan, second_stage_lr_factor=args.stage2_lr_factor)
    default_work = Path(tempfile.gettempdir()) / ("distill_depth_fidelity" + ("_quick" if args.quick else "")
                                                  + ("" if args.failures else "_clean_world"))
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
    labels, first = plan_jobs(args.runs, args.fractions, args.seeds, tuple(args.overrides), bool(plan.first_stage_steps))
    jobs = [(name, seed) for name in labels for seed in args.seeds]
    if first:

        def stage_one(job: tuple[str, float, int]) -> None:
            run, fraction, seed = job
            timings = train(run, seed, work, plan, shards, tuple(args.overrides), threads, fraction, stage=1)
            print(f"stage 1 {label(run, fraction)} seed {seed}: done {timings}", flush=True)

        try:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(stage_one, first))
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"stage 1 FAILED: {exc}", file=sys.stderr)
            return 1

    def one(job: tuple[str, int]) -> tuple[tuple[str, int], dict]:
        name, seed = job
        run, fraction = labels[name]
        try:
            result = train_and_evaluate(run, seed, work, plan, shards, tuple(args.overrides), threads, fraction)
            print(f"{name} seed {seed}: done {result['timings']}", flush=True)
        except (RuntimeError, FileNotFoundError) as exc:
            result = {"error": str(exc)}
            print(f"{name} seed {seed}: FAILED: {exc}", file=sys.stderr, flush=True)
        return job, result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        finished = dict(pool.map(one, jobs))
    per_seed = {name: {seed: finished[(name, seed)] for seed in args.seeds if "error" not in finished[(name, seed)]}
                for name in labels}
    results = {run: summarize(seeds) if seeds else {"error": "every seed failed"} for run, seeds in per_seed.items()}
    diffs = paired_differences(results, per_seed)
    output = {"plan": asdict(plan), "overrides": list(args.overrides), "seeds": list(args.seeds), "protocol": "dense",
              "fractions": list(args.fractions), "runs": results, "per_seed": per_seed, "paired_differences": diffs,
              "fraction_curve": {name: {f"{f:g}": v for f, v in points.items()}
                                 for name, points in fraction_curve(results).items()},
              "errors": {f"{r}_seed{s}": v["error"] for (r, s), v in finished.items() if "error" in v},
              "total_s": round(time.perf_counter() - start, 1)}
    result_file = args.json or work / "fidelity.json"
    result_file.write_text(json.dumps(output, indent=2))
    print(format_table(results))
    if diffs:
        print(format_differences(diffs))
    if len(args.fractions) > 1:
        print(format_curve(fraction_curve(results)))
    if plan.failures:
        print(format_regions(results))
    for path in write_plots(results, result_file.parent):
        print(f"wrote {path}")
    print(f"{len(args.seeds)} seed(s), {plan.steps} steps, {plan.height}x{plan.width}, {plan.beams}-beam LiDAR; "
          f"total {output['total_s']:.0f} s; wrote {result_file}")
    return 1 if output["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
