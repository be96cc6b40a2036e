"""task=classification: sites cut from a loaded dataset, label noise measured, the pitfalls
(shortcut, patient leakage), co-teaching, and the whole run through Flower's simulation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from snowfed.cli import EXIT_BAD_CONFIG, main
from snowfed.client.trainer import train_locally
from snowfed.config import ConfigError, compose, plain_config
from snowfed.metrics import classification_metrics
from snowfed.models import build_model, stage_keys
from snowfed.sim.federation.shortcut import shortcut_report
from snowfed.sim.run.plan import prepare
from snowfed.sim.run.runner import run
from snowfed.strategies import LocalStrategy, StrategySpec
from snowfed.strategies.coteaching import PEER_KEY, STEP_KEY

SITES = ["federation.hospitals=[{name: a}, {name: b}]"]


def _store(tmp_path, overrides):
    cfg = plain_config(compose(["task=classification", *overrides]))
    return prepare(cfg, tmp_path / "run")[1]


def _spec(**kw) -> StrategySpec:
    base = dict(name="t", sampler="random", loss="cross_entropy", optimizer="adam", lr=0.003,
                local_steps=100, batch_size=32, tile_size=8)
    return StrategySpec.from_config({**base, **kw})


def test_four_noisy_sites_measure_their_configured_flip_rates(tmp_path):
    store = _store(tmp_path, [])
    assert store.manifest["task"] == "classification" and store.manifest["num_classes"] == 10
    test = set(store.manifest["test"])
    seen = set(test)
    for node, rate in zip(store.nodes, (0.0, 0.2, 0.4, 0.6)):
        measured = node["label_noise"]["flip_rate"]
        assert abs(measured - rate) <= 0.05, (node["name"], measured, rate)
        confusion = np.asarray(node["label_noise"]["confusion"])
        assert confusion.sum() == node["num_train"]
        assert 1 - np.trace(confusion) / confusion.sum() == pytest.approx(measured)
        assert sum(node["class_histogram"]) == node["num_train"] + node["num_val"]
        rows = set(node["train"]) | set(node["val"])
        assert not rows & seen  # sites, their splits and the test set are disjoint
        seen |= rows
    assert len(seen) == 1797  # every digit used once
    noisy, clean = store.arrays["noisy"], store.arrays["clean"]
    assert np.array_equal(noisy[sorted(test)], clean[sorted(test)])  # the test set stays clean
    assert (noisy != clean).sum() > 0


def test_a_rate_range_is_drawn_per_site(tmp_path):
    store = _store(tmp_path, ["federation.hospitals=[{name: a, noise: {kind: pairflip, rate: [0.1, 0.5]}},"
                              " {name: b, noise: {kind: pairflip, rate: [0.1, 0.5]}}]"])
    rates = [n["label_noise"]["configured_rate"] for n in store.nodes]
    assert all(0.1 <= r <= 0.5 for r in rates) and rates[0] != rates[1]
    for node, rate in zip(store.nodes, rates):
        assert abs(node["label_noise"]["flip_rate"] - rate) < 0.08
        confusion = np.asarray(node["label_noise"]["confusion"])
        off = confusion - np.diag(np.diag(confusion))
        # pair flip: every wrong label is the next class
        assert all(off[i].sum() == off[i, (i + 1) % 10] for i in range(10))


def test_dirichlet_partition_skews_the_sites_class_histograms(tmp_path):
    iid = _store(tmp_path / "iid", SITES)
    skew = _store(tmp_path / "skew", [*SITES, "federation.partition={scheme: dirichlet, alpha: 0.1}"])

    def spread(store):
        h = np.asarray([n["class_histogram"] for n in store.nodes], dtype=float)
        p = h / h.sum(axis=1, keepdims=True)
        return np.abs(p - h.sum(0) / h.sum()).sum(axis=1).mean() / 2

    assert spread(skew) > spread(iid) + 0.2


def test_classification_metrics():
    labels = np.array([0, 0, 1, 2])
    perfect = np.eye(3)[labels]
    m = classification_metrics(labels, perfect)
    assert m["accuracy"] == m["balanced_accuracy"] == m["f1"] == m["auc"] == 1.0
    always_zero = np.tile([0.9, 0.05, 0.05], (4, 1))
    m = classification_metrics(labels, always_zero)
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((2 / 3) / 3)  # macro: only class 0 scores
    assert m["auc"] == 0.5  # constant scores rank nothing


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_scikit_learn(seed):
    """The numpy metrics against scikit-learn's own, with absent classes, ties and a tiny split."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    rng = np.random.default_rng(seed)
    n, c = [(200, 5), (7, 4), (50, 10), (30, 3), (12, 6), (100, 2)][seed]
    labels = rng.integers(0, max(c - 1, 2), n)  # the last class never occurs (seed > 0)
    probs = np.round(rng.dirichlet(np.ones(c), n), 1)  # rounded: many ties
    pred = probs.argmax(axis=1)
    macro = {"labels": list(range(c)), "average": "macro", "zero_division": 0}
    present = [k for k in range(c) if 0 < np.sum(labels == k) < n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {"accuracy": accuracy_score(labels, pred),
                    "balanced_accuracy": balanced_accuracy_score(labels, pred),
                    "f1": f1_score(labels, pred, **macro),
                    "precision": precision_score(labels, pred, **macro),
                    "recall": recall_score(labels, pred, **macro),
                    "auc": np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present]),
                    "predicted_majority": np.bincount(pred).max() / n,
                    "label_majority": np.bincount(labels).max() / n}
    got = classification_metrics(labels, probs)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["smallcnn", "resnet"])
