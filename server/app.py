"""The aggregator's main loop: FedAvg-family training with centralized evaluation every round.

`run_federation` is the body of a ServerApp's main: the simulation (snowfed.sim) and the
`flwr run .` app both call it with a Grid, the resolved config and the federation store.

The loop is Flower's `Strategy.start` (configure -> send -> aggregate, for train and evaluate,
then the server's own evaluation) with what a benchmark run needs and `start` lacks: a
checkpoint after every round and a resume from it, a per-round timeout whose latecomers are
recorded, a stop with a reason when fewer than `min_train_nodes` sites reply, and optional
personalisation after the last round. Aggregation itself stays in Flower's strategies.

One thing differs from `start`'s order of work: round r's evaluate messages and round r+1's
train messages go out together (both carry round r's aggregate), and the server evaluates the
global model on its test set while the nodes work, instead of the nodes idling through the
server's evaluation and an extra message round trip. The strategy is called in `start`'s order
(configure_evaluate(r), then configure_train(r+1)), so the same sites are sampled; round r is
recorded and checkpointed when its evaluation is in, with the random state from before round
r+1 was configured, so a resume redoes round r+1 exactly.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from snowfed import protocol
from snowfed.evaluation import evaluate
from snowfed.models import build_model
from snowfed.rundir import (
    FINAL_MODEL,
    METRICS,
    atomic_write_bytes,
    keep_rounds_upto,
    load_checkpoint,
    restore_global_record,
    save_checkpoint,
)
from snowfed.store import FederationStore

from .aggregation import build_aggregation, sites_per_round
from .privacy import CENTRAL, central_epsilon, wrap_central_dp
from .quality import LossProbe
from .recording import RoundRecorder


@dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    final_metrics: dict[str, float]


class FederationStopped(RuntimeError):
    """Too few sites replied in a round to go on; the run ends `failed` with this reason."""


class RunInterrupted(KeyboardInterrupt):
    """The user stopped the run (Ctrl-C sets run_federation's `stop`). Raised by the server loop
    while it waits for replies; the run directory holds every round completed before it."""


# Flower's strategies sample sites with Python's global `random`, central DP draws its noise from
# numpy's global RNG and a model's init from torch's. A sweep (snowfed.sim.sweep) runs several
# federations in threads of one process, so each run keeps its own states (RunRandomness) and
# swaps them in under this lock around every call that draws.
_GLOBAL_RNG = threading.Lock()


class RunRandomness:
    """One run's states of Python's and numpy's global RNGs, checkpointed with the run."""

    def __init__(self, seed: int):
        self.python = random.Random(seed).getstate()
        self.numpy = np.random.RandomState(seed).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        with _GLOBAL_RNG:
            random.setstate(self.python)
            np.random.set_state(self.numpy)
            try:
                yield
            finally:
                self.python, self.numpy = random.getstate(), np.random.get_state()


def build_global_model(model_cfg: Mapping[str, Any], num_classes: int, seed: int) -> torch.nn.Module:
    """The initial global model, seeded so every run with the same seed starts identical."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model_cfg["name"], num_classes=num_classes, **kwargs)


def save_model(folder: Path, state_dict: Mapping[str, torch.Tensor], name: str = FINAL_MODEL) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state_dict.items()}, buffer)
    atomic_write_bytes(folder / name, buffer.getvalue())


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a Flower strategy has learnt across rounds (FedAdam's moments, FedAvgM's momentum,
    the current arrays): its attributes that are data, not code. Flower has no state API."""
    return {k: v for k, v in vars(strategy).items() if not callable(v)}


def identify_nodes(grid: Grid, recorder: RoundRecorder, store_path: str | None) -> dict[int, int]:
    """Which partition (hospital) each connected node is, so that a node that never replies is
    still recorded under its hospital's name, and sites are sampled in partition order.

    Flower's simulation engine registers node i as partition i, one after another
    (flwr.server.superlink.fleet.vce.vce_api._register_nodes), so there the nodes' registration
    times give the answer, and only the last node is asked, to confirm it (asking every node
    cost 7.5 s at 1000 nodes here). The wait for that reply is also the wait for the engine's
    actors to start, which round 1's timeout should not count. Every later reply names its
    node's partition too, and RoundRecorder stops the run if one contradicts the answer.
    Elsewhere (a deployment), or if the order cannot be confirmed, every node is asked."""
    partitions = _registration_order(grid, len(recorder.node_names))
    if partitions is not None:
        last = max(partitions, key=partitions.__getitem__)
        if _ask_partitions(grid, store_path, [last]) != {last: partitions[last]}:
            partitions = None
    if partitions is None:
        partitions = _ask_partitions(grid, store_path, list(grid.get_node_ids()))
    for node_id, partition in partitions.items():
        recorder.names_by_node_id[node_id] = recorder.node_names[partition]
    return partitions


def _registration_order(grid: Grid, num_sites: int) -> dict[int, int] | None:
    """Partition by node id from the order the simulation registered its nodes; None when the
    grid is not the simulation's, or the order is not unambiguous."""
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return None
    nodes = list(grid.get_nodes())
    stamps = [n.registered_at for n in nodes]
    if len(nodes) != num_sites or len(set(stamps)) != len(stamps):
        return None
    ordered = sorted(nodes, key=lambda n: datetime.fromisoformat(n.registered_at))
    return {n.node_id: partition for partition, n in enumerate(ordered)}


def _ask_partitions(grid: Grid, store_path: str | None, node_ids: list[int]) -> dict[int, int]:
    """One `query.identify` message to each of `node_ids`; the partition of each that replied."""
    config = ConfigRecord({protocol.STORE: store_path} if store_path else {})
    messages = [Message(RecordDict({"config": config}), dst_node_id=nid,
                        message_type=protocol.IDENTIFY_TYPE) for nid in node_ids]
    return {reply.metadata.src_node_id: int(reply.content["metrics"][protocol.PARTITION_ID])
            for reply in _exchange(grid, messages, timeout=600)[0] if not reply.has_error()}


class PartitionOrderedGrid(Grid):
    """A Grid that lists its nodes in partition order and otherwise passes everything on.

    Flower's strategies sample sites with `random.sample(list(grid.get_node_ids()), k)`, and the
    simulation's node ids are random numbers returned as a set: with the same seed, each run
    sampled different sites. Listed by partition, the seed alone decides which sites train."""

    def __init__(self, grid: Grid, partitions: Mapping[int, int]):
        self._grid, self._partitions = grid, dict(partitions)

    def get_node_ids(self) -> list[int]:
        last = len(self._partitions)
        return sorted(self._grid.get_node_ids(), key=lambda n: (self._partitions.get(n, last), n))

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)


