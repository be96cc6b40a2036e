"""Live progress of a run in the terminal: one line per completed round."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class RoundProgress:
    """Prints `round 3/10 [######----] global f1 0.712 | alpha 0.70 beta 0.41 | 12s, ~28s left`."""

    def __init__(self, total_rounds: int, stream: TextIO | None = None, width: int = 20):
        self.total = total_rounds
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.first_round_at: float | None = None

    def update(self, rnd: int, global_metrics: dict, node_f1: dict[str, float]) -> None:
        now = time.monotonic()
        if rnd == 0:
            self.first_round_at = now
        done = int(self.width * rnd / max(self.total, 1))
        bar = "#" * done + "-" * (self.width - done)
        elapsed = now - self.start
        eta = ""
        if rnd > 0 and self.first_round_at is not None:
            per_round = (now - self.first_round_at) / rnd
            eta = f", ~{per_round * (self.total - rnd):.0f}s left"
        nodes = " ".join(f"{name} {f1:.2f}" for name, f1 in node_f1.items())
        line = (
            f"round {rnd}/{self.total} [{bar}] global f1 {global_metrics.get('f1', float('nan')):.3f}"
            + (f" | {nodes}" if nodes else "")
            + f" | {elapsed:.0f}s{eta}"
        )
        print(line, file=self.stream, flush=True)
