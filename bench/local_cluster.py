"""A multi-node Ray cluster on this one machine, on 127.0.0.1: the raylets of Ray's own
`ray.cluster_utils.Cluster`, each with its CPUs, for `snowfed bench` and the tests of
backend=cluster (docs/cluster.md shows it too, for a first try of backend=cluster).

The cluster lives in a process of its own (`python -m snowfed.bench.local_cluster`), so the
process that uses it keeps its own Ray state: it prints the address, then the node ids, one line
each, and stops its cluster, and only that, when its standard input closes (`local_cluster`
closes it; a parent that dies closes it too).

`hide`: the nodes after the first see an empty folder at that path (a tmpfs over it, in a mount
namespace of their own: Linux, as root), as a node whose disk is its own sees a run directory
that is on another node's disk.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000  # linux/sched.h


@dataclass(frozen=True)
class LocalCluster:
    address: str  # host:port of the head node's GCS
    node_ids: tuple[str, ...]  # Ray's node ids, the head's first
    client_address: str | None = None  # ray://127.0.0.1:port of its Ray Client server, if any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_cluster(nodes: int, cpus_per_node: int, hide: Path | None = None,
                  client_port: int | None = None) -> Iterator[LocalCluster]:
    """A cluster of `nodes` raylets with `cpus_per_node` CPUs each (and a Ray Client server on
    `client_port`); stopped when the block ends."""
    cmd = [sys.executable, "-m", "snowfed.bench.local_cluster", "--nodes", str(nodes),
           "--cpus", str(cpus_per_node), *(["--hide", str(hide)] if hide else []),
           *(["--client-port", str(client_port)] if client_port else [])]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(nodes + 1)]
        if not all(lines):
            raise RuntimeError(f"the local Ray cluster did not start (exit {proc.wait()})")
        client = f"ray://127.0.0.1:{client_port}" if client_port else None
        yield LocalCluster(lines[0], tuple(lines[1:]), client)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _own_mounts(hide: Path) -> None:
    """From here on this process, and what it starts, sees an empty `hide`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed (this needs root on Linux)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "snowfed-hidden", str(hide)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snowfed.bench.local_cluster")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--hide", type=Path)
    parser.add_argument("--client-port", type=int)
    opts = parser.parse_args(argv)
    # Ray reads this as it is imported: every node on 127.0.0.1, listening on the loopback only
    from snowfed.sim.run.processes import LOOPBACK_ONLY

    os.environ[LOOPBACK_ONLY[0]] = LOOPBACK_ONLY[1]
    from ray.cluster_utils import Cluster

    head = {"num_cpus": opts.cpus, "include_dashboard": False}
    if opts.client_port:
        head["ray_client_server_port"] = opts.client_port
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        for i in range(1, opts.nodes):
            if i == 1 and opts.hide is not None:
                _own_mounts(opts.hide)
            cluster.add_node(num_cpus=opts.cpus)
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        for node in cluster.list_all_nodes():
            print(node.node_id, flush=True)
        sys.stdin.read()  # until the user of the cluster closes it, or dies
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
