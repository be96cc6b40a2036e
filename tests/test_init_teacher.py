"""Initialisation (autoencoder pre-training, checkpoints), frozen stages and the teacher: each test
checks the mechanism, on a tiny model and node."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snowfed.client.trainer import train_locally
from snowfed.config import ConfigError, compose, plain_config
from snowfed.models import build_model, stage_keys
from snowfed.sim.federation import resolve_federation
from snowfed.strategies import LocalStrategy, StrategySpec
from snowfed.strategies.init import INITS, load_checkpoint
from snowfed.strategies.teacher import distillation, pseudo_labels

BASE = {"name": "t", "sampler": "random", "loss": "cross_entropy", "optimizer": "adam", "lr": 1e-2,
        "local_steps": 4, "batch_size": 2, "tile_size": 16}
ENCODER = 4  # stem, enc1, enc2, bottleneck


def _node(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(0)
    images = gen.integers(0, 150, (n, 24, 24, 3), dtype=np.uint8)
    labels = np.zeros((n, 24, 24), np.uint8)
    labels[:, 6:14, 4:12] = 1
    images[labels == 1] = 240  # the object is visible: bright
    return images, labels


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("shortres", num_classes=2, width=8)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- frozen stages ----------------------------------------------------------------------------

def test_frozen_stages_stay_bitwise_equal_across_rounds_whatever_the_server_sends():
    spec = StrategySpec.from_config({**BASE, "freeze_stages": ENCODER})
    strategy = LocalStrategy.build(spec, *_node())
    model, memory = _model(), {}
    first = _state(model)
    frozen = stage_keys(model, ENCODER)
    assert frozen and all(k.startswith("encoder.") for k in frozen)
    for round_ in range(3):
        if round_:  # a new global model whose every weight differs from the node's first one
            model.load_state_dict({k: v + 0.5 for k, v in first.items()})
        train_locally(model, strategy, torch.Generator().manual_seed(round_), memory=memory)
        after = model.state_dict()
        assert all(torch.equal(after[k], first[k]) for k in frozen)
        assert any(not torch.equal(after[k], first[k]) for k in after if k not in frozen)


def test_freezing_more_stages_than_the_model_has_is_a_config_error(tmp_path):
    cfg = plain_config(compose(["federation=smoke", "strategy.freeze_stages=8",
                                f"run_dir={tmp_path / 'r'}"]))
    with pytest.raises(ConfigError, match=r"strategy.freeze_stages=8.*from 0 to 7.*stem, enc1"):
        resolve_federation(cfg)


# --- autoencoder pre-training (semi-supervised) -----------------------------------------------

def _autoencoder(steps: int):
    part = INITS["autoencoder"]
    return part.build(**part.resolve({"steps": steps, "batch_size": 4, "weight_l1": 0.0}, "init"))


def _reconstruction_error(model, state, images) -> float:
    model.load_state_dict(state)
    torch.manual_seed(1)
    decoder = model.reconstruction_decoder()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    # a fresh decoder fitted on top of the frozen encoder, a few steps: how much the features hold
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(30):
        loss = F.mse_loss(decoder(model.encoder(x).detach()), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_autoencoder_init_trains_only_the_encoder_and_ignores_labels():
    images, labels = _node()
    model = _model()
    received = _state(model)
    init = _autoencoder(steps=40)
    state = init(model, images, 16, torch.Generator().manual_seed(0), "cpu")
    encoder = [k for k in state if k.startswith("encoder.")]
    assert all(not torch.equal(state[k], received[k]) for k in encoder if k.endswith("weight"))
    assert all(torch.equal(state[k], received[k]) for k in state if k not in encoder)
    assert all(torch.equal(v, received[k]) for k, v in model.state_dict().items())  # input untouched
    # labels are never read: nodes with opposite labels pre-train the very same encoder
    spec = StrategySpec.from_config({**BASE, "init": "autoencoder", "init_params": {"steps": 5}})
    inits = []
    for node_labels in (labels, 1 - labels):
        memory = {}
        LocalStrategy.build(spec, images, node_labels).start_round(
            _model(), memory, torch.Generator().manual_seed(3))
        inits.append(memory["init"])
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])


def test_autoencoder_pretraining_makes_features_that_reconstruct_better():
    images, _ = _node()
    model = _model()
    received = _state(model)
    state = _autoencoder(steps=150)(model, images, 16, torch.Generator().manual_seed(0), "cpu")
    assert _reconstruction_error(model, state, images) < _reconstruction_error(model, received, images)


def test_semi_supervised_applies_the_init_once_then_follows_the_server():
    images, labels = _node()
    spec = StrategySpec.from_config({**BASE, "init": "autoencoder", "init_params": {"steps": 5}})
    strategy = LocalStrategy.build(spec, images, labels)
    model, memory = _model(), {}
    strategy.start_round(model, memory, torch.Generator().manual_seed(0))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in memory["init"].items())
    global_next = {k: v + 1.0 for k, v in _state(model).items()}
    model.load_state_dict(global_next)
    strategy.start_round(model, memory, torch.Generator().manual_seed(1))  # no freeze: kept as sent
    assert all(torch.equal(model.state_dict()[k], v) for k, v in global_next.items())


# --- checkpoints (transfer) -------------------------------------------------------------------

def test_transfer_starts_from_the_checkpoint_and_keeps_its_encoder(tmp_path):
    source = _model(seed=5)
    torch.save(source.state_dict(), tmp_path / "model_final.pt")
    spec = StrategySpec.from_config({**BASE, "init": "checkpoint", "init_params": {"path": str(tmp_path)},
                                     "freeze_stages": ENCODER})
    strategy = LocalStrategy.build(spec, *_node())
    model, memory = _model(seed=0), {}
    train_locally(model, strategy, torch.Generator().manual_seed(0), memory=memory)
    frozen = stage_keys(model, ENCODER)
    after, ckpt = model.state_dict(), source.state_dict()
    assert all(torch.equal(after[k], ckpt[k]) for k in frozen)
    assert all(torch.equal(memory["init"][k], ckpt[k]) for k in ckpt)


def test_a_checkpoint_of_another_model_is_refused_with_its_key(tmp_path):
    torch.save(build_model("shortres", num_classes=2, width=16).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConfigError, match=r"k=.*m.pt.*shape.*model.width"):
        load_checkpoint(tmp_path / "m.pt", _model(), "k")
    with pytest.raises(ConfigError, match="run directory holding model_final.pt"):
        load_checkpoint(tmp_path / "nowhere", _model(), "k")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="loading it failed"):
        load_checkpoint(tmp_path / "junk.pt", _model(), "k")


def _finished_run(path, width: int, status: str = "completed") -> None:
    path.mkdir(parents=True)
    torch.save(build_model("shortres", num_classes=2, width=width).state_dict(), path / "model_final.pt")
    (path / "summary.json").write_text(json.dumps({"status": status}))


def test_last_means_the_newest_completed_run_whose_model_fits(tmp_path):
    runs = tmp_path / "runs"
    overrides = ["federation=smoke", "strategy=transfer", f"run_dir={runs / 'new'}"]
    with pytest.raises(ConfigError, match="strategy.init_params.path='last'.*there is none yet"):
        resolve_federation(plain_config(compose(overrides)))
    _finished_run(runs / "a", width=16)  # fits federation=smoke (model.width 16)
    _finished_run(runs / "sweep" / "0", width=16)
    _finished_run(runs / "b", width=32)  # newer, but another model
    _finished_run(runs / "c", width=16, status="failed")
    plan = resolve_federation(plain_config(compose(overrides)))
    paths = {h.strategy.init_params["path"] for h in plan.hospitals}
    assert paths == {str((runs / "sweep" / "0" / "model_final.pt").resolve())}


# --- teacher ----------------------------------------------------------------------------------

def test_the_teacher_fills_only_unannotated_pixels_above_its_threshold():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(4, 2, 12, 12, generator=gen)
    labels = (torch.rand(4, 12, 12, generator=gen) < 0.3).long()
    confidence, predicted = F.softmax(logits, dim=1).max(dim=1)
    for threshold in (0.6, 0.9, 0.99):
        merged = pseudo_labels(logits, labels, threshold, "pixel")
        changed = merged != labels
        assert changed.any()
        assert (confidence[changed] >= threshold).all() and (labels[changed] == 0).all()
        assert (merged[labels == 1] == 1).all()  # annotations are never removed
        should = (confidence >= threshold) & (labels == 0) & (predicted == 1)
        assert torch.equal(changed, should)


def test_a_tile_teacher_uses_whole_tiles_whose_mean_confidence_passes():
    logits = torch.zeros(2, 2, 8, 8)
    logits[0, 1] = 5.0  # tile 0: confident foreground everywhere
    logits[1, 1, :2] = 5.0  # tile 1: confident on two rows only, unsure elsewhere
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    merged = pseudo_labels(logits, labels, 0.9, "tile")
    assert (merged[0] == 1).all() and (merged[1] == 0).all()
    assert (pseudo_labels(logits, labels, 0.9, "pixel")[1, :2] == 1).all()


def test_distillation_is_zero_on_agreement_and_pulls_the_student_to_the_teacher():
    teacher = torch.randn(2, 2, 4, 4)
    assert distillation(teacher, teacher, 2.0).abs() < 1e-6
    student = torch.zeros(2, 2, 4, 4, requires_grad=True)
    distillation(student, teacher, 2.0).backward()
    step = -student.grad
    assert ((step[:, 1] - step[:, 0]).sign() == (teacher[:, 1] - teacher[:, 0]).sign()).all()


def test_a_global_teacher_of_an_untrained_model_adds_nothing():
    # the head starts near zero: probabilities near 0.5, below any threshold >= 0.5 + margin
    spec = StrategySpec.from_config({**BASE, "teacher": "global"})
    strategy = LocalStrategy.build(spec, *_node())
    stats = train_locally(_model(), strategy, torch.Generator().manual_seed(0))
    assert stats.pseudo_labelled == 0.0


def test_a_clean_teacher_is_trained_once_on_verified_images_and_fills_missing_objects():
    images, labels = _node(8)
    noisy = labels.copy()
    noisy[2:] = 0  # every annotation missing except on the two verified images
    verified = np.zeros(8, bool)
    verified[:2] = True
    spec = StrategySpec.from_config({**BASE, "teacher": "clean",
                                     "teacher_params": {"steps": 60, "threshold": 0.8}})
    strategy = LocalStrategy.build(spec, images, noisy, verified)
    model, memory = _model(), {}
    stats = train_locally(model, strategy, torch.Generator().manual_seed(0), memory=memory)
    teacher = memory["teacher"]
    assert stats.pseudo_labelled > 0
    train_locally(model, strategy, torch.Generator().manual_seed(1), memory=memory)
    assert memory["teacher"] is teacher  # not retrained
    with pytest.raises(ValueError, match="clean_fraction"):
        LocalStrategy.build(spec, images, noisy, np.zeros(8, bool))


def test_teacher_clean_needs_verified_images_in_the_federation(tmp_path):
    base = ["federation=smoke", "strategy=teacher", "strategy.teacher=clean", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"hospitals\[0\].clean_fraction=0.0"):
        resolve_federation(plain_config(compose(base)))
    plan = resolve_federation(plain_config(compose([
        *base, "+federation.hospitals.0.clean_fraction=0.25", "+federation.hospitals.1.clean_fraction=0.25"
    ])))
    assert [h.clean_fraction for h in plan.hospitals] == [0.25, 0.25]


def test_verified_images_keep_their_clean_labels(tmp_path):
    from snowfed.sim.run.plan import prepare

    cfg = plain_config(compose(["federation=smoke", "noise=noisy",
                                "+federation.hospitals.0.clean_fraction=0.5"]))
    _, store = prepare(cfg, tmp_path / "run")
    entry = store.node(0)
    data = store.node_data(0)
    assert data.verified.sum() == len(entry["verified"]) == round(0.5 * entry["num_train"])
    clean = np.asarray(store.arrays["clean"])[entry["train"]]
    assert np.array_equal(data.labels[data.verified], clean[data.verified])
    assert not np.array_equal(data.labels[~data.verified], clean[~data.verified])
    assert not store.node_data(1).verified.any()
