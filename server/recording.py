"""Record what every node and the server report, round by round, into metrics.jsonl.

`RecordingStrategy` wraps any Flower strategy (FedAvg today, the rest of the FedAvg family
tomorrow) the way Flower's own DP wrappers do: it delegates every phase and logs the per-node
replies it sees before they are aggregated away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from snowfed.rundir import append_jsonl

NODE_KEY = "partition-id"  # every node reply carries its partition id among its metrics


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
        self._names_by_node_id: dict[int, str] = {}
        self._node_f1: dict[str, float] = {}

    def record_replies(self, rnd: int, phase: str, replies: Iterable[Message]) -> None:
        records = []
        for msg in replies:
            src = msg.metadata.src_node_id
            if msg.has_error():
                name = self._names_by_node_id.get(src, f"node-id-{src}")
                records.append(
                    {"round": rnd, "scope": "node", "node": name, "phase": phase,
                     "error": msg.error.reason}
                )
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            name = self.node_names[int(metrics.pop(NODE_KEY))]
            self._names_by_node_id[src] = name
            if phase == "evaluate" and "f1" in metrics:
                self._node_f1[name] = float(metrics["f1"])
            records.append({"round": rnd, "scope": "node", "node": name, "phase": phase, **metrics})
        records.sort(key=lambda r: r["node"])
        append_jsonl(self.metrics_path, records)

    def record_global(self, rnd: int, metrics: dict) -> None:
        append_jsonl(self.metrics_path, [{"round": rnd, "scope": "global", **metrics}])
        if self.on_round is not None:
            self.on_round(rnd, metrics, dict(sorted(self._node_f1.items())))


class RecordingStrategy(Strategy):
    """Delegates to `inner`, recording each node's train and evaluate replies."""

    def __init__(self, inner: Strategy, recorder: RoundRecorder):
        self.inner = inner
        self.recorder = recorder

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.recorder.record_replies(server_round, "train", replies)
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.recorder.record_replies(server_round, "evaluate", replies)
        return self.inner.aggregate_evaluate(server_round, replies)
