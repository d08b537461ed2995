"""Checked at the door: the real ``distill-depth train`` command refuses a run that cannot work
with one line naming the key and the path, exit 2, no traceback, before any model is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train_procs import REPO, child_env, launch, tiny_overrides


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_depth.cli", "train", *overrides], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)


def _refused(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("distill-depth train: "), result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("case", ["train_shards", "output_dir", "resume", "batch_size"])
def test_train_refuses_at_the_door(case: str, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    not_a_checkpoint = tmp_path / "some_folder"
    not_a_checkpoint.mkdir()
    overrides = tiny_overrides(tiny_shards, out, 2, "train.report_to=none")
    if case == "train_shards":
        result = _train(*overrides, "data.train_shards=/wrong/path")
        _refused(result, "data.train_shards=/wrong/path", "no such file or folder")
    elif case == "output_dir":
        out = blocker / "run"
        result = _train(*overrides, f"train.output_dir={out}")
        _refused(result, f"train.output_dir={out}", "not writable")
    elif case == "resume":
        result = _train(*overrides, f"train.resume={not_a_checkpoint}")
        _refused(result, f"train.resume={not_a_checkpoint}", "is no checkpoint")
    else:
        import json

        samples = json.loads((tiny_shards / "manifest.json").read_text())["num_samples"]
        result = _train(*overrides, f"data.batch_size={samples + 1}")
        _refused(result, f"data.batch_size={samples + 1}", f"reads {samples + 1} distinct samples",
                 f"data.train_shards={tiny_shards} holds {samples}")
    assert not (out / "config.yaml").exists()  # refused before the run folder was set up
    assert "placement:" not in result.stderr  # before the models (logged right after the door)


def test_truncated_shard_is_refused_at_the_door(tiny_shards: Path, tmp_path: Path) -> None:
    import shutil

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    victim = sorted(shards.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:2048])
    out = tmp_path / "run"
    result = _train(*tiny_overrides(shards, out, 2, "train.report_to=none"))
    _refused(result, f"data.train_shards={shards}", str(victim), "truncated")
    assert "placement:" not in result.stderr


def test_resume_past_a_truncated_checkpoint_through_the_cli(tiny_shards: Path, tmp_path: Path) -> None:
    """A real run's newest checkpoint cut short after COMPLETE: an explicit train.resume to it is
    refused (one line naming the file, exit 2); train.resume=auto logs the file and resumes from
    the previous complete checkpoint, then finishes."""
    out = tmp_path / "run"
    first = _train(*tiny_overrides(tiny_shards, out, 2, "train.report_to=none", "train.ckpt_every=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = out / "checkpoints" / "step_00000002"
    weights = newest / "S" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    explicit = _train(*tiny_overrides(tiny_shards, out, 3, "train.report_to=none"), f"train.resume={newest}")
    _refused(explicit, f"train.resume={newest}", str(weights), "truncated")
    auto = _train(*tiny_overrides(tiny_shards, out, 3, "train.report_to=none"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert str(weights) in auto.stderr and "trying the previous complete one" in auto.stderr
    assert "resuming from checkpoint step 1" in auto.stderr


@pytest.mark.slow
def test_every_rank_stops_at_the_door_and_only_rank_0_speaks(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = launch(2, tiny_overrides(tiny_shards, out, 2, "train.report_to=none", "data.train_shards=/wrong/path"), out)
    assert run.wait(timeout=120) == [2, 2], run.tail()
    logs = [log.read_text() for log in run.logs]
    assert "Traceback" not in logs[0] + logs[1]
    assert logs[0].count("distill-depth train: data.train_shards=/wrong/path: no such file or folder") == 1
    assert "distill-depth train:" not in logs[1]


@pytest.mark.slow
def test_batch_of_the_whole_run_must_fit_the_shards(tiny_shards: Path, tmp_path: Path) -> None:
    """On 2 split ranks (1 S + 1 U: one cell) a batch of half the shards fits; in a 2-rank
    colocated run (two cells, each reading its own batch) the same batch is refused: the step reads
    more distinct samples than the shards hold."""
    import json

    samples = json.loads((tiny_shards / "manifest.json").read_text())["num_samples"]
    batch = samples // 2 + 1
    out = tmp_path / "run"
    run = launch(2, tiny_overrides(tiny_shards, out, 1, "train.report_to=none", f"data.batch_size={batch}",
                                   "topology.mode=colocated"), out)
    assert run.wait(timeout=120) == [2, 2], run.tail()
    logs = [log.read_text() for log in run.logs]
    assert "Traceback" not in logs[0] + logs[1]
    assert logs[0].count(f"data.batch_size={batch}: one step of this run reads {2 * batch} distinct samples") == 1


@pytest.mark.slow
def test_accelerate_launch_report_names_the_door_error(tiny_shards: Path, tmp_path: Path) -> None:
    """Under ``accelerate launch`` the ranks print one line and no traceback; the launcher's own
    failure report (torchelastic's ChildFailedError, printed after it) shows that line as each
    rank's error, not "To enable traceback see ..."."""
    from train_procs import launch_accelerate

    out = tmp_path / "run"
    run = launch_accelerate("launch/accelerate/cpu_2proc.yaml",
                            tiny_overrides(tiny_shards, out, 2, "train.report_to=none", "data.train_shards=/wrong/path"),
                            out)
    assert run.wait(timeout=120) != [0], run.tail()
    text = run.logs[0].read_text()
    line = "distill-depth train: data.train_shards=/wrong/path: no such file or folder"
    ours = text.split("ChildFailedError")[0].split("Traceback (most recent call last)")[0]
    assert ours.count(line) == 1, text[-3000:]
    assert text.count(f"traceback : {line}") == 2, text[-3000:]
    assert "To enable traceback" not in text
