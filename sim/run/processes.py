"""The processes a run starts, and their end: the environment Ray's processes inherit, and the
`snowfed` command's adoption and ending of whatever Ray leaves running when it shuts down."""

from __future__ import annotations

import ctypes
import os
import sys

# After a kill -9 of the driver, Ray's dashboard and runtime-env agents see the raylet gone within
# 2 s, then report it to the (dead) GCS and wait out its reconnect timeout before they exit: 60 s
# by Ray's default, measured 45-105 s here with 200 MB held. A local GCS answers in milliseconds,
# so 10 s costs a live run nothing; with it every process was gone 15 s after the kill
# (tests/test_resume_failures.py::test_kill_9_leaves_no_ray_process_behind). The agents read it
# from the environment only (not from ray.init's _system_config, measured); a value the user set
# is kept.
GCS_RECONNECT_TIMEOUT = ("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
# Ray 2.55 turns `_node_ip_address="127.0.0.1"` into the machine's routable address, and its
# GCS, raylet and workers then listen on every interface (measured with `ss -ltnp`). With this
# switch of Ray's own (meant for one-machine Ray on Windows and macOS; Ray reads it when it is
# imported) the node's address is 127.0.0.1 and every one of them listens on the loopback only.
LOOPBACK_ONLY = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ray_environment(address: str | None = None) -> None:
    """What every Ray process started from here inherits, and what this process's Ray reads as
    it is imported; set before Ray is imported. A private Ray (`address` None) listens on
    127.0.0.1 only. So does the driver that attaches to a cluster at a loopback address (one
    started on 127.0.0.1, as the tests do): its node must be found at the address it reaches the
    cluster by (`auto` resolved first: sim.run.plan.attach_address). A driver attaching to any
    other address takes the node's routable address, as Ray does. A user's own values are kept."""
    os.environ.setdefault(*GCS_RECONNECT_TIMEOUT)
    if address is None or is_loopback(address):
        os.environ.setdefault(*LOOPBACK_ONLY)


def is_loopback(address: str) -> bool:
    """Whether a cluster address (host:port, ray://host:port) names this machine's loopback."""
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def adopt_orphans() -> None:
    """Make this process the parent of every process it starts whose own parent exits first
    (Linux's child subreaper), rather than PID 1. Ray's shutdown stops its raylet and GCS, and
    the raylet's agents and workers outlive them: after a normal end the dashboard and
    runtime-env agents stayed about 10 s (their wait for the dead GCS), after Ctrl-C the actors
    6 s and the agents 11 s (measured on the shared 2-core machine). Adopted, `end_children`
    finds and ends them before the command returns."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_children(grace_s: float = 3.0) -> None:
    """SIGTERM every process this one started that is still alive (directly or not; adopted
    orphans included), SIGKILL those still alive `grace_s` later, and reap them all. Called when
    every result is written: what is left is Ray's, and holds nothing of the run's."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
