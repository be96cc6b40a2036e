"""The data of the report's three plots (per round, against noise, quality against quantity),
drawn by snowfed.report.plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snowfed.report.runs import Run, as_number, final_metric, lookup, numeric
from snowfed.report.tables import Table


@dataclass(frozen=True)
class Curve:
    """A cell's metric per round: the mean, min and max over its runs at each round and how many
    runs reached it (round 0 is the initial model)."""

    rounds: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    runs: tuple[int, ...]


def metric_per_round(
    runs: list[Run], row_key: str, col_key: str, metric: str = "f1"
) -> dict[tuple[str, str], Curve]:
    """{(row, col): Curve} of the global metric per round in each completed run's summary.json
    `history`; runs without a history are left out."""
    grouped: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if final_metric(run, metric) is None:
            continue
        for record in run.summary.get("history") or []:
            if not isinstance(record, dict):
                continue
            value, rnd = as_number(record.get(metric)), record.get("round")
            if value is not None and isinstance(rnd, int):
                grouped[lookup(run.config, row_key), lookup(run.config, col_key)][rnd].append(value)
    curves = {}
    for cell, per_round in grouped.items():
        rounds = tuple(sorted(per_round))
        curves[cell] = Curve(
            rounds,
            tuple(statistics.fmean(per_round[r]) for r in rounds),
            tuple(min(per_round[r]) for r in rounds),
            tuple(max(per_round[r]) for r in rounds),
            tuple(len(per_round[r]) for r in rounds),
        )
    return curves


def site_label_quality(node: dict[str, Any]) -> float | None:
    """How well a site's training labels agree with the clean ones (see the module docstring):
    segmentation, the pixel F1 of the noisy masks against the clean masks; classification,
    1 - the measured flip rate. None when the summary does not say."""
    noise = node.get("label_noise") if isinstance(node, dict) else None
    if not isinstance(noise, dict):
        return None
    flip = as_number(noise.get("flip_rate"))
    if flip is not None:
        return 1.0 - flip
    precision, recall = as_number(noise.get("pixel_precision")), as_number(noise.get("pixel_recall"))
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _nodes(run: Run) -> list[dict[str, Any]]:
    nodes = run.summary.get("nodes")
    return [n for n in nodes.values() if isinstance(n, dict)] if isinstance(nodes, dict) else []


def label_quality(run: Run) -> float | None:
    """A run's label quality: its sites' `site_label_quality`, averaged with their `num_train` as
    weights (the plain mean if a site lacks it); None if any site's quality is unknown."""
    nodes = _nodes(run)
    qualities = [site_label_quality(n) for n in nodes]
    if not nodes or any(q is None for q in qualities):
        return None
    weights = [as_number(n.get("num_train")) for n in nodes]
    if any(w is None or w < 0 for w in weights) or sum(weights) == 0:
        weights = [1.0] * len(nodes)
    return sum(w * q for w, q in zip(weights, qualities)) / sum(weights)


def num_annotated(run: Run) -> int | None:
    """A run's number of annotated training samples: the sum of its sites' `num_train`."""
    counts = [as_number(n.get("num_train")) for n in _nodes(run)]
    if not counts or any(c is None for c in counts):
        return None
    return int(sum(counts))


def noise_level(run: Run, noise_key: str | None = None) -> float | None:
    """The noise level of a run: the number at config key `noise_key` (e.g. noise.p_remove,
    federation.hospitals.1.noise.rate), or without one the measured label noise,
    1 - `label_quality` (0 = labels as clean as the masks / classes they came from)."""
    if noise_key:
        return numeric(run.config, noise_key)
    quality = label_quality(run)
    return None if quality is None else 1.0 - quality


@dataclass(frozen=True)
class NoisePoint:
    """One point of a row's line in metric_vs_noise.png: the noise level (mean over the runs,
    with its sd: measured levels differ from seed to seed), the final metric of each run, and the
    column value the runs share (with --noise-key the runs are grouped by level instead, and
    `label` lists their column values)."""

    level: float
    level_sd: float
    values: tuple[float, ...]
    label: str

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def metric_vs_noise(
    runs: list[Run], row_key: str, col_key: str, metric: str = "f1", noise_key: str | None = None
) -> tuple[dict[str, list[NoisePoint]], int]:
    """({row: points sorted by level}, number of completed runs without a noise level). With
    `noise_key` the runs of a row are grouped by its value; without, by the column (a table
    cell), at the mean of their measured noise levels."""
    groups: dict[tuple[str, Any], list[tuple[float, float, str]]] = defaultdict(list)
    missing = 0
    for run in runs:
        value = final_metric(run, metric)
        if value is None:
            continue
        level = noise_level(run, noise_key)
        if level is None:
            missing += 1
            continue
        row, col = lookup(run.config, row_key), lookup(run.config, col_key)
        groups[row, level if noise_key else col].append((level, value, col))
    series: dict[str, list[NoisePoint]] = defaultdict(list)
    for (row, _), members in groups.items():
        levels = [m[0] for m in members]
        cols = list(dict.fromkeys(m[2] for m in members))
        series[row].append(NoisePoint(
            statistics.fmean(levels), statistics.stdev(levels) if len(levels) > 1 else 0.0,
            tuple(m[1] for m in members), ",".join(cols)))
    return {row: sorted(points, key=lambda p: p.level) for row, points in series.items()}, missing


