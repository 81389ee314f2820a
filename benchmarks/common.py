"""What the benchmark scripts share: reading their resumable JSONL result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_jsonl(out: Path) -> list[dict]:
    """The rows already in ``out`` (none if it does not exist); corrupt lines are reported and skipped."""
    rows: list[dict] = []
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"skipping corrupt line in {out}: {line[:80]!r}", file=sys.stderr)
    return rows
