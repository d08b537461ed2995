"""Aggregation, tables and plots of the fidelity benchmark (benchmarks/fidelity.py).

A result *label* is a run name (``mutual``) or, in a label-fraction sweep, the run name and the
fraction of labelled samples (``mutual@0.25``). Branch U alone never sees labels, so its
baseline (``self_only``) carries no fraction; S's baseline at fraction f is ``sup_only@f``.
"""

from __future__ import annotations

import statistics

BASELINES = {"S": "sup_only", "U": "self_only"}
TABLE_METRICS = (("abs_rel", "AbsRel"), ("sq_rel", "SqRel"), ("rmse", "RMSE"), ("rmse_log", "RMSElog"),
                 ("a1", "d1"), ("ause", "AUSE"), ("aurg", "AURG"))
FRACTION_SEP = "@"


def label(run: str, fraction: float) -> str:
    """``run`` at fraction 1 (the plain benchmark, whose folders it reuses), else ``run@fraction``."""
    return run if fraction >= 1.0 else f"{run}{FRACTION_SEP}{fraction:g}"


def split_label(name: str) -> tuple[str, float]:
    """Inverse of :func:`label`: (run, fraction)."""
    run, _, fraction = name.partition(FRACTION_SEP)
    return run, float(fraction) if fraction else 1.0


def baseline_label(name: str, branch: str, results: dict | None = None) -> str:
    """The single-branch run a branch of ``name`` is compared with, at the same label fraction for
    S; for U as well when ``results`` holds U-only at that fraction (U trained on labels,
    ``loss.u_confidence_target: lidar``), else U-only without a fraction."""
    _, fraction = split_label(name)
    baseline = BASELINES[branch]
    if branch == "S" or (results is not None and label(baseline, fraction) in results):
        return label(baseline, fraction)
    return baseline


def summarize(per_seed: dict[int, dict]) -> dict:
    """Mean and (with several seeds) sample standard deviation over seeds of every number."""
    out: dict = {"seeds": sorted(per_seed)}
    for key in ("auto", "ms"):
        branches = sorted({b for r in per_seed.values() for b in r.get(key, {})})
        out[key] = {}
        out[f"{key}_std"] = {}
        for branch in branches:
            metrics = {m for r in per_seed.values() for m in r[key].get(branch, {})}
            values = {m: [r[key][branch][m] for r in per_seed.values()
                          if isinstance(r[key][branch].get(m), (int, float))] for m in metrics}
            out[key][branch] = {m: statistics.fmean(v) for m, v in values.items() if v}
            out[f"{key}_std"][branch] = {m: statistics.stdev(v) for m, v in values.items() if len(v) > 1}
    regions: dict = {}
    for result in per_seed.values():
        for output, by_region in result.get("auto_regions", {}).items():
            for region, value in by_region.items():
                regions.setdefault(output, {}).setdefault(region, []).append(value)
    if regions:
        out["regions_abs_rel"] = {o: {r: statistics.fmean(v) for r, v in rs.items()} for o, rs in regions.items()}
    first = next(iter(per_seed.values()))
    out["median_scaling"] = first.get("median_scaling", {})
    return out


def format_regions(results: dict[str, dict]) -> str:
    """AbsRel per region (rows = run and branch, columns = regions; mean over seeds, metric)."""
    rows = [(f"{run} {output}", by_region) for run, r in results.items()
            for output, by_region in r.get("regions_abs_rel", {}).items()]
    if not rows:
        return ""
    regions = sorted({region for _, by_region in rows for region in by_region})
    first = max(len("AbsRel per region"), *(len(name) for name, _ in rows)) + 1
    width = max(len(r) for r in regions) + 2
    lines = ["AbsRel per region".ljust(first) + "".join(r.rjust(width) for r in regions)]
    for name, by_region in rows:
        cells = [("-" if by_region.get(r) is None else f"{by_region[r]:.4f}").rjust(width) for r in regions]
        lines.append(name.ljust(first) + "".join(cells))
    return "\n".join(lines)


