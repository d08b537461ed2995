"""Split placement over real gloo processes: S and U on different ranks, DDP inside each group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_procs import REFERENCE_STEPS, ReferenceRun, launch, loss_terms, tiny_overrides

pytestmark = pytest.mark.slow


def _load(folder: Path, name: str) -> dict:
    return torch.load(folder / name, weights_only=False)


def test_two_ranks_exchange_partner_predictions(reference_run: ReferenceRun, tiny_shards: Path) -> None:
    """``accelerate launch`` with launch/accelerate/cpu_2proc.yaml: rank 0 trains S, rank 1 trains U; what each receives is the other's actual prediction for the
    same sample keys; both branches' weights move; tracker ``none`` writes no tracker files."""
    run, dump, out = reference_run.run, reference_run.dump, reference_run.run.out
    assert reference_run.codes == [0], run.tail()
    for step in range(REFERENCE_STEPS):
        s_side = _load(dump, f"exchange_rank0_step{step}_0.pt")
        u_side = _load(dump, f"exchange_rank1_step{step}_0.pt")
        assert set(s_side["sent"]) == {"S"} and set(u_side["sent"]) == {"U"}
        got_by_s, sent_by_u = s_side["received"]["S"], u_side["sent"]["U"]
        got_by_u, sent_by_s = u_side["received"]["U"], s_side["sent"]["S"]
        assert got_by_s["keys"] == sent_by_u["keys"] == sent_by_s["keys"] == got_by_u["keys"]
        for field in ("depth", "confidence", "valid"):
            assert torch.equal(got_by_s[field], sent_by_u[field])
            assert torch.equal(got_by_u[field], sent_by_s[field])
        # Two different networks: the exchanged maps are not the receiver's own.
        assert not torch.equal(got_by_s["depth"], sent_by_s["depth"])
    weights = {r: _load(dump, f"weights_rank{r}.pt") for r in (0, 1)}
    assert set(weights[0]) == {"S"} and set(weights[1]) == {"U"}
    from safetensors.torch import load_file

    from distill_depth.config import load_config
    from distill_depth.branches import build_branch

    cfg = load_config(None, tiny_overrides(tiny_shards, out, REFERENCE_STEPS))
    for rank, name in ((0, "S"), (1, "U")):
        torch.manual_seed(cfg.train.seed + {"S": 0, "U": 1}[name])
        initial = build_branch(name, cfg).state_dict()
        trained = weights[rank][name]
        changed = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
        assert len(changed) > len(initial) // 4, f"{name}: only {len(changed)} tensors changed"
        exported = load_file(out / "export" / f"{name}.safetensors")
        assert torch.equal(exported[next(iter(exported))], trained[next(iter(exported))])
    assert not (out / "wandb").exists() and not (out / "tensorboard").exists()


def test_four_ranks_replicas_agree_and_groups_stay_apart(four_rank_run: ReferenceRun) -> None:
    """2 S + 2 U ranks (cells {0,1}, {2,3}; started as srun starts tasks, only SLURM_* variables):
    each group's replicas hold identical parameters, the two cells read different samples, and no
    rank ever holds the other group's branch."""
    dump = four_rank_run.dump
    assert four_rank_run.codes == [0, 0, 0, 0], four_rank_run.run.tail()
    weights = {r: _load(dump, f"weights_rank{r}.pt") for r in range(4)}
    assert [set(weights[r]) for r in range(4)] == [{"S"}, {"U"}, {"S"}, {"U"}]
    for a, b, name in ((0, 2, "S"), (1, 3, "U")):
        params = [k for k in weights[a][name] if "running" not in k and "num_batches" not in k]
        for key in params:
            assert torch.equal(weights[a][name][key], weights[b][name][key]), f"{name} replicas differ at {key}"
    exchanges = {r: _load(dump, f"exchange_rank{r}_step0_0.pt") for r in range(4)}
    keys = {r: exchanges[r]["received"][next(iter(exchanges[r]["received"]))]["keys"] for r in range(4)}
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]


def test_colocated_equals_split(reference_run: ReferenceRun, tiny_shards: Path, tmp_path: Path) -> None:
    """The same config on one process (both branches colocated) and on two ranks (S | U, the
    reference run): every logged loss term of every step and the final weights are identical.
    Each branch draws its augmentation and held-out pixels from its own stream, so placement
    changes nothing but speed."""
    assert reference_run.codes == [0], reference_run.run.tail()
    dump, out = tmp_path / "dump", tmp_path / "run"
    run = launch(1, tiny_overrides(tiny_shards, out, REFERENCE_STEPS), out, DISTILL_DEPTH_DUMP_DIR=str(dump))
    assert run.wait() == [0], run.tail()
    assert "placement: colocated" in run.logs[0].read_text()
    colocated, split = loss_terms(run.metrics()), loss_terms(reference_run.run.metrics())
    assert sorted(colocated) == sorted(split) == list(range(1, REFERENCE_STEPS + 1))
    assert colocated[1]["S/distill_weight"] == 0.0 < colocated[REFERENCE_STEPS]["S/distill_weight"]
    for step in colocated:
        assert colocated[step] == split[step], f"step {step}: {colocated[step]} != {split[step]}"
    together = _load(dump, "weights_rank0.pt")
    apart = {"S": _load(reference_run.dump, "weights_rank0.pt")["S"], "U": _load(reference_run.dump, "weights_rank1.pt")["U"]}
    for name in ("S", "U"):
        for key, value in together[name].items():
            assert torch.equal(value, apart[name][key]), f"{name}.{key}"
