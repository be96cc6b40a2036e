"""End to end through Flower's simulation engine with the Ray backend (slow: starts Ray)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from snowfed.config import compose, group_options
from snowfed.models import build_model, stage_keys
from snowfed.rundir import read_jsonl
from snowfed.sim.run.runner import run

pytestmark = pytest.mark.slow


def test_two_nodes_two_rounds_through_ray(tmp_path, monkeypatch):
    import threading

    import ray

    starts = []
    real_init = ray.init

    def counted_init(*args, **kwargs):  # the real ray.init, counted
        preload = (kwargs.get("_system_config") or {}).get("preload_python_modules")
        starts.append((threading.current_thread().name, preload))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", counted_init)
    run_dir = tmp_path / "run"
    summary = run(compose(["federation=smoke", "rounds=2"]), run_dir)

    # Ray was started once, in the background while the store was built, with the ClientApp's
    # imports preloaded in its workers; Flower's engine used it and shut it down
    assert starts == [("snowfed-ray-start", ["snowfed.client.preload"])]
    assert not ray.is_initialized()

    assert summary["status"] == "completed" and summary["rounds"] == 2
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert 0.0 <= summary["global"]["f1"] <= 1.0
    assert set(summary["nodes"]) == {"alpha", "beta"}
    beta = summary["nodes"]["beta"]
    assert beta["noise_profile"] == "noisy" and beta["strategy"] == "baseline"
    assert beta["num_train"] > 0 and beta["label_noise"]["objects_removed"] > 0
    records = read_jsonl(run_dir / "metrics.jsonl")
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            got = {r["node"] for r in records if r["round"] == rnd and r.get("phase") == phase}
            assert got == {"alpha", "beta"}, (rnd, phase)
    # local training moved the weights: the global model changed between rounds
    assert summary["history"][0]["f1"] != summary["history"][2]["f1"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rounds"] == 2
    assert (run_dir / "f1_per_round.png").stat().st_size > 1000
    assert (run_dir / "model_final.pt").exists()


def test_a_run_stopped_by_its_data_leaves_no_ray_behind(tmp_path):
    import ray

    from snowfed.data.loaders import DataError

    with pytest.raises(DataError):  # found after Ray's background start has begun
        run(compose(["task=classification", "dataset=npz", f"dataset.path={tmp_path / 'missing.npz'}"]),
            tmp_path / "run")
    assert not ray.is_initialized()


# every line a run prints by default: its progress, its outcome and its verdict (no Ray, Hydra,
# alembic or actor lines)
SNOWFED_LINE = re.compile(r"round \d+/\d+ \| global f1 |completed: |settled: |not judged |"
                          r"not converged: |degenerate: ")


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_runs_the_smoke_federation_quietly(verbose, tmp_path):
    from tests.conftest import run_watched, wait_until_gone

    run_dir = tmp_path / "cli-run"
    returncode, stdout, stderr, started = run_watched(
        [sys.executable, "-m", "snowfed.cli", "run", "federation=smoke", "rounds=1",
         f"run_dir={run_dir}", f"verbose={str(verbose).lower()}"])
    assert returncode == 0, stderr[-3000:]
    assert "round 1/1" in stderr  # the progress display
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    others = [line for line in (stdout + stderr).splitlines() if not SNOWFED_LINE.match(line)]
    if verbose:  # Flower's own per-round logs come back
        assert any("INFO" in line for line in others), others
    else:
        assert others == []
    assert started, "the run started no process to watch"
    assert not wait_until_gone(started, 10.0)  # nothing it started outlives it by 10 s


def test_a_failed_cli_run_says_why_in_its_own_lines_and_leaves_no_process_behind(tmp_path):
    """A site raises in round 1 and the run needs both sites: it fails after Ray has started.
    The terminal holds snowfed's lines only (Flower's ERROR tracebacks of the site's exception
    come with verbose=true), naming the site and its exception."""
    from tests.conftest import run_watched, wait_until_gone

    returncode, stdout, stderr, started = run_watched(
        [sys.executable, "-m", "snowfed.cli", "run", "federation=smoke", "rounds=2",
         "+federation.hospitals.1.failure={rounds:[1],mode:raise}",
         "aggregation.min_train_nodes=2", f"run_dir={tmp_path / 'run'}"])
    assert returncode == 1, stderr[-3000:]
    lines = (stdout + stderr).splitlines()
    assert "  site beta: 1 failed replies; the last in round 1 (train): RuntimeError: simulated " \
           "failure of partition 1 in round 1 (federation.hospitals[1].failure)" in lines
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], lines
    assert started, "the run started no process to watch"
    assert not wait_until_gone(started, 10.0)


LISTENERS = """
import json, psutil
from snowfed.config import compose
from snowfed.config import plain_config
from snowfed.sim.run.engine import RayStart
start = RayStart(plain_config(compose(["federation=smoke"])))
start.wait()
found = [(proc.name(), conn.laddr.ip)
         for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]
         for conn in proc.net_connections("inet") if conn.status == psutil.CONN_LISTEN]
