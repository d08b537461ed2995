"""Per-image records → per-output means, text tables and the JSON report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from distill_depth.metrics import METRIC_NAMES

CONFIDENCE_NAMES = ("ause", "aurg")
"""AUSE/AURG of the AbsRel sparsification curve (see ``metrics.ause_aurg``)."""
COLUMN_TITLES = {
    "abs_rel": "AbsRel", "sq_rel": "SqRel", "rmse": "RMSE", "rmse_log": "RMSElog",
    "a1": "d<1.25", "a2": "d<1.25^2", "a3": "d<1.25^3", "ause": "AUSE", "aurg": "AURG",
}


def _metric_means(rows: list[dict]) -> dict[str, Any]:
    """Per metric (and confidence measure), the mean over ``rows`` of its non-NaN values (NaN if none)."""
    mean: dict[str, Any] = {}
    for metric in METRIC_NAMES + CONFIDENCE_NAMES:
        values = [r[metric] for r in rows if not math.isnan(r[metric])]
        mean[metric] = sum(values) / len(values) if values else float("nan")
    return mean


def summarize(records: list[dict], outputs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean of every metric over the images of each output (images without valid pixels skipped).

    The standard protocol: metrics per image first, then the plain mean over images.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in outputs:
        rows = [r for r in records if r["output"] == name]
        usable = [r for r in rows if r["valid_pixels"] > 0 and not math.isnan(r["abs_rel"])]
        mean = _metric_means(usable)
        scales = [r["scale"] for r in usable]
        mean["scale_mean"] = sum(scales) / len(scales) if scales else float("nan")
        mean["num_images"] = len(usable)
        mean["skipped_images"] = len(rows) - len(usable)
        summary[name] = mean
    return summary


def summarize_regions(records: list[dict], outputs: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{output: {region: means}}`` from records carrying ``"regions"`` (``evaluate --regions``).

    Each region is averaged like the whole image: metrics per image over the image's pixels in the
    region, then the mean over the images that have at least one valid pixel there. A region no image
    has a valid pixel in is ``{"absent": True, "num_images": 0}``, never NaN.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in outputs:
        rows = [r for r in records if r["output"] == name and "regions" in r]
        regions = list(rows[0]["regions"]) if rows else []
        out[name] = {}
        for region in regions:
            usable = [r["regions"][region] for r in rows if r["regions"][region]["valid_pixels"] > 0]
            if not usable:
                out[name][region] = {"absent": True, "num_images": 0}
                continue
            mean = _metric_means(usable)
            mean.update(absent=False, num_images=len(usable), valid_pixels=sum(u["valid_pixels"] for u in usable))
            out[name][region] = mean
    return out


def format_table(row_names: list[str], rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """A fixed-width text table: one row per entry, one column per metric."""
    first = max([len("output")] + [len(n) for n in row_names])
    widths = [max(9, len(COLUMN_TITLES.get(c, c))) for c in columns]
    head = "output".ljust(first) + "  " + "  ".join(COLUMN_TITLES.get(c, c).rjust(w) for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for name, row in zip(row_names, rows):
        cells = []
        for column, width in zip(columns, widths):
            value = row.get(column, float("nan"))
            cells.append(f"{value:.4f}".rjust(width) if isinstance(value, float) else str(value).rjust(width))
        lines.append(name.ljust(first) + "  " + "  ".join(cells))
    return "\n".join(lines)


def per_image_table(records: list[dict]) -> str:
    names = [f"{r['key']} {r['output']}" for r in records]
    return format_table(names, records, METRIC_NAMES + CONFIDENCE_NAMES + ("scale",))


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomic write (temporary file + rename); NaN written as null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(report), indent=2))
    os.replace(tmp, path)
