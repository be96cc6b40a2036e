"""Local-strategy parts: each test checks the mechanism of one part, then every strategy config
builds and trains on a tiny synthetic node."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from skimage.morphology import dilation, disk, erosion

from snowfed.client.trainer import train_locally
from snowfed.config import ConfigError, compose, group_options, load_group_option
from snowfed.models import build_model
from snowfed.strategies import LocalStrategy, StrategySpec
from snowfed.strategies.base import PARTS
from snowfed.strategies.losses import LOSSES, detection_logit, tile_labels
from snowfed.strategies.parts import TASKS
from snowfed.strategies.samplers import PositiveTileSampler
from snowfed.strategies.transforms import LABEL_TRANSFORMS

BASE = {"name": "t", "sampler": "random", "loss": "cross_entropy", "optimizer": "adam", "lr": 1e-3,
        "local_steps": 3, "batch_size": 2, "tile_size": 16}


def make_loss(name: str, **params):
    part = LOSSES[name]
    return part.build(**part.resolve(params, f"strategy.loss_params[{name}]"))


def make_transform(name: str, **params):
    part = LABEL_TRANSFORMS[name]
    return part.build(**part.resolve(params, "strategy.label_transform_params"))


# --- positive sampler -----------------------------------------------------------------------

def _border_node() -> tuple[np.ndarray, np.ndarray]:
    """Tiny objects in corners and on edges, plus empty images marked by their pixel value 255."""
    n, h, w = 8, 40, 36
    labels = np.zeros((n, h, w), np.uint8)
    labels[0, 0, 0] = 1
    labels[1, h - 1, w - 1] = 1
    labels[2, 0, w - 1] = labels[2, h - 1, 0] = 1  # two one-pixel objects in one image
    labels[3, 20, 0:2] = 1
    labels[4, h - 2 :, 17] = 1
    images = np.zeros((n, h, w, 3), np.uint8)
    images[5:] = 255  # images 5..7 have no annotation
    images[:5] = np.arange(1, 6, dtype=np.uint8)[:, None, None, None]  # image id as intensity
    return images, labels


def test_positive_sampler_never_yields_an_empty_tile_or_an_empty_image():
    images, labels = _border_node()
    sampler = PositiveTileSampler(images, labels)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for tile_size in (8, 16, 24):
        for _ in range(10):
            x, y = sampler(25, tile_size, gen)  # 750 tiles in all
            assert x.shape == (25, 3, tile_size, tile_size) and y.shape == (25, tile_size, tile_size)
            assert (y.flatten(1).amax(dim=1) > 0).all()
            assert (x < 254 / 255).all()  # never a tile of an empty image
            seen |= set((x[:, 0, 0, 0] * 255).round().long().tolist())
    assert seen == {1, 2, 3, 4, 5}  # every annotated image is used


def test_positive_sampler_refuses_a_node_without_annotation():
    images, labels = _border_node()
    with pytest.raises(ValueError, match="none of this node's 3 training images"):
        PositiveTileSampler(images[5:], labels[5:])


# --- weak losses ----------------------------------------------------------------------------

def test_tile_label_saturates_at_the_threshold():
    labels = torch.zeros(5, 20, 20, dtype=torch.long)
    for i, count in enumerate((0, 40, 79, 80, 300)):
        labels[i].view(-1)[:count] = 1
    assert torch.allclose(tile_labels(labels, 80.0), torch.tensor([0, 0.5, 79 / 80, 1, 1]))
    assert torch.allclose(tile_labels(labels, 40.0), torch.tensor([0, 1.0, 1, 1, 1]))


def test_weak_loss_only_reaches_the_max_pixel_of_each_tile_and_class():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 8, 8, generator=gen, requires_grad=True)
    labels = (torch.rand(4, 8, 8, generator=gen) < torch.tensor([0, 0.2, 0.6, 1])[:, None, None]).long()
    loss = make_loss("weak", threshold=20)
    loss(logits, labels).backward()
    flat = logits.detach().flatten(2)
    argmax = F.one_hot(flat.argmax(dim=2), flat.shape[2]).bool()
    grad = logits.grad.flatten(2)
    assert (grad[~argmax] == 0).all()
    assert (grad[argmax] != 0).all()
    # The loss does not see where in the tile the pixels are: shuffling each class map is a no-op.
    shuffled = torch.stack([logits.detach().flatten(2)[b, c][torch.randperm(64, generator=gen)]
                            for b in range(4) for c in range(2)]).view(4, 2, 8, 8)
    assert torch.isclose(loss(shuffled, labels), loss(logits, labels))


def test_weak_loss_is_the_reference_two_class_detection_cross_entropy():
    """deephisto: softmax cross-entropy of the per-class maxima against (1 - t, t)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 2, 10, 10, generator=gen)
    labels = torch.zeros(3, 10, 10, dtype=torch.long)
    labels[1, :4, :5] = 1  # 20 px: t = 0.25 at threshold 80
    labels[2, :, :9] = 1  # 90 px: t = 1
    t = torch.tensor([0.0, 0.25, 1.0])
    ref = -(torch.stack([1 - t, t], 1) * F.log_softmax(logits.amax(dim=(2, 3)), 1)).sum(1).mean()
    assert torch.isclose(make_loss("weak")(logits, labels), ref)
    assert torch.isclose(make_loss("soft_weak")(logits, labels), ref + F.cross_entropy(logits, labels))
    assert torch.allclose(detection_logit(logits), logits[:, 1].amax((1, 2)) - logits[:, 0].amax((1, 2)))


