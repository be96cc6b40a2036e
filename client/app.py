"""The node: a Flower ClientApp (Message API) that trains on its own labels and evaluates.

In simulation every node opens the federation store named in the server's config and finds its
data by its `partition-id`; what a node builds (data tensors, strategy, model skeleton) is built
once per Ray actor and reused every round. What its strategy must remember between rounds
(initial weights, a trained teacher) lives in Flower's `Context.state`, which follows the node
from actor to actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from snowfed.evaluation import evaluate_segmentation
from snowfed.models import build_model
from snowfed.store import FederationStore, NodeData
from snowfed.strategies import LocalStrategy, StrategySpec

from .trainer import train_locally

app = ClientApp()


@dataclass
class _Node:
    partition_id: int
    data: NodeData
    strategy: LocalStrategy
    model: torch.nn.Module
    device: torch.device
    memory: dict[str, Any] = field(default_factory=dict)


_NODES: dict[tuple[str, int], _Node] = {}


def _node(msg: Message, context: Context) -> _Node:
    config = msg.content["config"]
    if "store" not in config:
        raise ValueError("the server's config names no federation store ('store' key)")
    store_path, partition_id = str(config["store"]), int(context.node_config["partition-id"])
    key = (store_path, partition_id)
    if key not in _NODES:
        store = FederationStore(store_path)
        entry = store.node(partition_id)
        data = store.node_data(partition_id)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_cfg = store.manifest["model"]
        model = build_model(
            model_cfg["name"],
            num_classes=store.manifest["num_classes"],
            **{k: v for k, v in model_cfg.items() if k != "name"},
        ).to(device)
        strategy = LocalStrategy.build(
            StrategySpec(**entry["strategy"]), data.images, data.labels, data.verified
        )
        _NODES[key] = _Node(partition_id, data, strategy, model, device)
    node = _NODES[key]
    for name, record in context.state.array_records.items():
        if name.startswith(_MEMORY) and name[len(_MEMORY) :] not in node.memory:
            node.memory[name[len(_MEMORY) :]] = record.to_torch_state_dict()
    return node


_MEMORY = "snowfed.memory."  # prefix of the strategy's memory entries in Context.state


def _save_memory(node: _Node, context: Context) -> None:
    for name, state in node.memory.items():
        if _MEMORY + name not in context.state:
            context.state[_MEMORY + name] = ArrayRecord(state)


def _load_global(node: _Node, msg: Message) -> None:
    node.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(msg, context)
    _load_global(node, msg)
    config = msg.content["config"]
    # Reproducible per (seed, round, node), whichever actor runs the node.
    seed = int(config["seed"]) * 1_000_003 + int(config["server-round"]) * 1009 + node.partition_id
    generator = torch.Generator().manual_seed(seed)
    stats = train_locally(node.model, node.strategy, generator, node.device, node.memory)
    _save_memory(node, context)
    # The locally trained model on the node's clean held-out split: what this node's labels and
    # strategy alone made of the global model this round (the global model's score on the same
    # split comes from the evaluate phase).
    local = evaluate_segmentation(node.model, node.data.val_images, node.data.val_masks, node.device)
    metrics = MetricRecord(
        {
            "num-examples": len(node.data.images),
            "train-loss-first": stats.first_loss,
            "train-loss": stats.last_loss,
            "local-f1": local["f1"],
            "local-precision": local["precision"],
            "local-recall": local["recall"],
            "pseudo-labelled": stats.pseudo_labelled,
            "partition-id": node.partition_id,
        }
    )
    arrays = ArrayRecord({k: v.cpu() for k, v in node.model.state_dict().items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(msg, context)
    _load_global(node, msg)
    metrics = evaluate_segmentation(node.model, node.data.val_images, node.data.val_masks, node.device)
    record = MetricRecord(
        {"num-examples": len(node.data.val_images), "partition-id": node.partition_id, **metrics}
    )
    return Message(RecordDict({"metrics": record}), reply_to=msg)
