"""The fidelity benchmark (benchmarks/fidelity.py): its aggregation, and one real miniature run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("fidelity", REPO / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(SPEC)
sys.modules["fidelity"] = fidelity  # dataclasses look their module up while the file runs
SPEC.loader.exec_module(fidelity)


def _seed_result(s_abs_rel: float | None, u_abs_rel_ms: float | None) -> dict:
    auto, ms = {}, {}
    if s_abs_rel is not None:
        auto["S"] = {"abs_rel": s_abs_rel, "rmse": 2.0, "a1": 0.5}
        ms["S"] = {"abs_rel": s_abs_rel - 0.01}
    if u_abs_rel_ms is not None:
        auto["U"] = {"abs_rel": u_abs_rel_ms + (0.2 if s_abs_rel is None else 0.1), "rmse": 3.0, "a1": 0.4}
        ms["U"] = {"abs_rel": u_abs_rel_ms}
    return {"auto": auto, "ms": ms, "median_scaling": {b: b == "U" and s_abs_rel is None for b in auto}}


def test_means_over_seeds_and_paired_differences() -> None:
    per_seed = {
        "sup_only": {0: _seed_result(0.30, None), 1: _seed_result(0.20, None)},
        "self_only": {0: _seed_result(None, 0.50), 1: _seed_result(None, 0.40)},
        "mutual": {0: _seed_result(0.25, 0.30), 1: _seed_result(0.21, 0.35)},
    }
    results = {run: fidelity.summarize(seeds) for run, seeds in per_seed.items()}
    assert results["sup_only"]["auto"]["S"]["abs_rel"] == pytest.approx(0.25)
    assert results["sup_only"]["auto_std"]["S"]["abs_rel"] == pytest.approx(0.0707107, rel=1e-5)
    assert results["mutual"]["ms"]["U"]["abs_rel"] == pytest.approx(0.325)
    diffs = fidelity.paired_differences(results, per_seed)
    assert set(diffs) == {"mutual"}
    assert diffs["mutual"]["S"]["per_seed"] == pytest.approx([-0.05, 0.01])
    assert diffs["mutual"]["U"]["per_seed"] == pytest.approx([-0.20, -0.05])
    # U-only is monocular here (median-scaled): U is compared median-scaled; S in metres.
    assert diffs["mutual"]["U"]["vs"] == "self_only" and "median-scaled" in diffs["mutual"]["U"]["metric"]
    assert diffs["mutual"]["S"]["metric"] == "abs_rel"
    results["self_only"]["median_scaling"] = {"U": False}  # a stereo U-only is metric: compared in metres
    assert fidelity.paired_differences(results, per_seed)["mutual"]["U"]["per_seed"] == pytest.approx([-0.30, -0.15])
    table = fidelity.format_table(results)
    header, _, sup, self_, mutual = table.splitlines()
    assert "S AbsRel" in header and "U AbsRel(ms)" in header
    assert "0.2500" in sup and sup.count("-") >= 7  # no U columns for S-only
    assert "0.3250" in mutual and "0.2300" in mutual and "0.4250" in mutual
    assert "per seed -0.0500, +0.0100" in fidelity.format_differences(diffs)


@pytest.mark.slow
def test_miniature_two_stage_run_pairs_s_exactly(tmp_path: Path) -> None:
    """One real two-stage plan on fresh synthetic data, 2 steps per stage, fractions 1 and 0.5:
    S-only and U-only train first (stage 1 at the full learning rates); S-only and one-way (S
    teaches U, learns nothing from U) then start from those weights (the trainer says so) at a
    tenth of the rates. S trains on the same random numbers in both, so its metrics are identical
    and the paired difference is exactly 0 at each fraction; the JSON, table and plots hold every
    run, and a second call reuses the data and the finished runs."""
    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--quick", "--runs", "sup_only,one_way",
               "--steps", "2", "--two-stage", "2", "--fractions", "1,0.5", "--no-failures", "--work", str(work),
               "--jobs", "2"]  # two 1-thread runs at a time: the 2-core CI machine does both at once
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((work / "fidelity.json").read_text())
    assert report["plan"]["steps"] == 2 and report["plan"]["beams"] == 22 and not report["errors"]
    assert report["plan"]["first_stage_steps"] == 2 and report["plan"]["second_stage_lr_factor"] == 0.1
    sup, one_way = report["runs"]["sup_only"], report["runs"]["one_way"]
    assert set(sup["auto"]) == {"S"} and set(one_way["auto"]) == {"S", "U", "fused"}
    assert one_way["auto"]["S"] == sup["auto"]["S"] and one_way["ms"]["S"] == sup["ms"]["S"]
    assert report["paired_differences"]["one_way"]["S"]["per_seed"] == [0.0]
    assert one_way["median_scaling"] == {"S": False, "U": False, "fused": False}  # U learned metres from S
    assert "one_way" in result.stdout and "S +0.0000 (+0.0%) vs sup_only" in result.stdout
    # the label-fraction sweep: each fraction its own S-only baseline, its own curve point and plot
    assert report["paired_differences"]["one_way@0.5"]["S"]["vs"] == "sup_only@0.5"
    assert report["paired_differences"]["one_way@0.5"]["S"]["per_seed"] == [0.0]
    assert set(report["fraction_curve"]["sup_only S"]) == {"1", "0.5"}
    assert (work / "fidelity_fractions.png").is_file() and "AbsRel by labelled fraction" in result.stdout

    runs = work / "runs"
    assert {p.name for p in runs.iterdir()} == {
        "stage1_sup_only_seed0", "stage1_sup_only_f0.5_seed0", "stage1_self_only_seed0",  # U-only: one, no labels
        "sup_only_seed0", "sup_only_f0.5_seed0", "one_way_seed0", "one_way_f0.5_seed0"}
    one_way_log = (work / "logs" / "train_one_way_f0.5_seed0.log").read_text()
    assert f"branch S starts from {runs / 'stage1_sup_only_f0.5_seed0'}" in one_way_log
    assert f"branch U starts from {runs / 'stage1_self_only_seed0'}" in one_way_log

    def logged_lr(run: str, branch: str) -> list[float]:
        rows = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        return [row[f"{branch}/lr"] for row in rows if f"{branch}/lr" in row]

    base_lr = yaml.safe_load((REPO / "configs" / "bench_base.yaml").read_text())["optim"]["lr"]
    stage_one = logged_lr("stage1_sup_only_seed0", "S")
    assert stage_one and stage_one == pytest.approx([base_lr] * len(stage_one))
    stage_two = logged_lr("one_way_seed0", "S") + logged_lr("one_way_seed0", "U")
    assert stage_two and stage_two == pytest.approx([0.1 * base_lr] * len(stage_two))

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "'train_s'" not in again.stdout and "'eval_auto_s'" not in again.stdout


def test_region_means_over_seeds_and_their_table() -> None:
    per_seed = {
        0: {**_seed_result(0.30, None), "auto_regions": {"S": {"moving": 0.4, "above_top_beam": 0.6}}},
        1: {**_seed_result(0.20, None), "auto_regions": {"S": {"moving": 0.2}}},
    }
    summary = fidelity.summarize(per_seed)
    assert summary["regions_abs_rel"]["S"] == pytest.approx({"moving": 0.3, "above_top_beam": 0.6})
    table = fidelity.format_regions({"sup_only": summary, "self_only": fidelity.summarize({0: _seed_result(None, 0.5)})})
    lines = table.splitlines()
    assert len(lines) == 2 and "above_top_beam" in lines[0] and "moving" in lines[0]
    assert lines[1].split() == ["sup_only", "S", "0.6000", "0.3000"]
    assert fidelity.format_regions({"self_only": fidelity.summarize({0: _seed_result(None, 0.5)})}) == ""


def test_label_fraction_sweep_pairs_each_fraction_with_its_own_baseline(tmp_path: Path) -> None:
    """S at fraction f is compared with S-only at the same f; U with the one U-only run (U sees
    no labels); the curve has one series per run and branch, and both plots are written."""
    per_seed = {
        "sup_only": {0: _seed_result(0.20, None), 1: _seed_result(0.22, None)},
        "sup_only@0.25": {0: _seed_result(0.30, None), 1: _seed_result(0.34, None)},
        "self_only": {0: _seed_result(None, 0.25), 1: _seed_result(None, 0.27)},
        "mutual": {0: _seed_result(0.21, 0.24), 1: _seed_result(0.21, 0.26)},
        "mutual@0.25": {0: _seed_result(0.24, 0.25), 1: _seed_result(0.36, 0.27)},
    }
    for seeds in per_seed.values():  # U metric (stereo) everywhere, as in the benchmark's plan
        for result in seeds.values():
            result["median_scaling"] = {b: False for b in result["auto"]}
            result["auto_regions"] = {b: {"moving": 0.5, "above_top_beam": 0.4} for b in result["auto"]}
    results = {name: fidelity.summarize(seeds) for name, seeds in per_seed.items()}
    diffs = fidelity.paired_differences(results, per_seed)
    assert set(diffs) == {"mutual", "mutual@0.25"}
    s_quarter = diffs["mutual@0.25"]["S"]
    assert s_quarter["vs"] == "sup_only@0.25" and s_quarter["per_seed"] == pytest.approx([-0.06, 0.02])
    assert s_quarter["relative_per_seed"] == pytest.approx([-0.2, 0.02 / 0.34])
    assert s_quarter["better_every_seed"] is False
    assert diffs["mutual@0.25"]["U"]["vs"] == "self_only"
    assert diffs["mutual"]["S"]["better_every_seed"] is False and diffs["mutual"]["S"]["mean"] == pytest.approx(0.0)

    curve = fidelity.fraction_curve(results)
    assert curve["sup_only S"] == pytest.approx({1.0: 0.21, 0.25: 0.32})
    assert curve["mutual S"] == pytest.approx({1.0: 0.21, 0.25: 0.30})
    assert curve["self_only U"] == pytest.approx({1.0: 0.46, 0.25: 0.46})  # flat: U-only has no fraction
    table = fidelity.format_curve(curve).splitlines()
    assert table[0].split()[-2:] == ["1", "0.25"] and table[1].split()[-2:] == ["0.2100", "0.3200"]

    written = fidelity.write_plots(results, tmp_path)
    assert [p.name for p in written] == ["fidelity_fractions.png", "fidelity_regions.png"]
    from PIL import Image

    for path in written:
        with Image.open(path) as image:
            assert image.size == (900, 520)
            assert len(set(image.convert("RGB").getdata())) > 5  # lines, bars and text were drawn


def test_fractions_flag_is_checked() -> None:
    args = fidelity._parse_args(["--quick", "--fractions", "0.05,1,0.25"])
    assert args.fractions == (1.0, 0.25, 0.05)
    with pytest.raises(SystemExit):
        fidelity._parse_args(["--fractions", "0,1"])
    assert fidelity._parse_args(["--stage2-lr-factor", "1"]).stage2_lr_factor == 1.0
    with pytest.raises(SystemExit):
        fidelity._parse_args(["--stage2-lr-factor", "0"])
    assert fidelity.label("mutual", 1.0) == "mutual" and fidelity.label("mutual", 0.05) == "mutual@0.05"


def test_a_u_that_reads_labels_follows_the_label_fraction(tmp_path: Path) -> None:
    """loss.u_confidence_target=lidar: U-only and U's stage 1 run at each fraction, stage 2 starts U
    from the stage 1 of its own fraction, and U is compared with U-only at that fraction. Without
    it U-only runs once, at fraction 1."""
    lidar = ("loss.u_confidence_target=lidar",)
    assert fidelity.u_reads_labels(lidar) and not fidelity.u_reads_labels(("loss.tau_u=0.02",))
    runs, fractions = ("sup_only", "self_only", "mutual"), (1.0, 0.25)
    labels, first = fidelity.plan_jobs(runs, fractions, (0,), (), two_stage=True)
    assert set(labels) == {"sup_only", "sup_only@0.25", "self_only", "mutual", "mutual@0.25"}
    assert first == [("self_only", 1.0, 0), ("sup_only", 0.25, 0), ("sup_only", 1.0, 0)]
    labels, first = fidelity.plan_jobs(runs, fractions, (0,), lidar, two_stage=True)
    assert set(labels) == {"sup_only", "sup_only@0.25", "self_only", "self_only@0.25", "mutual", "mutual@0.25"}
    assert first == [("self_only", 0.25, 0), ("self_only", 1.0, 0), ("sup_only", 0.25, 0), ("sup_only", 1.0, 0)]
    assert fidelity.plan_jobs(runs, fractions, (0,), lidar, two_stage=False)[1] == []
    sources = fidelity.stage_one_sources("mutual", 0.25, 1, tmp_path, lidar)
    assert sources == {"S": tmp_path / "runs" / "stage1_sup_only_f0.25_seed1",
                       "U": tmp_path / "runs" / "stage1_self_only_f0.25_seed1"}
    assert fidelity.stage_one_sources("mutual", 0.25, 1, tmp_path, ())["U"] == tmp_path / "runs" / "stage1_self_only_seed1"

    per_seed = {name: {0: _seed_result(0.3 if "sup" in name else (None if "self" in name else 0.25),
                                       None if "sup" in name else (0.2 if name == "self_only" else 0.3))}
                for name in ("sup_only@0.25", "self_only", "self_only@0.25", "mutual@0.25")}
    for seeds in per_seed.values():
        for result in seeds.values():
            result["median_scaling"] = {b: False for b in result["auto"]}
    results = {name: fidelity.summarize(seeds) for name, seeds in per_seed.items()}
    assert fidelity.paired_differences(results, per_seed)["mutual@0.25"]["U"]["vs"] == "self_only@0.25"
    curve = fidelity.fraction_curve(results)
    assert curve["self_only U"] == pytest.approx({1.0: 0.4, 0.25: 0.5})  # two points, not a flat line


def _subcommand(cmdline: list[str]) -> str | None:
    """``train`` for ``python -m distill_depth.cli train ...`` (not ``synth ... --out .../train``)."""
    return cmdline[cmdline.index("distill_depth.cli") + 1] if "distill_depth.cli" in cmdline[:-1] else None


@pytest.mark.slow
def test_sigterm_stops_the_running_trainings_and_starts_no_queued_one(tmp_path: Path) -> None:
    """SIGTERM while two trainings run in the pool (``--jobs 2``): both children are killed, no queued
    run starts, and the benchmark exits (before the fix the pool threads' children trained on)."""
    import signal
    import time

    import psutil

    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--quick", "--runs", "sup_only,self_only",
               "--steps", "5000", "--two-stage", "0", "--fractions", "1,0.25", "--no-failures", "--work", str(work),
               "--jobs", "2"]
    bench = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    parent = psutil.Process(bench.pid)
    try:
        deadline = time.monotonic() + 300
        trainings: list[psutil.Process] = []
        while len(trainings) < 2:
            assert bench.poll() is None and time.monotonic() < deadline, "two trainings never ran at once"
            trainings = [p for p in parent.children() if _subcommand(p.cmdline()) == "train"]
            time.sleep(0.5)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(trainings, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        # three runs were queued (sup_only at two fractions, self_only): the third never started
        assert len(list((work / "logs").glob("train_*.log"))) == 2
    finally:
        for child in parent.children(recursive=True) if bench.poll() is None else []:
            child.kill()
        bench.kill()
