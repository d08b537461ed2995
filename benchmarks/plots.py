"""Small PNG charts for the benchmarks, drawn with Pillow (already a dependency; no matplotlib).

Two shapes only: a line chart (one series per run, e.g. AbsRel against the labelled fraction)
and a grouped bar chart (e.g. AbsRel per region, one bar per run). Axes, ticks and a legend;
nothing else. Values that are ``None`` are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
SIZE = (900, 520)
MARGIN = (80, 40, 260, 60)  # left, top, right (legend), bottom


def _frame(title: str, y_label: str, x_label: str) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int]]:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    draw.rectangle((left, top, right, bottom), outline="black")
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill="black", font=font)
    draw.text((left, bottom + 35), x_label, fill="black", font=font)
    draw.text((5, top - 25), y_label, fill="black", font=font)
    return image, draw, (left, top, right, bottom)


def _y_range(values: Sequence[float], zero: bool) -> tuple[float, float]:
    lo, hi = (0.0 if zero else min(values)), max(values)
    pad = 0.05 * (hi - lo or abs(hi) or 1.0)
    return (lo if zero else lo - pad), hi + pad


def _y_axis(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lo: float, hi: float) -> None:
    left, top, right, bottom = box
    for i in range(6):
        value = lo + (hi - lo) * i / 5
        y = bottom - (bottom - top) * i / 5
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left, y, right, y), fill=(230, 230, 230))
        draw.text((8, y - 6), f"{value:.3f}", fill="black")


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], box: tuple[int, int, int, int]) -> None:
    x = box[2] + 15
    for i, name in enumerate(names):
        y = box[1] + 5 + 18 * i
        draw.rectangle((x, y, x + 12, y + 12), fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 18, y), name, fill="black")


def line_plot(series: dict[str, Sequence[tuple[float, float | None]]], path: Path, *, title: str,
              x_label: str, y_label: str, log_x: bool = False) -> Path:
    """One polyline with markers per series of (x, y) points; ``log_x`` for fractions like 0.05..1."""
    points = {name: [(x, y) for x, y in pts if y is not None and math.isfinite(y)] for name, pts in series.items()}
    xs = sorted({x for pts in points.values() for x, _ in pts})
    ys = [y for pts in points.values() for _, y in pts]
    if not xs or not ys:
        raise ValueError(f"line_plot {path}: no finite points to draw")
    image, draw, box = _frame(title, y_label, x_label)
    left, top, right, bottom = box
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    x_lo, x_hi = fx(xs[0]), fx(xs[-1])
    x_span = (x_hi - x_lo) or 1.0
    y_lo, y_hi = _y_range(ys, zero=False)
    to_px = lambda x, y: (left + 20 + (right - left - 40) * (fx(x) - x_lo) / x_span,  # noqa: E731
                          bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo))
    _y_axis(draw, box, y_lo, y_hi)
    for x in xs:
        px, _ = to_px(x, y_lo)
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 10, bottom + 8), f"{x:g}", fill="black")
    for i, (name, pts) in enumerate(points.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
    _legend(draw, list(points), box)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def bar_plot(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, *, title: str,
             y_label: str) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series within it."""
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not groups or not values:
        raise ValueError(f"bar_plot {path}: no finite values to draw")
    image, draw, box = _frame(title, y_label, "")
    left, top, right, bottom = box
    y_lo, y_hi = _y_range(values, zero=True)
    _y_axis(draw, box, y_lo, y_hi)
    group_width = (right - left) / len(groups)
    bar_width = 0.8 * group_width / max(1, len(series))
    for g, group in enumerate(groups):
        x0 = left + g * group_width + 0.1 * group_width
        draw.text((x0, bottom + 8), group[:18], fill="black")
        for i, vs in enumerate(series.values()):
            value = vs[g]
            if value is None or not math.isfinite(value):
                continue
            y = bottom - (bottom - top) * (value - y_lo) / (y_hi - y_lo)
            draw.rectangle((x0 + i * bar_width, y, x0 + (i + 1) * bar_width - 1, bottom), fill=COLOURS[i % len(COLOURS)])
    _legend(draw, list(series), box)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
