"""`snowfed report`'s work once its runs and keys are checked: every file written, and the
tables printed."""

from __future__ import annotations

from pathlib import Path

from snowfed.report.figures import write_plots
from snowfed.report.plots import plot_metric_against_epsilon
from snowfed.report.ranking import friedman_ranking, pairwise_score, write_ranking
from snowfed.report.runs import Run
from snowfed.report.tables import Cell, build_table, privacy_utility, write_report


def write_reports(runs: list[Run], rows: str, cols: str, metric: str, row_order: list[str],
                  col_order: list[str], out: Path, noise_key: str | None,
                  privacy_plot: str | None) -> None:
    """report.md, report.csv, the ranking and the plots of `runs` in `out`; printed as well."""
    table = build_table(runs, rows, cols, metric, row_order, col_order)
    score = pairwise_score(runs, rows, cols, metric)
    ranking = friedman_ranking(runs, rows, cols, metric, row_order=row_order,
                               col_order=col_order)
    plots = write_ranking(ranking, out, metric) + write_plots(runs, table, out, noise_key)
    md, csv_path = write_report(table, out, score, plots, ranking)
    if privacy_plot:
        _privacy_utility(runs, privacy_plot, metric, out)
    print(table.markdown(), end="")
    print(ranking.markdown(), end="")
    print(score.markdown(), end="")
    for line in plots:  # report.md's plot sections: a caption and image, or why not drawn
        if line.startswith("#"):
            continue
        if line.startswith("!["):
            print(f"  wrote {out / line[line.index('](') + 2 : -1]}")
        elif line:
            print(line)
    print(f"{sum(len(c.values) for c in table.cells.values())} runs ({table.skipped} not completed "
          f"skipped); wrote {md} and {csv_path}")


def _privacy_utility(runs: list[Run], privacy_plot: str, metric: str, out: Path) -> None:
    """privacy_utility.png: the metric against the epsilon spent, a series per `privacy_plot`."""
    series, reference = privacy_utility(runs, privacy_plot, metric)
    plot_metric_against_epsilon(series, out / "privacy_utility.png", metric, reference)
    for label, points in [*series.items(), ("no privacy", [(0.0, v) for v in reference])]:
        eps, values = Cell(tuple(p[0] for p in points)), Cell(tuple(p[1] for p in points))
        print(f"{label}: epsilon {eps.mean:.2f}, {metric} {values.text()} "
              f"[{', '.join(f'{v:.3f}' for v in values.values)}]")
    print(f"wrote {out / 'privacy_utility.png'}")
