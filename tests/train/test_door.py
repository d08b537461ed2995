

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
