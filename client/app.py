"""The node: a Flower ClientApp (Message API) that trains on its own labels and evaluates.

Where a node's data is: at a partner site (Flower's deployment engine) the SuperNode's own
`--node-config` names it: `data-path` (a folder), `data-format` (`snowfed-store`, a federation
store as snowfed.store writes it and `snowfed prepare` makes from any dataset config, is the one
format: a node reads arrays, never a site's raw files) and `partition-id` (which of the store's
nodes this site is). In simulation
the node config holds only `partition-id` and the node opens the federation store that the
server's config names. A site's own node config wins over the server's config.

What a node builds (data tensors, strategy) is built once per process (a Ray actor in
simulation) and reused every round; the model skeleton is built once per process and shared by
the nodes it runs. What its strategy must remember between rounds
(initial weights, a trained teacher) is written next to the node's data in the store
(`node-memory/<partition-id>/<name>.pt`), so it follows the node to whichever Ray actor runs it
and survives a resumed run (Flower's `Context.state` lives only as long as the simulation).

Message types: `query.identify` (which partition is this node), `train` (local round),
`evaluate` (the global model on the node's clean held-out split) and `evaluate.personalize`
(fine-tune the final global model locally; score both).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from snowfed import protocol
from snowfed.evaluation import evaluate
from snowfed.models import model_from_config
from snowfed.rundir import atomic_write_bytes
from snowfed.store import FederationStore, NodeData
from snowfed.strategies import LocalStrategy, StrategySpec

from .privacy import DPSettings, PrivacyLedger, epsilon, resolve_dp
from .trainer import PERSONALIZE_SALT, node_generator, personalize_locally, train_locally

app = ClientApp()
MEMORY_DIR = "node-memory"
PRIVACY_LEDGER = "privacy.json"  # the node's DP-SGD step count, beside its memory


@dataclass
class _Node:
    partition_id: int
    data: NodeData
    strategy: LocalStrategy
    model: torch.nn.Module
    device: torch.device
    memory_dir: Path
    failure: dict[str, Any] | None
    dp: DPSettings | None = None  # DP-SGD settings when the federation runs privacy=dp_sgd
    memory: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)  # the memory entries as last written


@dataclass
class _StoreNodes:
    """What a process keeps of one federation store: the nodes it has run and one network,
    shared by them (each handler loads the received weights into it first, so nodes never see
    each other's, and a process that runs 1000 virtual sites holds one model, not 1000)."""

    store: FederationStore  # opened once: its manifest lists every site's rows (MBs at 1000 sites)
    model: torch.nn.Module
    nodes: dict[int, _Node] = field(default_factory=dict)


# By store path, least recently used first. A sweep runs many federations (one store each) in
# the same Ray actors; the nodes of stores no longer in use are dropped, so memory does not grow
# with the number of runs. More stores than this in use at once would rebuild nodes each round.
_STORES: OrderedDict[str, _StoreNodes] = OrderedDict()
STORES_KEPT = 8


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _threads_as_ray_says() -> None:
    """torch's intra-op threads as many as the CPUs Ray gave this actor. Ray says so in
    OMP_NUM_THREADS when it gives a worker an actor, but a worker that preloaded torch
    (snowfed.client.preload) has fixed its thread count before: two actors on two cores would
    then run two threads each and slow each other down."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))


def _store_nodes(store_path: str, device: torch.device, store: FederationStore | None = None
                 ) -> _StoreNodes:
    if store_path in _STORES:
        _STORES.move_to_end(store_path)
        return _STORES[store_path]
    store = store or FederationStore(store_path)
    model_cfg = store.manifest["model"]
    model = model_from_config(model_cfg, store.manifest["num_classes"]).to(device)
    _STORES[store_path] = _StoreNodes(store, model)
    while len(_STORES) > STORES_KEPT:
        _STORES.popitem(last=False)
    return _STORES[store_path]


DATA_PATH, DATA_FORMAT = "data-path", "data-format"  # the SuperNode's --node-config keys
STORE_FORMAT = "snowfed-store"
DATA_FORMATS = (STORE_FORMAT,)


def _partition_id(context: Context) -> int:
    return int(context.node_config[protocol.PARTITION_ID])


def _store_path(config, node_config) -> str:
    """The federation store this node reads: the one its SuperNode's node config names (a partner
    site), else the one the server's config names (a simulation, where every node shares it)."""
    if DATA_PATH in node_config:
        data_format = str(node_config.get(DATA_FORMAT, STORE_FORMAT))
        if data_format not in DATA_FORMATS:
            raise ValueError(f"node config {DATA_FORMAT}={data_format!r} is not supported; "
                             f"{DATA_FORMAT} must be one of {', '.join(DATA_FORMATS)}")
        return str(node_config[DATA_PATH])
    if "store" in config:
        return str(config[protocol.STORE])
    raise ValueError(f"no data for this node: its node config names no {DATA_PATH} and the "
                     "server's config names no federation store ('store' key)")


