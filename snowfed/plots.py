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
    """Left: global F1 on the clean test set per round (bold) and the global model's F1 on each
    node's clean held-out split. Right: each node's locally trained model on the same split
    (`local-f1`), where a node's own label noise shows. `node_labels` adds e.g. the noise
    profile to a node's legend entry."""
    node_labels = node_labels or {}
    fig, (ax_global, ax_local) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    glob = sorted((r["round"], r["f1"]) for r in records if r.get("scope") == "global" and "f1" in r)
    if glob:
        ax_global.plot(*zip(*glob), "-o", color="black", lw=2.5, label="global (clean test set)")
    nodes = sorted({r["node"] for r in records if r.get("scope") == "node"})
    for color, name in zip(plt.cm.tab10.colors * 10, nodes):
        label = f"{name} ({node_labels[name]})" if name in node_labels else name
        for ax, phase, key in ((ax_global, "evaluate", "f1"), (ax_local, "train", "local-f1")):
            pts = sorted(
                (r["round"], r[key])
                for r in records
                if r.get("scope") == "node" and r["node"] == name and r.get("phase") == phase
                and key in r
            )
            if pts:
                ax.plot(*zip(*pts), "--", marker=".", lw=1.2, color=color, label=label)
    ax_global.set_title("global model: clean test set, and each node's clean split")
    ax_local.set_title("each node's model after local training, on its clean split")
    for ax in (ax_global, ax_local):
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    ax_global.set_ylabel("pixel F1")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_metric_against_epsilon(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    metric: str = "f1",
    reference: list[float] | None = None,
) -> None:
    """The privacy-utility trade-off: each series (e.g. a noise multiplier) is its runs'
    (epsilon, metric) points, drawn one by one and as their mean with a sample-sd bar;
    `reference` (the non-private runs' values) is drawn as a band at its mean."""
    import statistics

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    if reference:
        mean = statistics.fmean(reference)
        ax.axhline(mean, color="grey", ls="--", lw=1.2,
                   label=f"no privacy (mean of {len(reference)}: {mean:.2f})")
        ax.scatter([], [])  # keep colours aligned with the series below
    for color, (label, points) in zip(plt.cm.tab10.colors * 10, series.items()):
        eps, values = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(eps, values, s=14, color=color, alpha=0.45)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar(statistics.fmean(eps), statistics.fmean(values), yerr=sd, fmt="o", ms=7,
                    color=color, capsize=3, label=f"{label} (n={len(points)})")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (log scale; largest over sites, delta as configured)")
    ax.set_ylabel(f"final global {metric}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