def paired_differences(results: dict[str, dict], per_seed: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """AbsRel of each two-branch run minus its single-branch baseline, seed by seed (negative =
    better): S against S-only, U against U-only; metric, or median-scaled where the U-only
    baseline has no scale of its own (monocular)."""
    diffs: dict[str, dict] = {}
    for run in results:
        if split_label(run)[0] in BASELINES.values():
            continue
        row = {}
        for branch in BASELINES:
            baseline = baseline_label(run, branch, results)
            key = "ms" if results.get(baseline, {}).get("median_scaling", {}).get(branch) else "auto"
            pairs = [(r[key][branch]["abs_rel"], per_seed[baseline][s][key][branch]["abs_rel"])
                     for s, r in per_seed.get(run, {}).items()
                     if branch in r.get(key, {}) and s in per_seed.get(baseline, {})]
            if pairs:
                deltas = [a - b for a, b in pairs]
                relative = [(a - b) / b for a, b in pairs if b]
                row[branch] = {"vs": baseline, "metric": "abs_rel" + ("" if key == "auto" else " (median-scaled)"),
                               "per_seed": deltas, "mean": statistics.fmean(deltas),
                               "relative_per_seed": relative,
                               "relative_mean": statistics.fmean(relative) if relative else None,
                               "better_every_seed": all(d < 0 for d in deltas)}
        if row:
            diffs[run] = row
    return diffs


def format_table(results: dict[str, dict]) -> str:
    """Rows = runs; per branch the `auto` metrics then AbsRel median-scaled ('-': branch not trained)."""
    cells = [f"{b} {t}" for b in ("S", "U") for t in [t for _, t in TABLE_METRICS] + ["AbsRel(ms)"]]
    width = max(len(c) for c in cells) + 1
    title = "run (U ms = U median-scaled)"
    first = max(len(title), *(len(r) + 7 for r in results))
    lines = [title.ljust(first) + "".join(c.rjust(width) for c in cells)]
    lines.append("-" * len(lines[0]))
    for run, result in results.items():
        name = run + (" (U ms)" if result.get("median_scaling", {}).get("U") else "")
        row = []
        for branch in ("S", "U"):
            mean = result.get("auto", {}).get(branch)
            values = [None if mean is None else mean.get(key) for key, _ in TABLE_METRICS]
            values.append(result.get("ms", {}).get(branch, {}).get("abs_rel"))
            row += [("-" if v is None else f"{v:.4f}").rjust(width) for v in values]
        lines.append(name.ljust(first) + "".join(row))
    return "\n".join(lines)


def format_differences(diffs: dict[str, dict]) -> str:
    lines = ["AbsRel minus the single-branch baseline, same seeds (negative = better):"]
    for run, row in diffs.items():
        parts = [f"{b} {d['mean']:+.4f} ({_percent(d.get('relative_mean'))}) vs {d['vs']}"
                 + (f" (per seed {', '.join(f'{x:+.4f}' for x in d['per_seed'])})" if len(d["per_seed"]) > 1 else "")
                 for b, d in row.items()]
        lines.append(f"  {run}: " + "; ".join(parts))
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _abs_rel(result: dict, branch: str) -> float | None:
    """Metric AbsRel of ``branch``, median-scaled where that run's branch has no scale of its own."""
    key = "ms" if result.get("median_scaling", {}).get(branch) else "auto"
    return result.get(key, {}).get(branch, {}).get("abs_rel")


def fraction_curve(results: dict[str, dict]) -> dict[str, dict[float, float]]:
    """The semi-supervised curve: AbsRel against the labelled fraction, one series per run and
    branch (``"sup_only S"``, ``"mutual S"``, ``"mutual U"``...). U-only without a fraction (it
    reads no labels) is a flat line over the fractions of the others."""
    series: dict[str, dict[float, float]] = {}
    fractions = sorted({split_label(name)[1] for name in results})
    for name, result in results.items():
        run, fraction = split_label(name)
        for branch in ("S", "U"):
            value = _abs_rel(result, branch)
            if value is None:
                continue
            if run == BASELINES["U"] and not any(split_label(n) == (run, f) for n in results for f in fractions if f < 1):
                series.setdefault(f"{run} {branch}", {}).update({f: value for f in fractions})
            else:
                series.setdefault(f"{run} {branch}", {})[fraction] = value
    return series


def format_curve(series: dict[str, dict[float, float]]) -> str:
    """Rows = run and branch, columns = labelled fractions (AbsRel, mean over seeds)."""
    fractions = sorted({f for points in series.values() for f in points}, reverse=True)
    if len(fractions) < 2:
        return ""
    first = max(len("AbsRel by labelled fraction"), *(len(name) for name in series)) + 1
    lines = ["AbsRel by labelled fraction".ljust(first) + "".join(f"{f:g}".rjust(9) for f in fractions)]
    for name, points in series.items():
        lines.append(name.ljust(first) + "".join(
            ("-" if points.get(f) is None else f"{points[f]:.4f}").rjust(9) for f in fractions))
    return "\n".join(lines)


def write_plots(results: dict[str, dict], out_dir) -> list:
    """PNG plots next to the JSON: the label-fraction curve (when there are several fractions) and
    AbsRel per region (when evaluated with regions). Returns the paths written."""
    from pathlib import Path

    from plots import bar_plot, line_plot  # benchmarks/plots.py, a sibling of this file

    out_dir = Path(out_dir)
    written = []
    series = fraction_curve(results)
    if len({f for points in series.values() for f in points}) > 1:
        path = out_dir / "fidelity_fractions.png"
        line_plot({name: sorted(points.items()) for name, points in series.items()}, path,
                  title="AbsRel vs labelled fraction (mean over seeds)", x_label="labelled fraction (log)",
                  y_label="AbsRel", log_x=True)
        written.append(path)
    rows = {f"{run} {output}": by_region for run, r in results.items()
            for output, by_region in r.get("regions_abs_rel", {}).items() if output in ("S", "U")}
    if rows:
        regions = sorted({region for by_region in rows.values() for region in by_region})
        path = out_dir / "fidelity_regions.png"
        bar_plot(regions, {name: [by_region.get(r) for r in regions] for name, by_region in rows.items()}, path,
                 title="AbsRel per region (mean over seeds)", y_label="AbsRel")
        written.append(path)
    return written
