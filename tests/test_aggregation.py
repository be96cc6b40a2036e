"""Server side without Ray: FedAvg through snowfed's recording wrapper is the example-weighted
mean, and every node's reply lands in metrics.jsonl under its name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from snowfed.config import ConfigError
from snowfed.rundir import read_jsonl
from snowfed.server.aggregation import build_aggregation
from snowfed.server.recording import RecordingStrategy, RoundRecorder

AGG = {"name": "fedavg", "fraction_train": 1.0, "fraction_evaluate": 1.0,
       "min_train_nodes": 1, "min_evaluate_nodes": 1}


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages need a run identity, which Flower's runtime sets; outside it we set one.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node_id: int, partition: int, weights: list[np.ndarray], n: int) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id,
                   message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({f"w{i}": torch.from_numpy(w) for i, w in enumerate(weights)}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": float(partition),
                                 "partition-id": partition}),
    })
    return Message(content, reply_to=sent)


def test_fedavg_is_example_weighted_mean(tmp_path):
    rng = np.random.default_rng(0)
    weights = [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
               for _ in range(3)]
    sizes = [10, 30, 60]
    recorder = RoundRecorder(tmp_path / "metrics.jsonl", ["a", "b", "c"])
    strategy = RecordingStrategy(build_aggregation(AGG, num_nodes=3), recorder)
    replies = [_reply(100 + i, i, w, n) for i, (w, n) in enumerate(zip(weights, sizes))]

    arrays, metrics = strategy.aggregate_train(1, replies)

    total = sum(sizes)
    for k in range(2):
        expected = sum(w[k] * n / total for w, n in zip(weights, sizes))
        np.testing.assert_allclose(arrays[f"w{k}"].numpy(), expected, rtol=1e-6)
        # and it is not the plain mean (the weights matter)
        assert not np.allclose(arrays[f"w{k}"].numpy(), np.mean([w[k] for w in weights], axis=0))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["node"] for r in records] == ["a", "b", "c"]
    assert [r["num-examples"] for r in records] == sizes
    assert all(r["phase"] == "train" and r["scope"] == "node" for r in records)


def test_bad_aggregation_values_are_named():
    with pytest.raises(ConfigError, match="aggregation.fraction_train"):
        build_aggregation({**AGG, "fraction_train": 1.5}, num_nodes=2)
    with pytest.raises(ConfigError, match="aggregation.name"):
        build_aggregation({**AGG, "name": "fedsomething"}, num_nodes=2)
