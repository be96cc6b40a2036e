from __future__ import annotations

import json

import pytest

from snowfed.rundir import append_jsonl, atomic_write_json, build_summary, read_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"a": 1})
    atomic_write_json(tmp_path / "s.json", {"a": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"round": 1}, {"round": 2}])
    with open(path, "a") as f:
        f.write('{"round": 3, "f1"')  # a kill in the middle of a write
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]


def test_summary_from_records():
    records = [
        {"round": 0, "scope": "global", "f1": 0.1},
        {"round": 1, "scope": "node", "node": "a", "phase": "evaluate", "f1": 0.4},
        {"round": 1, "scope": "global", "f1": 0.5},
        {"round": 2, "scope": "node", "node": "a", "phase": "evaluate", "f1": 0.6},
        {"round": 2, "scope": "global", "f1": 0.7},
    ]
    nodes = {"a": {"noise_profile": "clean", "strategy": "baseline", "num_train": 3,
                   "label_noise": {}}}
    s = build_summary(records, nodes, "completed", 1.5)
    assert s["rounds"] == 2 and s["status"] == "completed"
    assert s["global"] == {"f1": 0.7}
    assert [h["round"] for h in s["history"]] == [0, 1, 2]
    assert s["nodes"]["a"]["final"]["f1"] == 0.6 and s["nodes"]["a"]["final"]["round"] == 2
    assert "final_train" not in s["nodes"]["a"]  # no train record given
    with pytest.raises(ValueError):
        build_summary(records, nodes, "running", 1.0)


def test_a_run_directory_in_use_is_refused_before_anything_is_written(tmp_path, smoke_cfg):
    import os

    import pytest

    from snowfed.config import ConfigError
    from snowfed.rundir import run_lock
    from snowfed.sim.run.runner import resume, run

    run_dir = tmp_path / "busy"
    with run_lock(run_dir):  # another snowfed process holds it (flock: per open file)
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} holds it"):
            run(smoke_cfg, run_dir)
        (run_dir / "config.yaml").write_text("rounds: 1\n")
        with pytest.raises(ConfigError, match="no other snowfed process"):
            resume(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".snowfed.lock", "config.yaml"]
    with run_lock(run_dir):  # released: free again
        pass


def test_metrics_and_summary_are_strict_json_with_non_finite_values_flagged(tmp_path):
    import json
    import math

    from snowfed.rundir import append_jsonl, atomic_write_json, read_jsonl

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token}"))

    append_jsonl(tmp_path / "m.jsonl", [{"round": 1, "train-loss": math.nan, "f1": 0.5},
                                         {"round": 1, "auc": -math.inf}])
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [strict(line) for line in lines] == [
        {"round": 1, "train-loss": None, "f1": 0.5, "non_finite": ["train-loss"]},
        {"round": 1, "auc": None, "non_finite": ["auc"]}]
    assert read_jsonl(tmp_path / "m.jsonl")[1]["non_finite"] == ["auc"]
    atomic_write_json(tmp_path / "s.json", {"global": {"f1": 0.5, "auc": math.nan},
                                            "history": [{"round": 0, "loss": math.inf}]})
    summary = strict((tmp_path / "s.json").read_text())
    assert summary["global"] == {"f1": 0.5, "auc": None}
    assert summary["non_finite"] == ["global.auc", "history.0.loss"]


def test_resume_writes_the_global_record_a_checkpoint_has_and_the_log_lacks(tmp_path):
    """A round's checkpoint is written before its global record; a kill between the two leaves
    a log one record short, which resume completes from the checkpoint (and a later round's
    partial records go)."""
    from snowfed.rundir import restore_global_record

    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, [{"round": 0, "scope": "global", "f1": 0.2},
                       {"round": 1, "scope": "node", "node": "a", "phase": "evaluate", "f1": 0.5},
                       {"round": 2, "scope": "node", "node": "a", "phase": "train"}])
    restore_global_record(log, {"round": 1, "metrics": {"f1": 0.6}})
    assert read_jsonl(log) == [{"round": 0, "scope": "global", "f1": 0.2},
                               {"round": 1, "scope": "node", "node": "a", "phase": "evaluate", "f1": 0.5},
                               {"round": 1, "scope": "global", "f1": 0.6}]
    restore_global_record(log, {"round": 1, "metrics": {"f1": 0.6}})  # nothing to do twice
    assert len(read_jsonl(log)) == 3
