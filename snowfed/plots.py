"""PNG plots of a run directory (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import atomic_write_bytes  # noqa: E402


def plot_f1_per_round(
    records: list[dict[str, Any]], path: str | Path, node_labels: dict[str, str] | None = None
) -> None:
    """Global F1 on the clean test set per round (bold) and each node's F1 on its own clean
    held-out split (thin); `node_labels` adds e.g. the noise profile to a node's legend entry."""
    node_labels = node_labels or {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    glob = sorted((r["round"], r["f1"]) for r in records if r.get("scope") == "global" and "f1" in r)
    if glob:
        ax.plot(*zip(*glob), "-o", color="black", lw=2.5, label="global (clean test set)")
    nodes = sorted({r["node"] for r in records if r.get("scope") == "node"})
    for name in nodes:
        pts = sorted(
            (r["round"], r["f1"])
            for r in records
            if r.get("scope") == "node" and r["node"] == name and r.get("phase") == "evaluate"
            and "f1" in r
        )
        if pts:
            label = f"{name} ({node_labels[name]})" if name in node_labels else name
            ax.plot(*zip(*pts), "--", marker=".", lw=1.2, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("pixel F1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("F1 per round: global model on clean test data, per node on its clean split")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
