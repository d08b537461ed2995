"""Who should teach whom? Do the confidences know?

    .venv/bin/python benchmarks/teacher_oracle.py --checkpoint RUN --shards TEST_SHARDS [--json OUT]

For a run with both branches (or ``--s RUN_S --u RUN_U``: two single-branch runs), on shards with
dense ground truth (``evaluate --protocol dense``, the same masks, median scaling and clamping),
per region of the shards' ``regions.png`` and over all pixels:

* each branch's AbsRel;
* ``u_better``: the share of pixels where U's depth is closer to the truth than S's (relative
  error). It is what a per-pixel distillation gate would ideally know: S should learn from U there
  and U from S elsewhere;
* each branch's mean confidence;
* how often each confidence rule agrees with that oracle: ``relative`` (C_u > C_s, the rule of
  ``loss.distill_gate: relative``) and ``ranked`` (U's confidence percentile within its image above
  S's: the two confidences are trained on different errors, LiDAR vs photometric, so only their
  ranks may be comparable). An agreement near the share of the majority class says the rule knows
  nothing the constant guess would not;
* the AbsRel of per-pixel selections: S or U by the oracle (a bound on what any gate could pick),
  by each rule, and the evaluation's confidence-weighted fusion.

Everything is computed from the evaluation's own pieces (``distill_depth.evaluation``): the final
depths are those ``distill-depth evaluate --protocol dense --save-predictions`` writes. AbsRel here
is pooled over the pixels; ``evaluate`` reports the mean of per-image AbsRels, so the two differ by
how much each image weighs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from distill_depth.checkpoint_io import load_branches
from distill_depth.data.regions import REGION_BITS
from distill_depth.data.stream import eval_batches
from distill_depth.evaluation.inference import (
    fuse,
    fusion_aligns_u,
    infer_at_size,
    needs_median_scaling,
    resize_map,
    training_size,
)
from distill_depth.evaluation.protocol import evaluation_mask, get_protocol, ground_truth, prepare_prediction

RULES = ("oracle", "relative", "ranked")


def percentile_within_image(confidence: Tensor) -> Tensor:
    """(B, 1, H, W) → each pixel's rank within its image, in [0, 1)."""
    flat = confidence.flatten(1)
    ranks = flat.argsort(dim=1).argsort(dim=1).float() / flat.shape[1]
    return ranks.view_as(confidence)


def pixel_table(depth_s: Tensor, conf_s: Tensor, depth_u: Tensor, conf_u: Tensor, fused: Tensor, gt: Tensor
                ) -> dict[str, Tensor]:
    """Per-pixel columns over the compared pixels (all (N,) tensors, N = pixels of ``gt > 0``)."""
    error_s, error_u = (depth_s - gt).abs() / gt, (depth_u - gt).abs() / gt
    picks = {
        "oracle": error_u < error_s,
        "relative": conf_u > conf_s,
        "ranked": percentile_within_image(conf_u) > percentile_within_image(conf_s),
    }
    columns = {"error_s": error_s, "error_u": error_u, "error_fused": (fused - gt).abs() / gt,
               "conf_s": conf_s, "conf_u": conf_u}
    columns.update({f"pick_{rule}": pick for rule, pick in picks.items()})
    return columns


def summarise(columns: dict[str, Tensor]) -> dict[str, float]:
    """One row: AbsRels, oracle share, confidences, each rule's agreement and selected AbsRel."""
    if columns["error_s"].numel() == 0:
        return {"pixels": 0}
    oracle = columns["pick_oracle"]
    row = {
        "pixels": int(oracle.numel()),
        "abs_rel_s": columns["error_s"].mean().item(),
        "abs_rel_u": columns["error_u"].mean().item(),
        "abs_rel_fused": columns["error_fused"].mean().item(),
        "u_better": oracle.float().mean().item(),
        "conf_s": columns["conf_s"].mean().item(),
        "conf_u": columns["conf_u"].mean().item(),
    }
    for rule in RULES:
        pick = columns[f"pick_{rule}"]
        row[f"abs_rel_pick_{rule}"] = torch.where(pick, columns["error_u"], columns["error_s"]).mean().item()
        if rule != "oracle":
            row[f"agree_{rule}"] = (pick == oracle).float().mean().item()
            row[f"picks_u_{rule}"] = pick.float().mean().item()
    return row


