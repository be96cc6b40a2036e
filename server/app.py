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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from snowfed import protocol
from snowfed.evaluation import evaluate
from snowfed.models import model_from_config
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
from .transport import PartitionOrderedGrid, Sent, exchange, identify_nodes


@dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    final_metrics: dict[str, float]


class FederationStopped(RuntimeError):
    """Too few sites replied in a round to go on; the run ends `failed` with this reason."""


# Flower's strategies sample sites with Python's global `random`, central DP draws its noise from
# numpy's global RNG and a model's init from torch's. A sweep (snowfed.sim.run.sweep) runs several
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
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_from_config(model_cfg, num_classes)


def save_model(folder: Path, state_dict: Mapping[str, torch.Tensor], name: str = FINAL_MODEL) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state_dict.items()}, buffer)
    atomic_write_bytes(folder / name, buffer.getvalue())


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a Flower strategy has learnt across rounds (FedAdam's moments, FedAvgM's momentum,
    the current arrays): its attributes that are data, not code. Flower has no state API."""
    return {k: v for k, v in vars(strategy).items() if not callable(v)}


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
    replies, missing = exchange(grid, messages, timeout)
    recorder.record_replies(int(config[protocol.SERVER_ROUND]), "personalize", replies, missing, timeout)


class _Federation:
    """One run's server side across rounds: the global model and its evaluation, the Flower
    strategy, the random states, the checkpoints and the records."""

    def __init__(self, cfg: Mapping[str, Any], store: FederationStore, run_dir: Path,
                 on_round: Callable[[int, dict, dict[str, float]], None] | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        num_classes = store.manifest["num_classes"]
        self.model = build_global_model(cfg["model"], num_classes, cfg["seed"]).to(self.device)
        self.test_images, self.test_targets = store.test_set()
        self.num_sites = len(store.nodes)
        self.recorder = RoundRecorder(run_dir / METRICS, [n["name"] for n in store.nodes], on_round)
        agg_cfg = cfg["aggregation"]
        probe = None
        if agg_cfg["name"] == "quality":
            probe = LossProbe(build_global_model(cfg["model"], num_classes, 0).to(self.device),
                              *store.server_val_set(), self.device)
        self.strategy, self.timeout = build_aggregation(agg_cfg, self.num_sites, probe)
        self.privacy = cfg["privacy"]
        self.per_round = sites_per_round(agg_cfg, self.num_sites)
        if self.privacy["name"] in CENTRAL:
            self.strategy = wrap_central_dp(self.strategy, self.privacy, self.per_round)
        self.min_replies = int(agg_cfg["min_train_nodes"])
        self.completed: dict[int, dict[str, float]] = {}
        self.rng = RunRandomness(int(cfg["seed"]))

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(self.model, self.test_images, self.test_targets, self.device)
        if self.privacy["name"] in CENTRAL:  # site-level epsilon spent by the rounds so far
            metrics["epsilon"] = central_epsilon(self.privacy["noise_multiplier"],
                                                 self.per_round / self.num_sites, server_round,
                                                 self.privacy["delta"])
        return metrics

    def complete(self, server_round: int, arrays: ArrayRecord, metrics: dict[str, float],
                 random_state: tuple) -> None:
        """Checkpoint the round, then record its global metrics (a kill between the two leaves
        a checkpoint whose record resume writes from it: `restore_global_record`);
        `random_state` is the run's (python, numpy) random state before the next round was
        configured."""
        save_checkpoint(self.run_dir, server_round, {
            "arrays": arrays.to_torch_state_dict(),
            "strategy": strategy_state(self.strategy),
            "random": random_state[0],  # Flower samples sites with Python's `random`
            "numpy_random": random_state[1],  # and draws central-DP noise with numpy's
            "metrics": metrics,
        })
        self.recorder.record_global(server_round, metrics)
        self.completed[server_round] = metrics

    def start(self) -> ArrayRecord:
        """The global model to train from: the checkpoint's, or the initial one (round 0)."""
        saved = load_checkpoint(self.run_dir)
        if saved is None:
            keep_rounds_upto(self.run_dir / METRICS, -1)
            arrays = ArrayRecord(self.model.state_dict())
            self.complete(0, arrays, self.evaluate_global(0, arrays), (self.rng.python, self.rng.numpy))
            return arrays
        restore_global_record(self.run_dir / METRICS, saved)
        vars(self.strategy).update(saved["strategy"])
        self.rng.python, self.rng.numpy = saved["random"], saved["numpy_random"]
        self.completed[saved["round"]] = saved["metrics"]
        return ArrayRecord(saved["arrays"])

    def aggregate(self, rnd: int, training: Sent) -> ArrayRecord | None:
        """Round `rnd`'s aggregate of its finite updates (None when no site sent one); stops
        the run when fewer than `min_train_nodes` sites did, or the aggregate is not finite."""
        replies, missing = training.replies()
        replies_kept, refused = refuse_non_finite(replies)
        valid = [m for m in replies_kept if not m.has_error()]
        with self.rng.active():
            aggregated, _ = self.strategy.aggregate_train(rnd, replies_kept) if valid else (None, None)
        self.recorder.record_replies(rnd, "train", replies, missing, self.timeout, refused)
        if len(valid) < self.min_replies:
            left_out = [self.recorder.name_of(m.metadata.src_node_id) for m in replies
                        if m.has_error() or m.metadata.src_node_id in refused]
            left_out += [self.recorder.name_of(n) for n in missing]
            raise FederationStopped(
                f"round {rnd}: {len(valid)} of {len(training.messages)} sites replied with a usable "
                f"update, fewer than aggregation.min_train_nodes={self.min_replies} (left out: "
                f"{', '.join(left_out)}; see metrics.jsonl)")
        if aggregated is not None:
            bad, total, names = non_finite_values(aggregated)
            if bad:
                raise FederationStopped(
                    f"round {rnd}: the aggregated global model holds {bad} NaN or infinite values "
                    f"of {total} (in {', '.join(names[:3])}), from finite site updates: the "
                    f"aggregation ({self.cfg['aggregation']['name']}) diverged; the last finite "
                    f"model is round {max(self.completed)}'s checkpoint")
        return aggregated


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
    messages in flight to the engine (a simulation's Ctrl-C, snowfed.sim.run.engine)."""
    fed = _Federation(cfg, store, run_dir, on_round)
    arrays = fed.start()
    shared = {protocol.STORE: str(store.path.resolve())} if share_store else {}
    grid = PartitionOrderedGrid(grid, identify_nodes(grid, fed.recorder, shared.get(protocol.STORE)))
    node_ids = grid.get_node_ids()
    # the run's rounds (more after a resume that extends it)
    node_config = {**shared, protocol.SEED: int(cfg["seed"]), protocol.NUM_ROUNDS: int(cfg["rounds"])}

    def send(configure: Callable, rnd: int, arrays: ArrayRecord) -> Sent:
        with fed.rng.active():
            messages = list(configure(rnd, arrays, ConfigRecord(dict(node_config)), grid))
        return Sent(grid, messages, fed.timeout, stop)

    first, last = max(fed.completed) + 1, int(cfg["rounds"])
    training = send(fed.strategy.configure_train, first, arrays) if first <= last else None
    for rnd in range(first, last + 1):
        aggregated = fed.aggregate(rnd, training)
        arrays = arrays if aggregated is None else aggregated
        evaluating = send(fed.strategy.configure_evaluate, rnd, arrays)
        random_state = (fed.rng.python, fed.rng.numpy)  # what a resume from this round starts with
        training = send(fed.strategy.configure_train, rnd + 1, arrays) if rnd < last else None
        metrics = fed.evaluate_global(rnd, arrays)  # while the nodes evaluate and train
        replies, missing = evaluating.replies()
        fed.recorder.record_replies(rnd, "evaluate", replies, missing, fed.timeout)
        fed.complete(rnd, arrays, metrics, random_state)

    save_model(run_dir, arrays.to_torch_state_dict())
    steps = int(cfg.get("personalize_steps", 0))
    if steps > 0:
        personalize(grid, fed.recorder, node_ids, arrays,
                    {**node_config, protocol.PERSONALIZE_STEPS: steps,
                     protocol.SERVER_ROUND: int(cfg["rounds"])}, fed.timeout)
    last = max(fed.completed)
    return FederationResult(rounds_completed=last, final_metrics=fed.completed[last])
