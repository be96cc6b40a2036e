"""The server's round loop on a Grid that runs the real ClientApp handlers in this process (no
Ray): round r's evaluation and round r+1's training are sent together, and the server's own
evaluation of round r runs while they are out; the run itself is what a sequential loop gives."""

from __future__ import annotations

import uuid

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from snowfed.client import app as client_app
from snowfed.rundir import read_jsonl
from snowfed.server.app import run_federation

HANDLERS = {"train": client_app.train, "evaluate": client_app.evaluate_global,
            "query.identify": client_app.identify}


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class LocalGrid(Grid):
    """Nodes 101, 102, ... are partitions 0, 1, ...; a pushed message is answered by the
    ClientApp handler when its reply is pulled. `events` logs pushes and answers in order."""

    def __init__(self, num_nodes: int, metrics_file):
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}
        self.pending: dict[str, Message] = {}
        self.events: list[tuple] = []
        self.metrics_file = metrics_file

    def _rounds_recorded(self) -> int:
        return sum(r["scope"] == "global" for r in read_jsonl(self.metrics_file))

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pending[msg.metadata.message_id] = msg
            config = msg.content["config"] if "config" in msg.content else {}
            self.events.append(("push", msg.metadata.message_type, config.get("server-round"),
                                self._rounds_recorded()))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is None:
                continue
            reply = HANDLERS[msg.metadata.message_type](msg, self.contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def test_next_rounds_training_goes_out_before_this_round_is_recorded(smoke_cfg, tmp_path):
    from snowfed.sim.run.plan import prepare

    smoke_cfg.update(rounds=3)
    smoke_cfg["strategy"]["local_steps"] = 1
    run_dir = tmp_path / "run"
    _, store = prepare(smoke_cfg, run_dir)
    grid = LocalGrid(len(store.nodes), run_dir / "metrics.jsonl")
    result = run_federation(grid, smoke_cfg, store, run_dir)

    assert result.rounds_completed == 3
    pushes = [(kind, rnd, recorded) for event, kind, rnd, recorded in grid.events if event == "push"]
    trains = {rnd: recorded for kind, rnd, recorded in pushes if kind == "train"}
    evaluates = {rnd: recorded for kind, rnd, recorded in pushes if kind == "evaluate"}
    assert sorted(trains) == sorted(evaluates) == [1, 2, 3]
    # round 1's training follows round 0 (the initial model) being recorded; each later round's
    # training is sent with the previous round's evaluation, before that round is recorded
    assert trains == {1: 1, 2: 1, 3: 2}
    assert evaluates == {1: 1, 2: 2, 3: 3}
    order = [(kind, rnd) for kind, rnd, _ in pushes if kind != "query.identify"]
    order = [step for i, step in enumerate(order) if i == 0 or order[i - 1] != step]  # per node
    assert order == [("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2), ("train", 3),
                     ("evaluate", 3)]  # the strategy is configured in Flower's own order
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records if r["scope"] == "global"] == [0, 1, 2, 3]
    for rnd in (1, 2, 3):  # every site trained and evaluated in every round, recorded once
        for phase in ("train", "evaluate"):
            nodes = [r["node"] for r in records if r["scope"] == "node" and r.get("phase") == phase
                     and r["round"] == rnd]
            assert sorted(nodes) == sorted(n["name"] for n in store.nodes)


def test_a_stop_ends_the_loop_at_its_next_wait_keeping_the_completed_rounds(smoke_cfg, tmp_path):
    """Ctrl-C's path (sim.run.engine.ctrl_c_sets): `stop` set while round 2 is out ends the loop with
    RunInterrupted before round 2 is recorded; the checkpoint is round 1's, and resumable."""
    import threading

    from snowfed.rundir import load_checkpoint
    from snowfed.server.transport import RunInterrupted
    from snowfed.sim.run.plan import prepare

    smoke_cfg.update(rounds=5)
    smoke_cfg["strategy"]["local_steps"] = 1
    run_dir = tmp_path / "run"
    _, store = prepare(smoke_cfg, run_dir)
    grid = LocalGrid(len(store.nodes), run_dir / "metrics.jsonl")
    stop = threading.Event()

    def on_round(rnd, global_metrics, node_f1):
        if rnd == 1:
            stop.set()

    with pytest.raises(RunInterrupted):
        run_federation(grid, smoke_cfg, store, run_dir, on_round, stop=stop)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records if r["scope"] == "global"] == [0, 1]
    assert load_checkpoint(run_dir)["round"] == 1
    assert any(kind == "train" and rnd == 2 for _, kind, rnd, _ in grid.events)  # it was out

    stop.clear()  # the same directory continues from round 1
    result = run_federation(LocalGrid(len(store.nodes), run_dir / "metrics.jsonl"), smoke_cfg,
                            store, run_dir)
    assert result.rounds_completed == 5
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records if r["scope"] == "global"] == [0, 1, 2, 3, 4, 5]


def _simulation_grid(num_nodes: int):
    """The Grid and node registration of Flower's simulation engine, as run_simulation sets
    them up (flwr.simulation.run_simulation._main_loop, vce_api._register_nodes)."""
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(num_nodes, factory)
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    factory.state().run_ids[run.run_id] = RunRecord(run=run)
    factory.state().task_store[1] = Task(task_id=1, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, mapping


def test_the_simulations_node_order_is_its_partition_order():
    """What identify_nodes relies on to ask one node instead of all: Flower's simulation
    registers node i as partition i, in order (if Flower changes that, this fails)."""
    from snowfed.server.transport import _registration_order

    grid, mapping = _simulation_grid(300)
    assert _registration_order(grid, 300) == mapping
    assert _registration_order(grid, 299) is None  # not the federation's nodes: ask them


def test_a_reply_that_contradicts_the_identified_partition_stops_the_run(tmp_path):
    from flwr.app import MetricRecord

    from snowfed.protocol import PARTITION_ID
    from snowfed.server.recording import RoundRecorder

    recorder = RoundRecorder(tmp_path / "metrics.jsonl", ["alpha", "beta"])
    recorder.names_by_node_id = {11: "alpha", 12: "beta"}

    def reply(node_id: int, partition: int) -> Message:
        msg = Message(RecordDict({"metrics": MetricRecord({PARTITION_ID: partition, "f1": 0.5})}),
                      dst_node_id=node_id, message_type="evaluate")
        msg.metadata.__dict__["_src_node_id"] = node_id
        return msg

    recorder.record_replies(1, "evaluate", [reply(11, 0), reply(12, 1)])
    with pytest.raises(RuntimeError, match="replied as 'alpha' but was identified as 'beta'"):
        recorder.record_replies(2, "evaluate", [reply(12, 0)])


class LastFirstGrid(LocalGrid):
    """Answers the messages pulled together last one first (as a faster node, or actor, would)."""

    def pull_messages(self, message_ids) -> list[Message]:
        return super().pull_messages(sorted(message_ids, key=list(self.pending).index))[::-1]


def test_replies_come_in_the_order_of_their_messages_not_of_their_arrival(tmp_path):
    from snowfed.server.transport import exchange

    grid = LastFirstGrid(4, tmp_path / "metrics.jsonl")
    nodes = [103, 101, 104, 102]
    messages = [Message(RecordDict(), dst_node_id=nid, message_type="query.identify") for nid in nodes]
    replies, missing = exchange(grid, messages, timeout=10)
    assert [r.metadata.src_node_id for r in replies] == nodes and missing == []
