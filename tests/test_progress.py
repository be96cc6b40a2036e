"""The terminal's progress lines: this round's sites only, time left from the median round, one
line rewritten in place on a terminal, and a sweep's runs in flight."""

from __future__ import annotations

import io
import re
from pathlib import Path

from snowfed.progress import RoundProgress
from snowfed.server.recording import RoundRecorder
from snowfed.sim.run.sweep import Job, Outcome, SweepProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_round_line_summarises_this_rounds_sites(monkeypatch):
    clock = iter([0.0, 1.0, 11.0, 13.0, 15.0])  # start, round 0, a slow round 1, then 2 s rounds
    monkeypatch.setattr("snowfed.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = RoundProgress(5, out)
    progress.update(0, {"f1": 0.1}, {})
    progress.update(1, {"f1": 0.5}, {"a": 0.2, "b": 0.6, "c": 0.9})
    progress.update(2, {"f1": 0.7}, {"a": 0.4})
    progress.update(3, {"f1": 0.8}, {"b": 0.8, "c": 0.7})
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("round 1/5 | global f1 0.500 | 3 sites 0.20/0.60/0.90 |")
    assert "| 1 site 0.40/0.40/0.40 |" in lines[2]
    # the median of the rounds so far (10 s, 2 s, 2 s) times the 2 rounds left, not the mean
    assert lines[3].endswith("| 15s, ~4s left")


def test_a_terminal_gets_one_line_rewritten_in_place():
    term = _Terminal()
    progress = RoundProgress(3, term)
    for rnd in range(4):
        progress.update(rnd, {"f1": 0.1 * rnd}, {"a": 0.5})
    progress.close()
    text = term.getvalue()
    assert text.count("round ") >= 4 and "\x1b[2K" in text  # each redraw erases the line
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "\n" not in plain.strip()  # one line, rewritten after a carriage return
    last = plain.strip().split("\r")[-1]
    assert last.startswith("round 3/3 | global f1 0.300") and last.rstrip().endswith("s")


def test_recorder_hands_on_only_the_rounds_evaluated_sites(tmp_path):
    seen = []
    recorder = RoundRecorder(tmp_path / "metrics.jsonl", ["a", "b"],
                             lambda rnd, g, node_f1: seen.append(node_f1))
    recorder.append([{"round": 1, "scope": "node", "node": "a", "phase": "evaluate", "f1": 0.5},
                     {"round": 1, "scope": "node", "node": "b", "phase": "evaluate", "f1": 0.7}])
    recorder.record_global(1, {"f1": 0.6})
    recorder.append([{"round": 2, "scope": "node", "node": "b", "phase": "evaluate", "f1": 0.8}])
    recorder.record_global(2, {"f1": 0.7})
    assert seen == [{"a": 0.5, "b": 0.7}, {"b": 0.8}]


def test_sweep_shows_done_out_of_total_and_the_rounds_in_flight(tmp_path):
    term = _Terminal()
    progress = SweepProgress(3, term)
    progress.run_hook(0, 4)(2, {}, {})
    progress.run_hook(1, 4)(1, {}, {})
    live = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())
    assert "sweep 0/3 done | in flight: #0 r2/4 #1 r1/4" in live
    progress.finished(Outcome(Job({}, Path(tmp_path / "r0")), "completed",
                              {"global": {"f1": 0.8}}), 0)
    progress.close()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())
    assert "sweep 1/3 | completed f1 0.800" in plain
    assert plain.strip().splitlines()[-1].startswith("sweep 1/3 done | in flight: #1 r1/4")
    log = io.StringIO()  # not a terminal (a log file): only the runs that ended, a line each
    progress = SweepProgress(2, log)
    progress.run_hook(0, 4)(1, {}, {})
    progress.finished(Outcome(Job({}, Path(tmp_path / "r0")), "crashed", error="boom"), 0)
    assert log.getvalue().splitlines() == [f"sweep 1/2 | crashed (boom) | {tmp_path / 'r0'} | "
                                           f"{log.getvalue().split('| ')[-1].strip()}"]