def _node(msg: Message, context: Context) -> _Node:
    config = msg.content["config"]
    store_path, partition_id = _store_path(config, context.node_config), _partition_id(context)
    _threads_as_ray_says()
    device = _device()
    shared = _store_nodes(store_path, device)
    if partition_id in shared.nodes:
        return shared.nodes[partition_id]
    store = shared.store
    entry = store.node(partition_id)
    data = store.node_data(partition_id)
    strategy = LocalStrategy.build(
        StrategySpec(**entry["strategy"]), data.images, data.labels, data.verified
    )
    memory_dir = store.path / MEMORY_DIR / str(partition_id)
    privacy = store.manifest.get("privacy", {"name": "none"})
    dp = None
    if privacy["name"] == "dp_sgd":
        spec = strategy.spec
        dp = resolve_dp(privacy, strategy.sampler.num_images, spec.batch_size,
                        int(store.manifest["rounds"]) * spec.local_steps)
    node = _Node(partition_id, data, strategy, shared.model, device, memory_dir, entry.get("failure"), dp)
    for file in sorted(memory_dir.glob("*.pt")):
        node.memory[file.stem] = torch.load(file, map_location="cpu", weights_only=True)
        node.saved[file.stem] = node.memory[file.stem]
    shared.nodes[partition_id] = node
    return node


def _save_memory(node: _Node) -> None:
    """Write the memory entries the strategy created or replaced this round (a part that
    updates its state, like co-teaching's peer, puts a new object in memory)."""
    for name, state in node.memory.items():
        if node.saved.get(name) is not state:
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
            atomic_write_bytes(node.memory_dir / f"{name}.pt", buffer.getvalue())
            node.saved[name] = state


def _load_global(node: _Node, msg: Message) -> None:
    node.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())


def _fails(node: _Node, server_round: int, mode: str) -> bool:
    failure = node.failure
    return bool(failure) and server_round in failure["rounds"] and failure["mode"] == mode


def _simulated_failure(node: _Node, server_round: int) -> None:
    """The hospital's `failure` setting: crash or stall in the listed rounds (a dropout test;
    mode nan, a diverged site, corrupts the reply instead: `train`)."""
    failure = node.failure
    if not failure or server_round not in failure["rounds"] or failure["mode"] == "nan":
        return
    if failure["mode"] == "raise":
        raise RuntimeError(f"simulated failure of partition {node.partition_id} in round "
                           f"{server_round} (federation.hospitals[{node.partition_id}].failure)")
    time.sleep(float(failure["stall_s"]))


def _generator(config, node: _Node, salt: int = 0) -> torch.Generator:
    return node_generator(int(config[protocol.SEED]), int(config[protocol.SERVER_ROUND]),
                          node.partition_id, salt)


