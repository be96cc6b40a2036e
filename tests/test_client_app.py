"""The ClientApp's handlers called directly with Flower Messages (no Ray): a node's strategy
memory lives on disk next to its data, so a node rebuilt in a fresh process (another Ray actor,
a resumed run) still has its initial weights; FedProx's mu reaches the local loss."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from snowfed import protocol
from snowfed.client import app as client_app
from snowfed.models import stage_keys
from snowfed.server.app import build_global_model


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _train_message(store, state, rnd, **extra):
    config = ConfigRecord({protocol.STORE: str(store.path), protocol.SEED: 0,
                           protocol.SERVER_ROUND: rnd, protocol.NUM_ROUNDS: store.manifest["rounds"],
                           **extra})
    content = RecordDict({"arrays": ArrayRecord(state), "config": config})
    return Message(content, dst_node_id=0, message_type="train")


def test_node_memory_survives_a_fresh_process(smoke_cfg, tmp_path):
    from snowfed.sim.run.plan import prepare

    smoke_cfg["strategy"]["freeze_stages"] = 2
    smoke_cfg["strategy"]["local_steps"] = 2
    _, store = prepare(smoke_cfg, tmp_path / "run")
    context = Context(run_id=1, node_id=0, node_config={protocol.PARTITION_ID: 1}, state=RecordDict(),
                      run_config={})
    model = build_global_model(smoke_cfg["model"], 2, seed=0)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = stage_keys(model, 2)

    client_app.train(_train_message(store, first, 1), context)
    assert (store.path / "node-memory" / "1" / "init.pt").exists()
    client_app._STORES.clear()  # a new actor or process: only the disk remembers
    other = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in first.items()}
    reply = client_app.train(_train_message(store, other, 2), context)

    after = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(after[k], first[k]) for k in frozen)  # pinned to round 1's weights
    assert any(not torch.equal(after[k], other[k]) for k in after if k not in frozen)


def test_fedprox_mu_from_the_server_changes_the_reply(smoke_cfg, tmp_path):
    from snowfed.sim.run.plan import prepare

    smoke_cfg["strategy"]["local_steps"] = 3
    _, store = prepare(smoke_cfg, tmp_path / "run")
    state = build_global_model(smoke_cfg["model"], 2, seed=0).state_dict()

    def reply(**extra):
        client_app._STORES.clear()
        context = Context(run_id=1, node_id=0, node_config={protocol.PARTITION_ID: 0},
                          state=RecordDict(), run_config={})
        msg = client_app.train(_train_message(store, state, 1, **extra), context)
        return msg.content["arrays"].to_torch_state_dict()

    plain, again, prox = reply(), reply(**{"proximal-mu": 0.0}), reply(**{"proximal-mu": 100.0})
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert any(not torch.equal(plain[k], prox[k]) for k in plain)


def test_nodes_of_one_process_share_one_model_and_never_see_each_others_weights(smoke_cfg, tmp_path):
    from snowfed.sim.run.plan import prepare

    smoke_cfg["strategy"]["local_steps"] = 2
    _, store = prepare(smoke_cfg, tmp_path / "run")
    state = build_global_model(smoke_cfg["model"], 2, seed=0).state_dict()

    def train(partition: int):
        context = Context(run_id=1, node_id=partition, node_config={protocol.PARTITION_ID: partition},
                          state=RecordDict(), run_config={})
        reply = client_app.train(_train_message(store, state, 1), context)
        return reply.content["arrays"].to_torch_state_dict()

    client_app._STORES.clear()
    alone = train(1)  # node 1 in a fresh process
    client_app._STORES.clear()
    train(0)
    after_other = train(1)  # node 1 after node 0 trained the same network object
    nodes = list(client_app._STORES[str(store.path)].nodes.values())
    assert len(nodes) == 2 and nodes[0].model is nodes[1].model
    assert all(torch.equal(alone[k], after_other[k]) for k in alone)


def test_a_preloaded_worker_takes_the_thread_count_ray_gives_its_actor(monkeypatch):
    """Ray sets OMP_NUM_THREADS when it gives a worker an actor; torch, imported before that by
    snowfed.client.preload, has fixed its thread count already and must follow."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        client_app._threads_as_ray_says()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")  # a real SuperNode: torch's own choice stays
        torch.set_num_threads(2)
        client_app._threads_as_ray_says()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
