"""Bad input fails before any work: one paragraph naming key, value and what is allowed,
a non-zero exit, no Ray started, no run directory written."""

from __future__ import annotations

import pytest

from snowfed.cli import EXIT_BAD_CONFIG, main


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["federation=nowhere"], "federation='nowhere'", "four_hospitals"),
        (["aggregation=fedfoo"], "aggregation='fedfoo'", "fedavg"),
        (["noise=noisy", "noise.p_remove=1.5"], "noise.p_remove=1.5", "[0.0, 1.0]"),
        (["noise=noisy_hd", "noise.sigma=-2"], "noise.sigma=-2", ">= 0.0"),
        (["federation.hospitals=[]"], "federation.hospitals=0", "at least one hospital"),
        (["rounds=0"], "rounds=0", "an integer >= 1"),
        (["federation.hospitals.0.noise=fuzzy"], "federation.hospitals[0].noise.preset='fuzzy'",
         "one of bb, clean"),
        (["strategy.sampler=nope"], "strategy.sampler='nope'", "random"),
        (["backend.client_resources.num_gpus=-1"], "backend.client_resources.num_gpus=-1", ">= 0"),
        # keys Hydra cannot compose, with the closest existing keys named
        (["foo=1"], "foo='1'", "the top-level keys are rounds"),
        (["noize=noisy"], "noize='noisy'", "did you mean noise?"),
        (["strategy.lrr=0.1"], "strategy.lrr='0.1'", "did you mean strategy.lr?"),
        (["model.widht=8"], "model.widht='8'", "did you mean model.width?"),
        (["federation.val_fractio=0.1"], "federation.val_fractio='0.1'",
         "did you mean federation.val_fraction?"),
        # keys added with + that no part reads
        (["+foo=1"], "foo='1'", "a top-level key of snowfed's config"),
        (["+strategy.foo=1"], "strategy.foo=1", "a strategy key"),
        (["+model.depth=2"], "model.depth=2", "a parameter of model shortres"),
        # values that used to be clamped, or to fail after Ray started
        (["strategy.tile_size=1000"], "strategy.tile_size=1000", "at most dataset.image_size=128"),
        (["model.width=0"], "model.width=0", "an integer >= 1"),
        (["model.norm=batch"], "model.norm='batch'", "one of none, group"),
        (["rounds=abc"], "rounds='abc'", "an integer >= 1"),
        # top-level keys and group choices
        (["seed=-1"], "seed=-1", "an integer >= 0"),
        (["personalize_steps=-3"], "personalize_steps=-3", "an integer >= 0"),
        (["verbose=maybe"], "verbose='maybe'", "true or false"),
        (["strategy=nope"], "strategy='nope'", "one of augment, baseline"),
        (["model=nope"], "model='nope'", "one of resnet, shortres, smallcnn"),
        (["privacy=nope"], "privacy='nope'", "one of central_dp_adaptive"),
        (["backend=nope"], "backend='nope'", "one of cluster, cpu, gpu"),
        (["backend=cluster", "backend.address=head-node"], "backend.address='head-node'",
         "host:port (the head node's GCS)"),
        (["backend=cluster", "backend.address=head:99999"], "backend.address='head:99999'", "auto"),
        (["backend=cluster", "backend.address=http://head:6379"], "backend.address='http://head:6379'",
         "ray://host:port"),
        (["backend=cluster", "backend.address=127.0.0.1:9"], "backend.address='127.0.0.1:9'",
         "nothing answers at 127.0.0.1:9"),
        (["task=detection"], "task='detection'", "one of classification, segmentation"),
        (["logger=nope"], "logger='nope'", "one of mlflow, none, tensorboard"),
        # the local strategy and its parts
        (["strategy.lr=0"], "strategy.lr=0", "a number > 0.0"),
        (["strategy.lr=nan"], "strategy.lr=nan", "a number > 0.0"),
        (["strategy.local_steps=0"], "strategy.local_steps=0", "an integer >= 1"),
        (["strategy.batch_size=0"], "strategy.batch_size=0", "an integer >= 1"),
        (["strategy.optimizer=rmsprop"], "strategy.optimizer='rmsprop'", "one of adam, sgd"),
        (["strategy.lr_schedule=linear"], "strategy.lr_schedule='linear'", "one of constant, cosine"),
        (["strategy.loss=focal"], "strategy.loss='focal'", "one of cross_entropy"),
        (["strategy.label_transform=blur"], "strategy.label_transform='blur'", "dilate_erode"),
        (["strategy.augmentation=mixup"], "strategy.augmentation='mixup'", "one of none, histo"),
        (["strategy.init=imagenet"], "strategy.init='imagenet'", "autoencoder, checkpoint"),
        (["strategy.teacher=oracle"], "strategy.teacher='oracle'", "one of none, global, clean"),
        (["strategy.freeze_stages=99"], "strategy.freeze_stages=99", "an integer from 0 to 7"),
        (["strategy=teacher", "strategy.teacher_params.threshold=2"],
         "strategy.teacher_params.threshold=2", "a number in [0.5, 1.0]"),
        # label noise
        (["noise=noisy", "noise.simplify_every=0"], "noise.simplify_every=0", "an integer >= 1"),
        (["task=classification", "noise=symmetric", "noise.rate=1.5"], "noise.rate=1.5", "[0, 1]"),
        (["task=classification", "noise=noisy"], "noise.p_remove=0.5", "a key of classification noise"),
        (["federation.hospitals.0.appearance.blur=-1"], "federation.hospitals.0.appearance.blur='-1'",
         "the keys of federation.hospitals.0.appearance are stain_rotation"),
        (["federation.hospitals.0.appearance.blur_sigma=-1"],
         "federation.hospitals[0].appearance.blur_sigma=-1", ">= 0"),
        # aggregation
        (["aggregation.fraction_train=0"], "aggregation.fraction_train=0", "a number in (0.0, 1.0]"),
        (["aggregation.fraction_train=1.5"], "aggregation.fraction_train=1.5", "(0.0, 1.0]"),
        (["aggregation.min_train_nodes=0"], "aggregation.min_train_nodes=0", "an integer >= 1"),
        (["aggregation=fedprox", "aggregation.proximal_mu=-1"], "aggregation.proximal_mu=-1", ">= 0.0"),
        (["aggregation=fedprox", "aggregation.proximal_mu=nan"], "aggregation.proximal_mu=nan", ">= 0.0"),
        (["aggregation=krum", "aggregation.num_malicious_nodes=-1"],
         "aggregation.num_malicious_nodes=-1", "an integer >= 0"),
        (["aggregation=bulyan", "federation=smoke"], "aggregation.name='bulyan'", "at least 4*num_malicious"),
        (["aggregation.round_timeout_s=0"], "aggregation.round_timeout_s=0", "a number >= 1.0"),
        # privacy
        (["privacy=dp_sgd", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1", ">= 0.0"),
        (["privacy=dp_sgd", "privacy.max_grad_norm=0"], "privacy.max_grad_norm=0", ">= 1e-06"),
        (["privacy=dp_sgd", "privacy.delta=2"], "privacy.delta=2", "[0.0, 1.0]"),
        (["privacy=dp_sgd", "aggregation=fedprox"], "aggregation.name='fedprox'", "not fedprox"),
        (["privacy=secagg"], "privacy.name='secagg'", "SecAgg+ only in its legacy workflow"),
        (["privacy=central_dp_fixed", "privacy.side=middle"], "privacy.side='middle'", "server or client"),
        # data, federation, backend, model
        (["dataset.image_size=8"], "dataset.image_size=8", "an integer >= 16"),
        (["dataset=npz"], "dataset.path=None", "a MedMNIST-style .npz file"),
        (["task=classification", "dataset=npz", "dataset.path=/nonexistent.npz"], "/nonexistent.npz",
         "no such file"),
        (["dataset=seg_folder", "dataset.path=/nonexistent"], "/nonexistent", "no such folder"),
        (["federation.hospitals.0.num_images=1"], "federation.hospitals[0].num_images=1", ">= 2"),
        (["federation.val_fraction=0.95"], "federation.val_fraction=0.95", "[0.0, 0.9]"),
        (["federation=smoke", "federation.hospitals.0.name=beta"], "federation.hospitals[1].name='beta'",
         "a unique non-empty name"),
        (["backend.client_resources.num_cpus=0"], "backend.client_resources.num_cpus=0", ">= 0.01"),
        (["model.width=-4"], "model.width=-4", "an integer >= 1"),
        (["model=resnet"], "model.name='resnet'", "a segmentation model (shortres)"),
    ],
)
def test_bad_input_is_refused_before_work(overrides, key, allowed, tmp_path, capsys):
    import ray

    run_dir = tmp_path / "run"
    code = main(["run", *overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG
    assert key in err and allowed in err, err
    assert len(err.strip().splitlines()) == 1  # one paragraph, no traceback
    assert not run_dir.exists()
    assert not ray.is_initialized()


def test_per_hospital_noise_probability_is_checked(capsys, tmp_path):
    code = main(["run", "federation=smoke", "federation.hospitals.1.noise={preset: noisy, "
                 "p_remove: 2}", f"run_dir={tmp_path / 'r'}"])
    assert code == EXIT_BAD_CONFIG
    assert "federation.hospitals[1].noise.p_remove=2" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["fly"]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "No such command 'fly'" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    import json

    from omegaconf import OmegaConf

    from snowfed.config import compose
    from snowfed.rundir import save_checkpoint

    run_dir = tmp_path / "run"
    assert main(["run", f"resume={run_dir}"]) == EXIT_BAD_CONFIG
    assert "a run directory (with config.yaml; " in capsys.readouterr().err
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose(["federation=smoke", "rounds=3"])))
    assert main(["run", f"resume={run_dir}"]) == EXIT_BAD_CONFIG
    assert "with a checkpoint.pt" in capsys.readouterr().err
    save_checkpoint(run_dir, 3, {})
    assert main(["run", f"resume={run_dir}", "seed=4"]) == EXIT_BAD_CONFIG
    assert "seed=4" in capsys.readouterr().err
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert main(["run", f"resume={run_dir}"]) == EXIT_BAD_CONFIG
    assert "more than the 3 rounds this run has completed" in capsys.readouterr().err


