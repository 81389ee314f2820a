"""Results on disk: one JSONL row per sample, appended and flushed as it is made, so a crash or Ctrl-C loses
nothing written; a resumed run skips rows already there. Corrupt lines (a write cut short) are skipped and
reported, never fatal, and the next run that writes the file removes them (once).

Beside the samples, ``run_<task>.json`` records what made them (the run's identity: model, its size, dtype,
seed, task parameters) and every cell a run asked for, so a re-run with other settings is refused instead of
pooled, and ``report`` can say which cells are missing. One writer at a time: ``lock`` holds an OS lock on
``.lock_<task>`` (released by the kernel if the process dies). Every JSON file is written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("selfextend")

SAMPLES_FILE = "samples_{task}.jsonl"
RESULTS_FILE = "results_{task}.json"
RUN_FILE = "run_{task}.json"
LOCK_FILE = ".lock_{task}"


def shard_part(shard: tuple[int, int] | None) -> str:
    """The file-name part of shard K of N (``.shard-K-of-N``); empty for an unsharded run. Shards write their
    own files into one ``--out``, so they never share a writer's lock; ``report`` merges them."""
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


def task_of(filename: str) -> str:
    """The task a samples or run file is of: ``samples_niah_single.shard-1-of-2.jsonl`` -> ``niah_single``."""
    return filename.split(".", 1)[0].split("_", 1)[1]


def task_files(out: Path, template: str, task: str) -> list[Path]:
    """Every file of ``task`` written from ``template`` (the unsharded one and every shard's), sorted."""
    whole = out / template.format(task=task)
    stem, dot, ext = template.format(task=task).partition(".")
    shards = sorted(out.glob(f"{stem}.shard-*-of-*{dot}{ext}"))
    return ([whole] if whole.exists() else []) + shards


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over: no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def lock(out: Path, task: str) -> Iterator[None]:
    """Hold the writer's lock on ``out`` for ``task``, or refuse at once when another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE.format(task=task)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"another eval ({holder}) is writing {task} results to {out}; wait for it to "
                             "finish or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_corrupt_lines(path: Path) -> int:
    """Rewrite the samples file without its corrupt lines (atomically); returns how many were removed."""
    rows, bad = read_rows(path)
    if not bad:
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    logger.warning("selfextend: removed %d corrupt line(s) from %s; their samples will be re-run",
                   len(bad), path)
    return len(bad)


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a sample across runs: task, method label, length, depth and sample index."""
    depth = row.get("depth")
    return (row["task"], row["method"], int(row["length"]), None if depth is None else round(float(depth), 6),
            int(row["sample"]))


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """All parsable rows, and the line numbers of the corrupt ones."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    if not path.exists():
        return rows, bad
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_key(row)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad.append(lineno)
                continue
            rows.append(row)
    if bad:
        logger.warning("selfextend: skipped %d corrupt line(s) in %s (lines %s); they will be re-run",
                       len(bad), path, ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    return rows, bad


def task_rows(out: Path, task: str) -> list[dict[str, Any]]:
    """Every row of ``task`` in ``out``: the unsharded samples file and every shard's."""
    return [row for path in task_files(out, SAMPLES_FILE, task) for row in read_rows(path)[0]]


def latest_rows(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """One row per key (the last one written wins)."""
    return {row_key(r): r for r in rows}


class SampleWriter:
    """Appends rows to the samples file; each row is flushed and fsynced before the next sample starts.

    The file is opened anew for every row: a handle held across samples would keep writing into the old
    file once something replaces the path (``git checkout`` or ``git stash`` of a results directory during
    a run), and every later row would be lost with it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def _repair_tail(self) -> None:
        """A crash mid-write can leave a last line without its newline: end it so the next row starts
        clean."""
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")

    def write(self, row: dict[str, Any]) -> None:
        self._repair_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Nothing to close (no file stays open between rows); here so a writer works in a ``with`` block."""

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
