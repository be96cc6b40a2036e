"""Shared fixtures: composed configs and a small built federation store."""

from __future__ import annotations

import os
import tempfile

import pytest

from snowfed.config import compose, plain_config

# A warm simulation the user keeps (`snowfed serve`) would take the suite's runs: every test,
# and every command a test starts, looks for one in a folder of the suite's own instead.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="snowfed-tests-")


@pytest.fixture
def smoke_cfg() -> dict:
    return plain_config(compose(["federation=smoke"]))


@pytest.fixture
def smoke_store(smoke_cfg, tmp_path):
    from snowfed.sim.run.plan import prepare

    _, store = prepare(smoke_cfg, tmp_path / "run")
    return store


def descendants(pid: int) -> set[int]:
    """The PIDs of the live processes that `pid` started, directly or not (Ray's GCS and
    raylet, and the raylet's agents and workers, for a run's process)."""
    import psutil

    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def still_running(pids: set[int]) -> dict[int, str]:
    """Those of `pids` alive now: PID -> its command line, for a failure message.

    Zombies are left out: an exited process whose parent has not reaped it yet holds no
    memory, and in a container whose PID 1 does not reap, Ray's exited workers stay zombies for
    good (CI failed on two of them while they were matched by their `ray::` name)."""
    import psutil

    alive = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = " ".join(proc.cmdline())[:200] or proc.name()
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_until_gone(pids: set[int], within_s: float) -> dict[int, str]:
    """Those of `pids` still running after `within_s` seconds (see `still_running`)."""
    import time

    deadline = time.monotonic() + within_s
    while (left := still_running(pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def run_watched(args: list[str], timeout: float = 300) -> tuple[int, str, str, set[int]]:
    """Run `args` to its end: its exit code, stdout, stderr, and every process it started that
    was seen alive (checked every 0.2 s)."""
    import os
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started: set[int] = set()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            started |= descendants(proc.pid)
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait()
        out.seek(0)
        err.seek(0)
        return returncode, out.read(), err.read(), started


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
