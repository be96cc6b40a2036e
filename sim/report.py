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

from snowfed.diagnostics import STABLE_RANGE, UNDECIDED_MARGIN, UNDECIDED_SHARE, diagnose, is_undecided
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


def _known_keys(config: Any, dotted: str) -> tuple[str, list[str]]:
    """The deepest prefix of `dotted` that exists in `config`, and the keys found there."""
    value, found = config, []
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value, found = value[part], [*found, part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value, found = value[int(part)], [*found, part]
        else:
            break
    keys = list(value) if isinstance(value, dict) else [str(i) for i in range(len(value))] \
        if isinstance(value, list) else []
    return ".".join(found), keys


def check_report_keys(runs: list[Run], keys: dict[str, str], metric: str) -> None:
    """Refuse, in one line, what the runs lack: no run at all, a config key (by its flag) that no
    run's config.yaml has, or a global metric that no completed run records."""
    if not runs:
        raise ValueError("no run directory (config.yaml and summary.json) under the given paths")
    for flag, key in keys.items():
        if all(_value(run.config, key) is _ABSENT for run in runs):
            prefix, known = _known_keys(runs[0].config, key)
            where = f"keys under {prefix}" if prefix else "top-level keys"
            raise ValueError(f"{flag} {key}: no run's config.yaml has this key; the {where} are "
                             f"{', '.join(map(str, known))}")
    completed = [run for run in runs if run.status == "completed"]
    if not any(metric in run.summary.get("global", {}) for run in completed):
        recorded = sorted({k for run in completed for k in run.summary.get("global", {})})
        raise ValueError(f"--metric {metric}: no completed run ({len(completed)} of {len(runs)} "
                         f"found) records this global metric"
                         + (f"; they record {', '.join(recorded)}" if recorded else ""))


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


def run_diagnostics(run: Run) -> dict[str, Any]:
    """The run's summary.json `diagnostics`, or, for a summary written before they existed,
    the same judged from its `history` (snowfed.diagnostics)."""
    found = run.summary.get("diagnostics")
    return found if isinstance(found, dict) else diagnose(run.summary.get("history") or [])


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


def paired_values(runs: list[Run], row_key: str, col_key: str, metric: str = "f1"
                  ) -> dict[str, dict[tuple[str, str], float]]:
    """{row: {(column, seed): final metric}} of the completed runs: the runs of two rows pair up
    when they share the column value and the seed."""
    values: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for run in runs:
        value = run.summary.get("global", {}).get(metric)
        if run.status == "completed" and value is not None:
            key = (lookup(run.config, col_key), lookup(run.config, "seed"))
            values[lookup(run.config, row_key)][key] = float(value)
    return values


def pairwise_score(
    runs: list[Run], row_key: str, col_key: str, metric: str = "f1", alpha: float = 0.05
) -> Score:
    from scipy.stats import wilcoxon

    values = paired_values(runs, row_key, col_key, metric)
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


@dataclass(frozen=True)
class Ranking:
    """SNOW's ranking: the Friedman test over the rows (e.g. strategies) with the Nemenyi
    post-hoc (scikit-posthocs), over blocks of paired runs (a column value and a seed) in which
    every row has a run. Ranks are within a block, 1 = the best metric, ties sharing their mean.
    `columns` holds the same within each column alone (its blocks are the seeds)."""

    rows: list[str]
    mean_ranks: dict[str, float]
    blocks: int
    friedman_p: float | None  # None: fewer than 3 rows or 2 blocks, or every block tied
    nemenyi_p: dict[tuple[str, str], float]  # post-hoc p of each pair of rows
    critical_difference: float | None  # Nemenyi's CD on the mean ranks at alpha
    alpha: float
    columns: dict[str, tuple[dict[str, float], int, float | None]]  # col -> (ranks, blocks, p)

    def significant(self) -> list[tuple[str, str, float]]:
        """(better, worse, p) for each pair the post-hoc tells apart, when Friedman does."""
        if self.friedman_p is None or self.friedman_p >= self.alpha:
            return []
        found = []
        for (a, b), p in self.nemenyi_p.items():
            if p < self.alpha:
                better, worse = (a, b) if self.mean_ranks[a] < self.mean_ranks[b] else (b, a)
                found.append((better, worse, p))
        return sorted(found, key=lambda t: (self.mean_ranks[t[0]], self.mean_ranks[t[1]]))

    def markdown(self) -> str:
        def p_text(p: float | None) -> str:
            return "n/a" if p is None else f"{p:.2g}"

        order = sorted(self.rows, key=lambda r: self.mean_ranks[r])
        cols = list(self.columns)
        lines = [f"Friedman test with the Nemenyi post-hoc (blocks: a column value and a seed in "
                 f"which every row has a run; rank 1 = best): {self.blocks} blocks, Friedman "
                 f"p = {p_text(self.friedman_p)}"
                 + (f", Nemenyi critical difference {self.critical_difference:.2f} at alpha "
                    f"{self.alpha}" if self.critical_difference is not None else "") + ".", "",
                 "| row | mean rank | " + " | ".join(f"{c} ({self.columns[c][1]})" for c in cols) + " |",
                 "|---|---|" + "---|" * len(cols)]
        for r in order:
            per_col = [self.columns[c][0].get(r) for c in cols]
            lines.append(f"| {r} | {self.mean_ranks[r]:.2f} | "
                         + " | ".join(MISSING if v is None else f"{v:.2f}" for v in per_col) + " |")
        lines.append("| Friedman p | " + p_text(self.friedman_p) + " | "
                     + " | ".join(p_text(self.columns[c][2]) for c in cols) + " |")
        pairs = self.significant()
        lines += ["", "Pairs the Nemenyi post-hoc tells apart (p < " + f"{self.alpha}): "
                  + ("; ".join(f"{a} over {b} (p {p:.2g})" for a, b, p in pairs) if pairs else "none")
                  + "."]
        return "\n".join(lines) + "\n"


def _friedman(matrix, alpha: float) -> tuple[float | None, Any]:
    """Friedman's p and Nemenyi's p-value matrix of a (blocks x rows) matrix; (None, None) when
    the test does not apply (fewer than 3 rows or 2 blocks, or every block tied)."""
    import numpy as np
    import scikit_posthocs
    from scipy.stats import friedmanchisquare

    if matrix.shape[1] < 3 or matrix.shape[0] < 2 or np.all(matrix == matrix[:, :1]):
        return None, None
    p = float(friedmanchisquare(*matrix.T).pvalue)
    return p, scikit_posthocs.posthoc_nemenyi_friedman(matrix).to_numpy()


def friedman_ranking(runs: list[Run], row_key: str, col_key: str, metric: str = "f1",
                     alpha: float = 0.05, row_order: list[str] | None = None,
                     col_order: list[str] | None = None) -> Ranking:
    import numpy as np
    from scipy.stats import rankdata, studentized_range

    values = paired_values(runs, row_key, col_key, metric)
    rows = [r for r in (row_order or []) if r in values] + [r for r in values if r not in (row_order or [])]
    complete = sorted(set.intersection(*(set(values[r]) for r in rows))) if rows else []

    def ranked(blocks):
        matrix = np.array([[values[r][b] for r in rows] for b in blocks], dtype=float)
        ranks = rankdata(-matrix, axis=1).mean(axis=0) if len(blocks) else [math.nan] * len(rows)
        return matrix, dict(zip(rows, map(float, ranks)))

    matrix, mean_ranks = ranked(complete)
    friedman_p, nemenyi = _friedman(matrix, alpha) if len(complete) else (None, None)
    k, n = len(rows), len(complete)
    cd = (float(studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2) * math.sqrt(k * (k + 1) / (6 * n)))
          if k >= 2 and n else None)
    pairs = ({(rows[i], rows[j]): float(nemenyi[i, j]) for i in range(k) for j in range(i + 1, k)}
             if nemenyi is not None else {})
    columns = {}
    present = list(dict.fromkeys(b[0] for b in complete))
    ordered = [c for c in (col_order or []) if c in present]
    for col in ordered + [c for c in present if c not in ordered]:
        blocks = [b for b in complete if b[0] == col]
        col_matrix, col_ranks = ranked(blocks)
        columns[col] = (col_ranks, len(blocks), _friedman(col_matrix, alpha)[0])
    return Ranking(rows, mean_ranks, n, friedman_p, pairs, cd, alpha, columns)


