"""A full disk while checkpointing or exporting: real 2-rank runs (S | U) on a small tmpfs.

The tmpfs is sized from the run's own first checkpoint, so the test does not depend on the
encoder's size: room for one checkpoint (plus some), not for two.
"""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill_depth.checkpoint_io import complete_checkpoints, verify_checkpoint

from train_procs import launch, tiny_overrides

pytestmark = pytest.mark.slow


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def checkpoint_bytes(tiny_shards: Path, module_tmp_path: Path) -> dict[str, int]:
    """Sizes of one 2-rank checkpoint and of the final export, measured on an unconstrained disk."""
    out = module_tmp_path / "sizes" / "run"
    run = launch(2, tiny_overrides(tiny_shards, out, 1), out)
    assert run.wait() == [0, 0], run.tail()
    (checkpoint,) = complete_checkpoints(out)
    return {"checkpoint": _folder_bytes(checkpoint), "export": _folder_bytes(out / "export")}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """``small_disk(bytes)``: a tmpfs of that size mounted at ``tmp_path/run`` (needs root)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        target = tmp_path / "run"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_full_disk_at_the_second_checkpoint_keeps_the_first(tiny_shards: Path, small_disk, checkpoint_bytes) -> None:
    """Step 1's checkpoint fits, step 2's does not: both ranks exit 1 together, one line from rank 0
    names the file and the kept checkpoint, no traceback; step 1 is intact (its manifest verifies)
    and no half folder is left, neither counted as complete nor as a temporary."""
    out = small_disk(int(checkpoint_bytes["checkpoint"] * 1.5))
    run = launch(2, tiny_overrides(tiny_shards, out, 3, "train.ckpt_every=1", "train.keep_last=3"), out)
    assert run.wait() == [1, 1], run.tail()
    log0, log1 = (log.read_text() for log in run.logs)
    assert "checkpoint of step 2 not written: writing " in log0, log0[-3000:]
    # what is left depends on which rank's write failed first (they write at once)
    assert "the disk is full: " in log0 and re.search(r"; \d+ MiB free there\)", log0), log0[-3000:]
    assert f"newest complete checkpoint is {out / 'checkpoints' / 'step_00000001'}" in log0
    assert "not written" not in log1  # said once, by rank 0
    assert "Traceback" not in log0 and "Traceback" not in log1
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000001"]
    assert verify_checkpoint(out / "checkpoints" / "step_00000001")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


def test_full_disk_at_the_final_export_names_the_checkpoint(tiny_shards: Path, small_disk, checkpoint_bytes) -> None:
    """The last checkpoint fits, the export after it does not: exit 1 on both ranks, a line naming the
    checkpoint that holds the final weights; no half weights file left in export/."""
    out = small_disk(checkpoint_bytes["checkpoint"] + checkpoint_bytes["export"] // 3)
    run = launch(2, tiny_overrides(tiny_shards, out, 1), out)
    assert run.wait() == [1, 1], run.tail()
    log0 = run.logs[0].read_text()
    final = out / "checkpoints" / "step_00000001"
    assert f"final export of step 1 not written: writing {out / 'export'}" in log0, log0[-3000:]
    assert f"the weights of that step are in the checkpoint {final}" in log0
    assert "Traceback" not in log0 and "Traceback" not in run.logs[1].read_text()
    assert verify_checkpoint(final)
    assert not [p.name for p in (out / "export").iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_is_recognised_by_the_error_not_by_the_space_left() -> None:
    """safetensors fails a write larger than what is left with space to spare and says "os error
    28"; an OSError says ENOSPC (maybe as the cause of another error); torch.save says only
    "unexpected pos", where less than 1 MiB left is the sign. Any other error is not a full disk."""
    from safetensors import SafetensorError

    from distill_depth.train.file_writing import disk_full

    safetensors_error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(safetensors_error, free_bytes=34 * 2**20)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("writing failed") from cause
    except RuntimeError as chained:
        assert disk_full(chained, free_bytes=None)
    assert disk_full(RuntimeError("unexpected pos 128 vs 64"), free_bytes=2**19)
    assert not disk_full(RuntimeError("unexpected pos 128 vs 64"), free_bytes=2**30)
    assert not disk_full(PermissionError(errno.EACCES, "Permission denied"), free_bytes=0 + 2**30)
