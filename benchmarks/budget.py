"""What the GPU check's scripts share: a time budget counted from the process's own start, rows written and
flushed one line at a time, and the rows for what a script could not run.

``benchmarks/gpu_check.sh`` gives every script a ``--budget-s`` a little under the hard ``timeout`` of its
part. A script checks ``Budget.allows(reserve)`` before each step (a correctness case, a timing cell, a model
round) and, once the budget is spent, writes ``{"status": "skipped", "skipped": "out of time", ...}`` for each
step it did not reach and exits 0. The gap between budget and hard limit covers the one step in flight.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO

OUT_OF_TIME = "out of time"
NOT_AVAILABLE = "backend not available"


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where unavailable), so a budget includes the
    interpreter's start and the imports of torch and transformers."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Budget:
    """``seconds`` of wall time from the process's start; None: unlimited."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic() - process_age()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, reserve: float = 0.0) -> bool:
        """True while more than ``reserve`` seconds are left (``reserve``: what the next step may take)."""
        return self.left() > reserve


def open_rows(path: Path, mode: str = "w") -> IO[str]:
    """A JSONL file, line-buffered: every row is on disk as soon as it is written, so a part killed by its
    time limit keeps the rows it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open(mode, buffering=1)


def write_row(f: IO[str], row: dict) -> None:
    f.write(json.dumps(row) + "\n")
    f.flush()


def skipped(row: dict, why: str = OUT_OF_TIME) -> dict:
    """``row`` (the step's identifying fields) marked as not run."""
    return {**row, "status": "skipped", "skipped": why}
