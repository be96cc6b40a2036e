"""Record what every node and the server report, round by round, into metrics.jsonl.

The round loop (snowfed.server.app) hands every reply to the recorder before the strategy's
aggregate has moved on, so per-node numbers (losses, local scores, quality estimates, errors,
timeouts) are never aggregated away.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Message

from snowfed import protocol
from snowfed.rundir import append_jsonl

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# "RuntimeError: ..." or "torch.OutOfMemoryError: ...": an exception's type and message at the
# start of a line of a traceback
_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Warning|Exit|"
                     r"Interrupt)\w*: .+$", re.MULTILINE)
# the exceptions Ray and Flower wrap a ClientApp's own in
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")


def plain_text(reason: str) -> str:
    """An error reason without the terminal colour codes Ray puts in its exception text."""
    return _ANSI.sub("", reason)


def site_error(reason: str) -> dict[str, str]:
    """A site's error reply as a record's fields: `error`, the exception the site raised (its
    type and message, one line), and `traceback`, the whole plain-text reason Flower sent (Ray's
    traceback of the actor). A reason with no such line (a timeout, Flower's own) is kept whole."""
    text = plain_text(reason).strip()
    raised = [line for line in _RAISED.findall(text)
              if not any(wrapper in line.split(":", 1)[0] for wrapper in _WRAPPERS)]
    if not raised:
        return {"error": text}
    return {"error": raised[0], "traceback": text}


class RoundRecorder:
    """Appends node and global records to metrics.jsonl and notifies a progress callback."""

    def __init__(
        self,
        metrics_path: Path,
        node_names: list[str],
        on_round: Callable[[int, dict, dict[str, float]], None] | None = None,
    ):
        self.metrics_path = metrics_path
        self.node_names = node_names
        self.on_round = on_round
        self.names_by_node_id: dict[int, str] = {}
        self._node_f1: dict[str, float] = {}

    def name_of(self, node_id: int) -> str:
        return self.names_by_node_id.get(node_id, f"node-id-{node_id}")

    def record_replies(
        self,
        rnd: int,
        phase: str,
        replies: Iterable[Message],
        missing: Iterable[int] = (),
        timeout_s: float | None = None,
        refused: Mapping[int, str] | None = None,
    ) -> None:
        """Each reply as a node record; an error reply and each node in `missing` (no reply
        within the round's timeout) as a record with an `error` field; a reply the server left
        out (`refused`: why, by source node) keeps its metrics, with the reason as `error` and
        `refused` true."""
        records = []
        refused = refused or {}
        for msg in replies:
            src = msg.metadata.src_node_id
            if msg.has_error():
                records.append({"round": rnd, "scope": "node", "node": self.name_of(src),
                                "phase": phase, **site_error(msg.error.reason)})
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            name = self.node_names[int(metrics.pop(protocol.PARTITION_ID))]
            if self.names_by_node_id.setdefault(src, name) != name:
                raise RuntimeError(
                    f"node {src} replied as {name!r} but was identified as "
                    f"{self.names_by_node_id[src]!r} (server.app.identify_nodes)")
            if phase == "evaluate" and "f1" in metrics:
                self._node_f1[name] = float(metrics["f1"])
            if protocol.WHERE in msg.content.config_records:
                metrics.update(msg.content.config_records[protocol.WHERE])
            if src in refused:
                metrics.update(error=refused[src], refused=True)
            records.append({"round": rnd, "scope": "node", "node": name, "phase": phase, **metrics})
        for node_id in missing:
            records.append({"round": rnd, "scope": "node", "node": self.name_of(node_id),
                            "phase": phase, "error": f"no reply within round_timeout_s={timeout_s}"})
        records.sort(key=lambda r: r["node"])
        append_jsonl(self.metrics_path, records)

    def append(self, records: list[dict]) -> None:
        """Node records made outside Flower (the in-process reference runs)."""
        for r in records:
            if r.get("phase") == "evaluate" and "f1" in r:
                self._node_f1[r["node"]] = float(r["f1"])
        append_jsonl(self.metrics_path, records)

    def record_global(self, rnd: int, metrics: dict) -> None:
        append_jsonl(self.metrics_path, [{"round": rnd, "scope": "global", **metrics}])
        node_f1, self._node_f1 = dict(sorted(self._node_f1.items())), {}  # this round's sites
        if self.on_round is not None:
            self.on_round(rnd, metrics, node_f1)
