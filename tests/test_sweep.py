"""Sweeps (snowfed.sim.run.sweep): many runs in one Flower simulation, several at once, each with
results independent of what ran beside it; what a sweep does with runs it finds done or
unfinished; the node cache that keeps a sweep's actors from growing with every run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from snowfed.client import app as client_app
from snowfed.config import ConfigError, compose, plain_config
from snowfed.sim.run.sweep import Job, parallel_runs, plan_jobs, run_sweep

SAMPLED = ["task=classification", "federation=many_sites", "federation.hospitals.count=6",
           "aggregation.fraction_train=0.5", "aggregation.fraction_evaluate=0.5", "rounds=2",
           "strategy.local_steps=3"]


def _cfg(*overrides: str) -> dict:
    return plain_config(compose([*SAMPLED, *overrides]))


def _global_and_sampled(run_dir):
    """Each round's global metrics and the sites that trained in it."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    glob = [(r["round"], r["f1"], r["accuracy"]) for r in records if r["scope"] == "global"]
    trained = sorted((r["round"], r["node"]) for r in records
                     if r["scope"] == "node" and r.get("phase") == "train" and "train-loss" in r)
    return glob, trained


@pytest.mark.slow
def test_parallel_runs_in_one_simulation_match_runs_alone(tmp_path, monkeypatch):
    import flwr.simulation

    from snowfed.sim.run.runner import run

    started = []
    real = flwr.simulation.run_simulation

    def counting(**kwargs):  # the real engine, counted
        started.append(kwargs["num_supernodes"])
        return real(**kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", counting)
    jobs = [Job(_cfg(f"seed={seed}"), tmp_path / f"seed{seed}") for seed in (0, 1)]
    outcomes = run_sweep(jobs, parallel=2)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    assert started == [6]  # one simulation (one Ray start) for both runs
    run(_cfg("seed=1"), tmp_path / "alone", quiet=True)
    assert started == [6, 6]
    alone = _global_and_sampled(tmp_path / "alone")
    in_sweep = _global_and_sampled(tmp_path / "seed1")
    assert alone[1] and len({node for _, node in alone[1]}) > 1
    assert in_sweep == alone  # same sites sampled, same global metrics, bit for bit
    assert _global_and_sampled(tmp_path / "seed0") != alone  # the seed matters


@pytest.mark.slow
def test_ctrl_c_stops_the_run_in_flight_and_starts_no_other(tmp_path):
    """SIGINT to this process (as a terminal's Ctrl-C) during the first of three runs: that run
    ends `interrupted` with its completed rounds kept, the others do not start, and the same
    sweep started again resumes the first and runs the others."""
    import os
    import signal
    import threading
    import time

    jobs = [Job(_cfg(f"seed={seed}", "rounds=60"), tmp_path / f"seed{seed}") for seed in (0, 1, 2)]
    metrics = jobs[0].run_dir / "metrics.jsonl"

    def ctrl_c_after_round_1() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any('"global"' in line and '"round": 1,' in line for line in lines):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_round_1, daemon=True).start()
    before = signal.getsignal(signal.SIGINT)
    outcomes = run_sweep(jobs, parallel=1)
    assert signal.getsignal(signal.SIGINT) is before  # the sweep's handler is gone
    assert [o.status for o in outcomes] == ["interrupted"] * 3
    assert [o.error for o in outcomes[1:]] == ["not started"] * 2
    summary = json.loads((jobs[0].run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["rounds"] < 60
    assert not jobs[1].run_dir.exists() and not jobs[2].run_dir.exists()
    plan_jobs(jobs)  # what the same sweep started again does
    assert [job.action for job in jobs] == ["resume", "run", "run"]


def test_plan_skips_completed_runs_and_resumes_checkpointed_ones(tmp_path):
    done, unfinished, fresh = (tmp_path / n for n in ("done", "unfinished", "fresh"))
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    jobs = [Job(_cfg(), d) for d in (done, unfinished, fresh)]
    plan_jobs(jobs)
    assert [j.action for j in jobs] == ["skip", "resume", "run"]


def test_a_bad_job_stops_the_sweep_before_anything_runs(tmp_path):
    jobs = [Job(_cfg(), tmp_path / "good"), Job(_cfg("rounds=0"), tmp_path / "bad")]
    with pytest.raises(ConfigError, match="rounds=0.*sweep job .*bad"):
        run_sweep(jobs)
    assert not (tmp_path / "good").exists()


def test_auto_parallel_fills_the_actors(monkeypatch):
    plans = [SimpleNamespace(hospitals=[None] * 6)] * 8
    jobs = [Job(_cfg(), None)] * 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert parallel_runs("auto", jobs, plans) == 2  # 3 sites a round cover 2 actors; +1 fills gaps
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert parallel_runs("auto", jobs, plans) == 7  # 16 actors / 3 sites a round, + 1
    assert parallel_runs("auto", jobs[:3], plans[:3]) == 3  # never more than the runs
    assert parallel_runs(4, jobs, plans) == 4
    with pytest.raises(ConfigError, match="--parallel"):
        parallel_runs(0, jobs, plans)
    with pytest.raises(ConfigError, match="--parallel"):  # before any job, reference runs too
        run_sweep([Job(_cfg("aggregation=pooled"), None)], parallel=9)


def test_actors_keep_the_nodes_of_the_most_recent_stores_only(monkeypatch):
    monkeypatch.setattr(client_app, "_STORES", client_app.OrderedDict())
    manifest = {"model": {"name": "smallcnn", "width": 4}, "num_classes": 3}
    store = SimpleNamespace(manifest=manifest)
    cpu = torch.device("cpu")
    first = client_app._store_nodes("store0", cpu, store)
    for i in range(1, client_app.STORES_KEPT):
        client_app._store_nodes(f"store{i}", cpu, store)
    assert client_app._store_nodes("store0", cpu) is first  # kept, now the most recent
    client_app._store_nodes("one-more", cpu, store)
    assert "store0" in client_app._STORES and "store1" not in client_app._STORES  # LRU dropped
    assert len(client_app._STORES) == client_app.STORES_KEPT


def test_a_sweep_checks_each_job_once_and_its_jobs_share_the_loaded_dataset(tmp_path, monkeypatch):
    import snowfed.sim.run.plan as plan_module

    calls = []
    resolve = plan_module.resolve_federation
    monkeypatch.setattr(plan_module, "resolve_federation",
                        lambda cfg, loaded=None: calls.append(1) or resolve(cfg, loaded))
    jobs = [Job(_cfg("aggregation=local", "rounds=1", f"seed={s}"), tmp_path / str(s)) for s in (0, 1)]
    outcomes = run_sweep(jobs)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    assert len(calls) == 2  # plan_jobs' check of each job, and no other
    assert jobs[0].plan.dataset is jobs[1].plan.dataset  # one copy of the digits for both