# --- label transforms -----------------------------------------------------------------------

def test_noisy_negatives_makes_about_half_of_the_empty_tiles_fully_positive():
    n = 1000
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(2 * n, 12, 12, dtype=torch.long)
    labels[n:] = (torch.rand(n, 12, 12, generator=gen) < 0.05).long()
    labels[n:, 0, 0] = 1  # every second-half tile has an annotated pixel
    out = make_transform("noisy_negatives", p=0.5)(labels.clone(), gen)
    assert torch.equal(out[n:], labels[n:])  # non-empty tiles are untouched
    t = tile_labels(out[:n], 80.0)
    flipped = int((t == 1).sum())
    assert ((t == 0) | (t == 1)).all() and ((out[:n] == 1).flatten(1).all(1) == (t == 1)).all()
    assert abs(flipped - n / 2) < 4 * math.sqrt(n / 4), flipped  # binomial, 4 sigma
    assert torch.equal(make_transform("noisy_negatives", p=0.0)(labels, gen), labels)


def test_dilate_erode_picks_each_variant_a_third_of_the_time():
    n, size, radius = 900, 32, 5
    gen = torch.Generator().manual_seed(4)
    mask = np.zeros((size, size), bool)
    mask[8:22, 10:24] = True
    mask[12:16, 6:10] = True  # an irregular object away from the border
    variants = [mask, dilation(mask, disk(radius)), erosion(mask, disk(radius))]
    labels = torch.from_numpy(mask).long().expand(n, size, size).clone()
    out = make_transform("dilate_erode", radius=radius)(labels, gen).numpy().astype(bool)
    which = np.array([[np.array_equal(o, v) for v in variants] for o in out])
    assert (which.sum(axis=1) == 1).all()  # each output is exactly one of skimage's variants
    counts = which.sum(axis=0)
    assert (abs(counts - n / 3) < 5 * math.sqrt(n * 2 / 9)).all(), counts


def test_dilated_masks_contain_the_original_and_eroded_ones_are_inside_it():
    gen = torch.Generator().manual_seed(5)
    labels = (torch.rand(300, 20, 20, generator=gen) < 0.3).long()
    labels = (F.avg_pool2d(labels[:, None].float(), 5, 1, 2)[:, 0] > 0.3).long()  # blobs on borders
    out = make_transform("dilate_erode", radius=3)(labels, gen)
    grown, shrunk = (out >= labels).flatten(1).all(1), (out <= labels).flatten(1).all(1)
    assert (grown | shrunk).all()
    changed = ~(out == labels).flatten(1).all(1)
    assert (grown & changed).any() and (shrunk & changed).any()