@torch.no_grad()
def analyse(models: dict, cfg_s, cfg_u, shards: str, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """{region or "all": row of :func:`summarise`} over every image of ``shards``."""
    protocol = get_protocol("dense")
    size = training_size(cfg_s)
    configs = {"S": cfg_s, "U": cfg_u, "fused": cfg_s}  # the fusion takes S's scale
    scaling = {name: needs_median_scaling(cfg, "auto", name) for name, cfg in configs.items()}
    gathered: dict[str, list[dict[str, Tensor]]] = {name: [] for name in ("all", *REGION_BITS)}
    for batch in eval_batches(shards, batch_size, 0, 1, num_workers=0):
        if batch.regions is None:
            raise SystemExit(f"{shards}: no regions.png in the shards (synthetic drives with failure modes needed)")
        gt = ground_truth(batch, protocol)
        mask = evaluation_mask(gt, protocol)
        raw = {name: infer_at_size(models[name], batch.image, size) for name in ("S", "U")}
        raw["fused"] = fuse(*raw["S"], *raw["U"], align_u_scale=fusion_aligns_u(cfg_u))
        final, confidence = {}, {}
        for name, (depth, conf) in raw.items():
            final[name], _ = prepare_prediction(depth, gt, mask, protocol, median_scaling=scaling[name])
            confidence[name] = resize_map(conf, tuple(gt.shape[-2:]))
        columns = pixel_table(final["S"], confidence["S"], final["U"], confidence["U"], final["fused"], gt)
        regions = batch.regions.to(torch.int32)
        for name in gathered:
            keep = mask if name == "all" else mask & ((regions & REGION_BITS[name]) != 0)
            gathered[name].append({k: v[keep] for k, v in columns.items()})
    return {name: summarise({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
            for name, parts in gathered.items() if parts}


def print_table(rows: dict[str, dict[str, float]], file=sys.stdout) -> None:
    head = (f"{'region':15s} {'pixels':>7s} {'S':>6s} {'U':>6s} {'fused':>6s} {'U<S':>5s} {'C_s':>5s} {'C_u':>5s} "
            f"{'agree rel':>9s} {'agree rank':>10s} {'pick oracle':>11s} {'pick rel':>8s} {'pick rank':>9s}")
    print(head, file=file)
    for name, r in rows.items():
        if not r.get("pixels"):
            continue
        print(f"{name:15s} {r['pixels']:7d} {r['abs_rel_s']:6.3f} {r['abs_rel_u']:6.3f} {r['abs_rel_fused']:6.3f} "
              f"{r['u_better']:5.2f} {r['conf_s']:5.2f} {r['conf_u']:5.2f} {r['agree_relative']:9.2f} "
              f"{r['agree_ranked']:10.2f} {r['abs_rel_pick_oracle']:11.3f} {r['abs_rel_pick_relative']:8.3f} "
              f"{r['abs_rel_pick_ranked']:9.3f}", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a run (checkpoint, export) with both branches")
    parser.add_argument("--s", help="S from this run instead (with --u)")
    parser.add_argument("--u", help="U from this run instead (with --s)")
    parser.add_argument("--shards", required=True, help="test shards with gt.png and regions.png")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.s or args.u) or bool(args.s) != bool(args.u):
        parser.error("give --checkpoint, or both --s and --u")
    torch.set_grad_enabled(False)
    if args.checkpoint:
        models, cfg = load_branches(args.checkpoint, ("S", "U"))
        cfg_s = cfg_u = cfg
    else:
        (s_models, cfg_s), (u_models, cfg_u) = load_branches(args.s, ("S",)), load_branches(args.u, ("U",))
        models = {"S": s_models["S"], "U": u_models["U"]}
    rows = analyse(models, cfg_s, cfg_u, args.shards)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
