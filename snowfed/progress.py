"""Live progress in the terminal, with rich (which Flower installs): one line per run, rewritten
in place on a terminal and printed once per round elsewhere (a log file, CI)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text


class LiveLine:
    """A line that a terminal shows rewritten in place (lines printed meanwhile go above it); on
    anything else each `show` is a line of its own, or nothing with `every_line=False`."""

    def __init__(self, stream: TextIO | None = None, every_line: bool = True):
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.every_line = every_line
        self._live: Live | None = None

    @property
    def stream(self) -> TextIO:
        return self.console.file

    def show(self, line: str) -> None:
        if not self.console.is_terminal:
            if self.every_line:
                self.console.print(line)
            return
        if self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        self._live.update(Text(line), refresh=True)

    def print(self, line: str) -> None:
        """A line that stays (above the live line on a terminal)."""
        self.console.print(line)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class RoundProgress:
    """`round 3/10 | global f1 0.712 | 4 sites 0.41/0.70/0.81 | 12s, ~28s left`: the minimum,
    median and maximum f1 of this round's evaluated sites, and the time left as the median round's
    time the rounds left (the first round pays start-up costs the others do not). Short enough
    for an 80-column terminal."""

    def __init__(self, total_rounds: int, stream: TextIO | None = None):
        self.total = total_rounds
        self.line = LiveLine(stream)
        self.start = time.monotonic()
        self.last: float | None = None
        self.durations: list[float] = []

    def update(self, rnd: int, global_metrics: dict, node_f1: dict[str, float]) -> None:
        now = time.monotonic()
        if rnd > 0 and self.last is not None:
            self.durations.append(now - self.last)
        self.last = now
        left = ""
        if self.durations and rnd < self.total:
            left = f", ~{statistics.median(self.durations) * (self.total - rnd):.0f}s left"
        line = f"round {rnd}/{self.total} | global f1 {global_metrics.get('f1', float('nan')):.3f}"
        if node_f1:
            values = sorted(node_f1.values())
            line += (f" | {len(values)} site{'s' * (len(values) > 1)} {values[0]:.2f}/"
                     f"{statistics.median(values):.2f}/{values[-1]:.2f}")
        self.line.show(f"{line} | {now - self.start:.0f}s{left}")

    def close(self) -> None:
        self.line.close()