def test_frozen_stages_of_a_classifier_stay_bitwise_equal(name):
    images = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    model = build_model(name, num_classes=4)
    frozen = stage_keys(model, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = LocalStrategy.build(_spec(local_steps=5, freeze_stages=1), images, labels)
    train_locally(model, strategy, torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in after if k not in frozen)


def test_a_model_trained_at_a_shortcut_site_relies_on_the_shortcut(tmp_path):
    store = _store(tmp_path, ["federation=digits_pitfalls"])
    site = next(i for i, n in enumerate(store.nodes) if "shortcut" in n)
    data = store.node_data(site)
    torch.manual_seed(0)
    # without normalisation: GroupNorm divides each image's features by their own scale, so an
    # intensity shortcut is invisible to it (measured: the same accuracy with and without)
    model = build_model("smallcnn", num_classes=10, norm="none")
    train_locally(model, LocalStrategy.build(_spec(local_steps=150), data.images, data.labels),
                  torch.Generator().manual_seed(0))
    report = shortcut_report(store, model)[store.nodes[site]["name"]]
    assert report["class"] == 3 and report["effect"] == "intensity"
    # the shortcut class is recognised by its intensity: without it, the class is mostly missed
    assert report["class_accuracy_with_shortcut"] > 0.8
    assert report["class_accuracy_shortcut_removed"] < report["class_accuracy_with_shortcut"] - 0.4
    assert report["accuracy_shortcut_removed"] < report["accuracy_with_shortcut"]


def test_dawid_skene_crowd_site_beats_its_majority_vote(tmp_path):
    store = _store(tmp_path, ["federation=digits_pitfalls"])
    crowd = next(n for n in store.nodes if n["name"] == "crowd")["label_noise"]["annotators"]
    assert crowd["fusion"] == "dawid_skene" and crowd["count"] == 3
    assert crowd["fused_accuracy"] > crowd["majority_accuracy"] + 0.03


def _patient_folder(root, patients=12, per_patient=4):
    """An ImageFolder of two classes where every patient has several tiles (one class each)."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        cls = "tumour" if p % 2 else "normal"
        (root / cls).mkdir(parents=True, exist_ok=True)
        for t in range(per_patient):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"P{p:02d}_tile{t}.png")
    return root


@pytest.mark.parametrize("level", ["patient", "image"])
def test_patient_leakage_is_checked(tmp_path, level):
    root = _patient_folder(tmp_path / "data")
    store = _store(tmp_path, [
        "dataset=image_folder", f"dataset.path={root}", "dataset.patient_pattern='^(P\\d+)_'",
        "federation.hospitals=[{name: a}, {name: b}]", f"federation.split_level={level}",
        "federation.val_fraction=0.25", "federation.test_fraction=0.25",
    ])
    leak = store.manifest["data"]["leakage"]
    if level == "patient":
        assert leak["leaked_patients"] == 0 and leak["train_test"] == []
        assert leak["patients_in_two_sites"] == {}
    else:  # tile-level splits put tiles of one patient on both sides: the pitfall, reported
        assert leak["leaked_patients"] > 0 and leak["train_test"]
    assert store.manifest["class_names"] == ["normal", "tumour"]


def test_natural_silos_follow_the_site_folders(tmp_path):
    for site in ("liege", "ghent"):
        _patient_folder(tmp_path / "data" / site, patients=6)
    store = _store(tmp_path, [
        "dataset=image_folder", f"dataset.path={tmp_path / 'data'}", "dataset.layout=sites",
        "federation.hospitals=[{name: ghent}, {name: liege}]", "federation.partition={scheme: natural}",
        "federation.test_fraction=0.2", "dataset.patient_pattern='^(P\\d+)_'",
    ])
    assert [n["name"] for n in store.nodes] == ["ghent", "liege"]
    # the same patient ids in both site folders: reported (a patient seen by two hospitals)
    two_sites = store.manifest["data"]["leakage"]["patients_in_two_sites"]
    assert two_sites and all(sites == ["ghent", "liege"] for sites in two_sites.values())
    total = sum(n["num_train"] + n["num_val"] for n in store.nodes) + len(store.manifest["test"])
    assert total == 48


def test_a_medmnist_npz_uses_its_own_test_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 10), ("test", 20)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez(tmp_path / "toymnist.npz", **arrays)
    store = _store(tmp_path, ["dataset=npz", f"dataset.path={tmp_path / 'toymnist.npz'}", *SITES])
    assert len(store.manifest["test"]) == 20 and store.manifest["image_size"] == 28
    assert sum(n["num_train"] + n["num_val"] for n in store.nodes) == 70
    assert store.arrays["images"].shape[1:] == (28, 28, 3)


def test_coteaching_trusts_the_clean_labels_and_keeps_its_peer(tmp_path):
    store = _store(tmp_path, ["federation.hospitals=[{name: noisy, noise: {kind: symmetric, rate: 0.5}}]"])
    data = store.node_data(0)
    clean = np.asarray(store.arrays["clean"])[store.nodes[0]["train"]]
    strategy = LocalStrategy.build(
        _spec(loss="coteaching", loss_params={"forget_rate": 0.5, "warmup_steps": 20}, local_steps=150),
        data.images, data.labels)
    model, memory = build_model("smallcnn", num_classes=10), {}
    train_locally(model, strategy, torch.Generator().manual_seed(0), memory=memory)
    assert int(memory[STEP_KEY]["step"]) == 150
    peer = memory[PEER_KEY]
    assert any(not torch.equal(peer[k], v) for k, v in model.state_dict().items())  # two networks
    # the samples the peer would hand the federated network are mostly the correctly labelled
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.labels).long()
    strategy.loss.peer.eval()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(strategy.loss.peer(x), y, reduction="none")
    kept = torch.argsort(losses)[: len(y) // 2].numpy()
    correct = data.labels == clean
    assert correct[kept].mean() > correct.mean() + 0.05
    # next round: the peer comes back from memory exactly
    strategy.loss.start_round(model, memory, torch.Generator().manual_seed(1), 0.003, torch.optim.Adam, "cpu")
    assert all(torch.equal(strategy.loss.peer.state_dict()[k], v) for k, v in peer.items())
    # its peer's optimiser follows the run's lr schedule with the model's
    optimizer = strategy.optimizer(model.parameters())
    strategy.set_learning_rate(optimizer, 1e-4)
    assert [g["lr"] for g in strategy.loss.peer_optimizer.param_groups] == [1e-4]


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["dataset=synthetic"], "task='classification'", "segmentation"),
        (["model=shortres"], "model.name='shortres'", "smallcnn"),
        (["federation=four_hospitals"], "federation.test_images_per_site", "dataset=synthetic"),
        (["+federation.hospitals.0.num_images=10"], "federation.hospitals[0].num_images", "partition sizes"),
        (["strategy.sampler=positive"], "strategy.sampler='positive'", "masks"),
        (["strategy=augment"], "strategy.augmentation='histo'", "none"),
        (["dataset=npz"], "dataset.path=None", ".npz"),
        (["noise=noisy"], "noise.p_remove", "segmentation"),
        (["federation.hospitals.0.noise={kind: symmetric, rate: 1.5}"],
         "federation.hospitals[0].noise.rate=1.5", "[0"),
        (["federation.partition={scheme: natural}"], "federation.partition.scheme='natural'", "sites"),
        (["aggregation=quality"], "aggregation.name='quality'", "synthetic"),
    ],
)
def test_bad_classification_input_is_refused_before_work(overrides, key, allowed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "task=classification", *overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG
    assert key in err and allowed in err, err
    assert len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_a_corrupt_data_file_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file")
    code = main(["run", "task=classification", "dataset=npz", f"dataset.path={bad}",
                 f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG and str(bad) in err, err


def test_segmentation_only_losses_are_refused_for_classification():
    with pytest.raises(ConfigError, match="strategy.loss"):
        from snowfed.sim.run.plan import validate

        validate(plain_config(compose(["task=classification", "strategy=weak"])))


@pytest.mark.slow
def test_classification_federation_through_ray(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(compose(["task=classification", "rounds=2"]), run_dir)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert {"accuracy", "balanced_accuracy", "f1", "auc"} <= set(summary["global"])
    assert summary["history"][2]["accuracy"] > summary["history"][0]["accuracy"]
    for name, rate in zip(("site0", "site1", "site2", "site3"), (0.0, 0.2, 0.4, 0.6)):
        node = summary["nodes"][name]
        assert abs(node["label_noise"]["flip_rate"] - rate) <= 0.05
        assert "accuracy" in node["final"]
    assert summary["data"]["dataset"] == "digits"
    assert json.loads((run_dir / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_pitfalls_federation_with_coteaching_through_ray(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(compose(["task=classification", "federation=digits_pitfalls", "rounds=2",
                           "strategy=coteaching"]), run_dir)
    assert summary["status"] == "completed"
    shortcut = summary["shortcut"]["scanner_b"]
    assert {"accuracy_with_shortcut", "accuracy_shortcut_removed"} <= set(shortcut)
    crowd = summary["nodes"]["crowd"]["label_noise"]["annotators"]
    assert crowd["fused_accuracy"] > crowd["majority_accuracy"]
    memory = run_dir / "federation" / "node-memory" / "0"
    assert (memory / f"{PEER_KEY}.pt").is_file() and (memory / f"{STEP_KEY}.pt").is_file()
    step = torch.load(memory / f"{STEP_KEY}.pt", weights_only=True)["step"]
    assert int(step) == 2 * 20  # two rounds of 20 local steps: the peer's schedule carried over


@pytest.mark.parametrize("loss", ["gce", "sce", "bootstrap", "coteaching"])
def test_noise_robust_losses_train_a_classifier(loss, tmp_path):
    store = _store(tmp_path, ["federation.hospitals=[{name: a, noise: {kind: symmetric, rate: 0.3}}]"])
    data = store.node_data(0)
    model = build_model("smallcnn", num_classes=10)
    stats = train_locally(model, LocalStrategy.build(_spec(loss=loss, local_steps=100), data.images,
                                                     data.labels), torch.Generator().manual_seed(0))
    assert stats.last_loss < stats.first_loss
    scores = classification_metrics(data.val_targets, torch.softmax(model(
        torch.from_numpy(data.val_images).permute(0, 3, 1, 2).float() / 255), 1).detach().numpy())
    assert scores["accuracy"] > 0.3  # chance is 0.1


def test_coteaching_is_refused_for_segmentation():
    from snowfed.sim.run.plan import validate

    with pytest.raises(ConfigError, match="strategy.loss='coteaching'.*task=segmentation"):
        validate(plain_config(compose(["federation=smoke", "strategy=coteaching"])))


def test_skipped_files_are_counted_in_the_store_and_a_matrix_noise_is_applied(tmp_path):
    root = _patient_folder(tmp_path / "data")
    (root / "normal" / "P99_broken.png").write_bytes(b"not a png")
    store = _store(tmp_path, [
        "dataset=image_folder", f"dataset.path={root}", "dataset.skip_bad=true",
        "federation.hospitals=[{name: a, noise: {kind: matrix, matrix: [[0.0, 1.0], [0.0, 1.0]]}},"
        " {name: b}]",
        "federation.test_fraction=0.25",
    ])
    data = store.manifest["data"]
    assert data["skipped"] == 1 and data["skipped_files"][0]["file"].endswith("P99_broken.png")
    a = store.nodes[0]
    # every label of site a becomes class 1: the flip rate is the share of class-0 labels there
    assert set(np.asarray(store.arrays["noisy"])[a["train"]]) == {1}
    confusion = np.asarray(a["label_noise"]["confusion"])
    assert confusion[:, 0].sum() == 0 and a["label_noise"]["flip_rate"] == confusion[0, 1] / confusion.sum()


def test_many_alike_sites_from_a_count(tmp_path):
    store = _store(tmp_path, ["federation=many_sites", "federation.hospitals.count=30"])
    names = [n["name"] for n in store.nodes]
    assert names[0] == "site00" and names[-1] == "site29" and len(set(names)) == 30
    rates = [n["label_noise"]["configured_rate"] for n in store.nodes]
    assert all(0.0 <= r <= 0.4 for r in rates) and len(set(rates)) == 30  # drawn per site
