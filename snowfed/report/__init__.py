"""`snowfed report`: a table of finished runs, e.g. strategies x noise presets, mean and spread.

Reads every run directory under the given paths (a run directory holds config.yaml and
summary.json, so a sweep directory works as a whole), groups completed runs by two config keys
(dotted paths into config.yaml) and reports the mean, the sample standard deviation and the number
of runs of a final global metric in each cell: the runs of a cell differ only in what is not a
row or column key, typically the seed. Writes report.md and report.csv, and three plots next to
them (data prepared here, drawn by snowfed.report.plots):

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

Modules: `runs` (run directories read back), `tables` (the table), `ranking` (Wilcoxon,
Friedman/Nemenyi), `figures` (the plots' data) and `plots` (every figure snowfed draws).
"""

from snowfed.report.figures import PLOTS, write_plots
from snowfed.report.ranking import friedman_ranking, pairwise_score, write_ranking
from snowfed.report.runs import check_report_keys, find_runs
from snowfed.report.tables import Cell, build_table, privacy_utility, write_report

__all__ = ["PLOTS", "Cell", "build_table", "check_report_keys", "find_runs", "friedman_ranking",
           "pairwise_score", "privacy_utility", "write_plots", "write_ranking", "write_report"]
