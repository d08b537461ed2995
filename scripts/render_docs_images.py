"""Render the documentation's pictures from a trained run: its training curve and depth/confidence
panels of the first validation samples (the same renderer the trainer logs with).

    distill-depth train --config configs/default.yaml train.max_steps=60 train.output_dir=runs/docs
    python scripts/render_docs_images.py runs/docs            # writes docs/img/training_*.png

The committed pictures were made with exactly these two commands on the bundled shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # plots.py: the Pillow charts the benchmarks draw

from plots import line_plot  # noqa: E402
from distill_depth.checkpoint_io import CheckpointError, load_branches  # noqa: E402
from distill_depth.train.panels import fixed_panel_batch, render_panels  # noqa: E402

CURVES = ("S/loss", "U/loss", "S/sup_nll", "U/photo_nll")
"""The logged terms drawn in the training curve."""


def read_curves(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) per logged term of :data:`CURVES` from a run's ``metrics.jsonl``."""
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no training log at {metrics_file} (is this a run folder?)")
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in CURVES}
    for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics_file}:{number}: not JSON ({exc.msg})") from None
        for name in CURVES:
            if name in row and "step" in row:
                series[name].append((float(row["step"]), float(row[name])))
    return {name: points for name, points in series.items() if points}


def render(run: Path, val_shards: str, out: Path) -> list[Path]:
    """Write ``training_curve.png`` and ``training_panels.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    curves = read_curves(run / "metrics.jsonl")
    if not curves:
        raise ValueError(f"{run / 'metrics.jsonl'} logs none of {list(CURVES)}")
    curve = line_plot(curves, out / "training_curve.png", title=f"training losses ({run.name})",
                      x_label="step", y_label="loss")
    models, _ = load_branches(run, names=("S", "U"))
    batch = fixed_panel_batch(val_shards, torch.device("cpu"))
    if batch is None:
        raise ValueError(f"no validation samples in {val_shards}")
    maps = {name: model.infer(batch.image) for name, model in models.items()}
    pictures = render_panels(batch.image, maps, batch.sparse_depth)
    gap = np.full((2, pictures.shape[2], 3), 255, dtype=np.uint8)
    rows = [piece for picture in pictures for piece in (picture, gap)][:-1]
    panels = out / "training_panels.png"
    # a 256-colour palette keeps the committed PNG small; the colormaps have fewer colours than that
    Image.fromarray(np.concatenate(rows, axis=0)).quantize(256).save(panels, optimize=True)
    return [curve, panels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run folder (metrics.jsonl + export or checkpoint)")
    parser.add_argument("--val-shards", default=str(REPO / "shards" / "val"), help="samples for the panels")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args(argv)
    try:
        paths = render(args.run, args.val_shards, args.out)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
