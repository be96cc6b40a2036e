"""Finished runs read back from their run directories: their config keys and summaries."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from snowfed.diagnostics import diagnose
from snowfed.rundir import CONFIG, SUMMARY

MISSING = "-"


@dataclass(frozen=True)
class Run:
    path: Path
    status: str
    config: dict[str, Any]
    summary: dict[str, Any]


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run directory at or under `paths` (sorted by path)."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run or sweep directory")
        for summary_file in sorted({root / SUMMARY, *root.glob(f"**/{SUMMARY}")}):
            config_file = summary_file.parent / CONFIG
            if not summary_file.is_file() or not config_file.is_file():
                continue
            summary = json.loads(summary_file.read_text())
            config = yaml.safe_load(config_file.read_text())
            runs.append(Run(summary_file.parent, str(summary.get("status")), config, summary))
    return runs


_ABSENT = object()


def _value(config: Any, dotted: str) -> Any:
    """The raw value at a dotted config path (a number indexes a list: federation.hospitals.1);
    None where a null group cuts the path, _ABSENT where the path does not exist."""
    value: Any = config
    for part in dotted.split("."):
        if value is None:
            return None
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _ABSENT
    return value


def _known_keys(config: Any, dotted: str) -> tuple[str, list[str]]:
    """The deepest prefix of `dotted` that exists in `config`, and the keys found there."""
    value, found = config, []
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value, found = value[part], [*found, part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value, found = value[int(part)], [*found, part]
        else:
            break
    keys = list(value) if isinstance(value, dict) else [str(i) for i in range(len(value))] \
        if isinstance(value, list) else []
    return ".".join(found), keys


def check_report_keys(runs: list[Run], keys: dict[str, str], metric: str) -> None:
    """Refuse, in one line, what the runs lack: no run at all, a config key (by its flag) that no
    run's config.yaml has, or a global metric that no completed run records."""
    if not runs:
        raise ValueError("no run directory (config.yaml and summary.json) under the given paths")
    for flag, key in keys.items():
        if all(_value(run.config, key) is _ABSENT for run in runs):
            prefix, known = _known_keys(runs[0].config, key)
            where = f"keys under {prefix}" if prefix else "top-level keys"
            raise ValueError(f"{flag} {key}: no run's config.yaml has this key; the {where} are "
                             f"{', '.join(map(str, known))}")
    completed = [run for run in runs if run.status == "completed"]
    if not any(metric in run.summary.get("global", {}) for run in completed):
        recorded = sorted({k for run in completed for k in run.summary.get("global", {})})
        raise ValueError(f"--metric {metric}: no completed run ({len(completed)} of {len(runs)} "
                         f"found) records this global metric"
                         + (f"; they record {', '.join(recorded)}" if recorded else ""))


def lookup(config: dict[str, Any], dotted: str) -> str:
    """The value at a dotted config path as a label; a null group (noise: null) reads 'per-site'."""
    value = _value(config, dotted)
    if value is _ABSENT:
        return MISSING
    return "per-site" if value is None else str(value)


def numeric(config: dict[str, Any], dotted: str) -> float | None:
    """The value at a dotted config path as a number; None if absent, null or not a number."""
    value = _value(config, dotted)
    if isinstance(value, bool) or value is None or value is _ABSENT:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_diagnostics(run: Run) -> dict[str, Any]:
    """The run's summary.json `diagnostics`, or, for a summary written before they existed,
    the same judged from its `history` (snowfed.diagnostics)."""
    found = run.summary.get("diagnostics")
    return found if isinstance(found, dict) else diagnose(run.summary.get("history") or [])


def final_metric(run: Run, metric: str) -> float | None:
    """The final global metric of a completed run (None for a failed run or a missing metric)."""
    value = run.summary.get("global", {}).get(metric) if run.status == "completed" else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
