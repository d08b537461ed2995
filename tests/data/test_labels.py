"""Scarce labels: unlabelled samples from make-shards (real drive), the hashed label subset in the
stream, and branch S's LiDAR terms on unlabelled batches."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from distill_depth.branches import build_branch
from distill_depth.cli import main
from distill_depth.config import Config
from distill_depth.data.labels import in_label_subset
from distill_depth.data.stream import TrainStream, eval_batches

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_branches import synthetic_batch  # noqa: E402


def test_label_subset_is_a_deterministic_hash_of_the_key() -> None:
    keys = [f"drive_{i:04d}_l_{i * 7:010d}" for i in range(4000)]
    quarter = [k for k in keys if in_label_subset(k, 0.25, seed=0)]
    assert 0.22 < len(quarter) / len(keys) < 0.28
    assert quarter == [k for k in keys if in_label_subset(k, 0.25, seed=0)]  # same answer every time
    assert set(quarter) <= {k for k in keys if in_label_subset(k, 0.5, seed=0)}  # nested fractions
    assert set(quarter) != {k for k in keys if in_label_subset(k, 0.25, seed=1)}  # another seed, another subset
    assert all(in_label_subset(k, 1.0) for k in keys[:10]) and not any(in_label_subset(k, 0.0) for k in keys[:10])


def test_keep_unlabelled_on_the_real_drive_and_the_stream(kitti_raw_root: Path, tmp_path: Path, capsys) -> None:
    """Scans exist for frames 0..29 only: with --keep-unlabelled, targets 30..76 become unlabelled samples."""
    out = tmp_path / "shards"
    assert main(["make-shards", "--kitti-root", str(kitti_raw_root), "--out", str(out), "--drives", "2011_09_26/*",
                 "--height", "48", "--width", "160", "--samples-per-shard", "40", "--workers", "2",
                 "--no-progress", "--keep-unlabelled"]) == 0
    assert "(47 unlabelled: no LiDAR scan)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 76 and manifest["unlabelled"] == 47
    assert manifest["skipped"] == {"no_neighbours": 2, "no_lidar": 0}

    batches = list(eval_batches(str(out), 8, 0, 1))
    labelled = {k: bool(f) for b in batches for k, f in zip(b.keys, b.labelled)}
    frame = lambda key: int(key.rsplit("_", 1)[1])  # noqa: E731
    assert len(labelled) == 76 and all(labelled[k] == (frame(k) <= 29) for k in labelled)
    for b in batches:  # unlabelled samples carry no depth at all; labelled ones their real scan
        per_sample = (b.sparse_depth > 0).flatten(1).sum(1)
        assert ((per_sample > 0) == b.labelled).all()

    # a fraction of the labelled ones keeps its LiDAR: same subset for 1 and 2 data ranks, after resume
    def subset(world: int, start: int = 0) -> dict[str, bool]:
        seen = {}
        for rank in range(world):
            stream = TrainStream(str(out), 4, rank, world, num_workers=0, seed=3, labelled_fraction=0.5, label_seed=7)
            for b in stream.epoch(0, start):
                seen.update({k: bool(f) for k, f in zip(b.keys, b.labelled)})
        return seen

    one, two = subset(1), subset(2)
    assert one == {k: v for k, v in two.items() if k in one} and len(one) == 76
    expected = {k: labelled[k] and in_label_subset(k, 0.5, 7) for k in labelled}
    assert one == expected and 5 < sum(one.values()) < 25
    resumed = subset(1, start=10)
    assert resumed == {k: expected[k] for k in resumed} and len(resumed) == 76 - 40


def test_supervised_terms_are_exactly_zero_on_an_unlabelled_batch_and_distillation_still_trains() -> None:
    torch.manual_seed(0)
    batch = synthetic_batch(2, 32, 96)
    unlabelled = dataclasses.replace(batch, labelled=torch.tensor([False, False]))
    for variant in ("held_out", "prior"):
        cfg = Config()
        cfg.loss.point_filtering = variant
        cfg.loss.distill_warmup = 0.0
        branch = build_branch("S", cfg).train()
        prediction = branch(unlabelled)
        own = prediction.for_partner()  # a teacher whose structure differs (a uniform factor is aligned away)
        teacher = dataclasses.replace(own, depth=own.depth * (1.0 + torch.rand_like(own.depth)))
        total, terms = branch.loss(unlabelled, prediction, teacher, step=10)
        assert terms["sup_nll"].item() == 0.0 and terms["pf"].item() == 0.0
        assert terms["labelled_share"].item() == 0.0 and torch.isfinite(total)
        assert terms["distill"].item() > 0.05
        total.backward()
        grads = [p.grad for p in branch.depth_net.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0  # S learns from U alone
    # one labelled sample of two: the LiDAR terms are the labelled sample's alone
    half = dataclasses.replace(batch, labelled=torch.tensor([True, False]))
    torch.manual_seed(1)
    cfg = Config()
    cfg.loss.point_filtering = "none"  # no random held-out draw, which differs between the two batches
    branch = build_branch("S", cfg).eval()  # eval: no augmentation, per-sample BatchNorm
    cfg_terms = branch.loss(half, branch(half), None, step=0)[1]
    only_first = branch.loss(batch.slice(0, 1), branch(batch.slice(0, 1)), None, step=0)[1]
    assert cfg_terms["labelled_share"].item() == 0.5
    assert abs(cfg_terms["sup_nll"].item() - only_first["sup_nll"].item()) < 1e-5
