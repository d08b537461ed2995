"""``evaluate --wandb``: the per-image rows as a W&B Table, the means as the run's summary.

One W&B run per evaluation (job type ``evaluation``), on rank 0 only; ``WANDB_MODE=offline``
writes it under ``$WANDB_DIR/wandb/`` without a network.
"""

from __future__ import annotations

import math
from typing import Any

from distill_depth.evaluation.report import CONFIDENCE_NAMES
from distill_depth.metrics import METRIC_NAMES

TABLE_KEY = "per_image"
COLUMNS = ("key", "output", *METRIC_NAMES, *CONFIDENCE_NAMES, "scale", "valid_pixels")


def _cell(value: Any) -> Any:
    """A NaN (an image without valid pixels) as None: W&B shows an empty cell, JSON stays valid."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def log_report(report: dict[str, Any], project: str, run_name: str | None = None) -> str:
    """Log ``report`` (``evaluate``'s) to a new W&B run; returns the run's folder."""
    import wandb  # noqa: PLC0415 (only when asked for)

    run = wandb.init(project=project, name=run_name, job_type="evaluation",
                     config={k: report[k] for k in ("checkpoint", "shards", "protocol", "median_scaling", "flip_tta",
                                                    "input_size", "outputs")})
    try:
        table = wandb.Table(columns=list(COLUMNS),
                            data=[[_cell(row.get(column)) for column in COLUMNS] for row in report["per_image"]])
        run.log({TABLE_KEY: table})
        for output, means in report["mean"].items():
            for name, value in means.items():
                run.summary[f"{output}/{name}"] = _cell(value)
        return str(run.dir)
    finally:
        run.finish()
