"""Rank rows as SNOW ranked: a paired Wilcoxon score, and the Friedman test with the Nemenyi
post-hoc and its critical-difference diagram."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snowfed.report.runs import MISSING, Run, lookup


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
    from snowfed.report.plots import plot_critical_difference

    plot_critical_difference(ranking.mean_ranks, ranking.nemenyi_p, out_dir / CD_PLOT,
                             ranking.critical_difference, ranking.alpha,
                             f"mean rank of final {metric} over {ranking.blocks} blocks (1 = best)\n"
                             f"bars: not told apart by Nemenyi at {ranking.alpha}; Friedman "
                             f"p = {ranking.friedman_p:.2g}")
    return lines + [f"Mean ranks over {ranking.blocks} blocks; rows joined by a bar are not told "
                    f"apart by the Nemenyi post-hoc at alpha {ranking.alpha}:", "",
                    f"![critical difference]({CD_PLOT})", ""]


# --- plots: the data behind metric_per_round.png, metric_vs_noise.png, quality_quantity.png ---
