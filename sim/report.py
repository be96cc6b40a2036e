"""`snowfed report`: a table of finished runs, e.g. strategies x noise presets, mean and spread.

Reads every run directory under the given paths (a run directory holds config.yaml and
summary.json, so a sweep directory works as a whole), groups completed runs by two config keys
(dotted paths into config.yaml) and reports the mean, the sample standard deviation and the number
of runs of a final global metric in each cell: the runs of a cell differ only in what is not a
row or column key, typically the seed. Writes report.md and report.csv, and three plots next to
them (data prepared here, drawn by snowfed.plots):

- metric_per_round.png (`metric_per_round`): the global metric per round from each run's
  summary.json `history`, one line per row value (mean over the cell's runs, band min..max), one
  panel per column value.
- metric_vs_noise.png (`metric_vs_noise`): the final metric against a run's noise level, one
  line per row, error bars over seeds. The noise level is a numeric config key (`--noise-key`,
  e.g. noise.p_remove), or by default the run's measured label noise, 1 - `label_quality`.
- quality_quantity.png (`quality_quantity`): the talk's quality-versus-quantity map, one point
  per run: x its number of annotated training samples, y its label quality, colour its final
  metric.

Label quality (`site_label_quality`, `label_quality`): how well a site's training labels, as
noised, agree with the clean ones, measured by the simulator and stored in summary.json `nodes`:
segmentation, the pixel F1 of the noisy masks against the clean masks (2PR / (P + R) of
`label_noise.pixel_precision` and `pixel_recall`); classification, the fraction of labels left
unflipped (1 - `label_noise.flip_rate`). A run's label quality is the mean over its sites
weighted by their `num_train`, i.e. the quality of the pooled training set the federation learns
from (the plain mean when the sites are of equal size).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from snowfed.rundir import CONFIG, SUMMARY, atomic_write_text

MISSING = "-"


@dataclass(frozen=True)
class Run:
    path: Path
    status: str
    config: dict[str, Any]
    summary: dict[str, Any]


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run directory at or under `paths` (sorted by path)."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run or sweep directory")
        for summary_file in sorted({root / SUMMARY, *root.glob(f"**/{SUMMARY}")}):
            config_file = summary_file.parent / CONFIG
            if not summary_file.is_file() or not config_file.is_file():
                continue
            summary = json.loads(summary_file.read_text())
            config = yaml.safe_load(config_file.read_text())
            runs.append(Run(summary_file.parent, str(summary.get("status")), config, summary))
    return runs


_ABSENT = object()


def _value(config: Any, dotted: str) -> Any:
    """The raw value at a dotted config path (a number indexes a list: federation.hospitals.1);
    None where a null group cuts the path, _ABSENT where the path does not exist."""
    value: Any = config
    for part in dotted.split("."):
        if value is None:
            return None
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _ABSENT
    return value


def lookup(config: dict[str, Any], dotted: str) -> str:
    """The value at a dotted config path as a label; a null group (noise: null) reads 'per-site'."""
    value = _value(config, dotted)
    if value is _ABSENT:
        return MISSING
    return "per-site" if value is None else str(value)


def numeric(config: dict[str, Any], dotted: str) -> float | None:
    """The value at a dotted config path as a number; None if absent, null or not a number."""
    value = _value(config, dotted)
    if isinstance(value, bool) or value is None or value is _ABSENT:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def text(self) -> str:
        if not self.values:
            return MISSING
        spread = "" if math.isnan(self.spread) else f" ± {self.spread:.3f}"
        return f"{self.mean:.3f}{spread} ({len(self.values)})"


@dataclass(frozen=True)
class Table:
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], Cell]
    row_key: str
    col_key: str
    metric: str
    skipped: int  # runs found but not completed

    def markdown(self) -> str:
        head = f"| {self.row_key} \\ {self.col_key} | " + " | ".join(self.cols) + " |"
        lines = [head, "|" + "---|" * (len(self.cols) + 1)]
        for r in self.rows:
            lines.append(f"| {r} | " + " | ".join(self.cells[r, c].text() for c in self.cols) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([self.row_key, self.col_key, f"{self.metric}_mean", f"{self.metric}_std", "runs"])
        for r in self.rows:
            for c in self.cols:
                cell = self.cells[r, c]
                if cell.values:
                    writer.writerow([r, c, f"{cell.mean:.6f}", f"{cell.spread:.6f}", len(cell.values)])
        return out.getvalue()


def build_table(
    runs: list[Run],
    row_key: str = "strategy.name",
    col_key: str = "noise.name",
    metric: str = "f1",
    row_order: list[str] | None = None,
    col_order: list[str] | None = None,
) -> Table:
    """Group completed runs into cells; orders default to first appearance."""
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    rows, cols, skipped = list(row_order or []), list(col_order or []), 0
    for run in runs:
        value = run.summary.get("global", {}).get(metric)
        if run.status != "completed" or value is None:
            skipped += 1
            continue
        r, c = lookup(run.config, row_key), lookup(run.config, col_key)
        rows += [r] if r not in rows else []
        cols += [c] if c not in cols else []
        grouped[r, c].append(float(value))
    cells = {(r, c): Cell(tuple(grouped.get((r, c), ()))) for r in rows for c in cols}
    return Table(rows, cols, cells, row_key, col_key, metric, skipped)


def write_report(
    table: Table, out_dir: Path, score: Score | None = None, plots: list[str] | None = None
) -> tuple[Path, Path]:
    """report.md (the table, the score, then `plots`: markdown lines from `write_plots`) and
    report.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(
        md,
        f"Final global {table.metric} (clean test set drawn from every site): mean ± sample "
        f"standard deviation (number of runs).\n\n" + table.markdown()
        + ("\n" + score.markdown() if score is not None else "")
        + ("\n" + "\n".join(plots) + "\n" if plots else ""),
    )
    atomic_write_text(csv_path, table.csv())
    return md, csv_path


