"""`snowfed bench`'s parts: the generated dataset, the workloads' configs, the plain-loop floor
(c), the stock Flower app (b) and the process-tree memory probe. The timings themselves are
measured by the benchmark, never asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from snowfed.bench.benchmark import (
    VARIANTS,
    WORKLOADS,
    Process,
    _configs,
    _tree_pss_kb,
    mem_overrides,
    plan,
    synthetic_npz,
    workloads,
)
from snowfed.bench.floor import plain_loop

TINY = ("federation.hospitals.count=6", "aggregation.fraction_train=0.5",
        "aggregation.fraction_evaluate=0.5", "strategy.local_steps=3")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_npz(tmp_path_factory.mktemp("bench") / "data.npz", 600, size=16)


def test_generated_dataset_is_a_medmnist_file_the_loader_reads(data):
    from snowfed.data.loaders import load_dataset

    loaded = load_dataset({"name": "npz", "path": str(data), "image_size": None, "skip_bad": False,
                           "class_names": None})
    assert loaded.images.shape[1:] == (16, 16, 3) and loaded.images.dtype == np.uint8
    assert set(np.unique(loaded.targets)) == set(range(10))
    from sklearn.linear_model import LogisticRegression

    x = loaded.images.reshape(len(loaded.images), -1) / 255.0
    fit = LogisticRegression(max_iter=300).fit(x, loaded.targets)
    assert fit.score(x, loaded.targets) > 0.5  # far above chance (0.1): there is something to learn


@pytest.mark.parametrize("quick", [True, False])
def test_every_workload_is_a_valid_config(data, quick):
    from snowfed.sim.run.plan import validate

    loads = workloads(quick, data)
    assert set(loads) == {"W1", "W2", "S", "C"} and loads["S"].runs == (2 if quick else 12)
    assert loads["C"].runs == 4 and loads["C"].overrides[:2] == loads["W1"].overrides[:2]
    for load in loads.values():
        for cfg, _ in _configs(load.jobs()[:1], Path("unused")):
            validate(cfg)
    if quick:  # W2's b and c figures are the first run of S's processes: the same work
        assert loads["S"].jobs()[0] == loads["W2"].jobs()[0]
    federation = validate(_configs([mem_overrides(data, 100, 1)], Path("unused"))[0][0])
    assert len(federation.hospitals) == 100  # (the benchmark's own file has enough images for 1000)


@pytest.mark.parametrize("quick", [True, False])
def test_every_workload_and_variant_is_measured_once(data, quick):
    spawns = plan(quick, list(WORKLOADS), data)
    rows = [(name, variant.split()[0]) for spawn in spawns for name, variant, _ in spawn.rows]
    expected = {(w, v) for w in ("W2", "S") for v in VARIANTS} | {("MEM", "a")}
    expected |= {("W1", v) for v in ("ac" if quick else "abc")} | {("C", "a")}
    assert set(rows) == expected
    assert rows.count(("MEM", "a")) == (2 if quick else 3)
    for spawn in spawns:  # a row of one run names a run the process has; whole-process rows
        assert all(run is None or 0 <= run < len(spawn.jobs) for _, _, run in spawn.rows)
        assert spawn.sweep == (spawn.variant == "a" and spawn.rows[0][0] in ("S", "C"))
    assert sorted(s.cluster_nodes for s in spawns if s.rows[0][0] == "C") == [1, 2]
    # a row cut from a process's first run is a fresh process whose first work is that run
    w2 = workloads(quick, data)["W2"].jobs()[0]
    assert all(spawn.jobs[0] == w2 for spawn in spawns for name, _, run in spawn.rows
               if name == "W2" and run == 0)


def test_each_run_of_a_process_is_timed_and_measured_in_its_own_window():
    process = Process(runs=2, wall_s=20.0, samples=[(1.0, 100), (5.0, 300), (9.0, 200), (15.0, 900)],
                      ticks=[4.0, 6.0, 8.0, 13.0, 14.0], run_ends=[8.5, 14.5])
    first = process.figures(0)
    assert (first.wall_s, first.first_round_s, first.per_round_s) == (8.5, 4.0, 2.0)
    assert first.peak_mb == 300 / 1024  # not the second run's 900 kB
    second = process.figures(1)  # from the first run's end
    assert (second.wall_s, second.first_round_s, second.per_round_s) == (6.0, 4.5, 1.0)
    assert second.peak_mb == 200 / 1024  # 900 kB came after its end
    whole = process.figures()
    assert (whole.wall_s, whole.first_round_s, whole.peak_mb) == (20.0, 4.0, 900 / 1024)
    assert whole.per_round_s != whole.per_round_s  # NaN: two runs' rounds are not one run's


def test_plain_loop_trains_the_sampled_sites_and_reports_every_round(data, tmp_path):
    import torch

    overrides = (*workloads(True, data)["W2"].jobs()[0], *TINY, "rounds=3")
    (cfg, run_dir), = _configs([overrides], tmp_path)
    rounds = []
    plain_loop(cfg, run_dir, lambda rnd: rounds.append(rnd))
    assert rounds == [0, 1, 2, 3]
    from snowfed.server.app import build_global_model

    first = build_global_model(cfg["model"], 10, cfg["seed"]).state_dict()
    last = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # FedAvg moved the model


@pytest.mark.slow
def test_stock_flower_app_runs_the_rounds_on_flowers_engine(data, tmp_path):
    from snowfed.bench.flower_app import run_stock_flower

    overrides = (*workloads(True, data)["W2"].jobs()[0], *TINY, "rounds=2")
    (cfg, run_dir), = _configs([overrides], tmp_path)
    rounds = []
    run_stock_flower(cfg, run_dir, lambda rnd: rounds.append(rnd))
    assert rounds == [0, 1, 2]  # FedAvg.start's central evaluation: initial model, then each round
    assert (run_dir / "checkpoint.pt").is_file()


def test_memory_probe_sums_a_process_and_its_children():
    alone = _tree_pss_kb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]);"
                              " time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while _tree_pss_kb(os.getpid()) < alone + 150 * 1024 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _tree_pss_kb(os.getpid()) >= alone + 150 * 1024  # the child's 200 MB counted
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_a_variant_process_reports_each_runs_rounds_and_end(data, tmp_path):
    from snowfed.bench.benchmark import measure

    overrides = (*workloads(True, data)["W2"].overrides, *TINY, "rounds=2")
    process = measure("c", [(*overrides, "seed=0"), (*overrides, "seed=1", "rounds=1")], tmp_path)
    assert len(process.ticks) == 3 and len(process.run_ends) == 2  # rounds 1-2, then round 1
    assert process.ticks[1] <= process.run_ends[0] < process.ticks[2] <= process.run_ends[1]
    first, whole = process.figures(0), process.figures()
    assert first.wall_s == process.run_ends[0] < whole.wall_s
    assert 0 < first.peak_mb <= whole.peak_mb
    assert (tmp_path / "run1" / "checkpoint.pt").is_file()
