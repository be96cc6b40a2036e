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
    assert "a run directory (with config.yaml)" in capsys.readouterr().err
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

    from snowfed.config import compose
    from snowfed.rundir import save_checkpoint
    from snowfed.sim.runner import plain_config, start_run_dir

    run_dir = tmp_path / "run"
    cfg = plain_config(compose(["federation=smoke", "rounds=3"]))
    start_run_dir(cfg, run_dir)
    save_checkpoint(run_dir, 1, {})
    edited = {**cfg, "strategy": {**cfg["strategy"], "lr": 0.01}, "rounds": 5}  # rounds may change
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(edited)))
    assert main(["run", f"resume={run_dir}"]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "edited since: strategy.lr: 0.001 -> 0.01)" in err and len(err.strip().splitlines()) == 1
