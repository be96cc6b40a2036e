"""The federation store: the one on-disk copy of a simulated federation's data.

`snowfed.sim` writes it once per run; every node (Ray actor) and the server open it memory-mapped,
so a machine holds one copy of the pixels however many virtual hospitals it simulates. Nodes hold
indices into it, never copies: the writers lay each index list (a node's train rows, its val
rows, the test rows, the server's rows) out as one contiguous ascending range, so a node's arrays
are slices of the memory maps (views, no copy) rather than gathered rows. Stores written before
that layout (scattered index lists) still load; their nodes then copy their own rows. Layout of
the folder:

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


def take_rows(array: np.ndarray, idx) -> np.ndarray:
    """`array[idx]` for a list of row indices, as a slice (a view: no copy) when the indices are
    one contiguous ascending range, else by fancy indexing (a copy of just those rows). A node's
    rows in a store are such a range, so a thousand virtual sites in one process share the one
    memory-mapped copy of the pixels instead of each gathering its own."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"row indices must be one-dimensional, got shape {idx.shape}")
    if len(idx) == 0:
        return array[:0]
    start = int(idx[0])
    if start >= 0 and np.array_equal(idx, np.arange(start, start + len(idx))):
        if start + len(idx) > len(array):
            raise IndexError(f"rows up to {start + len(idx) - 1} in an array of {len(array)} rows")
        return array[start : start + len(idx)]
    return array[idx]


def contiguous_layout(lists: list) -> tuple[np.ndarray, list[list[int]]]:
    """For index lists into some rows: the order to write those rows in (the lists one after
    the other) and each list's indices in that order, a contiguous ascending range each."""
    lists = [np.asarray(lst, dtype=np.int64).reshape(-1) for lst in lists]
    order = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    ends = np.cumsum([len(lst) for lst in lists], dtype=np.int64)
    return order, [list(range(int(e) - len(lst), int(e))) for lst, e in zip(lists, ends)]


def tensor_view(array: np.ndarray):
    """`torch.from_numpy` of a C-contiguous copy of `array`, which is `array` itself when it is
    already contiguous (a store's slice is): the tensor then shares the read-only memory map.
    Callers never write such a tensor (they index, cast or copy it), so torch's warning about
    non-writable arrays is silenced here, and only here."""
    import warnings

    import torch

    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        # the tensor is only read: indexed, cast (.float(), .long()) or copied, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                                category=UserWarning)
        return torch.from_numpy(array)


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
    clean held-out split for evaluation. Arrays are read-only slices of the store's memory maps
    (views, no copy); only a store with scattered index lists gives copies of the node's rows.
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
        """The node's arrays: slices of the memory maps (views) for a store with contiguous node
        rows, else gathered once (fancy indexing copies only this node's rows)."""
        entry = self.node(partition_id)
        train, val = np.asarray(entry["train"], dtype=np.int64), np.asarray(entry["val"], dtype=np.int64)
        a = self.arrays
        return NodeData(
            name=entry["name"],
            images=take_rows(a["images"], train),
            labels=take_rows(a["noisy"], train),
            val_images=take_rows(a["images"], val),
            val_targets=take_rows(a["clean"], val),
            verified=np.isin(train, np.asarray(entry.get("verified", []), dtype=np.int64)),
        )

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The clean global test set (images, masks) drawn from every site."""
        idx = np.asarray(self.manifest["test"], dtype=np.int64)
        return take_rows(self.arrays["images"], idx), take_rows(self.arrays["clean"], idx)

    def server_val_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The server's own small clean validation set (images, masks), apart from the test set."""
        idx = np.asarray(self.manifest.get("server_val", []), dtype=np.int64)
        if not len(idx):
            raise ValueError(f"the store {self.path} holds no server validation images")
        return take_rows(self.arrays["images"], idx), take_rows(self.arrays["clean"], idx)


def node_facts(store: FederationStore) -> dict[str, dict[str, Any]]:
    """What summary.json says of each node before any training (appearance for synthetic
    sites; class histogram, patients and shortcut for sites cut from a loaded dataset)."""
    optional = ("appearance", "class_histogram", "patients", "shortcut")
    return {
        n["name"]: {
            "noise_profile": n["noise_profile"],
            "strategy": n["strategy"]["name"],
            "num_train": n["num_train"],
            "num_val": n["num_val"],
            "num_verified": len(n.get("verified", [])),
            "label_noise": n["label_noise"],
            "noise": n["noise"],
            **{k: n[k] for k in optional if k in n},
        }
        for n in store.nodes
    }