def _where() -> dict[str, ConfigRecord]:
    """The reply's `where` record: the Ray node this actor runs on, so a run on a cluster shows
    where each site's work went (in simulation only: a SuperNode runs without Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {protocol.WHERE: ConfigRecord({protocol.RAY_NODE: ray.get_runtime_context().get_node_id()})}


@app.query(protocol.IDENTIFY)
def identify(msg: Message, context: Context) -> Message:
    """The server asks each node once which partition (hospital) it is."""
    record = MetricRecord({protocol.PARTITION_ID: _partition_id(context)})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def central_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping mod, when the server's central-DP wrapper asks for it (it
    sends the clipping norm): adaptive or fixed as the federation's `privacy` says."""
    config = msg.content["config"]
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    store = _store_nodes(_store_path(config, context.node_config), _device()).store
    privacy = store.manifest["privacy"]["name"]
    mod = adaptiveclipping_mod if privacy == "central_dp_adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)


@app.train(mods=[central_dp_clipping])
def train(msg: Message, context: Context) -> Message:
    node = _node(msg, context)
    config = msg.content["config"]
    _simulated_failure(node, int(config[protocol.SERVER_ROUND]))
    _load_global(node, msg)
    stats = train_locally(
        node.model, node.strategy, _generator(config, node), node.device, node.memory,
        proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)), dp=node.dp,
        run_round=(int(config[protocol.SERVER_ROUND]), int(config[protocol.NUM_ROUNDS])),
    )
    _save_memory(node)
    privacy = {}
    if node.dp is not None:
        total = PrivacyLedger(node.memory_dir / PRIVACY_LEDGER).add(stats.steps, node.dp)
        privacy = {"epsilon": epsilon(node.dp, total), "dp-steps": total, "delta": node.dp.delta,
                   "noise-multiplier": node.dp.noise_multiplier, "sample-rate": node.dp.sample_rate}
    # The locally trained model on the node's clean held-out split: what this node's labels and
    # strategy alone made of the global model this round (the global model's score on the same
    # split comes from the evaluate phase).
    local = evaluate(node.model, node.data.val_images, node.data.val_targets, node.device)
    metrics = MetricRecord(
        {
            "num-examples": len(node.data.images),
            "train-loss-first": stats.first_loss,
            "train-loss": stats.last_loss,
            "local-f1": local["f1"],
            "local-precision": local["precision"],
            "local-recall": local["recall"],
            "pseudo-labelled": stats.pseudo_labelled,
            protocol.PARTITION_ID: node.partition_id,
            **privacy,
        }
    )
    state = {k: v.cpu() for k, v in node.model.state_dict().items()}
    if _fails(node, int(config[protocol.SERVER_ROUND]), "nan"):  # what a diverged site sends
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                 for k, v in state.items()}
    arrays = ArrayRecord(state)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, **_where()}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    node = _node(msg, context)
    _load_global(node, msg)
    metrics = evaluate(node.model, node.data.val_images, node.data.val_targets, node.device)
    record = MetricRecord(
        {"num-examples": len(node.data.val_images), protocol.PARTITION_ID: node.partition_id, **metrics}
    )
    return Message(RecordDict({"metrics": record, **_where()}), reply_to=msg)


@app.evaluate(protocol.PERSONALIZE)
def personalize(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model on the node's own data (`steps` local steps of its
    strategy); report the global and the personalised model on the node's clean held-out split."""
    node = _node(msg, context)
    config = msg.content["config"]
    _load_global(node, msg)
    scores = personalize_locally(
        node.model, node.strategy, node.data.val_images, node.data.val_targets,
        _generator(config, node, salt=PERSONALIZE_SALT), int(config[protocol.PERSONALIZE_STEPS]),
        node.device, node.memory,
    )
    record = MetricRecord(
        {"num-examples": len(node.data.val_images), protocol.PARTITION_ID: node.partition_id, **scores}
    )
    return Message(RecordDict({"metrics": record, **_where()}), reply_to=msg)
