"""Run-directory I/O (the contract of DESIGN.md): atomic files, an append-only metrics log.

Files are written to a temporary sibling and renamed, so a reader (or a crash) never sees half a
file; metrics.jsonl is appended one complete line per record and flushed, and a torn last line
(a kill mid-write) is ignored on read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from snowfed.config import ConfigError, plain_config, require_creatable_dir
from snowfed.diagnostics import diagnose
from snowfed.protocol import RAY_NODE

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FINAL_MODEL = "model_final.pt"
STARTED_CONFIG = ".config-at-start.yaml"  # what resume compares config.yaml with
CHECKPOINT = "checkpoint.pt"  # the state after the last completed round (what `resume` reads)
STATUSES = ("completed", "failed", "interrupted")
FINAL_KEYS = {"evaluate": "final", "train": "final_train", "personalize": "personalized"}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


NON_FINITE = "non_finite"  # the keys of a record whose value was NaN or infinite (now null)


def strict_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """`obj` with every NaN or infinite float replaced by None (strict JSON has no NaN token),
    and the dotted paths of the values replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [where]
    if isinstance(obj, dict):
        out, found = {}, []
        for key, value in obj.items():
            out[key], inner = strict_json(value, f"{where}.{key}" if where else str(key))
            found += inner
        return out, found
    if isinstance(obj, list | tuple):
        pairs = [strict_json(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]
        return [v for v, _ in pairs], [p for _, inner in pairs for p in inner]
    return obj, []


def _flagged(record: dict[str, Any]) -> dict[str, Any]:
    """A record as strict JSON, its non-finite values null and named under NON_FINITE."""
    clean, found = strict_json(record)
    return {**clean, NON_FINITE: found} if found else clean


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON: a non-finite value is written as null and its path listed under
    NON_FINITE at the top level."""
    obj = _flagged(obj) if isinstance(obj, dict) else strict_json(obj)[0]
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one strict-JSON object per line (a non-finite value null, its key listed
    under NON_FINITE), flushed to disk before returning."""
    lines = "".join(json.dumps(_flagged(r), sort_keys=False, allow_nan=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a missing file is empty, a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


LOCK = ".snowfed.lock"


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold the run directory for this process: a second snowfed process on the same directory
    (two sweeps started with the same sweep dir, a resume while the run still goes) would
    interleave their records, so it is refused with the holder's pid instead."""
    import fcntl

    from snowfed.config import ConfigError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ConfigError("run_dir", str(run_dir), "a directory no other snowfed process is "
                              f"running in (pid {handle.read().strip() or '?'} holds it)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def keep_rounds_upto(path: str | Path, last_round: int) -> int:
    """Rewrite a metrics log (atomically) without the records of rounds after `last_round`: a
    run resumed from round k's checkpoint redoes round k+1, so what a killed run wrote of it
    goes. Returns how many records were dropped."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("round", 0) <= last_round]
    if len(kept) != len(records) or Path(path).exists():
        atomic_write_text(path, "".join(json.dumps(_flagged(r), allow_nan=False) + "\n" for r in kept))
    return len(records) - len(kept)


def restore_global_record(path: str | Path, saved: dict[str, Any]) -> None:
    """Make a metrics log agree with the checkpoint `saved` a run resumes from: drop the records
    of later rounds, and write the checkpoint's global record if the run was stopped between
    writing the checkpoint and its record (the checkpoint comes first)."""
    keep_rounds_upto(path, saved["round"])
    recorded = any(r.get("scope") == "global" and r.get("round") == saved["round"]
                   for r in read_jsonl(path))
    if not recorded and "metrics" in saved:
        append_jsonl(path, [{"round": saved["round"], "scope": "global", **saved["metrics"]}])


def save_checkpoint(run_dir: str | Path, rnd: int, state: dict[str, Any]) -> None:
    """The state after round `rnd` (models, server strategy, random streams), atomically."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"round": rnd, **state}, buffer)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint of a run directory (a dict with "round"), or None if it has none."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    # snowfed's own file, holding pickled strategy state (not only tensors)
    return torch.load(path, map_location="cpu", weights_only=False)


def build_summary(
    records: list[dict[str, Any]],
    nodes: dict[str, dict[str, Any]],
    status: str,
    wall_time_s: float,
    reason: str | None = None,
) -> dict[str, Any]:
    """summary.json from the metrics log: global history (round 0 = the initial model), final
    global metrics, whether the run learned (`diagnostics`, snowfed.diagnostics), per-node facts.

    `nodes` maps node name -> static facts (noise_profile, strategy, num_train, label_noise...);
    each node's last reports are added: "final" (the global model on the node's clean held-out
    split), "final_train" (its local training: losses, local-f1 of the locally trained model)
    and, with personalisation, "personalized" (global vs fine-tuned model on that split).
    Records with an `error` (a failed or late site) are counted per node as "failures", updates
    the server refused (non-finite) as "refused_updates".
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} not in {STATUSES}")
    history = [
        {k: v for k, v in r.items() if k != "scope"}
        for r in records
        if r.get("scope") == "global"
    ]
    history.sort(key=lambda r: r["round"])
    node_summary = {name: dict(facts) for name, facts in nodes.items()}
    for r in records:  # records are in round order: the last one of each phase wins
        if r.get("scope") != "node" or r["node"] not in node_summary:
            continue
        if "error" in r:
            node = node_summary[r["node"]]
            kind = "refused_updates" if r.get("refused") else "failures"
            node[kind] = node.get(kind, 0) + 1
            node["last_failure"] = {"round": r["round"], "phase": r["phase"], "error": r["error"]}
        else:
            key = FINAL_KEYS[r.get("phase")]
            node_summary[r["node"]][key] = {  # results only: where it ran stays in metrics.jsonl
                k: v for k, v in r.items() if k not in ("scope", "node", "phase", RAY_NODE)
            }
    summary: dict[str, Any] = {
        "rounds": history[-1]["round"] if history else 0,
        "wall_time_s": round(wall_time_s, 3),
        "status": status,
        "global": {k: v for k, v in history[-1].items() if k != "round"} if history else {},
        "history": history,
        "diagnostics": diagnose(history),
        "nodes": node_summary,
    }
    if reason:
        summary["reason"] = reason
    return summary


def read_summary_status(run_dir: Path) -> str | None:
    """The status a run directory's summary.json records, or None (no summary, or unreadable)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text()).get("status")
    except (OSError, ValueError):
        return None


def start_run_dir(cfg: Mapping[str, Any], run_dir: Path, key: str = "run_dir") -> None:
    """Refuse a run directory holding a previous run's results; write config.yaml into it."""
    require_creatable_dir(run_dir, key)
    if (run_dir / METRICS).exists() or (run_dir / SUMMARY).exists():
        raise ConfigError(key, str(run_dir), "a new or empty run directory (this one holds "
                          "a previous run's results, which snowfed never overwrites)")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(dict(cfg)))
    atomic_write_text(run_dir / STARTED_CONFIG, text)
    atomic_write_text(run_dir / CONFIG, text)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items()
                for k, v in _flat(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}.{i}").items()}
    return {prefix: value}


def edited_keys(run_dir: Path, cfg: Mapping[str, Any], may_change: Iterable[str] = ()) -> list[str]:
    """The keys of `cfg` (the run's config.yaml) that differ from the config the run started
    with, as `key: old -> new`, the top-level keys `may_change` aside; none when the run
    predates the record."""
    if not (run_dir / STARTED_CONFIG).is_file():
        return []
    before = _flat(plain_config(OmegaConf.load(run_dir / STARTED_CONFIG)))
    after = _flat(dict(cfg))
    changed = sorted(k for k in before.keys() | after.keys()
                     if k.split(".")[0] not in may_change and before.get(k) != after.get(k))
    return [f"{k}: {before.get(k, '(absent)')!r} -> {after.get(k, '(absent)')!r}" for k in changed]
