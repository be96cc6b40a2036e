"""A run's closing: summary.json and the F1 plot, written from metrics.jsonl and the
federation store's facts, in a simulation and at a real deployment's server alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snowfed.report.plots import noise_label, plot_f1_per_round
from snowfed.rundir import METRICS, SUMMARY, atomic_write_json, build_summary, read_jsonl
from snowfed.server.quality import quality_report
from snowfed.store import FederationStore, node_facts

F1_PLOT = "f1_per_round.png"


def write_summary(run_dir: Path, store: FederationStore, status: str, wall_time_s: float,
                  reason: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Write summary.json and the F1 plot from whatever metrics.jsonl holds (also after a
    crash); `extra`: more top-level sections (the simulator's shortcut report)."""
    records = read_jsonl(run_dir / METRICS)
    facts = node_facts(store)
    summary = build_summary(records, facts, status, wall_time_s, reason)
    quality = quality_report(records, facts)
    if quality is not None:
        summary["quality"] = quality
    personalized = [n["personalized"] for n in summary["nodes"].values() if "personalized" in n]
    if personalized:
        summary["personalization"] = {
            k: sum(p[f"{k}-f1"] for p in personalized) / len(personalized)
            for k in ("global", "personalized")
        }
    spent = {name: {k: n["final_train"][k] for k in ("epsilon", "delta", "dp-steps", "noise-multiplier",
                                                     "sample-rate")}
             for name, n in summary["nodes"].items() if "epsilon" in n.get("final_train", {})}
    if spent:
        summary["privacy"] = spent
    if "data" in store.manifest:  # a loaded dataset: source, skipped files, leakage check
        summary["data"] = store.manifest["data"]
    summary.update(extra or {})
    atomic_write_json(run_dir / SUMMARY, summary)
    plot_f1_per_round(records, run_dir / F1_PLOT,
                      {n: noise_label(f["noise_profile"], f["noise"]) for n, f in facts.items()})
    return summary
