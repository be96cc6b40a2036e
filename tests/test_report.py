"""`snowfed report` on run directories laid out as snowfed writes them (config.yaml +
summary.json), and the resumable sweep (slow: real runs through Ray)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from snowfed.cli import main
from snowfed.config import sweep_size
from snowfed.sim.report import build_table, find_runs


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
    table_md, score_md = (out / "report.md").read_text().split("Pairwise Wilcoxon")
    assert table_md.count("| only_positive |") == 1 and "| only_positive |" in score_md
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {(r["strategy.name"], r["noise.name"]) for r in rows} == {
        ("baseline", "clean"), ("baseline", "noisy"), ("only_positive", "noisy"),
        ("only_positive", "per-site")}


def test_sweep_size_counts_the_jobs_of_a_multirun():
    assert sweep_size(["federation=smoke", "seed=0,1,2", "strategy=a,b"]) == 6
    assert sweep_size(["hydra.sweep.dir=x,y", "rounds=1"]) == 1
    assert sweep_size(["federation.hospitals.1.noise={preset: noisy, p_remove: 0.2}", "seed=0,1"]) == 2


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
    assert "unfinished run moved to" in first.stdout
    assert "sweep 1/2 |" in first.stderr and "sweep 2/2 |" in first.stderr  # progress, with ETA
    assert "m left" in first.stderr
    moved = [p for p in sweep_dir.iterdir() if p.name.startswith(name.format(1) + ".unfinished-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").exists()  # kept, not deleted
    for seed in (0, 1):
        summary = json.loads((sweep_dir / name.format(seed) / "summary.json").read_text())
        assert summary["status"] == "completed"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(skipped)") == 2 and "round 1/1" not in again.stderr


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
    from snowfed.sim.report import pairwise_score

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
