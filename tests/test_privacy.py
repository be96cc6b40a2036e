"""DP-SGD with Opacus at a site: per-example clipping bounds the update, the noise is seeded,
Poisson sampling draws q*N images per step on average, epsilon is Opacus's accountant's, and
combinations DP-SGD cannot honour are refused before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from snowfed.client.privacy import DPSettings, dp_sgd_steps, epsilon, resolve_dp
from snowfed.config import compose, plain_config
from snowfed.models import build_model
from snowfed.sim.run.plan import validate
from snowfed.strategies import LocalStrategy, StrategySpec

SPEC = StrategySpec.from_config({"name": "t", "sampler": "random", "loss": "cross_entropy",
                                 "optimizer": "sgd", "lr": 1.0, "local_steps": 4,
                                 "batch_size": 4, "tile_size": 16})


def _node(n=20):
    gen = np.random.default_rng(0)
    images = gen.integers(0, 150, (n, 24, 24, 3), dtype=np.uint8)
    labels = np.zeros((n, 24, 24), np.uint8)
    labels[:, 6:14, 4:12] = 1
    return images, labels


def _run(settings, steps=3, seed=0, sizes=None):
    torch.manual_seed(0)
    model = build_model("shortres", num_classes=2, width=8)
    before = [p.detach().clone() for p in model.parameters()]
    strategy = LocalStrategy.build(SPEC, *_node())
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)

    def loss(m, idx):
        if sizes is not None:
            sizes.append(len(idx))
        return strategy.step_loss(m, gen, "cpu", idx)

    dp_sgd_steps(model, torch.optim.SGD(params, lr=1.0), params, 20, loss, settings, [1.0] * steps, gen)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


def test_per_example_clipping_bounds_each_step():
    clip = 1e-3
    delta = _run(DPSettings(0.0, clip, 0.2, 1e-5), steps=1, sizes=(sizes := []))
    # one SGD step of lr 1: |update| <= sum of clipped per-example norms / expected batch size
    assert 0 < delta.norm() <= clip * sizes[0] / 4 + 1e-9


def test_noise_is_added_and_seeded():
    settings = DPSettings(1.0, 1.0, 0.2, 1e-5)
    a, b, c = _run(settings, seed=0), _run(settings, seed=0), _run(settings, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    quiet = _run(DPSettings(0.0, 1.0, 0.2, 1e-5), seed=0)
    assert not torch.allclose(a, quiet)


def test_poisson_sampling_draws_q_times_n_images_on_average_and_empty_samples_still_step():
    sizes: list[int] = []
    _run(DPSettings(1.0, 1.0, 0.2, 1e-5), steps=200, sizes=sizes)
    assert len(set(sizes)) > 3  # the batch size varies, as Poisson sampling does
    assert abs(np.mean(sizes) - 0.2 * 20) < 0.5
    sizes = []
    delta = _run(DPSettings(1.0, 1.0, 0.01, 1e-5), steps=20, sizes=sizes)
    assert len(sizes) < 20  # some steps had an empty sample (no loss evaluated) ...
    assert delta.abs().sum() > 0  # ... and still moved the weights: noise only


def test_epsilon_is_opacus_accountants_for_the_same_noise_rate_and_steps():
    settings = DPSettings(1.1, 1.0, 0.25, 1e-5)
    accountant = RDPAccountant()
    for _ in range(40):
        accountant.step(noise_multiplier=1.1, sample_rate=0.25)
    assert epsilon(settings, 40) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(settings, 0) == 0.0 and epsilon(settings, 80) > epsilon(settings, 40)


def test_target_epsilon_picks_the_noise_that_spends_it_over_the_planned_steps():
    privacy = {"name": "dp_sgd", "noise_multiplier": None, "target_epsilon": 3.0, "delta": 1e-5,
               "max_grad_norm": 1.0}
    settings = resolve_dp(privacy, num_images=40, batch_size=8, planned_steps=60)
    assert settings.sample_rate == 0.2
    assert 2.9 <= epsilon(settings, 60) <= 3.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["aggregation=fedprox"], "aggregation.name"),
        (["strategy=semi_supervised"], "strategy.init"),
        (["privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
        (["privacy.delta=1.0"], "privacy.delta"),
        (["+privacy.epsilon=3"], "privacy.epsilon"),
    ],
)
def test_what_dp_sgd_cannot_honour_is_refused(overrides, key):
    cfg = plain_config(compose(["federation=smoke", "privacy=dp_sgd", *overrides]))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.slow
def test_a_dp_sgd_federation_reports_each_sites_epsilon_per_round(tmp_path):
    from snowfed.rundir import read_jsonl
    from snowfed.sim.run.runner import run

    cfg = plain_config(compose(["federation=smoke", "privacy=dp_sgd", "rounds=2"]))
    summary = run(cfg, tmp_path / "dp")

    assert summary["status"] == "completed"
    steps = cfg["strategy"]["local_steps"]
    for name, spent in summary["privacy"].items():
        num_train = summary["nodes"][name]["num_train"]
        assert spent["sample-rate"] == pytest.approx(cfg["strategy"]["batch_size"] / num_train)
        accountant = RDPAccountant()
        for _ in range(2 * steps):
            accountant.step(noise_multiplier=1.0, sample_rate=spent["sample-rate"])
        assert spent["dp-steps"] == 2 * steps
        assert spent["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        per_round = [r["epsilon"] for r in read_jsonl(tmp_path / "dp" / "metrics.jsonl")
                     if r.get("node") == name and r.get("phase") == "train"]
        assert len(per_round) == 2 and 0 < per_round[0] < per_round[1]  # the budget accumulates


# --- central DP (Flower's wrappers) -----------------------------------------------------------

def test_central_dp_wraps_the_aggregation_in_flowers_wrapper_and_clips_server_side():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
    from flwr.supercore.task_identity import TaskIdentity

    from snowfed.config import load_group_option
    from snowfed.server.aggregation import build_aggregation
    from snowfed.server.privacy import WRAPPERS, wrap_central_dp

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    inner, _ = build_aggregation(dict(load_group_option("aggregation", "fedavg", "a")), num_nodes=2)
    for (name, side), wrapper in WRAPPERS.items():
        privacy = {**dict(load_group_option("privacy", name, "privacy")), "side": side,
                   "clipped_count_stddev": 1.0}
        assert type(wrap_central_dp(inner, privacy, 2)) is wrapper
    privacy = {"name": "central_dp_fixed", "side": "server", "noise_multiplier": 0.0,
               "clipping_norm": 0.5, "delta": 1e-5}
    strategy = wrap_central_dp(inner, privacy, 2)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    start = {"w": torch.zeros(10)}
    strategy.current_arrays = ArrayRecord(start)  # what configure_train records

    def reply(node, value):
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((10,), value)}),
                                   "metrics": MetricRecord({"num-examples": 5, "partition-id": node})}),
                       reply_to=sent)

    arrays, _ = strategy.aggregate_train(1, [reply(1, 3.0), reply(2, -1.0)])
    update = arrays["w"].numpy()
    # each site's update clipped to norm 0.5 before the mean: (0.5 - 0.5) / 2 per direction
    assert np.linalg.norm(update) <= 0.5 + 1e-6
    assert np.allclose(update, 0.0, atol=1e-6)


def test_central_epsilon_is_opacus_accountants_gaussian_mechanism_per_round():
    from snowfed.server.privacy import central_epsilon

    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.3, sample_rate=0.5)
    assert central_epsilon(1.3, 0.5, 5, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert central_epsilon(1.3, 0.5, 0, 1e-5) == 0.0
    assert central_epsilon(0.0, 1.0, 3, 1e-5) == float("inf")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy=central_dp_adaptive"], "privacy.clipped_count_stddev"),
        (["privacy=central_dp_fixed", "privacy.side=middle"], "privacy.side"),
        (["privacy=central_dp_fixed", "aggregation=pooled"], "aggregation.name"),
        (["privacy=central_dp_fixed", "+privacy.max_grad_norm=1"], "privacy.max_grad_norm"),
    ],
)
def test_bad_central_dp_settings_are_refused(overrides, key):
    cfg = plain_config(compose(["federation=smoke", *overrides]))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.slow
def test_client_side_central_dp_federation_reports_epsilon_per_round(tmp_path):
    from snowfed.server.privacy import central_epsilon
    from snowfed.sim.run.runner import run

    cfg = plain_config(compose(["federation=smoke", "privacy=central_dp_fixed", "privacy.side=client",
                                "rounds=2"]))
    summary = run(cfg, tmp_path / "cdp")

    assert summary["status"] == "completed"
    spent = [h["epsilon"] for h in summary["history"]]
    assert spent[0] == 0.0 and 0 < spent[1] < spent[2]
    assert spent[2] == pytest.approx(central_epsilon(1.0, 1.0, 2, 1e-5))


def test_secure_aggregation_is_refused_at_start_up_with_the_reason(capsys, tmp_path):
    from snowfed.cli import EXIT_BAD_CONFIG, main

    assert main(["run", "federation=smoke", "privacy=secagg", f"run_dir={tmp_path / 'r'}"]) == \
        EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "privacy.name='secagg'" in err and "SecAggPlusWorkflow" in err
    assert not (tmp_path / "r").exists()
