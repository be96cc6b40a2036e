"""Checkpoint/resume, failing and late sites, every aggregation end to end (slow: each starts
Flower's simulation engine with Ray, or runs the in-process reference)."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from snowfed.config import compose, plain_config
from snowfed.rundir import read_jsonl, read_summary_status
from snowfed.server.aggregation import AGGREGATIONS
from snowfed.sim.run.runner import resume, run

pytestmark = pytest.mark.slow


def _smoke(*overrides: str) -> dict:
    return plain_config(compose(["federation=smoke", *overrides]))


def _history(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    keys = Counter((r["round"], r["scope"], r.get("node"), r.get("phase")) for r in records)
    assert max(keys.values()) == 1, "a record was written twice"
    return {(r["round"], r["scope"], r.get("node"), r.get("phase")): r for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The smoke federation's 3 rounds, never interrupted: (summary, history)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run(_smoke("rounds=3"), run_dir), _history(run_dir)


def _assert_same_history(after: dict, expected: dict) -> None:
    assert after.keys() == expected.keys()
    for key, record in expected.items():
        for metric, value in record.items():
            if isinstance(value, float):
                assert after[key][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, metric)


def test_a_killed_run_resumed_ends_with_the_uninterrupted_history(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "snowfed.cli", "run", "federation=smoke", "rounds=3",
         f"run_dir={killed}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:  # kill -9 the whole process group once round 1 is on disk (mid-round 2)
        deadline = time.monotonic() + 240
        while not any(r.get("scope") == "global" and r["round"] == 1
                      for r in read_jsonl(killed / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _history(killed)
    assert max(k[0] for k in before) < 3 and not (killed / "summary.json").exists()

    summary = resume(killed)
    reference, expected = uninterrupted

    assert summary["status"] == reference["status"] == "completed"
    after = _history(killed)
    _assert_same_history(after, expected)
    for key in before:  # what the killed run had completed (round 1) is still there, unchanged
        if key[0] <= 1:
            assert after[key] == before[key]


def test_kill_9_at_random_moments_never_leaves_a_dead_end(tmp_path, uninterrupted):
    """kill -9 of the whole process group at 6 random moments (seeded) of smoke runs and of their
    continuations. Each state it leaves is resumable (`resume=DIR`) or, when resume says the run
    stopped before its first checkpoint, restartable in the same directory; nothing is deleted
    by hand, and each run ends with the uninterrupted history, no record written twice. A run
    that ends before the 6th kill (a fast machine outruns the moments) is checked, and the next
    kills go to a new run."""
    rng = random.Random(20261201)
    cli = [sys.executable, "-m", "snowfed.cli", "run"]
    _, expected = uninterrupted
    kills, moments, finished = 0, [], 0

    def commands(run_dir):
        return [*cli, "federation=smoke", "rounds=3", f"run_dir={run_dir}"], [*cli, f"resume={run_dir}"]

    run_dir = tmp_path / "killed0"
    start, again = commands(run_dir)
    args = start
    for _ in range(60):  # kills, refused resumes and the runs' ends
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            moment = rng.uniform(1.0, 15.0) if kills < 6 else 300  # start-up, Ray, rounds, writes
            try:
                returncode = proc.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                assert kills < 6, "the last run did not end within 300 s"
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills, moments = kills + 1, [*moments, round(moment, 1)]
                returncode = None  # killed: completed only if it was past its summary
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        said = (tmp_path / "stderr.txt").read_text()
        if returncode == 2 and "start it again instead" in said:  # killed before a checkpoint
            args = start
            continue
        assert returncode in (0, None), (moments, args, said[-2000:])
        if read_summary_status(run_dir) != "completed":
            assert returncode is None, (moments, args, said[-2000:])
            args = again if run_dir.exists() else start
            continue
        # completed (a kill in its teardown, after the summary, leaves it completed too)
        _assert_same_history(_history(run_dir), expected)
        finished += 1
        if kills == 6:
            break
        run_dir = tmp_path / f"killed{finished}"
        start, again = commands(run_dir)
        args = start
    assert kills == 6 and json.loads((run_dir / "summary.json").read_text())["status"] == "completed", moments


def test_a_failing_site_is_left_out_and_recorded_and_too_few_sites_stop_the_run(tmp_path):
    cfg = _smoke("rounds=2")
    cfg["federation"]["hospitals"][1]["failure"] = {"rounds": [2], "mode": "raise"}
    summary = run(cfg, tmp_path / "tolerant")

    assert summary["status"] == "completed"
    records = read_jsonl(tmp_path / "tolerant" / "metrics.jsonl")
    train2 = [r for r in records if r["round"] == 2 and r.get("phase") == "train"]
    assert {r["node"]: "error" in r for r in train2} == {"alpha": False, "beta": True}
    failed = next(r for r in train2 if r["node"] == "beta")
    # the site's own exception, on one plain line; Ray's whole traceback beside it
    assert failed["error"] == ("RuntimeError: simulated failure of partition 1 in round 2 "
                               "(federation.hospitals[1].failure)")
    assert "ClientAppActor" in failed["traceback"] and "\x1b" not in failed["traceback"]
    assert summary["nodes"]["beta"]["failures"] == 1
    assert summary["nodes"]["beta"]["last_failure"]["round"] == 2

    strict = copy.deepcopy(cfg)
    strict["aggregation"]["min_train_nodes"] = 2
    summary = run(strict, tmp_path / "strict")
    assert summary["status"] == "failed"
    assert "round 2: 1 of 2 sites replied with a usable update" in summary["reason"]
    assert "beta" in summary["reason"]
    assert summary["rounds"] == 1  # round 1 stays on disk
    assert (tmp_path / "strict" / "checkpoint.pt").exists()


def test_a_site_replying_nan_is_refused_every_round_and_the_run_ends_finite(tmp_path):
    cfg = _smoke("rounds=2")
    cfg["federation"]["hospitals"][1]["failure"] = {"rounds": [1, 2], "mode": "nan"}
    summary = run(cfg, tmp_path / "nan")

    assert summary["status"] == "completed"
    text = (tmp_path / "nan" / "metrics.jsonl").read_text()
    records = [json.loads(line, parse_constant=_no_bare_nan) for line in text.splitlines()]
    refused = [r for r in records if r.get("phase") == "train" and r.get("refused")]
    assert [(r["round"], r["node"]) for r in refused] == [(1, "beta"), (2, "beta")]
    assert "non-finite update refused" in refused[0]["error"]
    assert summary["nodes"]["beta"]["refused_updates"] == 2
    assert "failures" not in summary["nodes"]["beta"]
    final = torch.load(tmp_path / "nan" / "model_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert summary["global"]["f1"] > 0.3  # alpha's updates alone still train the model


def _no_bare_nan(token):
    raise AssertionError(f"metrics.jsonl holds a bare {token} token")


def test_a_site_past_the_round_timeout_is_left_out_and_recorded(tmp_path):
    cfg = _smoke("rounds=1")
    # generous for the site that is on time (a loaded CI machine), far below the stall
    cfg["aggregation"]["round_timeout_s"] = 6
    cfg["federation"]["hospitals"][0]["failure"] = {"rounds": [1], "mode": "stall", "stall_s": 15}
    summary = run(cfg, tmp_path / "late")

    assert summary["status"] == "completed"
    train = {r["node"]: r for r in read_jsonl(tmp_path / "late" / "metrics.jsonl")
             if r.get("phase") == "train"}
    assert "no reply within round_timeout_s=6" in train["alpha"]["error"]
    assert "error" not in train["beta"]


# Each aggregation with a path of its own through snowfed end to end: the sites' proximal term
# (fedprox), server state across rounds (fedadam), a third site (bulyan), the server's probe
# (quality), the in-process references. The rest differ only inside Flower's aggregate_train;
# test_aggregation.py builds every one from its config (a Ray start per name would cost CI
# minutes for no new path). All 14 ran end to end in docs/results/aggregation.md's sweep.
END_TO_END = ("fedprox", "fedadam", "bulyan", "quality", "pooled", "local")


def test_aggregations_with_their_own_path_run_the_smoke_federation(tmp_path):
    """As one sweep: fedprox, fedadam and quality share a simulation, bulyan (3 sites) has its
    own, pooled and local run in this process."""
    from snowfed.sim.run.sweep import Job, run_sweep

    jobs = []
    for name in END_TO_END:
        cfg = _smoke(f"aggregation={name}", "rounds=2")
        if name == "bulyan":  # needs 3 sites per round: a third hospital
            third = {**cfg["federation"]["hospitals"][0], "name": "gamma"}
            cfg["federation"]["hospitals"].append(third)
        jobs.append(Job(cfg, tmp_path / name))
    with open(os.devnull, "w") as quiet:
        outcomes = run_sweep(jobs, stream=quiet)
    for name, outcome in zip(END_TO_END, outcomes):
        summary = outcome.summary
        assert outcome.status == "completed" and summary["rounds"] == 2, (name, outcome.error)
        assert [h["round"] for h in summary["history"]] == [0, 1, 2]
        if name == "local":
            assert sorted(p.name for p in (tmp_path / name / "models_final").iterdir()) == [
                "alpha.pt", "beta.pt"]
        else:
            assert (tmp_path / name / "model_final.pt").exists()
        if name == "quality":
            assert set(summary["quality"]["sites"]) == {"alpha", "beta"}
        if name not in ("pooled", "local"):  # the global model moved
            first, last = (np.array(list(h.values())) for h in (summary["history"][0], summary["history"][2]))
            assert not np.array_equal(first, last), name


def test_end_to_end_list_names_real_aggregations():
    assert set(END_TO_END) <= set(AGGREGATIONS)


def test_personalisation_reports_global_and_fine_tuned_models_per_site(tmp_path):
    summary = run(_smoke("rounds=1", "personalize_steps=3"), tmp_path / "p")
    for name in ("alpha", "beta"):
        p = summary["nodes"][name]["personalized"]
        assert {"global-f1", "personalized-f1", "global-dice", "personalized-dice"} <= set(p)
        assert p["global-tp"] + p["global-fn"] == p["personalized-tp"] + p["personalized-fn"]
    assert set(summary["personalization"]) == {"global", "personalized"}
    on_disk = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert on_disk["personalization"] == summary["personalization"]


def test_kill_9_leaves_no_ray_process_behind(tmp_path):
    """kill -9 of the driver: Ray's processes die with it (PDEATHSIG), its agents within 30 s
    (sim.run.processes.GCS_RECONNECT_TIMEOUT; Ray's default kept them 45-105 s)."""
    from tests.conftest import descendants, start_smoke_run, wait_until_gone

    proc = start_smoke_run(tmp_path / "killed", until="round 1/")
    try:
        started = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert started, "the run started no Ray process to watch"
    assert not wait_until_gone(started, 30.0)
