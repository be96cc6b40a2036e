"""backend=cluster, once attached to the running Ray cluster (docs/cluster.md): the checks that
only the cluster can answer, before a run's first round. Each names what cannot work and ends
the run before anything of it is federated (the run directory keeps what it has).

- `actors_on_cluster`: some node has the resources of one site's actor (Flower's actor
  pool would otherwise wait forever for a node that never comes);
- `require_store_on_every_node`: every node reads the same federation store at the driver's
  path (the actors open it there), so the run directory is on a filesystem they all mount. Only
  the driver writes the run directory; a node reads its store and writes its own memory beside
  its data (client.app, `node-memory/`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import ray
from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from snowfed.config import ConfigError
from snowfed.sim.run.plan import backend_config, cluster_address
from snowfed.store import MANIFEST


def _nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes with resources (a node that left stays listed, with none)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def _described(nodes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{n['NodeManagerAddress']} {n['Resources'].get('CPU', 0):g} CPU "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)


def actors_on_cluster(backend: Mapping[str, Any]) -> int:
    """How many site actors Flower's Ray backend starts on the cluster (its own count, node by
    node); ConfigError when no node has room for one."""
    resources = backend_config(backend)["client_resources"]
    try:
        return pool_size_from_resources(resources)
    except ValueError:
        raise ConfigError("backend.client_resources", resources,
                          f"resources that one node of the cluster at {cluster_address(backend)} "
                          f"has (its nodes: {_described(_nodes())})") from None


@ray.remote(num_cpus=0)
def _manifest_digest(path: str) -> str:
    """On one node: the digest of the store's manifest at `path`, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        return f"error: {type(exc).__name__}: {exc}"


def require_store_on_every_node(cfg: Mapping[str, Any], store) -> None:
    """With backend=cluster, every node reads the store's manifest as the driver does; else
    ConfigError naming the path, the first node that cannot and what it saw."""
    if cluster_address(cfg["backend"]) is None:
        return
    path = str(store.path / MANIFEST)
    with open(path, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    nodes = _nodes()
    seen = ray.get([_manifest_digest.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(path) for node in nodes])
    for node, digest in zip(nodes, seen):
        if digest != expected:
            what = digest if digest.startswith("error: ") else "another store's manifest"
            raise ConfigError("run_dir", str(store.path.parent),
                              f"on a filesystem that every node of the cluster mounts at the same "
                              f"path: Ray node {node['NodeID'][:12]} ({node['NodeManagerAddress']}) "
                              f"cannot read the federation store {store.path} ({what})")
