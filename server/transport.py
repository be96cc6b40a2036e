"""How the server reaches the nodes: which hospital each node is, the nodes listed in that
order, and messages pushed now with their replies collected later (several exchanges in flight)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import datetime

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from snowfed import protocol

from .recording import RoundRecorder


class RunInterrupted(KeyboardInterrupt):
    """The user stopped the run (Ctrl-C sets run_federation's `stop`). Raised by the server loop
    while it waits for replies; the run directory holds every round completed before it."""


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
            for reply in exchange(grid, messages, timeout=600)[0] if not reply.has_error()}


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


class Sent:
    """Messages pushed to the nodes now, their replies collected later (`replies`), so that
    several exchanges can be in flight at once; each waits at most `timeout` s from its push."""

    def __init__(self, grid: Grid, messages: list[Message], timeout: float,
                 stop: threading.Event | None = None):
        self.grid, self.messages, self.stop = grid, messages, stop
        self.order = {mid: i for i, mid in enumerate(grid.push_messages(messages) if messages else [])}
        self.ids = set(self.order)
        self.deadline = time.monotonic() + timeout
        self.interval = _pull_interval(grid)

    def replies(self) -> tuple[list[Message], list[int]]:
        """The replies in the order of the messages they answer (not of their arrival, which
        depends on which actor or node ran what: a strategy sums the updates in this order, and
        floating-point sums depend on it), and the nodes that did not reply in time. Raises
        RunInterrupted as soon as `stop` is set."""
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
        replies.sort(key=lambda m: self.order[m.metadata.reply_to_message_id])
        replied = {m.metadata.src_node_id for m in replies}
        return replies, [m.metadata.dst_node_id for m in self.messages
                         if m.metadata.dst_node_id not in replied]


def _pull_interval(grid: Grid) -> float:
    """In the simulation a pull is a lookup in this process's memory: poll often (Flower's
    InMemoryGrid polls every 0.1 s, up to 0.2 s idle per exchange). A deployment's pull is a
    request to the SuperLink: once a second (Flower's own HTTP grid waits 3 s)."""
    inner = grid._grid if isinstance(grid, PartitionOrderedGrid) else grid
    return 0.01 if hasattr(inner, "pull_interval") else 1.0


def exchange(
    grid: Grid, messages: list[Message], timeout: float
) -> tuple[list[Message], list[int]]:
    """Send, wait at most `timeout` s; the replies, and the nodes that did not reply in time."""
    return Sent(grid, messages, timeout).replies()