start.close()
print(json.dumps(found))
"""


@pytest.mark.parametrize("cluster_switch", [None, "1"])
def test_a_local_simulations_ray_listens_on_the_loopback_only(cluster_switch):
    """Every listening socket of the Ray a run starts (GCS, raylet, agents, workers, the driver's
    own) is on 127.0.0.1; with Ray's cluster switch set back by the user, on every interface."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if cluster_switch is not None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = cluster_switch
    proc = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    names = {name for name, _ in found}
    assert {"gcs_server", "raylet"} <= names, found
    loopback = [ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip in found]
    assert all(loopback) if cluster_switch is None else not any(loopback), found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_keeps_what_was_written(signum, tmp_path):
    from tests.conftest import descendants, start_smoke_run, wait_until_gone

    run_dir = tmp_path / "interrupted"
    proc = start_smoke_run(run_dir, until="round 2/")  # the second round completed
    try:
        started = descendants(proc.pid)
        proc.send_signal(signum)
        rest = proc.stderr.read()  # Flower ends the simulation in order (sim.run.engine.ctrl_c_sets)
        assert proc.wait(timeout=120) == 130, rest[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping after the client tasks in hand" in rest
    assert ("SIGTERM: " in rest) == (signum == signal.SIGTERM)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["rounds"] >= 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line complete
    global_rounds = [r["round"] for r in records if r["scope"] == "global"]
    assert global_rounds == list(range(len(global_rounds)))  # nothing lost or duplicated
    assert [h["round"] for h in summary["history"]] == global_rounds
    assert started, "the run started no process to watch"
    assert not wait_until_gone(started, 10.0)  # nothing it started outlives it by 10 s


def test_every_strategy_runs_a_smoke_round(tmp_path):
    """Each segmentation strategy trains one smoke round through Ray. One sweep, one Ray start,
    two runs at a time: ten Ray starts made this the suite's slowest group (about 3.5 min)."""
    from snowfed.config import plain_config
    from snowfed.sim.run.sweep import Job, run_sweep

    # transfer has its own test below; coteaching is a classification strategy
    # (test_classification.py)
    strategies = [s for s in group_options("strategy") if s not in ("transfer", "coteaching")]
    jobs = []
    for strategy in strategies:
        # the autoencoder's 200 pre-training steps are tests/test_init_teacher.py's subject
        short = ["strategy.init_params.steps=20"] if strategy.startswith("semi_supervised") else []
        cfg = compose(["federation=smoke", f"strategy={strategy}", "rounds=1", *short])
        jobs.append(Job(plain_config(cfg), tmp_path / strategy))
    outcomes = run_sweep(jobs, parallel=2)
    assert len(outcomes) == len(strategies) >= 9
    for strategy, outcome in zip(strategies, outcomes):
        assert outcome.status == "completed", (strategy, outcome.error)
        nodes = outcome.summary["nodes"].values()
        assert {n["strategy"] for n in nodes} == {strategy}
        assert all("train-loss" in n["final_train"] for n in nodes), strategy


def test_transfer_from_the_last_run_keeps_its_encoder_through_the_federation(tmp_path):
    """`strategy=transfer` with its default path 'last': the earlier run's final model is the
    start, and the frozen encoder it gives both nodes is still the global model's at the end."""
    runs = tmp_path / "runs"
    source = runs / "source"
    run(compose(["federation=smoke", "rounds=1", f"run_dir={source}"]), source)
    target = runs / "target"
    cfg = compose(["federation=smoke", "strategy=transfer", "rounds=2", f"run_dir={target}"])
    summary = run(cfg, target)
    assert summary["status"] == "completed"
    before = torch.load(source / "model_final.pt", weights_only=True)
    after = torch.load(target / "model_final.pt", weights_only=True)
    frozen = stage_keys(build_model("shortres", num_classes=2, width=16), 4)
    # FedAvg of identical tensors: equal up to the rounding of the weighted mean
    assert all(torch.allclose(after[k], before[k], rtol=1e-6, atol=1e-7) for k in frozen)
    assert any(not torch.allclose(after[k], before[k]) for k in after if k not in frozen)
    manifest = json.loads((target / "federation" / "manifest.json").read_text())
    assert {n["strategy"]["init_params"]["path"] for n in manifest["nodes"]} == {
        str((source / "model_final.pt").resolve())}
