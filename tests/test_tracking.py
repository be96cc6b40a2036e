"""Experiment tracking (`logger=tensorboard|mlflow`): what each backend writes, read back with the
backend's own reader; the missing-package ConfigError; a failing tracker never stops a run."""

from __future__ import annotations

import io
import sys

import pytest

from snowfed.config import ConfigError, compose, plain_config
from snowfed.rundir import METRICS, read_jsonl
from snowfed.server.app import FederationResult
from snowfed.server.recording import RoundRecorder
from snowfed.sim.run.plan import validate
from snowfed.sim.run.runner import run
from snowfed.tracking import (
    MlflowTracker,
    RunTracking,
    TensorBoardTracker,
    build_tracker,
    flatten,
    node_metrics,
    validate_logger,
)

NODES = ("alpha", "beta")


def _scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag, values rounded to 6 places (event files hold float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def _text_tags(log_dir) -> list[str]:
    """Text summaries and TensorBoard's hparams records of a log dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events.Tags()["tensors"] + list(events.PluginTagToContent("hparams"))


def _mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("snowfed").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_flatten_and_node_metrics_names():
    flat = flatten({"aggregation": {"name": "fedavg"}, "federation": {"hospitals": [{"name": "a"}]},
                    "noise": None, "empty": {}})
    assert flat == {"aggregation.name": "fedavg", "federation.hospitals.0.name": "a", "noise": None,
                    "empty": "{}"}
    records = [
        {"round": 1, "scope": "node", "node": "alpha", "phase": "train", "train-loss": 0.5,
         "num-examples": 8},
        {"round": 1, "scope": "node", "node": "alpha", "phase": "evaluate", "f1": 0.7, "num-examples": 4},
        {"round": 1, "scope": "node", "node": "beta", "phase": "train", "error": "boom"},
        {"round": 1, "scope": "node", "node": "beta", "phase": "personalize", "personalized-f1": 0.8},
    ]
    assert node_metrics(records) == {
        "alpha": {"train-loss": 0.5, "train-num-examples": 8.0, "f1": 0.7, "num-examples": 4.0},
        "beta": {"personalize-personalized-f1": 0.8},
    }


def test_tensorboard_writes_round_scalars_and_config(tmp_path):
    log_dir = tmp_path / "tb"
    tracker = TensorBoardTracker(log_dir)
    tracker.log_params({"aggregation.name": "fedavg", "rounds": 2, "noise": None})
    tracker.log_round(0, {"f1": 0.1}, {})
    for rnd in (1, 2):
        nodes = {n: {"f1": rnd / 4, "train-loss": 1 / rnd} for n in NODES}
        tracker.log_round(rnd, {"f1": 0.1 + rnd / 10}, nodes)
    tracker.close({"status": "completed", "rounds": 2})

    assert _scalars(log_dir, "global/f1") == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert _scalars(log_dir, "node/beta/f1") == [(1, 0.25), (2, 0.5)]
    assert _scalars(log_dir, "node/alpha/train-loss") == [(1, 1.0), (2, 0.5)]
    assert {"config/text_summary", "status/text_summary", "_hparams_/experiment"} <= set(_text_tags(log_dir))


def test_tensorboard_resume_replaces_the_redone_round(tmp_path):
    log_dir = tmp_path / "tb"
    first = TensorBoardTracker(log_dir)
    for rnd in (0, 1, 2):  # killed after round 2 was logged, before its checkpoint
        first.log_round(rnd, {"f1": rnd / 10}, {})
    first.writer.close()
    again = TensorBoardTracker(log_dir, resuming=True)
    for rnd in (2, 3):
        again.log_round(rnd, {"f1": rnd / 100}, {})
    again.close({"status": "completed", "rounds": 3})
    assert _scalars(log_dir, "global/f1") == [(0, 0.0), (1, 0.1), (2, 0.02), (3, 0.03)]


def test_mlflow_logs_params_rounds_and_status(tmp_path):
    cfg = plain_config(compose(["federation=smoke", "logger=mlflow"]))
    run_dir = tmp_path / "run"
    tracker = build_tracker(cfg, run_dir)
    assert isinstance(tracker, MlflowTracker)
    tracker.log_params(flatten(cfg))
    for rnd in (0, 1, 2):
        tracker.log_round(rnd, {"f1": rnd / 10}, {"alpha": {"f1": rnd / 5}} if rnd else {})
    tracker.close({"status": "failed", "reason": "round 3: too few sites"})

    client, mlrun = _mlflow_run(run_dir)
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FAILED"
    assert mlrun.data.params["aggregation.name"] == "fedavg"
    assert mlrun.data.params["federation.hospitals.1.name"] == "beta"
    assert mlrun.data.tags["snowfed.reason"] == "round 3: too few sites"
    history = client.get_metric_history(mlrun.info.run_id, "global/f1")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.1), (2, 0.2)]
    node = client.get_metric_history(mlrun.info.run_id, "node/alpha/f1")
    assert sorted((m.step, m.value) for m in node) == [(1, 0.2), (2, 0.4)]


def test_mlflow_resume_continues_the_same_run(tmp_path):
    cfg = plain_config(compose(["federation=smoke", "logger=mlflow", "rounds=2"]))
    run_dir = tmp_path / "run"
    first = build_tracker(cfg, run_dir)
    first.log_params(flatten(cfg))
    first.log_round(0, {"f1": 0.1}, {})
    first.close({"status": "interrupted"})
    again = build_tracker({**cfg, "rounds": 4}, run_dir, resuming=True)
    assert again.run_id == first.run_id
    again.log_params(flatten({**cfg, "rounds": 4}))
    again.log_round(1, {"f1": 0.2}, {})
    again.close({"status": "completed"})

    client, mlrun = _mlflow_run(run_dir)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["rounds"] == "2" and mlrun.data.tags["resumed.rounds"] == "4"
    assert len(client.get_metric_history(mlrun.info.run_id, "global/f1")) == 2


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_package_is_a_config_error_before_any_work(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what find_spec sees for an absent package
    cfg = plain_config(compose(["federation=smoke", f"logger={name}"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "logger.name" and "pip install 'snowfed[tracking]'" in str(err.value)
    with pytest.raises(ConfigError):  # run() refuses it before writing anything
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_logger_key_is_refused():
    cfg = plain_config(compose(["federation=smoke", "logger=tensorboard"]))
    with pytest.raises(ConfigError, match="logger.tracking_uri"):
        validate_logger({**cfg, "logger": {**cfg["logger"], "tracking_uri": "x"}})
    validate_logger({k: v for k, v in cfg.items() if k != "logger"})  # runs from before tracking


class _Exploding:
    """A backend that starts fine and fails at its first round."""

    closed = False

    def log_params(self, params):
        pass

    def log_round(self, rnd, global_metrics, node_metrics):
        raise OSError("disk full")

    def close(self, summary):
        _Exploding.closed = True


def test_failing_tracker_is_reported_once_and_the_recorder_goes_on(monkeypatch, tmp_path):
    monkeypatch.setattr("snowfed.tracking.build_tracker", lambda *a: _Exploding())
    stream = io.StringIO()
    tracking = RunTracking({"logger": {"name": "tensorboard"}}, tmp_path, stream=stream)
    recorder = RoundRecorder(tmp_path / METRICS, list(NODES), tracking.on_round)
    for rnd in range(3):
        recorder.record_global(rnd, {"f1": 0.5})
    tracking.close({"status": "completed"})
    assert stream.getvalue().count("tracking failed") == 1 and "disk full" in stream.getvalue()
    assert not _Exploding.closed  # off for the rest of the run
    assert [r["round"] for r in read_jsonl(tmp_path / METRICS)] == [0, 1, 2]


def _fake_reference(cfg, store, run_dir, on_round):
    """Stands in for sim.run.reference.run_reference (minutes of training): records two rounds
    through the real recorder and the runner's callback."""
    recorder = RoundRecorder(run_dir / METRICS, list(NODES), on_round)
    recorder.record_global(0, {"f1": 0.1})
    for rnd in (1, 2):
        recorder.append([{"round": rnd, "scope": "node", "node": n, "phase": "evaluate",
                          "num-examples": 4, "f1": rnd / 4} for n in NODES])
        recorder.record_global(rnd, {"f1": 0.1 + rnd / 10})
    return FederationResult(rounds_completed=2, final_metrics={"f1": 0.3})


def test_runner_feeds_the_tracker_from_the_round_callback(monkeypatch, tmp_path):
    monkeypatch.setattr("snowfed.sim.run.reference.run_reference", _fake_reference)
    run_dir = tmp_path / "run"
    summary = run(compose(["federation=smoke", "rounds=2", "aggregation=pooled", "logger=tensorboard"]),
                  run_dir)
    assert summary["status"] == "completed"
    assert _scalars(run_dir / "tensorboard", "global/f1") == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert _scalars(run_dir / "tensorboard", "node/alpha/f1") == [(1, 0.25), (2, 0.5)]
    assert "status/text_summary" in _text_tags(run_dir / "tensorboard")


def test_failing_tracker_does_not_stop_a_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("snowfed.sim.run.reference.run_reference", _fake_reference)
    monkeypatch.setattr("snowfed.tracking.build_tracker", lambda *a: _Exploding())
    run_dir = tmp_path / "run"
    summary = run(compose(["federation=smoke", "rounds=2", "aggregation=pooled", "logger=tensorboard"]),
                  run_dir)
    assert summary["status"] == "completed" and [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert capsys.readouterr().err.count("tracking failed") == 1


@pytest.mark.slow
def test_tensorboard_end_to_end_through_ray(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(compose(["federation=smoke", "rounds=2", "logger=tensorboard"]), run_dir)
    assert summary["status"] == "completed"
    # step 0 is the initial model, as in summary.json's history
    expected = [(h["round"], round(h["f1"], 6)) for h in summary["history"]]
    assert [s for s, _ in expected] == [0, 1, 2]
    assert _scalars(run_dir / "tensorboard", "global/f1") == expected
    for node in NODES:
        assert [s for s, _ in _scalars(run_dir / "tensorboard", f"node/{node}/f1")] == [1, 2]
        assert [s for s, _ in _scalars(run_dir / "tensorboard", f"node/{node}/train-loss")] == [1, 2]
