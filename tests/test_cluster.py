"""backend=cluster on a real 2-node Ray cluster on this machine (127.0.0.1, one CPU per node):
a run and a sweep spread their sites over both nodes and give the single-machine results, also
through Ray Client (ray://); a node that cannot read the run directory is named before the first
round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snowfed.bench.local_cluster import free_port, local_cluster
from snowfed.config import compose, plain_config
from snowfed.sim.run.runner import run

pytestmark = pytest.mark.slow

SNOWFED = [sys.executable, "-c", "from snowfed.cli import console; console()"]
# 12 sites, 6 a round: two actors' replies arrive in any order, and a sum of six updates depends
# on its order (server.transport.Sent.replies fixes it)
SMALL = ["task=classification", "federation=many_sites", "federation.hospitals.count=12",
         "aggregation.fraction_train=0.5", "rounds=2", "strategy.local_steps=3"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> list[str]:
    """The run's records without what differs between two runs of one config (times, and the
    Ray node each reply came from)."""
    drop = ("time", "duration_s", "wall_s", "ray-node")
    return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True)
                  for r in _records(run_dir))


def _nodes(run_dir: Path) -> set[str]:
    return {r["ray-node"] for r in _records(run_dir) if "ray-node" in r}


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2, cpus_per_node=1, client_port=free_port()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def single_machine(cluster, tmp_path_factory):
    """The same run with a private Ray on this machine, started while the cluster is up."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert run(plain_config(compose([*SMALL, "seed=3"])), run_dir, quiet=True)["status"] == "completed"
    return run_dir


def test_a_local_backend_starts_its_own_ray_beside_a_running_cluster(cluster, single_machine):
    nodes = _nodes(single_machine)
    assert len(nodes) == 1 and not nodes & set(cluster.node_ids)


def test_a_run_uses_every_node_and_gives_the_single_machine_results(cluster, single_machine,
                                                                      tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([*SNOWFED, "run", *SMALL, "seed=3", "backend=cluster",
                           f"backend.address={cluster.address}", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _nodes(run_dir) == set(cluster.node_ids)  # one actor per node, both at work
    assert _results(run_dir) == _results(single_machine)


def test_a_run_through_ray_client_gives_the_same_results(cluster, single_machine, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([*SNOWFED, "run", *SMALL, "seed=3", "backend=cluster",
                           f"backend.address={cluster.client_address}", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _nodes(run_dir) <= set(cluster.node_ids) and _nodes(run_dir)
    assert _results(run_dir) == _results(single_machine)


def test_a_sweep_spreads_its_runs_over_the_cluster(cluster, single_machine, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # auto: Ray's record of it
    proc = subprocess.run([*SNOWFED, "run", "-m", *SMALL, "seed=3,4", "backend=cluster",
                           f"hydra.sweep.dir={tmp_path}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 runs of 12 sites in one Flower simulation, 2 at a time" in proc.stdout + proc.stderr
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl"))  # seed=3, then seed=4
    assert len(runs) == 2
    assert set().union(*map(_nodes, runs)) == set(cluster.node_ids)
    assert _results(runs[0]) == _results(single_machine)  # seed 3, beside another run


def test_a_node_that_cannot_read_the_run_directory_is_named(tmp_path):
    hidden = tmp_path / "node-local"
    hidden.mkdir()
    with local_cluster(nodes=2, cpus_per_node=1, hide=hidden) as cluster:
        run_dir = hidden / "run"
        proc = subprocess.run([*SNOWFED, "run", *SMALL, "backend=cluster",
                               f"backend.address={cluster.address}", f"run_dir={run_dir}"],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"run_dir='{run_dir}'" in line and f"Ray node {cluster.node_ids[1][:12]}" in line
    assert f"cannot read the federation store {run_dir / 'federation'}" in line
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before round 0
