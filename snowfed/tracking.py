"""Optional experiment tracking (`logger=none|tensorboard|mlflow`) for users who live there.

metrics.jsonl stays the record of a run; a tracker gets a copy, offline (TensorBoard event files,
an MLflow store on disk). So a tracker is never allowed to cost a result: a missing package is a
ConfigError before any work, and an error once tracking has started is reported on stderr once,
after which the run goes on untracked.

Steps are rounds, and round 0 is the initial global model, as in metrics.jsonl and summary.json's
history: `global/f1` has steps 0..rounds. Node scalars start at round 1.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlparse

from snowfed.config import ConfigError, require, require_creatable_dir
from snowfed.rundir import METRICS

INSTALL = "pip install 'snowfed[tracking]'"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger.name -> module it needs
KEYS = {
    "none": ("name",),
    "tensorboard": ("name", "log_dir"),
    "mlflow": ("name", "tracking_uri", "experiment", "run_name"),
}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
RUN_DIR_TAG = "snowfed.run_dir"  # how a resumed run finds its MLflow run again
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class Tracker(Protocol):
    """One backend. Metric dicts hold numbers only; node metrics are {node: {metric: value}}."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_round(
        self, rnd: int, global_metrics: Mapping[str, float], node_metrics: Mapping[str, Mapping[str, float]]
    ) -> None: ...

    def close(self, summary: Mapping[str, Any]) -> None: ...


