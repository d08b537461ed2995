"""The test helper that reads offline W&B logs, against a real offline run longer than one block."""

from __future__ import annotations

import json

from tests.wandb_log import _BLOCK_SIZE, final_summary, log_content, read_records


def test_a_multi_block_offline_log_reads_back_every_step_and_the_summary(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    steps = 400
    value = lambda step: 0.1 + step / 7  # noqa: E731 - floats whose digits run to the end of the repr
    run = wandb.init(mode="offline", dir=str(tmp_path), project="reader-test")
    for step in range(steps):
        run.log({"S/abs_rel": value(step), "a_key_long_enough_to_fill_blocks_quickly": step})
    run.finish()

    (log_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {}
    for record in read_records(log_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            logged[items["_step"]] = items["S/abs_rel"]
    assert log_file.stat().st_size > 2 * _BLOCK_SIZE, "the log must span blocks for this test to mean anything"
    assert logged == {step: value(step) for step in range(steps)}
    assert final_summary(log_file)["S/abs_rel"] == value(steps - 1)
    assert log_file.stem.removeprefix("run-").encode() in log_content(log_file)