def run_epsilon(run: Run) -> float | None:
    """The privacy budget a run spent: the largest per-site epsilon (DP-SGD) or the global
    site-level epsilon (central DP); 0 for a run without privacy, None if unknown."""
    summary = run.summary
    if summary.get("privacy"):
        return max(float(site["epsilon"]) for site in summary["privacy"].values())
    if "epsilon" in summary.get("global", {}):
        return float(summary["global"]["epsilon"])
    if lookup(run.config, "privacy.name") in ("none", MISSING):
        return 0.0
    return None


def privacy_utility(runs: list[Run], group_key: str, metric: str = "f1"):
    """(series, reference) for plots.plot_metric_against_epsilon: the completed private runs'
    (epsilon, metric) points grouped by `group_key` (e.g. privacy.noise_multiplier), and the
    metric of the completed runs without privacy."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    reference = []
    for run in runs:
        eps, value = run_epsilon(run), run.summary.get("global", {}).get(metric)
        if run.status != "completed" or value is None or eps is None:
            continue
        if eps == 0:
            reference.append(float(value))
        elif math.isfinite(eps):
            label = f"{lookup(run.config, 'privacy.name')} {group_key.split('.')[-1]}=" \
                    f"{lookup(run.config, group_key)}"
            series[label].append((eps, float(value)))
    return dict(sorted(series.items())), reference


@dataclass(frozen=True)
class Score:
    """Pairwise Wilcoxon signed-rank tests between rows over their paired runs (same column,
    same seed): a row wins against another where p < alpha and its median difference is > 0.
    `score` = wins - losses, the summary ranking of e.g. strategies across noise settings."""

    rows: list[str]
    wins: dict[str, int]
    losses: dict[str, int]
    pairs: dict[tuple[str, str], int]  # how many paired runs each comparison had
    alpha: float

    def markdown(self) -> str:
        order = sorted(self.rows, key=lambda r: (self.losses[r] - self.wins[r], r))
        lines = [f"Pairwise Wilcoxon signed-rank tests (paired by column and seed, p < {self.alpha}):",
                 "", "| row | wins | losses | score |", "|---|---|---|---|"]
        lines += [f"| {r} | {self.wins[r]} | {self.losses[r]} | {self.wins[r] - self.losses[r]} |"
                  for r in order]
        fewest = min(self.pairs.values(), default=0)
        lines += ["", f"Fewest paired runs in a comparison: {fewest} (Wilcoxon cannot reach "
                  f"p < 0.05 with fewer than 6)."]
        return "\n".join(lines) + "\n"


def pairwise_score(
    runs: list[Run], row_key: str, col_key: str, metric: str = "f1", alpha: float = 0.05
) -> Score:
    from scipy.stats import wilcoxon

    values: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for run in runs:
        value = run.summary.get("global", {}).get(metric)
        if run.status == "completed" and value is not None:
            key = (lookup(run.config, col_key), lookup(run.config, "seed"))
            values[lookup(run.config, row_key)][key] = float(value)
    rows = list(values)
    wins, losses, pairs = dict.fromkeys(rows, 0), dict.fromkeys(rows, 0), {}
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            shared = sorted(set(values[a]) & set(values[b]))
            pairs[a, b] = len(shared)
            diffs = [values[a][k] - values[b][k] for k in shared]
            if len(diffs) < 2 or all(d == 0 for d in diffs):
                continue
            if wilcoxon(diffs).pvalue < alpha:
                winner, loser = (a, b) if statistics.median(diffs) > 0 else (b, a)
                wins[winner] += 1
                losses[loser] += 1
    return Score(rows, wins, losses, pairs, alpha)


# --- plots: the data behind metric_per_round.png, metric_vs_noise.png, quality_quantity.png ---


def _final(run: Run, metric: str) -> float | None:
    """The final global metric of a completed run (None for a failed run or a missing metric)."""
    value = run.summary.get("global", {}).get(metric) if run.status == "completed" else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


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
        if _final(run, metric) is None:
            continue
        for record in run.summary.get("history") or []:
            if not isinstance(record, dict):
                continue
            value, rnd = _number(record.get(metric)), record.get("round")
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
    flip = _number(noise.get("flip_rate"))
    if flip is not None:
        return 1.0 - flip
    precision, recall = _number(noise.get("pixel_precision")), _number(noise.get("pixel_recall"))
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
    weights = [_number(n.get("num_train")) for n in nodes]
    if any(w is None or w < 0 for w in weights) or sum(weights) == 0:
        weights = [1.0] * len(nodes)
    return sum(w * q for w, q in zip(weights, qualities)) / sum(weights)


def num_annotated(run: Run) -> int | None:
    """A run's number of annotated training samples: the sum of its sites' `num_train`."""
    counts = [_number(n.get("num_train")) for n in _nodes(run)]
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
        value = _final(run, metric)
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
        value = _final(run, metric)
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
    from snowfed.plots import plot_metric_per_round, plot_metric_vs_noise, plot_quality_quantity

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