CD_PLOT = "critical_difference.png"


def write_ranking(ranking: Ranking, out_dir: Path, metric: str) -> list[str]:
    """Draw the critical-difference diagram of `ranking` into `out_dir` when the Friedman test
    applies; report.md's lines about it (the image, or why it was not drawn)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["## Critical-difference diagram", ""]
    if ranking.friedman_p is None:
        return lines + [f"{CD_PLOT} not drawn: the Friedman test needs 3 rows or more and 2 "
                        f"blocks in which every row has a run ({len(ranking.rows)} rows, "
                        f"{ranking.blocks} blocks).", ""]
    from snowfed.plots import plot_critical_difference

    plot_critical_difference(ranking.mean_ranks, ranking.nemenyi_p, out_dir / CD_PLOT,
                             ranking.critical_difference, ranking.alpha,
                             f"mean rank of final {metric} over {ranking.blocks} blocks (1 = best)\n"
                             f"bars: not told apart by Nemenyi at {ranking.alpha}; Friedman "
                             f"p = {ranking.friedman_p:.2g}")
    return lines + [f"Mean ranks over {ranking.blocks} blocks; rows joined by a bar are not told "
                    f"apart by the Nemenyi post-hoc at alpha {ranking.alpha}:", "",
                    f"![critical difference]({CD_PLOT})", ""]


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