def test_a_sweep_naming_a_key_that_does_not_exist_is_refused_before_work(tmp_path, capsys):
    import ray

    sweep_dir = tmp_path / "sweep"
    code = main(["run", "-m", "federation=smoke", "strategy.lrr=0.1,0.2", "seed=0,1",
                 f"hydra.sweep.dir={sweep_dir}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG
    assert "strategy.lrr='0.1'" in err and "did you mean strategy.lr?" in err
    assert len(err.strip().splitlines()) == 1
    assert not sweep_dir.exists() and not ray.is_initialized()


def test_a_gpu_backend_without_a_gpu_is_refused_before_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["run", "federation=smoke", "backend=gpu", f"run_dir={tmp_path / 'r'}"]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "backend.client_resources.num_gpus=0.25" in err and "no CUDA device" in err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_config_edited_since_the_run_started(tmp_path, capsys):
    from omegaconf import OmegaConf

    from snowfed.config import compose, plain_config
    from snowfed.rundir import save_checkpoint, start_run_dir

    run_dir = tmp_path / "run"
    cfg = plain_config(compose(["federation=smoke", "rounds=3"]))
    start_run_dir(cfg, run_dir)
    save_checkpoint(run_dir, 1, {})
    edited = {**cfg, "strategy": {**cfg["strategy"], "lr": 0.01}, "rounds": 5}  # rounds may change
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(edited)))
    assert main(["run", f"resume={run_dir}"]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "edited since: strategy.lr: 0.001 -> 0.01)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("path_override", ["run_dir={file}", "run_dir={file}/run",
                                           "logger.log_dir={file}/events"])
def test_a_path_that_cannot_be_made_a_directory_is_refused(path_override, tmp_path, capsys):
    """A run directory (or TensorBoard's) that is a file or lies under one: one line, exit 2,
    before Hydra makes the directory (it raised NotADirectoryError with a traceback)."""
    import ray

    file = tmp_path / "a-file"
    file.write_text("kept")
    override = path_override.format(file=file)
    others = ["logger=tensorboard", f"run_dir={tmp_path / 'run'}"] if "log_dir" in override else []
    code = main(["run", "federation=smoke", override, *others])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG
    assert f"{override.split('=')[0]}='{override.split('=')[1]}'" in err, err
    assert f"({file} is a file)" in err and len(err.strip().splitlines()) == 1, err
    assert file.read_text() == "kept" and not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_a_cluster_backend_with_no_cluster_to_find_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` would record its cluster
    run_dir = tmp_path / "run"
    assert main(["run", "backend=cluster", f"run_dir={run_dir}"]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "backend.address='auto'" in err and "`auto` found none" in err and str(tmp_path) in err
    assert len(err.strip().splitlines()) == 1 and not run_dir.exists() and not ray.is_initialized()
