"""`distill-depth evaluate`: KITTI-protocol metrics and confidence quality of a trained checkpoint.

One process, or several under ``accelerate launch --multi_gpu`` / ``torchrun`` / ``srun``: each
rank evaluates its share of the shards (every sample exactly once), rank 0 gathers the per-image
results, prints the tables and writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distill_depth.evaluation import distributed
from distill_depth.evaluation.inference import fusion_aligns_u, needs_median_scaling, training_size
from distill_depth.evaluation.protocol import PROTOCOLS, EvaluationError, get_protocol
from distill_depth.evaluation.report import (
    CONFIDENCE_NAMES,
    format_table,
    per_image_table,
    summarize,
    summarize_regions,
    write_json,
)
from distill_depth.evaluation.runner import FUSED, EvalSettings, evaluate_stream
from distill_depth.metrics import METRIC_NAMES

BRANCH_CHOICES = ("S", "U", "both", "fused", "auto")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    parser.add_argument("--shards", required=True, help="shard folder with manifest.json, brace pattern, or one .tar")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="eigen",
                        help="eigen: raw LiDAR depth.png, Garg crop; eigen_benchmark: gt.png, no crop; "
                             "dense: synthetic exact gt.png; cityscapes: gt.png from disparity, ManyDepth's centre crop. "
                             "All: 1e-3..80 m (default: eigen)")
    parser.add_argument("--branch", choices=BRANCH_CHOICES, default="auto",
                        help="S, U, both, fused (= S, U and their confidence-weighted fusion), or auto "
                             "(every branch the checkpoint trained; default)")
    parser.add_argument("--median-scaling", choices=("auto", "on", "off"), default="auto",
                        help="auto: on only for a U branch without any metric signal (no stereo, no "
                             "distillation from S); decided per branch and reported")
    parser.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's prediction")
    parser.add_argument("--json", type=Path, default=None, help="write the full report (means + per image) here")
    parser.add_argument("--save-predictions", type=Path, default=None,
                        help="write {key}_{branch}.npy: the final depth the metrics saw (GT size, scaled, clamped)")
    parser.add_argument("--save-images", type=Path, default=None,
                        help="write {key}_{branch}.png: image | depth | confidence | ground truth")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="network input height (default: training size)")
    parser.add_argument("--width", type=int, default=None, help="network input width (default: training size)")
    parser.add_argument("--per-image", action="store_true", help="also print the per-image table")
    parser.add_argument("--regions", action="store_true",
                        help="also every metric per region of the shards' regions.png (synthetic trees with "
                             "failure modes): table per output, and 'regions' in --json")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the per-image rows as a W&B Table and the means as the run summary "
                             "(WANDB_MODE=offline logs without a network)")
    parser.add_argument("--wandb-project", default="distill-depth", help="W&B project for --wandb")


def _outputs(choice: str, trained: tuple[str, ...]) -> tuple[str, ...]:
    if choice == "auto":
        return tuple(b for b in ("S", "U") if b in trained) + ((FUSED,) if {"S", "U"} <= set(trained) else ())
    wanted = {"S": ("S",), "U": ("U",), "both": ("S", "U"), "fused": ("S", "U", FUSED)}[choice]
    missing = [b for b in wanted if b != FUSED and b not in trained]
    if missing:
        raise EvaluationError(f"--branch {choice} needs branch(es) {missing}, but the checkpoint trained only {list(trained)}")
    return wanted


def _load(checkpoint: str, choice: str, device: Any) -> tuple[dict, Any]:
    try:
        return _load_branches(checkpoint, choice, device)
    except RuntimeError as exc:  # weights that do not fit the network this code builds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise EvaluationError(
            f"{checkpoint}: the saved weights do not fit the networks of this version of the code ({first})"
        ) from None


def _load_branches(checkpoint: str, choice: str, device: Any) -> tuple[dict, Any]:
    from distill_depth.checkpoint_io import CheckpointCorrupt, load_branches

    if choice in ("S", "U"):
        return load_branches(checkpoint, names=(choice,), device=device)
    try:
        return load_branches(checkpoint, names=("S", "U"), device=device)
    except CheckpointCorrupt:  # a file that fails its check: say so, whatever the other branch holds
        raise
    except ValueError:  # CheckpointError: a branch's weights are missing
        if choice != "auto":
            raise
    # A single-branch run (S-only / U-only baseline): load whichever branch it has.
    for name in ("S", "U"):
        try:
            return load_branches(checkpoint, names=(name,), device=device)
        except ValueError:
            continue
    return load_branches(checkpoint, names=("S", "U"), device=device)  # re-raise the real error


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the evaluation; the report on rank 0, None on the other ranks."""
    from distill_depth.data.stream import eval_batches

    protocol = get_protocol(args.protocol)
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.height is None) != (args.width is None):
        raise EvaluationError("give both --height and --width, or neither")
    info = distributed.start()
    try:
        models, cfg = _load(args.checkpoint, args.branch, info.device)
        outputs = _outputs(args.branch, tuple(b for b in cfg.branches if b in models))
        scaling = {name: needs_median_scaling(cfg, args.median_scaling, name) for name in outputs}
        input_size = (args.height, args.width) if args.height is not None else training_size(cfg)
        settings = EvalSettings(
            protocol=protocol,
            outputs=outputs,
            median_scaling=scaling,
            flip_tta=args.flip_tta,
            input_size=input_size,
            align_u_scale=fusion_aligns_u(cfg),
            save_predictions=args.save_predictions,
            save_images=args.save_images,
            regions=bool(getattr(args, "regions", False)),
        )
        batches = eval_batches(args.shards, args.batch_size, info.rank, info.world, num_workers=args.num_workers)
        records = evaluate_stream(models, batches, settings, info.device)
        gathered = distributed.gather_records(records, info)
    finally:
        distributed.finish(info)
    if gathered is None:
        return None
    order = {name: i for i, name in enumerate(outputs)}
    gathered.sort(key=lambda r: (r["key"], order[r["output"]]))
    seen = {(r["key"], r["output"]) for r in gathered}
    if len(seen) != len(gathered):
        raise EvaluationError("the evaluation stream gave some sample to more than one rank (duplicate keys)")
    return {
        "checkpoint": str(args.checkpoint),
        "shards": str(args.shards),
        "protocol": protocol.describe(),
        "median_scaling": {"mode": args.median_scaling, "applied": scaling},
        "flip_tta": bool(args.flip_tta),
        "fusion": "log D = (C_s log D_s + C_u log(k D_u)) / (C_s + C_u); C = (C_s^2 + C_u^2) / (C_s + C_u); "
        f"k = median(D_s)/median(D_u) {'per image' if settings.align_u_scale else 'not applied (k = 1)'}",
        "sparsification": "AbsRel per pixel, 20 steps, confidence-descending removal vs oracle (true error)",
        "input_size": list(input_size) if input_size else None,
        "trained_branches": list(cfg.branches),
        "world_size": info.world,
        "num_images": len({r["key"] for r in gathered}),
        "outputs": list(outputs),
        "mean": summarize(gathered, outputs),
        **({"regions": summarize_regions(gathered, outputs)} if settings.regions else {}),
        "per_image": gathered,
    }


