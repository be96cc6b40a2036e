"""Server side without Ray: every aggregation builds from its config, bad values are named,
FedAvg is the example-weighted mean and every reply lands in metrics.jsonl, FedProx's term
changes the local update, the quality-aware weights move toward the clean site, and a
strategy's state survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from snowfed.client.trainer import train_locally
from snowfed.config import ConfigError, group_options, load_group_option
from snowfed.models import build_model
from snowfed.rundir import read_jsonl
from snowfed.server.aggregation import AGGREGATIONS, FEDERATED, build_aggregation
from snowfed.server.app import strategy_state
from snowfed.server.quality import LossProbe, quality_report
from snowfed.server.recording import RoundRecorder
from snowfed.strategies import LocalStrategy, StrategySpec

AGG = {"name": "fedavg", "fraction_train": 1.0, "fraction_evaluate": 1.0,
       "min_train_nodes": 1, "min_evaluate_nodes": 1, "round_timeout_s": 60}


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages need a run identity, which Flower's runtime sets; outside it we set one.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node_id: int, partition: int, arrays: dict[str, torch.Tensor], n: int) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id,
                   message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord(arrays),
        "metrics": MetricRecord({"num-examples": n, "train-loss": float(partition),
                                 "partition-id": partition}),
    })
    return Message(content, reply_to=sent)


def _weights(rng, k=3):
    return [{"w0": torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32)),
             "w1": torch.from_numpy(rng.normal(size=4).astype(np.float32))} for _ in range(k)]


def test_fedavg_is_example_weighted_mean_and_replies_are_recorded(tmp_path):
    weights, sizes = _weights(np.random.default_rng(0)), [10, 30, 60]
    recorder = RoundRecorder(tmp_path / "metrics.jsonl", ["a", "b", "c"])
    strategy, timeout = build_aggregation(AGG, num_nodes=3)
    replies = [_reply(100 + i, i, w, n) for i, (w, n) in enumerate(zip(weights, sizes))]

    arrays, _ = strategy.aggregate_train(1, replies)
    recorder.record_replies(1, "train", replies, missing=[999], timeout_s=timeout)

    assert timeout == 60
    for k in ("w0", "w1"):
        expected = sum(w[k].numpy() * n / sum(sizes) for w, n in zip(weights, sizes))
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-6)
        assert not np.allclose(arrays[k].numpy(), np.mean([w[k].numpy() for w in weights], axis=0))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["node"] for r in records] == ["a", "b", "c", "node-id-999"]
    assert [r.get("num-examples") for r in records[:3]] == sizes
    assert "no reply within round_timeout_s=60" in records[3]["error"]


@pytest.mark.parametrize("name", [n for n in AGGREGATIONS if n not in ("pooled", "local")])
def test_every_federated_aggregation_builds_from_its_config(name):
    cfg = dict(load_group_option("aggregation", name, "aggregation"))
    strategy, _ = build_aggregation(cfg, num_nodes=4, probe=lambda arrays: 0.0)
    assert type(strategy) is FEDERATED[name]
    for key, value in cfg.items():  # every configured value reached Flower's strategy
        if hasattr(strategy, key) and key != "name":
            assert getattr(strategy, key) == value, key


def test_every_aggregation_name_has_a_config_file():
    assert set(group_options("aggregation")) == set(AGGREGATIONS)


@pytest.mark.parametrize(
    ("change", "nodes", "key", "allowed"),
    [
        ({"fraction_train": 1.5}, 3, "aggregation.fraction_train", "(0.0, 1.0]"),
        ({"name": "fedsomething"}, 3, "aggregation.name", "fedavg"),
        ({"min_train_nodes": 5}, 3, "aggregation.min_train_nodes", "at most the number of sites (3)"),
        ({"name": "bulyan"}, 2, "aggregation.name", "4*num_malicious_nodes+3 = 3"),
        ({"name": "fedprox", "proximal_mu": -1}, 3, "aggregation.proximal_mu", ">= 0.0"),
        ({"server_momentum": 0.9}, 3, "aggregation.server_momentum", "a key of aggregation fedavg"),
        ({"name": "multikrum", "num_nodes_to_select": 4}, 3, "aggregation.num_nodes_to_select",
         "from 1 to 3"),
    ],
)
def test_bad_aggregation_values_are_named(change, nodes, key, allowed):
    with pytest.raises(ConfigError, match=key) as err:
        build_aggregation({**AGG, **change}, num_nodes=nodes)
    assert allowed in str(err.value)


# --- FedProx ----------------------------------------------------------------------------------

def _object_node(n=6, size=24, empty=False):
    gen = np.random.default_rng(0)
    images = gen.integers(0, 150, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 6:14, 4:12] = 1
    images[masks == 1] = 240  # the object is visible: bright
    return images, (np.zeros_like(masks) if empty else masks), masks


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("shortres", num_classes=2, width=8)


SPEC = StrategySpec.from_config({"name": "t", "sampler": "random", "loss": "cross_entropy",
                                 "optimizer": "adam", "lr": 1e-2, "local_steps": 8,
                                 "batch_size": 2, "tile_size": 16})


def test_fedprox_term_changes_the_update_and_keeps_it_near_the_received_model():
    images, labels, _ = _object_node()
    received = {k: v.clone() for k, v in _model().state_dict().items()}

    def local_update(mu):
        model = _model()
        strategy = LocalStrategy.build(SPEC, images, labels)
        train_locally(model, strategy, torch.Generator().manual_seed(0), proximal_mu=mu)
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    def drift(update):
        return sum(float((update[k] - received[k]).pow(2).sum()) for k in update)

    plain, again, prox = local_update(0.0), local_update(0.0), local_update(50.0)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # same seed: same update
    assert any(not torch.equal(plain[k], prox[k]) for k in plain)
    assert drift(prox) < 0.5 * drift(plain)


# --- quality-aware FedAvg ---------------------------------------------------------------------

def test_quality_weights_move_toward_the_clean_site():
    images, clean, masks = _object_node()
    _, missing, _ = _object_node(empty=True)  # every annotation missing: all background

    def trained(labels):
        model = _model()
        train_locally(model, LocalStrategy.build(SPEC, images, labels), torch.Generator().manual_seed(0),
                      steps=30)
        return {k: v.clone() for k, v in model.state_dict().items()}

    clean_update, noisy_update = trained(clean), trained(missing)
    probe = LossProbe(_model(), images[:3], masks[:3])
    assert probe(ArrayRecord(clean_update)) < probe(ArrayRecord(noisy_update))
    cfg = dict(load_group_option("aggregation", "quality", "aggregation"))
    strategy, _ = build_aggregation(cfg, num_nodes=2, probe=probe)
    replies = [_reply(1, 0, clean_update, 10), _reply(2, 1, noisy_update, 30)]  # noisy site 3x bigger

    arrays, _ = strategy.aggregate_train(1, replies)

    q = [r.content["metrics"]["quality"] for r in replies]
    assert q[0] == 1.0 and q[1] < 0.5
    w_clean = 10 * q[0] / (10 * q[0] + 30 * q[1])
    assert w_clean > 0.25  # FedAvg would give the clean site 10/40
    for k, v in arrays.to_torch_state_dict().items():
        if v.is_floating_point():
            expected = w_clean * clean_update[k] + (1 - w_clean) * noisy_update[k]
            torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-5)


def test_quality_report_ranks_estimates_against_true_label_quality():
    records = [{"scope": "node", "phase": "train", "node": n, "round": r, "quality": q}
               for r in (1, 2) for n, q in (("a", 1.0), ("b", 0.4), ("c", 0.7))]
    nodes = {n: {"noise_profile": p, "label_noise": {"pixel_precision": pr, "pixel_recall": rc}}
             for n, p, pr, rc in (("a", "clean", 1, 1), ("b", "noisy", 1, 0.5), ("c", "bb", 0.8, 1))}
    report = quality_report(records, nodes)
    assert report["sites"]["b"]["estimated_quality"] == 0.4
    assert report["sites"]["b"]["true_label_quality"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["spearman"] == pytest.approx(1.0)
    assert quality_report([], nodes) is None


# --- server state across a checkpoint ---------------------------------------------------------

def test_fedadam_state_restored_from_a_checkpoint_continues_identically():
    rng = np.random.default_rng(1)
    rounds = [_weights(rng, 2) for _ in range(3)]
    cfg = dict(load_group_option("aggregation", "fedadam", "aggregation"))

    def fresh():
        strategy, _ = build_aggregation(cfg, num_nodes=2)
        # what configure_train records as the model sent out (FedOpt's delta is against it)
        strategy.current_arrays = {k: v.numpy().copy() for k, v in rounds[0][0].items()}
        return strategy

    uninterrupted, first = fresh(), fresh()
    for rnd in (1, 2):
        expected, _ = uninterrupted.aggregate_train(
            rnd, [_reply(i + 1, i, w, 5) for i, w in enumerate(rounds[rnd])])
    first.aggregate_train(1, [_reply(i + 1, i, w, 5) for i, w in enumerate(rounds[1])])
    state = strategy_state(first)
    resumed = fresh()  # a new process: built from config, then the saved state
    vars(resumed).update(state)
    arrays, _ = resumed.aggregate_train(2, [_reply(i + 1, i, w, 5) for i, w in enumerate(rounds[2])])
    expected = expected.to_torch_state_dict()
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, expected[k])
    # and the state matters: without it, round 2 comes out differently
    other, _ = fresh().aggregate_train(2, [_reply(i + 1, i, w, 5) for i, w in enumerate(rounds[2])])
    assert not np.allclose(other["w0"].numpy(), arrays["w0"].numpy())
