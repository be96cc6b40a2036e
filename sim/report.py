"""`snowfed report`: a table of finished runs, e.g. strategies x noise presets, mean and spread.

Reads every run directory under the given paths (a run directory holds config.yaml and
summary.json, so a sweep directory works as a whole), groups completed runs by two config keys
(dotted paths into config.yaml) and reports the mean, the sample standard deviation and the number
of runs of a final global metric in each cell: the runs of a cell differ only in what is not a
row or column key, typically the seed. Writes report.md and report.csv.
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


def lookup(config: dict[str, Any], dotted: str) -> str:
    """The value at a dotted config path as a label; a null group (noise: null) reads 'per-site'."""
    value: Any = config
    for part in dotted.split("."):
        if value is None:
            return "per-site"
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return "per-site" if value is None else str(value)


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


def write_report(table: Table, out_dir: Path, score: Score | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(
        md,
        f"Final global {table.metric} (clean test set drawn from every site): mean ± sample "
        f"standard deviation (number of runs).\n\n" + table.markdown()
        + ("\n" + score.markdown() if score is not None else ""),
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