def print_report(report: dict[str, Any], per_image: bool = False, file: Any = None) -> None:
    file = file or sys.stdout
    scaling = report["median_scaling"]
    applied = ", ".join(f"{name} {'ON' if on else 'off'}" for name, on in scaling["applied"].items())
    print(
        f"protocol {report['protocol']['name']} ({report['protocol']['ground_truth']}, "
        f"garg_crop={report['protocol']['garg_crop']}, "
        + (f"centre crop {report['protocol']['centre_crop']}, " if "centre_crop" in report["protocol"] else "")
        + f"{report['protocol']['min_depth']:g}..{report['protocol']['max_depth']:g} m), "
        f"{report['num_images']} images, median scaling {applied} ({scaling['mode']}), "
        f"flip TTA {'on' if report['flip_tta'] else 'off'}",
        file=file,
    )
    if per_image:
        print(per_image_table(report["per_image"]), file=file)
        print(file=file)
    names = report["outputs"]
    print(format_table(names, [report["mean"][n] for n in names], METRIC_NAMES + CONFIDENCE_NAMES), file=file)
    for name, per_region in report.get("regions", {}).items():
        print(f"\nper region, output {name} (absent: no valid ground-truth pixel in any image)", file=file)
        rows = [{"images": row["num_images"], **({c: "absent" for c in METRIC_NAMES + CONFIDENCE_NAMES} if row["absent"] else row)}
                for row in per_region.values()]
        print(format_table(list(per_region), rows, ("images",) + METRIC_NAMES + CONFIDENCE_NAMES), file=file)


def run(args: argparse.Namespace) -> int:
    try:
        report = evaluate(args)
    except (ValueError, OSError) as exc:  # EvaluationError, CheckpointError, ConfigError, missing files
        print(f"distill-depth evaluate: error: {exc}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    print_report(report, per_image=args.per_image)
    if args.json is not None:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if getattr(args, "wandb", False):
        from distill_depth.evaluation.wandb_log import log_report

        print(f"logged the per-image table to W&B ({log_report(report, args.wandb_project)})")
    return 0
