"""The report's table: one cell per (row, column) of config values, mean, spread and the
runs' diagnostics; and privacy against utility."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from snowfed.diagnostics import STABLE_RANGE, UNDECIDED_MARGIN, UNDECIDED_SHARE, is_undecided
from snowfed.report.ranking import Ranking, Score
from snowfed.report.runs import MISSING, Run, lookup, run_diagnostics
from snowfed.rundir import atomic_write_text


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]
    degenerate: int = 0  # runs whose final model predicts (almost) one class
    unsettled: int = 0  # runs whose metric still moved over their last rounds
    undecided: int = 0  # of the unsettled runs, those whose model is undecided (diagnostics)

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
        marks = (f" D{self.degenerate}" if self.degenerate else "") + (
            f" U{self.unsettled}" if self.unsettled else "") + (
            f" (u{self.undecided})" if self.undecided else "")
        return f"{self.mean:.3f}{spread} ({len(self.values)}){marks}"


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
        return "\n".join(lines) + "\n" + self.convergence() + "\n"

    def convergence(self) -> str:
        """How many runs, in how many cells, did not give an answer (snowfed.diagnostics)."""
        cells = [c for c in self.cells.values() if c.values]
        runs = sum(len(c.values) for c in cells)
        degenerate, unsettled, undecided = (sum(getattr(c, k) for c in cells)
                                            for k in ("degenerate", "unsettled", "undecided"))
        if not degenerate and not unsettled:
            return (f"\nEvery one of the {runs} runs learned and settled: no final model predicts "
                    f"(almost) one class, and every global F1 moved by at most {STABLE_RANGE} "
                    "over its last rounds.\n")
        return (f"\nD n: n runs of the cell are degenerate (the final model predicts (almost) one "
                f"class): {degenerate} of {runs} runs, in "
                f"{sum(1 for c in cells if c.degenerate)} cells. U n: n runs did not settle (their "
                f"global F1 moved by more than {STABLE_RANGE} over their last rounds): "
                f"{unsettled} of {runs} runs, in {sum(1 for c in cells if c.unsettled)} cells. "
                f"(u n): n of them are undecided, their final model has p(foreground) within "
                f"{UNDECIDED_MARGIN} of 0.5 on at least {UNDECIDED_SHARE:.0%} of the foreground "
                f"pixels, so small updates flip its F1 (more rounds do not settle it): "
                f"{undecided} of the {unsettled}."
                + (" The other unsettled runs report optimisation as much as label quality."
                   if unsettled > undecided else "") + "\n")

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([self.row_key, self.col_key, f"{self.metric}_mean", f"{self.metric}_std", "runs",
                         "degenerate", "unsettled", "undecided"])
        for r in self.rows:
            for c in self.cols:
                cell = self.cells[r, c]
                if cell.values:
                    writer.writerow([r, c, f"{cell.mean:.6f}", f"{cell.spread:.6f}", len(cell.values),
                                     cell.degenerate, cell.unsettled, cell.undecided])
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
    flags: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
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
        diagnostics = run_diagnostics(run)
        flags[r, c][0] += diagnostics.get("degenerate") is True
        flags[r, c][1] += diagnostics.get("stable") is False
        flags[r, c][2] += is_undecided(diagnostics)
    cells = {(r, c): Cell(tuple(grouped.get((r, c), ())), *flags.get((r, c), (0, 0, 0)))
             for r in rows for c in cols}
    return Table(rows, cols, cells, row_key, col_key, metric, skipped)


def write_report(
    table: Table, out_dir: Path, score: Score | None = None, plots: list[str] | None = None,
    ranking: Ranking | None = None,
) -> tuple[Path, Path]:
    """report.md (the table, the Friedman/Nemenyi ranking, the Wilcoxon score, then `plots`:
    markdown lines from `write_ranking` and `write_plots`) and report.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(
        md,
        f"Final global {table.metric} (clean test set drawn from every site): mean ± sample "
        f"standard deviation (number of runs).\n\n" + table.markdown()
        + ("\n" + ranking.markdown() if ranking is not None else "")
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
    """(series, reference) for report.plots.plot_metric_against_epsilon: the completed private runs'
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
