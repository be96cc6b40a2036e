"""The federation store: the one on-disk copy of a simulated federation's data.

`snowfed.sim` writes it once per run; every node (Ray actor) and the server open it memory-mapped,
so a machine holds one copy of the pixels however many virtual hospitals it simulates. Nodes hold
indices into it, never copies. Layout of the folder:

- images.npy  uint8 (N, H, W, 3)   every image of every hospital, global test images included
- clean.npy   uint8 (N, H, W)      clean binary masks (evaluation only)
- noisy.npy   uint8 (N, H, W)      the labels nodes train on (each hospital's noise applied)
- manifest.json                    nodes (name, indices, strategy, noise), test indices,
                                   server_val indices (the quality aggregation's clean set), model
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
ARRAYS = ("images", "clean", "noisy")


def write_store(path: str | Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    """Write a store atomically: a temporary sibling folder renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass(frozen=True)
class NodeData:
    """One node's view of the store: its training images with their (noisy) labels, and its
    clean held-out split for evaluation. Arrays are read-only memory maps or slices of them.
    `verified` marks the training images whose labels are clean (the site's clean_fraction)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    val_images: np.ndarray
    val_targets: np.ndarray
    verified: np.ndarray


class FederationStore:
    """Read side of the store; arrays are memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a federation store: no {MANIFEST}")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return {n: np.load(self.path / f"{n}.npy", mmap_mode="r") for n in ARRAYS}

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.manifest["nodes"]

    def node(self, partition_id: int) -> dict[str, Any]:
        if not 0 <= partition_id < len(self.nodes):
            raise IndexError(f"partition-id {partition_id} not in a {len(self.nodes)}-node store")
        return self.nodes[partition_id]

    def node_data(self, partition_id: int) -> NodeData:
        """The node's arrays, gathered once (fancy indexing copies only this node's rows)."""
        entry = self.node(partition_id)
        train, val = np.asarray(entry["train"]), np.asarray(entry["val"])
        a = self.arrays
        return NodeData(
            name=entry["name"],
            images=a["images"][train],
            labels=a["noisy"][train],
            val_images=a["images"][val],
            val_targets=a["clean"][val],
            verified=np.isin(train, np.asarray(entry.get("verified", []), dtype=int)),
        )

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The clean global test set (images, masks) drawn from every site."""
        idx = np.asarray(self.manifest["test"])
        return self.arrays["images"][idx], self.arrays["clean"][idx]

    def server_val_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The server's own small clean validation set (images, masks), apart from the test set."""
        idx = np.asarray(self.manifest.get("server_val", []), dtype=int)
        if not len(idx):
            raise ValueError(f"the store {self.path} holds no server validation images")
        return self.arrays["images"][idx], self.arrays["clean"][idx]
