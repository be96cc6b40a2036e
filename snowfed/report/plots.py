"""PNG plots of a run directory (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from snowfed.rundir import atomic_write_bytes  # noqa: E402

MAX_NODE_LEGEND = 12


def noise_label(profile: str, noise: Any) -> str:
    """A site's legend entry for its label noise: the profile and the parameters that act, e.g.
    `symmetric rate 0.4`, `noisy p_remove 0.5`, `noisy_hd p_remove 0.5 sigma 4 simplify 8`,
    `bb bounding box`; a list of specs is that many annotators."""
    if isinstance(noise, list):
        return f"{profile}: {len(noise)} annotators"
    if not isinstance(noise, dict):
        return profile
    if isinstance(noise.get("noise"), list):  # annotators with their fusion
        return f"{profile}: {len(noise['noise'])} annotators, {noise.get('fusion', 'majority')}"
    parts = [f"{key} {noise[key]:g}" for key in ("rate", "p_remove", "sigma")
             if isinstance(noise.get(key), (int, float)) and not isinstance(noise.get(key), bool)
             and noise[key]]
    if isinstance(noise.get("rate"), list):
        parts.append(f"rate {noise['rate'][0]:g}-{noise['rate'][-1]:g}")
    if (noise.get("simplify_every") or 1) > 1:
        parts.append(f"simplify {noise['simplify_every']}")
    if noise.get("bounding_box"):
        parts.append("bounding box")
    return " ".join([profile, *parts]) if parts else profile


def _node_curves(records: list[dict[str, Any]], name: str, phase: str, key: str):
    return sorted((r["round"], r[key]) for r in records
                  if r.get("scope") == "node" and r["node"] == name and r.get("phase") == phase
                  and key in r)


def _band(ax, curves: list[list[tuple[int, float]]], label: str) -> None:
    """Many sites: the median per round and the band between the quartiles."""
    import numpy as np

    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for rnd, value in curve:
            by_round.setdefault(rnd, []).append(value)
    rounds = sorted(by_round)
    if not rounds:
        return
    q1, median, q3 = (np.array([np.percentile(by_round[r], q) for r in rounds]) for q in (25, 50, 75))
    ax.fill_between(rounds, q1, q3, color="tab:blue", alpha=0.25, lw=0, label="sites: quartiles")
    ax.plot(rounds, median, "-", marker=".", color="tab:blue", lw=1.5, label=label)


def plot_f1_per_round(
    records: list[dict[str, Any]], path: str | Path, node_labels: dict[str, str] | None = None
) -> None:
    """Left: global F1 on the clean test set per round (bold) and the global model's F1 on each
    node's clean held-out split. Right: each node's locally trained model on the same split
    (`local-f1`), where a node's own label noise shows. `node_labels` names each node's noise
    (`noise_label`) in the legend; past MAX_NODE_LEGEND nodes, their median and quartiles."""
    _save(f1_figure(records, node_labels), path)


def f1_figure(records: list[dict[str, Any]], node_labels: dict[str, str] | None = None):
    """The figure of `plot_f1_per_round`."""
    node_labels = node_labels or {}
    fig, (ax_global, ax_local) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, sharey=True,
                                              layout="constrained")
    glob = sorted((r["round"], r["f1"]) for r in records if r.get("scope") == "global" and "f1" in r)
    if glob:
        ax_global.plot(*zip(*glob), "-o", color="black", lw=2.5, label="global (clean test set)")
    nodes = sorted({r["node"] for r in records if r.get("scope") == "node"})
    panels = ((ax_global, "evaluate", "f1"), (ax_local, "train", "local-f1"))
    if len(nodes) > MAX_NODE_LEGEND:
        for ax, phase, key in panels:
            _band(ax, [_node_curves(records, n, phase, key) for n in nodes],
                  f"sites: median of {len(nodes)}")
    else:
        for color, name in zip(plt.cm.tab10.colors * 10, nodes):
            label = f"{name} ({node_labels[name]})" if name in node_labels else name
            for ax, phase, key in panels:
                pts = _node_curves(records, name, phase, key)
                if pts:
                    ax.plot(*zip(*pts), "-", marker=".", lw=1.2, color=color, label=label)
    ax_global.set_title("global model: clean test set, and each node's clean split", wrap=True)
    ax_local.set_title("each node's own model after local training, on its clean split",
                       wrap=True)
    for ax in (ax_global, ax_local):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    ax_global.set_ylabel("F1 (pixel F1; macro F1 for classification)")
    return fig


def plot_metric_against_epsilon(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    metric: str = "f1",
    reference: list[float] | None = None,
) -> None:
    """The privacy-utility trade-off: each series (e.g. a noise multiplier) is its runs'
    (epsilon, metric) points, drawn one by one and as their mean with a sample-sd bar;
    `reference` (the non-private runs' values) is drawn as a band at its mean."""
    import statistics

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    if reference:
        mean = statistics.fmean(reference)
        ax.axhline(mean, color="grey", ls="--", lw=1.2,
                   label=f"no privacy (mean of {len(reference)}: {mean:.2f})")
        ax.scatter([], [])  # keep colours aligned with the series below
    for color, (label, points) in zip(plt.cm.tab10.colors * 10, series.items()):
        eps, values = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(eps, values, s=14, color=color, alpha=0.45)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar(statistics.fmean(eps), statistics.fmean(values), yerr=sd, fmt="o", ms=7,
                    color=color, capsize=3, label=f"{label} (n={len(points)})")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (log scale; largest over sites, delta as configured)")
    ax.set_ylabel(f"final global {metric}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _save(fig, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


UNIT_LIMITS = (-0.03, 1.03)  # a 0..1 metric's axis, a value at 0 or 1 clear of the frame


def _unit_interval(values) -> bool:
    """Whether every value lies in [0, 1] (a metric drawn on a fixed 0..1 axis)."""
    values = list(values)
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def plot_metric_per_round(
    curves: dict[tuple[str, str], Any],
    path: str | Path,
    row_key: str,
    col_key: str,
    metric: str = "f1",
    rows: list[str] | None = None,
    cols: list[str] | None = None,
) -> None:
    """One panel per column value, one line per row value: the global metric per round, mean over
    the cell's runs (usually the seeds), shaded from the lowest to the highest run. `curves` maps
    (row, col) to an object with rounds, mean, low, high and runs (report.figures.Curve)."""
    rows = [r for r in rows or dict.fromkeys(r for r, _ in curves) if any(k[0] == r for k in curves)]
    cols = [c for c in cols or dict.fromkeys(c for _, c in curves) if any(k[1] == c for k in curves)]
    ncols = min(len(cols), 3)
    nrows = -(-len(cols) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.4, 3.6 * nrows + 0.8), dpi=110,
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    styles = {row: (color, marker, dash) for row, color, marker, dash in
              zip(rows, plt.cm.tab10.colors * 10, MARKERS * 10, ["-", "--", "-.", ":"] * 10)}
    bounded = _unit_interval(v for c in curves.values() for v in (*c.low, *c.high))
    for ax, col in zip(axes.flat, cols):
        for row in rows:
            curve = curves.get((row, col))
            if curve is None:
                continue
            color, marker, dash = styles[row]  # overlapping rows stay apart by marker and dash
            ax.fill_between(curve.rounds, curve.low, curve.high, color=color, alpha=0.18, lw=0)
            ax.plot(curve.rounds, curve.mean, ls=dash, marker=marker, ms=5, lw=2, color=color,
                    label=f"{row} ({max(curve.runs)} runs)")
        ax.set_title(f"{col_key} = {col}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if bounded:
            ax.set_ylim(*UNIT_LIMITS)
    for ax in axes.flat[len(cols):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("round (0 = initial model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel(f"global {metric} (clean test set)")
    fig.suptitle(f"Global {metric} per round by {row_key}: mean over runs, band min..max",
                 fontsize=11, wrap=True)
    _save(fig, path)


def plot_metric_vs_noise(
    series: dict[str, list[Any]],
    path: str | Path,
    metric: str = "f1",
    noise_key: str | None = None,
    col_key: str = "",
    rows: list[str] | None = None,
) -> None:
    """The final global metric against the noise level, one line per row (e.g. strategy): each
    point the mean ± sample sd over its runs (the seeds), its horizontal bar the sd of the runs'
    measured noise levels; faint dots are the runs. `series` maps a row to points with level,
    level_sd, values, mean, sd and label (report.figures.NoisePoint); without `noise_key` each
    point is a column value (label), written above the axes at its level."""
    rows = [r for r in rows or series if r in series]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110, layout="constrained")
    for color, marker, dash, row in zip(plt.cm.tab10.colors * 10, MARKERS * 10,
                                        ["-", "--", "-.", ":"] * 10, rows):
        points = series[row]
        for p in points:
            ax.scatter([p.level] * len(p.values), p.values, s=12, color=color, alpha=0.35, lw=0)
        runs = sum(len(p.values) for p in points)
        ax.errorbar([p.level for p in points], [p.mean for p in points],
                    yerr=[p.sd for p in points], xerr=[p.level_sd for p in points], ls=dash,
                    marker=marker, ms=6, lw=1.8, capsize=3, color=color,
                    label=f"{row} ({runs} runs)")
    bounded = _unit_interval(v for points in series.values() for p in points for v in p.values)
    if bounded:
        ax.set_ylim(*UNIT_LIMITS)
    if not noise_key:  # name each level by the column value its runs share (e.g. the noise preset)
        at: dict[str, list[float]] = {}
        for points in series.values():
            for p in points:
                at.setdefault(p.label, []).append(p.level)
        for label, levels in at.items():
            ax.annotate(label, (sum(levels) / len(levels), 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, color="dimgrey")
        ax.set_xlabel("measured label noise: 1 - label quality (pixel F1 of the noisy masks, or "
                      "1 - flip rate;\nmean over sites weighted by num_train)"
                      + (f"; labels above: {col_key}" if col_key else ""), fontsize=9)
    else:
        ax.set_xlabel(f"noise level: {noise_key}")
    ax.set_ylabel(f"final global {metric} (mean ± sd over runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


MARKERS = "osD^vPX*<>"


def plot_quality_quantity(
    points: list[Any],
    path: str | Path,
    metric: str = "f1",
    row_key: str = "",
    rows: list[str] | None = None,
) -> None:
    """The talk's quality-versus-quantity plane: one marker per run at (annotated training
    samples, label quality), coloured by its final global metric, its shape the run's row value.
    Runs at the same spot (e.g. two strategies on the same seed's labels) are nudged sideways by
    row. `points` have samples, quality, value and row (report.figures.MapPoint)."""

    rows = [r for r in rows or dict.fromkeys(p.row for p in points) if any(p.row == r for p in points)]
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110, layout="constrained")
    samples = [p.samples for p in points]
    lo, hi = max(min(samples), 1), max(max(samples), 1)
    log = hi / lo >= 4
    values = [p.value for p in points]
    vmin, vmax = min(values), max(values)
    if vmax - vmin < 1e-6:  # one colour for all: a scale around it (0..1 for a bounded metric)
        vmin, vmax = (0.0, 1.0) if _unit_interval(values) else (vmin - 0.05, vmax + 0.05)
    norm = matplotlib.colors.Normalize(vmin, vmax)
    # x limits: a single quantity sits in the middle; the quadrant names stay clear of the data
    xmin, xmax = (lo / 2, hi * 2) if log else (0, hi * (2 if hi == lo else 1.15))
    for i, (marker, row) in enumerate(zip(MARKERS * 10, rows)):
        mine = [p for p in points if p.row == row]
        shift = (i - (len(rows) - 1) / 2) * 0.02  # a fraction of the axis width
        if log:
            xs = [p.samples * (xmax / xmin) ** shift for p in mine]
        else:
            xs = [p.samples + shift * (xmax - xmin) for p in mine]
        ax.scatter(xs, [p.quality for p in mine], c=[p.value for p in mine], cmap="viridis",
                   norm=norm, marker=marker, s=70, edgecolors="black", linewidths=0.6,
                   label=f"{row} ({len(mine)} runs)")
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlim(xmin, xmax)
    qualities = [p.quality for p in points]
    ax.set_ylim(min(0.0, min(qualities) - 0.05), 1.1)  # room above quality 1 for the top names
    for text, xy, align in (("clean but small", (0.01, 0.99), ("left", "top")),
                            ("machine-learning heaven: plenty and clean", (0.99, 0.99), ("right", "top")),
                            ("small and badly supervised", (0.01, 0.01), ("left", "bottom")),
                            ("big but badly supervised", (0.99, 0.01), ("right", "bottom"))):
        ax.text(*xy, text, transform=ax.transAxes, ha=align[0], va=align[1], fontsize=8,
                color="grey", style="italic")
    ax.set_xlabel("quantity: annotated training samples of the run (sum over sites of num_train)"
                  + (", log scale" if log else ""), fontsize=9)
    ax.set_ylabel("quality: label F1 of the training labels\n(1 - flip rate for classes; "
                  "num_train-weighted over sites)", fontsize=9)
    ax.grid(alpha=0.3)
    legend = ax.legend(title=row_key or None, fontsize=8, title_fontsize=8, loc="best")
    for handle in legend.legend_handles:
        handle.set_array(None)  # the shape names the row; the colour is the metric's
        handle.set_facecolor("lightgrey")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                 label=f"final global {metric}")
    _save(fig, path)


def plot_critical_difference(mean_ranks: dict[str, float], pvalues: dict[tuple[str, str], float],
                             path: str | Path, critical_difference: float | None, alpha: float,
                             title: str) -> None:
    """Demšar's critical-difference diagram (scikit-posthocs): the rows' mean ranks on an axis,
    rows the post-hoc cannot tell apart joined by a bar."""
    import pandas as pd
    import scikit_posthocs

    names = list(mean_ranks)
    matrix = pd.DataFrame(1.0, index=names, columns=names)
    for (a, b), p in pvalues.items():
        matrix.loc[a, b] = matrix.loc[b, a] = p
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(names)), dpi=110)
    scikit_posthocs.critical_difference_diagram(pd.Series(mean_ranks), matrix, ax=ax, alpha=alpha)
    if critical_difference is not None:
        title += f", critical difference {critical_difference:.2f}"
    ax.set_title(title, fontsize=9, pad=22)
    fig.tight_layout()
    _save(fig, path)