# --- noise-robust losses --------------------------------------------------------------------

# One pixel, 2 classes: p = (0.25, 0.75).
LOGITS = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)


@pytest.mark.parametrize(
    ("name", "params", "label", "expected"),
    [
        ("gce", {"q": 0.5}, 1, (1 - 0.75**0.5) / 0.5),
        ("gce", {"q": 1.0}, 0, 1 - 0.25),
        ("sce", {"alpha": 0.1, "beta": 1.0}, 1, -0.1 * math.log(0.75) + 4 * (1 - 0.75)),
        ("sce", {"alpha": 0.5, "beta": 2.0}, 0, -0.5 * math.log(0.25) + 2 * 4 * (1 - 0.25)),
        ("bootstrap", {"beta": 0.95, "mode": "soft"}, 0,
         -(0.95 + 0.05 * 0.25) * math.log(0.25) - 0.05 * 0.75 * math.log(0.75)),
        ("bootstrap", {"beta": 0.8, "mode": "hard"}, 0, -0.8 * math.log(0.25) - 0.2 * math.log(0.75)),
    ],
)
def test_noise_robust_losses_match_hand_computed_values(name, params, label, expected):
    value = make_loss(name, **params)(LOGITS, torch.tensor([[[label]]]))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_gce_tends_to_cross_entropy_and_bootstrap_with_beta_1_is_cross_entropy():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 5, 5, generator=gen)
    labels = torch.randint(3, (2, 5, 5), generator=gen)
    ce = F.cross_entropy(logits, labels)
    assert make_loss("gce", q=1e-5)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-4)
    for mode in ("soft", "hard"):
        assert torch.isclose(make_loss("bootstrap", beta=1.0, mode=mode)(logits, labels), ce)
    assert torch.isclose(make_loss("sce", alpha=1.0, beta=0.0)(logits, labels), ce)


# co-teaching trains a peer on the batch's images: tested on classification in test_classification.py
@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"coteaching"}))
def test_every_loss_has_finite_gradients_even_on_saturated_logits(name):
    gen = torch.Generator().manual_seed(7)
    logits = (60 * torch.randn(2, 2, 6, 6, generator=gen)).requires_grad_()
    labels = torch.randint(2, (2, 6, 6), generator=gen)
    value = make_loss(name)(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


# --- configs, building, training ------------------------------------------------------------

def _tiny_node() -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    labels = np.zeros((5, 24, 24), np.uint8)
    labels[0, 4:12, 5:15] = labels[1, 18:, :6] = labels[2, 10:14, 10:14] = labels[3, 0, 23] = 1
    return images, labels  # image 4 has no annotation


@pytest.mark.parametrize("name", [s for s in group_options("strategy") if s != "coteaching"])
def test_every_strategy_config_builds_and_trains(name, tmp_path):  # on masks; coteaching: classification
    cfg = {**load_group_option("strategy", name, "strategy"), "local_steps": 3, "batch_size": 2,
           "tile_size": 16}
    if cfg["init"] == "checkpoint":  # a model to transfer from
        torch.save(build_model("shortres", num_classes=2, width=8).state_dict(), tmp_path / "m.pt")
        cfg["init_params"] = {**cfg["init_params"], "path": str(tmp_path / "m.pt")}
    if cfg["init"] == "autoencoder":
        cfg["init_params"] = {**cfg["init_params"], "steps": 3}
    spec = StrategySpec.from_config(cfg)
    assert spec.name == name
    assert StrategySpec(**json.loads(json.dumps(asdict(spec)))) == spec  # as in the manifest
    strategy = LocalStrategy.build(spec, *_tiny_node())
    gen = torch.Generator().manual_seed(0)
    x, y = strategy.batch(gen)
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16) and y.dtype == torch.long
    torch.manual_seed(0)
    stats = train_locally(build_model("shortres", num_classes=2, width=8), strategy, gen)
    assert stats.steps == 3 and math.isfinite(stats.first_loss) and math.isfinite(stats.last_loss)


