"""`snowfed report` on run directories laid out as snowfed writes them (config.yaml +
summary.json), and the resumable sweep (slow: real runs through Ray)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snowfed.cli import main
from snowfed.report import PLOTS, build_table, find_runs, friedman_ranking


def _run(path, strategy, noise, seed, f1, status="completed"):
    path.mkdir(parents=True)
    config = {"strategy": {"name": strategy}, "noise": None if noise is None else {"name": noise},
              "seed": seed}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "summary.json").write_text(json.dumps({"status": status, "global": {"f1": f1}}))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, (a, b) in enumerate([(0.8, 0.2), (0.9, 0.4), (0.7, 0.3)]):
        _run(root / f"base-clean-{seed}", "baseline", "clean", seed, a)
        _run(root / f"base-noisy-{seed}", "baseline", "noisy", seed, b)
    _run(root / "pos-noisy-0", "only_positive", "noisy", 0, 0.75)
    _run(root / "pos-noisy-1", "only_positive", "noisy", 1, 0.1, status="failed")
    _run(root / "nested" / "pos-site", "only_positive", None, 0, 0.5)
    return root


def test_cells_hold_mean_and_sample_spread_of_completed_runs(sweep):
    table = build_table(find_runs([sweep]))
    assert table.rows == ["baseline", "only_positive"]
    assert set(table.cols) == {"clean", "noisy", "per-site"}
    clean = table.cells["baseline", "clean"]
    assert sorted(clean.values) == [0.7, 0.8, 0.9]
    assert clean.mean == pytest.approx(0.8) and clean.spread == pytest.approx(0.1)
    assert table.cells["only_positive", "noisy"].values == (0.75,)  # the failed run is left out
    assert table.cells["only_positive", "clean"].text() == "-"
    assert table.skipped == 1


def test_report_command_writes_markdown_and_csv(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", str(sweep), "--out", str(out), "--col-order", "clean,noisy,per-site"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| baseline | 0.800 ± 0.100 (3) | 0.300 ± 0.100 (3) | - |" in printed
    table_md, rest = (out / "report.md").read_text().split("Friedman test with", 1)
    ranking_md, score_md = rest.split("Pairwise Wilcoxon")
    assert table_md.count("| only_positive |") == 1 and "| only_positive |" in score_md
    assert "| only_positive | 1.00 |" in ranking_md  # the better of the one complete block
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {(r["strategy.name"], r["noise.name"]) for r in rows} == {
        ("baseline", "clean"), ("baseline", "noisy"), ("only_positive", "noisy"),
        ("only_positive", "per-site")}


def test_report_of_nothing_fails(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) != 0
    assert "no such run or sweep directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) != 0


@pytest.mark.slow
def test_a_sweep_started_again_runs_only_what_is_missing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    name = "federation=smoke,rounds=1,seed={}"
    unfinished = sweep_dir / name.format(1)
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text('{"round": 0, "scope": "global", "f1": 0.1}\n')
    cmd = [sys.executable, "-m", "snowfed.cli", "run", "-m", "federation=smoke", "rounds=1",
           "seed=0,1", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "unfinished run moved to" in first.stderr
    assert "2 runs of 2 sites in one Flower simulation" in first.stderr  # Ray starts once
    assert "sweep 1/2 |" in first.stderr and "sweep 2/2 |" in first.stderr  # progress, with ETA
    assert "m left" in first.stderr
    moved = [p for p in sweep_dir.iterdir() if p.name.startswith(name.format(1) + ".unfinished-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").exists()  # kept, not deleted
    for seed in (0, 1):
        summary = json.loads((sweep_dir / name.format(seed) / "summary.json").read_text())
        assert summary["status"] == "completed"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped (done already)") == 2
    assert "Flower simulation" not in again.stderr  # nothing left to run: Ray never starts


def test_privacy_plot_puts_each_noise_level_at_its_epsilon(tmp_path, capsys):
    root = tmp_path / "dp"
    for sigma, eps, f1s in ((0.5, 20.0, (0.7, 0.8)), (2.0, 1.5, (0.2, 0.4))):
        for seed, f1 in enumerate(f1s):
            path = root / f"s{sigma}-{seed}"
            path.mkdir(parents=True)
            (path / "config.yaml").write_text(yaml.safe_dump(
                {"privacy": {"name": "dp_sgd", "noise_multiplier": sigma}, "seed": seed}))
            (path / "summary.json").write_text(json.dumps({
                "status": "completed", "global": {"f1": f1},
                "privacy": {"a": {"epsilon": eps}, "b": {"epsilon": eps / 2}}}))
    plain = root / "none-0"
    plain.mkdir()
    (plain / "config.yaml").write_text(yaml.safe_dump({"privacy": {"name": "none"}, "seed": 0}))
    (plain / "summary.json").write_text(json.dumps({"status": "completed", "global": {"f1": 0.9}}))
    code = main(["report", str(root), "--rows", "privacy.noise_multiplier", "--cols", "privacy.name",
                 "--privacy-plot", "privacy.noise_multiplier"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dp_sgd noise_multiplier=0.5: epsilon 20.00, f1 0.750 ± 0.071 (2) [0.700, 0.800]" in out
    assert "dp_sgd noise_multiplier=2.0: epsilon 1.50, f1 0.300 ± 0.141 (2)" in out
    assert "no privacy: epsilon 0.00, f1 0.900 (1)" in out
    assert (root / "privacy_utility.png").stat().st_size > 5000


def test_pairwise_wilcoxon_score_counts_significant_wins_over_paired_runs(tmp_path):
    from snowfed.report.ranking import pairwise_score

    root = tmp_path / "score"
    rng = __import__("random").Random(0)
    for noise in ("clean", "noisy"):
        for seed in range(4):
            base = rng.uniform(0.2, 0.6)
            for strategy, delta in (("good", 0.2), ("baseline", 0.0), ("same", 0.0)):
                _run(root / f"{strategy}-{noise}-{seed}", strategy, noise, seed,
                     base + delta + (0.001 * seed if strategy == "same" else 0.0))
    _run(root / "good-bb-0", "good", "bb", 0, 0.9)  # no partner run: not paired
    score = pairwise_score(find_runs([root]), "strategy.name", "noise.name")

    assert score.pairs.get(("good", "baseline"), score.pairs.get(("baseline", "good"))) == 8
    assert (score.wins["good"], score.losses["good"]) == (2, 0)  # beats baseline and same
    assert (score.wins["baseline"], score.losses["baseline"]) == (0, 2)
    # 0.001 x seed above baseline: 6 non-tied pairs, all positive, p = 1/32 < 0.05
    assert (score.wins["same"], score.losses["same"]) == (1, 1)
    assert "| good | 2 | 0 | 2 |" in score.markdown()


# --- the plots: metric per round, metric against noise, quality against quantity ---


def _seg_node(num_train, precision, recall):
    return {"num_train": num_train, "label_noise": {"pixel_precision": precision, "pixel_recall": recall}}


def _full_run(path, strategy, noise, seed, history, nodes, status="completed", config=None):
    """A run directory as snowfed writes it: the final metric is the last round's."""
    path.mkdir(parents=True)
    cfg = {"strategy": {"name": strategy}, "noise": {"name": noise}, "seed": seed, **(config or {})}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"status": status, "global": {"f1": history[-1]},
               "history": [{"round": r, "f1": v} for r, v in enumerate(history)], "nodes": nodes}
    (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def seg_sweep(tmp_path):
    """2 strategies x 2 noise presets x 3 seeds; in 'noisy' a site keeps half its objects (label
    F1 2/3 at seed 0, varying with the seed), the other site stays clean."""
    root = tmp_path / "seg"
    for seed in range(3):
        recall = 0.5 + 0.1 * seed  # measured on the noisy site
        for strategy, gain in (("baseline", 0.0), ("only_positive", 0.3)):
            _full_run(root / f"{strategy}-clean-{seed}", strategy, "clean", seed,
                      [0.2, 0.5 + 0.1 * seed, 0.8 + 0.05 * seed],
                      {"a": _seg_node(12, 1.0, 1.0), "b": _seg_node(12, 1.0, 1.0)})
            _full_run(root / f"{strategy}-noisy-{seed}", strategy, "noisy", seed,
                      [0.2, 0.3, 0.2 + gain + 0.05 * seed],
                      {"a": _seg_node(12, 1.0, 1.0), "b": _seg_node(12, 1.0, recall)})
    _full_run(root / "failed", "baseline", "noisy", 9, [0.2, 0.0],
              {"a": _seg_node(12, 1.0, 1.0)}, status="failed")
    return root


def test_metric_per_round_is_the_mean_min_and_max_over_a_cells_runs(seg_sweep, tmp_path):
    from snowfed.report.figures import metric_per_round

    _full_run(tmp_path / "short" / "r", "baseline", "clean", 7, [0.5], {})  # one round only
    curves = metric_per_round(find_runs([seg_sweep, tmp_path / "short"]), "strategy.name", "noise.name")
    assert set(curves) == {(s, n) for s in ("baseline", "only_positive") for n in ("clean", "noisy")}
    clean = curves["baseline", "clean"]
    assert clean.rounds == (0, 1, 2) and clean.runs == (4, 3, 3)  # the short run has round 0
    assert clean.mean[0] == pytest.approx((0.2 * 3 + 0.5) / 4)
    assert clean.mean[1:] == pytest.approx((0.6, 0.85))
    assert (clean.low[2], clean.high[2]) == pytest.approx((0.8, 0.9))
    noisy = curves["baseline", "noisy"]  # the failed run (final 0.0, 4 runs) is left out
    assert noisy.runs == (3, 3, 3) and noisy.low[2] == pytest.approx(0.2)


def test_label_quality_is_the_label_f1_or_one_minus_flip_rate_weighted_by_num_train():
    from snowfed.report.figures import label_quality, noise_level, num_annotated, site_label_quality
    from snowfed.report.runs import Run

    # the keys of a real segmentation summary node
    seg = {"num_train": 9, "label_noise": {"objects": 49, "objects_removed": 0.49,
                                           "pixel_precision": 1.0, "pixel_recall": 0.5}}
    assert site_label_quality(seg) == pytest.approx(2 / 3)
    assert site_label_quality({"label_noise": {"pixel_precision": 0.0, "pixel_recall": 0.0}}) == 0.0
    assert site_label_quality({"num_train": 3}) is None
    # ... and of a classification one
    cls = {"num_train": 10, "label_noise": {"flip_rate": 0.4, "num_labels": 10, "configured_rate": 0.4}}
    assert site_label_quality(cls) == pytest.approx(0.6)

    run = Run(Path("r"), "completed", {}, {"nodes": {"a": {**cls, "num_train": 30,
                                                           "label_noise": {"flip_rate": 0.0}},
                                                     "b": cls}})
    assert label_quality(run) == pytest.approx((30 * 1.0 + 10 * 0.6) / 40)
    assert noise_level(run) == pytest.approx(0.1)
    assert num_annotated(run) == 40
    unknown = Run(Path("r"), "completed", {}, {"nodes": {"a": cls, "b": {"num_train": 5}}})
    assert label_quality(unknown) is None and noise_level(unknown) is None
    assert num_annotated(Run(Path("r"), "completed", {}, {})) is None


def test_noise_key_reads_a_numeric_config_value_lists_included():
    from snowfed.report.figures import noise_level
    from snowfed.report.runs import Run, lookup

    config = {"noise": {"name": "noisy", "p_remove": 0.5},
              "federation": {"hospitals": [{"noise": {"rate": 0.0}}, {"noise": {"rate": 0.2}},
                                           {"noise": "noisy"}]}}
    run = Run(Path("r"), "completed", config, {})
    assert noise_level(run, "noise.p_remove") == 0.5
    assert noise_level(run, "federation.hospitals.1.noise.rate") == 0.2
    assert lookup(config, "federation.hospitals.1.noise.rate") == "0.2"
    for key in ("federation.hospitals.2.noise", "federation.hospitals.5.noise.rate", "noise.name",
                "noise.missing"):
        assert noise_level(run, key) is None, key
    assert noise_level(Run(Path("r"), "completed", {"noise": None}, {}), "noise.p_remove") is None


def test_metric_vs_noise_puts_each_cell_at_its_measured_noise_level(seg_sweep):
    from snowfed.report.figures import metric_vs_noise

    series, missing = metric_vs_noise(find_runs([seg_sweep]), "strategy.name", "noise.name")
    assert missing == 0 and list(series) == ["baseline", "only_positive"]
    clean, noisy = series["only_positive"]  # sorted by level
    assert (clean.label, clean.level, clean.level_sd) == ("clean", 0.0, 0.0)
    assert clean.mean == pytest.approx(0.85) and clean.sd == pytest.approx(0.05)
    # site b's label F1 at recall 0.5, 0.6, 0.7; the run's quality is the mean with site a's 1
    levels = [1 - (1 + 2 * r / (1 + r)) / 2 for r in (0.5, 0.6, 0.7)]
    assert noisy.label == "noisy" and noisy.level == pytest.approx(sum(levels) / 3)
    assert sorted(noisy.values) == pytest.approx([0.5, 0.55, 0.6])
    assert series["baseline"][1].mean == pytest.approx(0.25)


def test_metric_vs_noise_with_a_noise_key_groups_runs_by_its_value(tmp_path):
    from snowfed.report.figures import metric_vs_noise

    root = tmp_path / "cls"
    for seed in range(2):
        for rate, f1 in ((0.0, 0.9), (0.2, 0.7), (0.4, 0.5)):
            hospitals = [{"noise": {"rate": 0.0}}, {"noise": {"rate": rate}}]
            _full_run(root / f"gce-{rate}-{seed}", "gce", "symmetric", seed, [0.1, f1 + 0.01 * seed],
                      {}, config={"federation": {"hospitals": hospitals}})
    _full_run(root / "other", "gce", "symmetric", 0, [0.1, 0.3], {})  # no such key: left out
    series, missing = metric_vs_noise(find_runs([root]), "strategy.name", "noise.name",
                                      noise_key="federation.hospitals.1.noise.rate")
    assert missing == 1
    assert [(p.level, len(p.values)) for p in series["gce"]] == [(0.0, 2), (0.2, 2), (0.4, 2)]
    assert [p.mean for p in series["gce"]] == pytest.approx([0.905, 0.705, 0.505])


def test_quality_quantity_has_one_point_per_completed_run_with_sizes_and_label_noise(tmp_path):
    from snowfed.report.figures import quality_quantity

    root = tmp_path / "map"
    _full_run(root / "small-clean", "baseline", "clean", 0, [0.1, 0.8], {"a": _seg_node(10, 1.0, 1.0)})
    _full_run(root / "big-noisy", "baseline", "noisy", 0, [0.1, 0.7],
              {"a": _seg_node(30, 1.0, 0.5), "b": _seg_node(10, 1.0, 1.0)})
    _full_run(root / "no-nodes", "baseline", "noisy", 1, [0.1, 0.6], {})
    _full_run(root / "failed", "baseline", "noisy", 2, [0.1, 0.6], {"a": _seg_node(10, 1, 1)},
              status="failed")
    points, missing = quality_quantity(find_runs([root]), "strategy.name", "noise.name")
    assert missing == 1
    by_name = {p.path.name: p for p in points}
    assert set(by_name) == {"small-clean", "big-noisy"}
    big = by_name["big-noisy"]
    assert (big.samples, big.row, big.col, big.value) == (40, "baseline", "noisy", 0.7)
    assert big.quality == pytest.approx((30 * 2 / 3 + 10 * 1.0) / 40)
    assert (by_name["small-clean"].samples, by_name["small-clean"].quality) == (10, 1.0)


def test_report_command_writes_the_three_plots(seg_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(seg_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for name in ("metric_per_round.png", "metric_vs_noise.png", "quality_quantity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert (out / name).stat().st_size > 20_000, name
        assert f"]({name})" in report and f"wrote {out / name}" in printed
    assert all(f"{name} not drawn" not in report for name in PLOTS)
    assert "All runs have 24 annotated training samples" in report  # the map's one quantity


def test_plots_the_data_cannot_make_are_reported_not_crashed(sweep, tmp_path, capsys):
    """The `sweep` runs have no history, no sites and a single noise level per key."""
    out = tmp_path / "out"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "metric_per_round.png not drawn: no completed run has a `history`" in report
    assert "metric_vs_noise.png not drawn: the runs have no noise level" in report
    assert "quality_quantity.png not drawn: no completed run" in report
    assert "not drawn" in capsys.readouterr().out
    assert not list(out.glob("*.png"))
    assert main(["report", str(sweep), "--out", str(out), "--noise-key", "strategy.name"]) == 0
    assert "not drawn: the runs have no noise level (config key strategy.name); 8 completed runs " \
        "without a noise level left out" in (out / "report.md").read_text()
    one = tmp_path / "one-level"  # a numeric key with a single value
    for seed in range(2):
        _full_run(one / f"r{seed}", "baseline", "noisy", seed, [0.1, 0.5], {},
                  config={"noise": {"name": "noisy", "p_remove": 0.5}})
    assert main(["report", str(one), "--noise-key", "noise.p_remove"]) == 0
    assert "metric_vs_noise.png not drawn: the runs have a single noise level (0.50) (config key " \
        "noise.p_remove)." in (one / "report.md").read_text()
    assert (one / "metric_per_round.png").exists() and not (one / "metric_vs_noise.png").exists()


def _ranked_run(path, strategy, noise, seed, f1, history=None):
    _run(path, strategy, noise, seed, f1)
    if history is not None:
        summary = json.loads((path / "summary.json").read_text())
        summary["history"] = history
        (path / "summary.json").write_text(json.dumps(summary))


def _seg_round(rnd, f1, predicted_fg):
    total, positives = 1000, 200
    predicted = int(predicted_fg * total)
    tp = min(positives, predicted)
    return {"round": rnd, "f1": f1, "tp": tp, "fp": predicted - tp, "fn": positives - tp,
            "tn": total - positives - predicted + tp}


@pytest.fixture
def ranked_sweep(tmp_path):
    """Three strategies over two noise presets x 4 seeds: best > middle > worst in every block
    but one, where middle and worst swap."""
    root = tmp_path / "ranked"
    for noise in ("noisy", "noisy_hd"):
        for seed in range(4):
            swap = noise == "noisy_hd" and seed == 3
            for name, f1 in (("best", 0.9), ("middle", 0.5 if not swap else 0.3),
                             ("worst", 0.3 if not swap else 0.5)):
                _ranked_run(root / f"{name}-{noise}-{seed}", name, noise, seed, f1 + seed / 100)
    return root


def test_friedman_nemenyi_ranks_rows_over_blocks_of_column_and_seed(ranked_sweep):
    ranking = friedman_ranking(find_runs([ranked_sweep]), "strategy.name", "noise.name",
                               col_order=["noisy_hd", "noisy"])
    assert ranking.blocks == 8
    assert ranking.mean_ranks == {"best": 1.0, "middle": pytest.approx(2 + 1 / 8),
                                  "worst": pytest.approx(3 - 1 / 8)}
    assert ranking.friedman_p < 0.01
    assert [(a, b) for a, b, _ in ranking.significant()] == [("best", "worst")]
    assert list(ranking.columns) == ["noisy_hd", "noisy"]
    ranks, blocks, p = ranking.columns["noisy"]
    assert (ranks, blocks) == ({"best": 1.0, "middle": 2.0, "worst": 3.0}, 4)
    # Demsar's CD for k = 3 rows over N = 8 blocks at alpha 0.05: 2.343 * sqrt(3 * 4 / 48)
    assert ranking.critical_difference == pytest.approx(2.3437 * (12 / 48) ** 0.5, rel=1e-3)


def test_report_writes_the_ranking_and_the_critical_difference_diagram(ranked_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(ranked_sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| best | 1.00 | 1.00 | 1.00 |" in report
    assert "Pairs the Nemenyi post-hoc tells apart (p < 0.05): best over worst" in report
    assert (out / "critical_difference.png").read_bytes()[:4] == b"\x89PNG"
    assert "](critical_difference.png)" in report
    assert f"wrote {out / 'critical_difference.png'}" in capsys.readouterr().out


def test_cells_count_degenerate_and_unsettled_runs(tmp_path):
    root = tmp_path / "marks"
    collapsed = [_seg_round(0, 0.3, 0.5), _seg_round(1, 0.0, 0.0), _seg_round(2, 0.0, 0.0)]
    swinging = [_seg_round(0, 0.3, 0.5), _seg_round(1, 0.9, 0.2), _seg_round(2, 0.5, 0.1)]
    settled = [_seg_round(0, 0.3, 0.5), _seg_round(1, 0.88, 0.2), _seg_round(2, 0.9, 0.2)]
    _ranked_run(root / "a", "baseline", "noisy", 0, 0.0, collapsed)
    _ranked_run(root / "b", "baseline", "noisy", 1, 0.5, swinging)
    _ranked_run(root / "c", "baseline", "noisy", 2, 0.9, settled)
    _ranked_run(root / "d", "baseline", "clean", 0, 0.9, settled)
    table = build_table(find_runs([root]))
    noisy = table.cells["baseline", "noisy"]
    assert (noisy.degenerate, noisy.unsettled) == (1, 1)
    assert noisy.text().endswith("(3) D1 U1")
    assert table.cells["baseline", "clean"].text() == "0.900 (1)"
    md = table.markdown()
    assert "1 of 4 runs, in 1 cells" in md and "D n:" in md and "U n:" in md
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert [(r["noise.name"], r["degenerate"], r["unsettled"], r["undecided"]) for r in rows] == [
        ("noisy", "1", "1", "0"), ("clean", "0", "0", "0")]


def test_an_unsettled_run_whose_model_is_undecided_is_counted_apart(tmp_path):
    root = tmp_path / "marks"
    swinging = [_seg_round(0, 0.3, 0.5), _seg_round(1, 0.9, 0.2), _seg_round(2, 0.5, 0.1)]
    undecided = [*swinging[:2], {**swinging[2], "undecided": 0.7}]
    decided = [*swinging[:2], {**swinging[2], "undecided": 0.2}]
    settled_but_undecided = [*swinging[:2], {**swinging[1], "round": 2, "undecided": 0.9}]
    for name, history in [("a", undecided), ("b", decided), ("c", settled_but_undecided)]:
        _ranked_run(root / name, "baseline", "noisy", ord(name), 0.5, history)
    table = build_table(find_runs([root]))
    cell = table.cells["baseline", "noisy"]
    assert (cell.unsettled, cell.undecided) == (2, 1)
    assert cell.text().endswith("U2 (u1)")
    assert "1 of the 2" in table.markdown()


@pytest.mark.parametrize(("args", "named"), [
    (["--rows", "strategy.nam"], "--rows strategy.nam: no run's config.yaml has this key; the "
                                 "keys under strategy are name"),
    (["--cols", "noize.name"], "--cols noize.name: no run's config.yaml has this key; the "
                               "top-level keys are noise, seed, strategy"),
    (["--metric", "f2"], "--metric f2: no completed run (8 of 9 found) records this global "
                         "metric; they record f1"),
    (["--noise-key", "strategy.p_remove"], "--noise-key strategy.p_remove: no run's config.yaml "
                                           "has this key"),
])
def test_a_report_key_or_metric_the_runs_lack_is_refused_in_one_line(sweep, tmp_path, capsys, args, named):
    assert main(["report", str(sweep), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