@dataclass(frozen=True)
class MapPoint:
    """One run on the quality-versus-quantity map."""

    path: Path
    row: str
    col: str
    samples: int
    quality: float
    value: float


def quality_quantity(
    runs: list[Run], row_key: str, col_key: str, metric: str = "f1"
) -> tuple[list[MapPoint], int]:
    """(one MapPoint per completed run, number of completed runs left out for lacking sizes or
    label noise). A point is a run, not a site: the colour, the final global metric, belongs to
    the model the whole federation trained on the pooled data, so the point sits at that pooled
    data's quantity (`num_annotated`) and quality (`label_quality`)."""
    points, missing = [], 0
    for run in runs:
        value = final_metric(run, metric)
        if value is None:
            continue
        samples, quality = num_annotated(run), label_quality(run)
        if samples is None or quality is None:
            missing += 1
            continue
        points.append(MapPoint(run.path, lookup(run.config, row_key), lookup(run.config, col_key),
                               samples, quality, value))
    return points, missing


PLOTS = ("metric_per_round.png", "metric_vs_noise.png", "quality_quantity.png")


def write_plots(
    runs: list[Run], table: Table, out_dir: Path, noise_key: str | None = None
) -> list[str]:
    """Draw the three plots into `out_dir` (those the data can make) and return report.md's
    lines about them: an image link each, or a one-line note why a plot was not drawn."""
    from snowfed.report.plots import plot_metric_per_round, plot_metric_vs_noise, plot_quality_quantity

    out_dir.mkdir(parents=True, exist_ok=True)
    metric, rows, cols = table.metric, table.rows, table.cols
    lines = ["## Plots", ""]

    curves = metric_per_round(runs, table.row_key, table.col_key, metric)
    if any(len(c.rounds) > 1 for c in curves.values()):
        plot_metric_per_round(curves, out_dir / PLOTS[0], table.row_key, table.col_key, metric,
                              rows, cols)
        lines += [f"Global {metric} per round (mean over a cell's runs, band min..max; round 0 is "
                  f"the initial model):", "", f"![{metric} per round]({PLOTS[0]})", ""]
    else:
        lines += [f"{PLOTS[0]} not drawn: no completed run has a `history` of {metric} over more "
                  f"than one round.", ""]

    series, missing = metric_vs_noise(runs, table.row_key, table.col_key, metric, noise_key)
    levels = {round(p.level, 2) for points in series.values() for p in points}
    what = (f"config key {noise_key}" if noise_key else
            "measured label noise, 1 - label quality (num_train-weighted mean over sites of the "
            "pixel F1 of the noisy masks, or of 1 - flip rate)")
    left_out = f"; {missing} completed runs without a noise level left out" if missing else ""
    if len(levels) > 1:
        plot_metric_vs_noise(series, out_dir / PLOTS[1], metric, noise_key, table.col_key,
                             [r for r in rows if r in series])
        lines += [f"Final global {metric} against the noise level, {what}; mean ± sd over the "
                  f"runs of a point{left_out}:", "", f"![{metric} against noise]({PLOTS[1]})", ""]
    else:
        found = f"a single noise level ({levels.pop():.2f})" if levels else "no noise level"
        lines += [f"{PLOTS[1]} not drawn: the runs have {found} ({what}){left_out}.", ""]

    points, missing = quality_quantity(runs, table.row_key, table.col_key, metric)
    left_out = f"; {missing} completed runs without sizes or label noise left out" if missing else ""
    if points:
        plot_quality_quantity(points, out_dir / PLOTS[2], metric, table.row_key,
                              [r for r in rows if any(p.row == r for p in points)])
        sizes, values = {p.samples for p in points}, {round(p.value, 3) for p in points}
        same = (f" All runs have {sizes.pop()} annotated training samples: vary the sites' sizes "
                f"to see quantity against quality." if len(sizes) == 1 else "")
        same += (f" All runs have a final {metric} of {values.pop():.3f}: the colour does not tell "
                 f"them apart." if len(values) == 1 else "")
        lines += [f"Quality against quantity, one point per run: x its annotated training samples "
                  f"(sum of the sites' num_train), y its label quality, colour its final global "
                  f"{metric}{left_out}.{same}", "", f"![quality against quantity]({PLOTS[2]})", ""]
    else:
        lines += [f"{PLOTS[2]} not drawn: no completed run with its sites' num_train and measured "
                  f"label noise{left_out}.", ""]
    return lines
