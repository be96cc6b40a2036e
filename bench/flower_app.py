"""Variant b of `snowfed bench`: the same federation written as Flower's PyTorch quickstart
writes an app (flwr 1.41-1.42 Message API), on Flower's simulation engine.

As in the quickstart, every client call builds the network (`Net()`) and loads its data
(`load_data(partition_id, num_partitions)`); the server runs FedAvg's `start` with a central
evaluation function; each run is one `run_simulation` (a sweep starts Ray once per run).

- Classification (W2, S): the quickstart's data path. The dataset file is read once per process
  (the quickstart's global `fds`), flwr-datasets' IidPartitioner cuts the partition, which is
  split 80/20 into train and test, and `with_transform` turns each image into a tensor for a
  shuffling DataLoader (batch 32). Local training is the strategy's number of steps (same
  optimiser, learning rate and batch size as snowfed's), then the local test split is scored.
- Segmentation (W1): the quickstart has no segmentation data path; the node's rows come from the
  federation store on every call and train with snowfed's strategy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from snowfed.client.trainer import node_generator, train_locally
from snowfed.evaluation import evaluate
from snowfed.models import model_from_config
from snowfed.store import FederationStore
from snowfed.strategies import LocalStrategy, StrategySpec

client_app = ClientApp()


def _load(msg: Message, context: Context):
    """The quickstart's `Net()` + `load_data(partition_id)`, on every call."""
    store = FederationStore(str(msg.content["config"]["store"]))
    model_cfg = store.manifest["model"]
    model = model_from_config(model_cfg, store.manifest["num_classes"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    data = store.node_data(pid)
    return store, model, pid, data


_DATASET = None  # the quickstart's global `fds`: the file is read once per process


def load_data(path: str, partition_id: int, num_partitions: int):
    """The quickstart's `load_data`: this partition's train and test DataLoaders."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    global _DATASET
    if _DATASET is None:
        with np.load(path) as f:
            images = np.concatenate([f["train_images"], f["val_images"]])
            labels = np.concatenate([f["train_labels"], f["val_labels"]]).reshape(-1)
        _DATASET = Dataset.from_dict({"img": list(images), "label": labels})
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _DATASET
    split = partitioner.load_partition(partition_id).train_test_split(test_size=0.2, seed=42)

    def apply_transforms(batch):  # ToTensor() for HWC uint8 images
        batch["img"] = [torch.tensor(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255
                        for img in batch["img"]]
        return batch

    split = split.with_transform(apply_transforms)
    return (DataLoader(split["train"], batch_size=32, shuffle=True),
            DataLoader(split["test"], batch_size=32))


def _steps(model, loader, steps: int, lr: float, optimizer: str) -> float:
    """The quickstart's `train`, counted in steps (the loader cycles) instead of epochs."""
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    model.train()
    done, loss = 0, torch.tensor(0.0)
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch["img"]), batch["label"])
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return float(loss)


def _test(model, loader) -> tuple[float, int]:
    """The quickstart's `test`: accuracy on the partition's test split."""
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for batch in loader:
            correct += int((model(batch["img"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    return correct / max(total, 1), total


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    store, model, pid, data = _load(msg, context)
    spec = StrategySpec(**store.node(pid)["strategy"])
    config = msg.content["config"]
    if store.manifest.get("task") == "classification":
        trainloader, testloader = load_data(str(config["data"]), pid, len(store.nodes))
        loss = _steps(model, trainloader, spec.local_steps, spec.lr, spec.optimizer)
        accuracy, _ = _test(model, testloader)
        metrics = {"num-examples": len(trainloader.dataset), "train-loss": loss, "local-acc": accuracy}
    else:
        strategy = LocalStrategy.build(spec, data.images, data.labels, data.verified)
        rnd = int(config["server-round"])
        stats = train_locally(model, strategy, node_generator(int(config["seed"]), rnd, pid),
                              run_round=(rnd, int(config["num-rounds"])))
        local = evaluate(model, data.val_images, data.val_targets)
        metrics = {"num-examples": len(data.images), "train-loss": stats.last_loss,
                   "local-f1": local["f1"]}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def evaluate_node(msg: Message, context: Context) -> Message:
    store, model, pid, data = _load(msg, context)
    if store.manifest.get("task") == "classification":
        _, testloader = load_data(str(msg.content["config"]["data"]), pid, len(store.nodes))
        score, n = _test(model, testloader)
    else:
        score, n = evaluate(model, data.val_images, data.val_targets)["f1"], len(data.val_images)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "score": score})}),
                   reply_to=msg)


def run_stock_flower(cfg: dict[str, Any], run_dir: Path, on_round) -> None:
    """One run: snowfed's `prepare` builds the same store, then one Flower simulation."""
    from flwr.simulation import run_simulation

    from snowfed.server.app import build_global_model
    from snowfed.sim.run.plan import backend_config, prepare

    _, store = prepare(cfg, run_dir)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_global_model(cfg["model"], store.manifest["num_classes"], cfg["seed"])
        test_images, test_targets = store.test_set()

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            scores = evaluate(model, test_images, test_targets)
            torch.save(model.state_dict(), run_dir / "checkpoint.pt")
            on_round(server_round)
            return MetricRecord({"f1": scores["f1"]})

        config = {"store": str(store.path), "seed": int(cfg["seed"]), "num-rounds": int(cfg["rounds"]),
                  "data": str(cfg["dataset"].get("path") or "")}
        agg = cfg["aggregation"]
        strategy = FedAvg(fraction_train=float(agg["fraction_train"]),
                          fraction_evaluate=float(agg["fraction_evaluate"]))
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=int(cfg["rounds"]), evaluate_fn=central,
                       train_config=ConfigRecord(config), evaluate_config=ConfigRecord(config))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(store.nodes),
                   backend_config=backend_config(cfg["backend"]))
