"""Shared fixtures: composed configs and a small built federation store."""

from __future__ import annotations

import re

import pytest

from snowfed.config import compose
from snowfed.sim.runner import plain_config


@pytest.fixture
def smoke_cfg() -> dict:
    return plain_config(compose(["federation=smoke"]))


@pytest.fixture
def smoke_store(smoke_cfg, tmp_path):
    from snowfed.sim.runner import prepare

    _, store = prepare(smoke_cfg, tmp_path / "run")
    return store


RAY_PROCESS = re.compile(r"ray::|raylet|gcs_server|default_worker")


def _ray_process_lines() -> dict[int, str]:
    """This machine's live Ray processes (raylet, GCS, workers, agents): PID -> `ps` line.

    Zombies are left out: an exited process whose parent has not reaped it yet holds no
    memory, and in a container whose PID 1 does not reap, Ray's exited workers stay zombies
    for good (pgrep matches them by their `ray::` name, so it cannot be used here)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,stat=,rss=,args="], capture_output=True,
                         text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        pid, stat, _rss, args = (line.split(None, 3) + [""])[:4]
        if not stat.startswith("Z") and RAY_PROCESS.search(args):
            found[int(pid)] = line.strip()[:200]
    return found


def ray_processes() -> set[int]:
    """The PIDs of this machine's live Ray processes."""
    return set(_ray_process_lines())


def wait_until_gone(pids: set[int], within_s: float) -> dict[int, str]:
    """Those of `pids` still running after `within_s` seconds, with their `ps` lines (state,
    RSS in KiB, command) for the failure message."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        left = {pid: line for pid, line in _ray_process_lines().items() if pid in pids}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


def start_smoke_run(run_dir, until: str):
    """`snowfed run federation=smoke rounds=50` in a process of its own, returned once its
    progress printed a line starting with `until` (e.g. "round 2/") or 240 s passed."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "snowfed.cli", "run", "federation=smoke", "rounds=50",
         f"run_dir={run_dir}"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        if line.startswith(until) or time.monotonic() > deadline:
            break
    return proc