def logger_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg.logger`; runs made before tracking existed have none, which means `none`."""
    return dict(cfg.get("logger") or {"name": "none"})


def validate_logger(cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown logger, an unknown key, or a backend whose package is not installed."""
    logger = logger_config(cfg)
    name = logger.get("name")
    require(name in KEYS, "logger.name", name, f"one of {', '.join(KEYS)}")
    for key, value in logger.items():
        require(key in KEYS[name], f"logger.{key}", value,
                f"a key of logger={name} ({', '.join(KEYS[name])})")
        require(key == "name" or value is None or isinstance(value, str), f"logger.{key}", value,
                "a string or null")
    if logger.get("log_dir") is not None:
        require_creatable_dir(logger["log_dir"], "logger.log_dir")
    module = PACKAGES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError("logger.name", name, f"none, or the {module} package installed (install "
                          f"with {INSTALL})")


def build_tracker(cfg: Mapping[str, Any], run_dir: Path, resuming: bool = False) -> Tracker | None:
    """The backend `cfg.logger` names (None for `none`); its files default to the run directory."""
    logger = logger_config(cfg)
    run_dir = Path(run_dir).resolve()
    if logger["name"] == "tensorboard":
        return TensorBoardTracker(Path(logger.get("log_dir") or run_dir / TENSORBOARD_DIR), resuming)
    if logger["name"] == "mlflow":
        uri = logger.get("tracking_uri") or f"sqlite:///{run_dir / MLFLOW_DB}"
        return MlflowTracker(uri, logger.get("experiment") or "snowfed",
                             logger.get("run_name") or run_dir.name, run_dir, resuming)
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"aggregation.name": "fedavg", "federation.hospitals.0.name": ...}."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    if not items:
        return {prefix: str(value)} if prefix else {}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries (booleans, strings such as an `error`, and lists are left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def node_metrics(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{node: {metric: value}} from node records. Metrics of the `evaluate` phase (the global
    model on the node's clean held-out split) keep their names; another phase's get its name as
    prefix unless they already carry it: `train-loss` stays, `num-examples` -> `train-num-examples`."""
    nodes: dict[str, dict[str, float]] = {}
    for r in records:
        phase = r.get("phase", "")
        for key, value in numbers({k: v for k, v in r.items() if k not in ("round", "node")}).items():
            if phase != "evaluate" and not key.startswith(f"{phase}-"):
                key = f"{phase}-{key}"
            nodes.setdefault(r["node"], {})[key] = value
    return nodes


class TensorBoardTracker:
    """Event files in `log_dir`: scalars `global/<metric>` and `node/<name>/<metric>` per round,
    the config as text and as hparams (TensorBoard's HPARAMS tab then compares the runs of a sweep
    opened with `tensorboard --logdir multirun/`).

    The writer opens at the first round logged. A resumed run purges what the earlier session
    logged from that round on (the round it was in when it stopped is redone) and keeps the
    config it logged then."""

    def __init__(self, log_dir: Path, resuming: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir, self.resuming = Path(log_dir), resuming
        self._open = SummaryWriter
        self.writer = None
        self.params: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    def _writer(self, step: int | None):
        if self.writer is None:
            self.writer = self._open(str(self.log_dir), purge_step=step if self.resuming else None)
            if not self.resuming and self.params:
                self._write_params()
        return self.writer

    def _write_params(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
        for summary in hparams(values, {"global/f1": 0.0}):  # the metric is named, not written
            self.writer.file_writer.add_summary(summary)

    def log_round(self, rnd, global_metrics, node_metrics) -> None:
        writer = self._writer(rnd)
        for key, value in global_metrics.items():
            writer.add_scalar(f"global/{key}", value, rnd)
        for node, metrics in node_metrics.items():
            for key, value in metrics.items():
                writer.add_scalar(f"node/{node}/{key}", value, rnd)
        writer.flush()  # a killed run keeps every round it finished

    def close(self, summary) -> None:
        writer = self._writer(None)  # no purge: a run that ends before any round keeps the earlier ones
        reason = f": {summary['reason']}" if summary.get("reason") else ""
        writer.add_text("status", f"{summary.get('status')}{reason}", int(summary.get("rounds", 0)))
        writer.close()


class MlflowTracker:
    """One MLflow run: the flattened config as params, `global/<metric>` and
    `node/<name>/<metric>` at step = round, the summary's status as the run's end status.

    The default store is a SQLite file in the run directory (MLflow 3 refuses its `file:` store
    unless MLFLOW_ALLOW_FILE_STORE is set, which this tracker sets when `tracking_uri` names one).
    MlflowClient with an explicit run id, not the fluent API: rounds are logged from Flower's
    server thread, and the fluent API's active run is per thread. A resumed run continues the
    MLflow run tagged with its run directory; without one it starts a new run and says so."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: Path,
                 resuming: bool = False, stream: TextIO | None = None):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up logs at INFO
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self._earlier_run(experiment_id, str(run_dir)) if resuming else None
        self.resumed = self.run_id is not None
        if self.resumed:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            if resuming:
                print(f"snowfed: mlflow: no run tagged {RUN_DIR_TAG}={run_dir} in {uri}; the resumed "
                      "rounds go to a new MLflow run", file=stream or sys.stderr, flush=True)
            tags = {RUN_DIR_TAG: str(run_dir)}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def _earlier_run(self, experiment_id: str, run_dir: str) -> str | None:
        if "'" in run_dir:  # not expressible in MLflow's filter syntax
            return None
        runs = self.client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = {_key(k): str(v) for k, v in params.items()}
        if self.resumed:  # params are immutable: keep the first values, tag what a resume changed
            logged = self.client.get_run(self.run_id).data.params
            for key in [k for k in params if k in logged]:
                if logged[key] != params[key]:
                    self.client.set_tag(self.run_id, f"resumed.{key}", params[key])
                del params[key]
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_round(self, rnd, global_metrics, node_metrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {f"global/{k}": v for k, v in global_metrics.items()}
        for node, metrics in node_metrics.items():
            values.update({f"node/{node}/{k}": v for k, v in metrics.items()})
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), v, now, rnd) for k, v in values.items()])

    def close(self, summary) -> None:
        status = summary.get("status", "failed")
        self.client.set_tag(self.run_id, "snowfed.status", status)
        if summary.get("reason"):
            self.client.set_tag(self.run_id, "snowfed.reason", str(summary["reason"])[:5000])
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def _key(name: str) -> str:
    """An MLflow key: alphanumerics, `_ - . : /` and spaces; anything else becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-.:/ " else "_" for c in name)


class RunTracking:
    """The runner's side of tracking: starts the configured tracker, feeds it from the per-round
    callback of the progress display (global metrics, plus that round's node records, which the
    recorder has just appended to metrics.jsonl) and closes it with the summary.

    Any tracker exception is reported on `stream` once; tracking then stops and the run goes on."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, resuming: bool = False,
                 stream: TextIO | None = None):
        self.name = logger_config(cfg)["name"]
        self.metrics_path = Path(run_dir) / METRICS
        self.offset = 0  # bytes of metrics.jsonl already read
        self.stream = stream or sys.stderr
        self.tracker: Tracker | None = None
        self._guard(lambda: self._start(cfg, Path(run_dir), resuming))

    def _start(self, cfg: Mapping[str, Any], run_dir: Path, resuming: bool) -> None:
        self.tracker = build_tracker(cfg, run_dir, resuming)
        if self.tracker is not None:
            self.tracker.log_params(flatten({k: v for k, v in cfg.items() if k != "hydra"}))

    def on_round(self, rnd: int, global_metrics: Mapping[str, Any], *_: Any) -> None:
        """The progress callback's signature: (round, global metrics, node f1)."""
        if self.tracker is not None:
            self._guard(lambda: self.tracker.log_round(
                rnd, numbers(global_metrics),
                node_metrics([r for r in self._new_node_records() if r["round"] == rnd])))

    def close(self, summary: Mapping[str, Any]) -> None:
        """Log node records that came after the last round (personalisation), then end the run."""
        if self.tracker is not None:
            self._guard(lambda: self._close(summary))

    def _close(self, summary: Mapping[str, Any]) -> None:
        late = self._new_node_records()
        for rnd in sorted({r["round"] for r in late}):
            self.tracker.log_round(rnd, {}, node_metrics([r for r in late if r["round"] == rnd]))
        self.tracker.close(summary)

    def _new_node_records(self) -> list[dict[str, Any]]:
        # Read from where the last call stopped. A resumed run truncates metrics.jsonl to its
        # checkpoint before the first round, so starting at 0 reads the right file; records of
        # rounds before the current one were logged by the earlier session.
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # complete lines only
        self.offset += len(data)
        records = [json.loads(line) for line in data.splitlines() if line.strip()]
        return [r for r in records if r.get("scope") == "node"]

    def _guard(self, action) -> None:
        try:
            action()
        except Exception as exc:
            print(f"snowfed: {self.name} tracking failed and is off for the rest of this run "
                  f"(the run goes on; metrics.jsonl has every result): {type(exc).__name__}: {exc}",
                  file=self.stream, flush=True)
            self.tracker = None