def test_batch_applies_the_label_transform_reproducibly():
    spec = StrategySpec.from_config({**BASE, "label_transform": "dilate_erode", "batch_size": 64})
    strategy = LocalStrategy.build(spec, *_tiny_node())
    (x1, y1), (x2, y2) = (strategy.batch(torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _, raw = strategy.sampler(64, 16, torch.Generator().manual_seed(9))
    assert not torch.equal(y1, raw)


def test_trainer_draws_batches_through_the_strategy():
    strategy = LocalStrategy.build(StrategySpec.from_config(BASE), *_tiny_node())
    calls = []
    original = strategy.batch
    strategy.batch = lambda *args, **kw: calls.append(1) or original(*args, **kw)
    train_locally(build_model("shortres", num_classes=2, width=8), strategy, torch.Generator())
    assert len(calls) == 3


@pytest.mark.parametrize("name", group_options("strategy"))
def test_a_strategy_named_per_site_is_the_option_hydra_composes(name):
    """The strategy files extend baseline through Hydra's defaults list; a site that names one
    (read after composition, snowfed.config.load_group_option) gets what `strategy=<name>`
    composes (four_hospitals, the default federation, sets no strategy key)."""
    composed = OmegaConf.to_container(compose([f"strategy={name}"])["strategy"])
    assert OmegaConf.to_container(load_group_option("strategy", name, "strategy")) == composed
    assert "defaults" not in composed and composed["name"] == name


def test_the_task_and_dp_sgd_checks_come_from_each_parts_own_declaration():
    base = StrategySpec.from_config(BASE)  # random tiles, cross-entropy: both tasks, private
    only, refused_by_dp = {task: set() for task in TASKS}, set()
    for name, registry in PARTS.items():
        for option, part in registry.items():
            spec = replace(base, **{name: option})
            for task in TASKS:
                if task in part.tasks:
                    spec.require_task(task, "s")
                else:
                    with pytest.raises(ConfigError, match=rf"s\.{name}='{option}'.*with task={task}"):
                        spec.require_task(task, "s")
                    only[next(t for t in TASKS if t != task)].add(f"{name}={option}")
            if part.not_private:
                with pytest.raises(ConfigError, match=rf"s\.{name}='{option}'.*privacy=dp_sgd"):
                    spec.require_private("s")
                refused_by_dp.add(f"{name}={option}")
            else:
                spec.require_private("s")
    assert only["classification"] == {"loss=coteaching"}
    assert only["segmentation"] == {
        "sampler=positive", "loss=weak", "loss=soft_weak", "label_transform=dilate_erode",
        "label_transform=noisy_negatives", "augmentation=histo", "init=autoencoder",
        "teacher=global", "teacher=clean"}
    assert refused_by_dp == {"init=autoencoder", "loss=coteaching", "teacher=clean"}


def test_the_cosine_schedule_anneals_the_lr_over_the_whole_run():
    cosine = LocalStrategy.build(StrategySpec.from_config(BASE), *_tiny_node())
    assert cosine.spec.lr_schedule == "cosine"  # the default of a config that names none
    lrs = [cosine.learning_rate(step, 12) for step in range(12)]
    assert lrs[0] == BASE["lr"] and lrs[6] == pytest.approx(BASE["lr"] / 2)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    constant = LocalStrategy.build(StrategySpec.from_config({**BASE, "lr_schedule": "constant"}),
                                   *_tiny_node())
    assert {constant.learning_rate(step, 12) for step in range(12)} == {BASE["lr"]}
    # a spec stored before schedules existed (a store being resumed) keeps its constant lr
    stored = {k: v for k, v in asdict(cosine.spec).items() if k != "lr_schedule"}
    assert StrategySpec(**stored).lr_schedule == "constant"


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_runs_last_round_moves_the_weights_less_under_the_cosine_schedule(schedule):
    """The same round's steps (same batches, same start) in the first and in the last of 4
    rounds: under cosine the last round's update is a fraction of the first's."""
    spec = StrategySpec.from_config({**BASE, "lr_schedule": schedule, "local_steps": 4})

    def update_norm(run_round):
        torch.manual_seed(0)
        model = build_model("shortres", num_classes=2, width=8)
        start = [p.detach().clone() for p in model.parameters()]
        train_locally(model, LocalStrategy.build(spec, *_tiny_node()), torch.Generator().manual_seed(3),
                      run_round=run_round)
        return torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).norm()

    first, last = update_norm((1, 4)), update_norm((4, 4))
    if schedule == "cosine":
        assert last < 0.2 * first
    else:
        assert last == first


def test_label_transforms_refuse_multiclass_labels():
    images, labels = _tiny_node()
    labels[0, 0, 0] = 2
    spec = StrategySpec.from_config({**BASE, "label_transform": "dilate_erode"})
    with pytest.raises(ValueError, match="binary masks"):
        LocalStrategy.build(spec, images, labels)


@pytest.mark.parametrize(
    ("change", "key", "allowed"),
    [
        ({"loss": "focal"}, "strategy.loss", "one of cross_entropy, gce"),
        ({"loss": "gce", "loss_params": {"q": 0.0}}, "strategy.loss_params.q", "a number in (0.0, 1.0]"),
        ({"loss": "gce", "loss_params": {"q": 1.5}}, "strategy.loss_params.q", "a number in (0.0, 1.0]"),
        ({"loss": "gce", "loss_params": {"qq": 0.5}}, "strategy.loss_params.qq", "(q)"),
        ({"loss": "bootstrap", "loss_params": {"mode": "medium"}}, "strategy.loss_params.mode",
         "one of soft, hard"),
        ({"loss": "weak", "loss_params": {"threshold": 0}}, "strategy.loss_params.threshold", "> 0.0"),
        ({"label_transform": "dilate_erode", "label_transform_params": {"radius": -1}},
         "strategy.label_transform_params.radius", "an integer >= 0"),
        ({"label_transform": "blur"}, "strategy.label_transform", "one of none, dilate_erode"),
        ({"sampler_params": [1]}, "strategy.sampler_params", "a mapping"),
        ({"sampler_params": {"size": 3}}, "strategy.sampler_params.size", "it takes none"),
        ({"los": "gce"}, "strategy.los", "a strategy key"),
    ],
)
def test_bad_strategy_values_name_their_key(change, key, allowed):
    with pytest.raises(ConfigError) as err:
        StrategySpec.from_config({**BASE, **change})
    assert err.value.key == key and allowed in err.value.allowed


def test_part_parameters_are_recorded_with_their_defaults():
    spec = StrategySpec.from_config({**BASE, "loss": "bootstrap", "loss_params": {"beta": 1}})
    assert spec.loss_params == {"beta": 1.0, "mode": "soft"}
    assert spec.label_transform == "none" and spec.label_transform_params == {}
    gce = StrategySpec.from_config({**BASE, "loss": "gce", "loss_params": {"q": 1}})
    assert gce.loss_params == {"q": 1.0}


def test_a_bad_part_parameter_is_refused_by_the_cli(tmp_path, capsys):
    from snowfed.cli import EXIT_BAD_CONFIG, main

    code = main(["run", "strategy=weak", "strategy.loss_params.threshold=-3", f"run_dir={tmp_path / 'r'}"])
    assert code == EXIT_BAD_CONFIG
    assert "strategy.loss_params.threshold=-3" in capsys.readouterr().err