class _Sent:
    """Messages pushed to the nodes now, their replies collected later (`replies`), so that
    several exchanges can be in flight at once; each waits at most `timeout` s from its push."""

    def __init__(self, grid: Grid, messages: list[Message], timeout: float,
                 stop: threading.Event | None = None):
        self.grid, self.messages, self.stop = grid, messages, stop
        self.ids = set(grid.push_messages(messages)) if messages else set()
        self.deadline = time.monotonic() + timeout
        self.interval = _pull_interval(grid)

    def replies(self) -> tuple[list[Message], list[int]]:
        """The replies, and the nodes that did not reply in time. Raises RunInterrupted as soon
        as `stop` is set."""
        replies: list[Message] = []
        waiting = set(self.ids)
        while waiting:
            if self.stop is not None and self.stop.is_set():
                raise RunInterrupted()
            got = list(self.grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or time.monotonic() >= self.deadline:
                break
            time.sleep(self.interval)
        replied = {m.metadata.src_node_id for m in replies}
        return replies, [m.metadata.dst_node_id for m in self.messages
                         if m.metadata.dst_node_id not in replied]


def _pull_interval(grid: Grid) -> float:
    """In the simulation a pull is a lookup in this process's memory: poll often (Flower's
    InMemoryGrid polls every 0.1 s, up to 0.2 s idle per exchange). A deployment's pull is a
    request to the SuperLink: once a second (Flower's own HTTP grid waits 3 s)."""
    inner = grid._grid if isinstance(grid, PartitionOrderedGrid) else grid
    return 0.01 if hasattr(inner, "pull_interval") else 1.0


def non_finite_values(arrays: ArrayRecord) -> tuple[int, int, list[str]]:
    """(NaN or infinite values, all values, names of the arrays holding them) of an ArrayRecord."""
    bad, total, names = 0, 0, []
    for name, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind in "fc":
            count = values.size - int(np.count_nonzero(np.isfinite(values)))
            if count:
                bad, names = bad + count, [*names, name]
        total += values.size
    return bad, total, names


def refuse_non_finite(replies: list[Message]) -> tuple[list[Message], dict[int, str]]:
    """The train replies whose arrays are all finite, and why each other reply was refused (by
    source node): an update holding NaN or inf would make every aggregate NaN (FedAvg's mean, and
    the median and trimmed means through their sorts), so it is left out of the round."""
    kept, refused = [], {}
    for msg in replies:
        arrays = None if msg.has_error() else next(iter(msg.content.array_records.values()), None)
        bad, total, names = non_finite_values(arrays) if arrays is not None else (0, 0, [])
        if bad:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            refused[msg.metadata.src_node_id] = (f"non-finite update refused: {bad} of {total} "
                                                 f"values are NaN or infinite (in {shown})")
        else:
            kept.append(msg)
    return kept, refused


def _exchange(
    grid: Grid, messages: list[Message], timeout: float
) -> tuple[list[Message], list[int]]:
    """Send, wait at most `timeout` s; the replies, and the nodes that did not reply in time."""
    return _Sent(grid, messages, timeout).replies()


def run_federation(
    grid: Grid,
    cfg: Mapping[str, Any],
    store: FederationStore,
    run_dir: Path,
    on_round: Callable[[int, dict, dict[str, float]], None] | None = None,
    share_store: bool = True,
    stop: threading.Event | None = None,
) -> FederationResult:
    """Run rounds up to `cfg["rounds"]`, from the run directory's checkpoint if it has one;
    append to metrics.jsonl as rounds complete, checkpoint each round, write the final model.

    `share_store`: the nodes read their data from the server's store (a simulation: its path goes
    in every message); False in a real deployment, where each site's node config names its own.
    `stop`: once set, the loop raises RunInterrupted at its next wait for replies, leaving the
    messages in flight to the engine (a simulation's Ctrl-C, snowfed.sim.runner)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_global_model(cfg["model"], store.manifest["num_classes"], cfg["seed"]).to(device)
    test_images, test_targets = store.test_set()
    node_names = [n["name"] for n in store.nodes]
    recorder = RoundRecorder(run_dir / METRICS, node_names, on_round)
    agg_cfg = cfg["aggregation"]
    probe = None
    if agg_cfg["name"] == "quality":
        probe = LossProbe(build_global_model(cfg["model"], store.manifest["num_classes"], 0).to(device),
                          *store.server_val_set(), device)
    strategy, timeout = build_aggregation(agg_cfg, len(node_names), probe)
    privacy = cfg["privacy"]
    per_round = sites_per_round(agg_cfg, len(node_names))
    if privacy["name"] in CENTRAL:
        strategy = wrap_central_dp(strategy, privacy, per_round)
    min_replies = int(agg_cfg["min_train_nodes"])
    completed: dict[int, dict[str, float]] = {}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test_images, test_targets, device)
        if privacy["name"] in CENTRAL:  # site-level epsilon spent by the rounds so far
            metrics["epsilon"] = central_epsilon(privacy["noise_multiplier"],
                                                 per_round / len(node_names), server_round,
                                                 privacy["delta"])
        return metrics

    rng = RunRandomness(int(cfg["seed"]))

    def complete(server_round: int, arrays: ArrayRecord, metrics: dict[str, float],
                 random_state: tuple) -> None:
        """Checkpoint the round, then record its global metrics (a kill between the two leaves
        a checkpoint whose record resume writes from it: `restore_global_record`);
        `random_state` is the run's (python, numpy) random state before the next round was
        configured."""
        save_checkpoint(run_dir, server_round, {
            "arrays": arrays.to_torch_state_dict(),
            "strategy": strategy_state(strategy),
            "random": random_state[0],  # Flower samples sites with Python's `random`
            "numpy_random": random_state[1],  # and draws central-DP noise with numpy's
            "metrics": metrics,
        })
        recorder.record_global(server_round, metrics)
        completed[server_round] = metrics

    saved = load_checkpoint(run_dir)
    if saved is None:
        keep_rounds_upto(run_dir / METRICS, -1)
        arrays = ArrayRecord(model.state_dict())
        complete(0, arrays, evaluate_global(0, arrays), (rng.python, rng.numpy))
    else:
        restore_global_record(run_dir / METRICS, saved)
        arrays = ArrayRecord(saved["arrays"])
        vars(strategy).update(saved["strategy"])
        rng.python, rng.numpy = saved["random"], saved["numpy_random"]
        completed[saved["round"]] = saved["metrics"]

    shared = {protocol.STORE: str(store.path.resolve())} if share_store else {}
    partitions = identify_nodes(grid, recorder, shared.get("store"))
    grid = PartitionOrderedGrid(grid, partitions)
    node_ids = grid.get_node_ids()
    # the run's rounds (more after a resume that extends it)
    node_config = {**shared, protocol.SEED: int(cfg["seed"]), protocol.NUM_ROUNDS: int(cfg["rounds"])}

    def send_train(rnd: int, arrays: ArrayRecord) -> _Sent:
        with rng.active():
            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(node_config)), grid))
        return _Sent(grid, messages, timeout, stop)

    first, last = max(completed) + 1, int(cfg["rounds"])
    training = send_train(first, arrays) if first <= last else None
    for rnd in range(first, last + 1):
        replies, missing = training.replies()
        replies_kept, refused = refuse_non_finite(replies)
        valid = [m for m in replies_kept if not m.has_error()]
        with rng.active():
            aggregated, _ = strategy.aggregate_train(rnd, replies_kept) if valid else (None, None)
        recorder.record_replies(rnd, "train", replies, missing, timeout, refused)
        if len(valid) < min_replies:
            left_out = [recorder.name_of(m.metadata.src_node_id) for m in replies
                        if m.has_error() or m.metadata.src_node_id in refused]
            left_out += [recorder.name_of(n) for n in missing]
            raise FederationStopped(
                f"round {rnd}: {len(valid)} of {len(training.messages)} sites replied with a usable "
                f"update, fewer than aggregation.min_train_nodes={min_replies} (left out: "
                f"{', '.join(left_out)}; see metrics.jsonl)")
        if aggregated is not None:
            bad, total, names = non_finite_values(aggregated)
            if bad:
                raise FederationStopped(
                    f"round {rnd}: the aggregated global model holds {bad} NaN or infinite values "
                    f"of {total} (in {', '.join(names[:3])}), from finite site updates: the "
                    f"aggregation ({agg_cfg['name']}) diverged; the last finite model is round "
                    f"{max(completed)}'s checkpoint")
            arrays = aggregated
        with rng.active():
            evaluating = _Sent(grid, list(strategy.configure_evaluate(
                rnd, arrays, ConfigRecord(dict(node_config)), grid)), timeout, stop)
        random_state = (rng.python, rng.numpy)  # what a resume from this round starts with
        training = send_train(rnd + 1, arrays) if rnd < last else None
        metrics = evaluate_global(rnd, arrays)  # while the nodes evaluate and train
        replies, missing = evaluating.replies()
        recorder.record_replies(rnd, "evaluate", replies, missing, timeout)
        complete(rnd, arrays, metrics, random_state)

    save_model(run_dir, arrays.to_torch_state_dict())
    steps = int(cfg.get("personalize_steps", 0))
    if steps > 0:
        personalize(grid, recorder, node_ids, arrays, {**node_config, protocol.PERSONALIZE_STEPS: steps,
                                                       protocol.SERVER_ROUND: int(cfg["rounds"])}, timeout)
    last = max(completed)
    return FederationResult(rounds_completed=last, final_metrics=completed[last])


def personalize(
    grid: Grid,
    recorder: RoundRecorder,
    node_ids: list[int],
    arrays: ArrayRecord,
    config: dict[str, Any],
    timeout: float,
) -> None:
    """Every node fine-tunes the final global model on its own data and reports both models on
    its clean held-out split (metrics.jsonl phase `personalize`, after the last round)."""
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=nid,
                message_type=protocol.PERSONALIZE_TYPE)
        for nid in node_ids
    ]
    replies, missing = _exchange(grid, messages, timeout)
    recorder.record_replies(int(config[protocol.SERVER_ROUND]), "personalize", replies, missing, timeout)
