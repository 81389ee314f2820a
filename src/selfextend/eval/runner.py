"""Run one task over methods x lengths x depths x samples on one model, resumably.

Loop order is lengths, then methods, then depths and samples: a run cut short still leaves complete
method-by-method comparisons for the lengths it reached. Each sample's prompt is generated once and reused by
every method, so all methods answer exactly the same prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..methods import METHODS
from ..models import is_main_process
from ..params import parse_value
from .results import (
    RUN_FILE,
    SAMPLES_FILE,
    SampleWriter,
    latest_rows,
    lock,
    read_rows,
    remove_corrupt_lines,
    row_key,
    shard_part,
    task_files,
    task_rows,
    write_json_atomic,
)
from .tasks import TASKS, Sample
from .tasks.base import TemplateTooLong

logger = logging.getLogger("selfextend")


@dataclass(frozen=True)
class MethodSpec:
    """``name`` or ``name:key=value:key=value`` (e.g. ``self-extend:group_size=4:window=1024``)."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


ALIASES = {"G": "group_size", "W": "window"}


def parse_method(spec: str) -> MethodSpec:
    name, *pairs = spec.strip().split(":")
    method = METHODS.get(name)
    declared = {p.name: p for p in method.params}
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"method spec {spec!r}: expected key=value after ':', got {pair!r}")
        key, value = pair.split("=", 1)
        key = ALIASES.get(key, key)
        if key not in declared:
            raise ValueError(f"method {name!r} has no parameter {key!r}; its parameters: "
                             f"{', '.join(declared)}")
        try:
            params[key] = parse_value(declared[key].type, value)
        except ValueError as exc:
            raise ValueError(f"method spec {spec!r}: {key}={value!r} {exc}") from None
    try:  # each value's range and how they go together, as `apply` checks them, before any model loads
        method.check_params(params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"method spec {spec!r}: {exc}") from None
    return MethodSpec(spec.strip(), name, params)


def parse_length(text: str) -> int:
    """``4k`` = 4096 tokens, ``16k`` = 16384, or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", text)
    if not m:
        raise ValueError(f"bad length {text!r}: use tokens like 16384 or 16k")
    value = float(m.group(1)) * (1024 if m.group(2) else 1)
    if value < 1 or value != int(value):
        raise ValueError(f"bad length {text!r}: must be a positive whole number of tokens")
    return int(value)


DEPTHS_FORMAT = ("a comma list of fractions in [0, 1] (0 = start, 1 = end), e.g. 0.05,0.5,0.95, or a "
                 "count like 5 (a lone whole number is a count: 5 depths evenly from 0.05 to 0.95; write 0.0 "
                 "or 1.0 for those single depths)")


def parse_depths(text: str) -> list[float]:
    """A lone whole number n: n depths evenly spaced from 0.05 to 0.95 (1: the middle); else a comma list of
    fractions in [0, 1]."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise ValueError(f"bad depths {text!r}: a lone whole number is a count of depths (5: five evenly "
                             "from 0.05 to 0.95) and must be >= 1; for the single depth 0 write 0.0, or give "
                             "fractions in [0, 1] like 0.05,0.5,0.95")
        return [0.5] if n == 1 else [round(0.05 + 0.9 * i / (n - 1), 4) for i in range(n)]
    depths = []
    for item in (d.strip() for d in text.split(",")):
        if not item:
            continue
        try:
            depth = float(item)
        except ValueError:
            raise ValueError(f"bad depths {text!r}: {item!r} is not a number; use {DEPTHS_FORMAT}") from None
        if not 0.0 <= depth <= 1.0:  # NaN fails this too
            raise ValueError(f"bad depths {text!r}: {item} is outside [0, 1]; use {DEPTHS_FORMAT}")
        depths.append(depth)
    if not depths:
        raise ValueError(f"bad depths {text!r}: no depth given; use {DEPTHS_FORMAT}")
    return depths


def json_safe(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(params.items()) if isinstance(v, (int, float, str, bool)) or v is None}


@dataclass
class EvalConfig:
    task: str
    methods: list[MethodSpec]
    lengths: list[int]
    depths: list[float] | None = None
    samples: int = 1
    seed: int = 0
    task_args: dict[str, Any] = field(default_factory=dict)  # ppl: corpus, mode, bucket, window, stride
    model_name: str = ""
    dtype: str = "float32"
    shard: tuple[int, int] | None = None  # (K, N): this run does shard K (1-based) of N

    def __post_init__(self) -> None:
        """A method label, length or depth listed twice would run its cells twice (two rows for one key):
        each is kept once, with a warning."""
        self.methods = _once(self.methods, lambda m: m.label, "methods", "label")
        self.lengths = _once(self.lengths, int, "lengths", "length")
        if self.depths is not None:
            self.depths = _once(self.depths, lambda d: round(float(d), 6), "depths", "depth")


def _once(values: list, key, what: str, one: str) -> list:
    """``values`` without repeats (by ``key``, first one kept, order kept); warns naming the repeats."""
    seen: dict = {}
    for value in values:
        seen.setdefault(key(value), value)
    if len(seen) < len(values):
        counts = Counter(key(v) for v in values)
        repeated = sorted((k for k, c in counts.items() if c > 1), key=str)
        logger.warning("selfextend: --%s lists the %s %s more than once; each runs once", what,
                       one + ("s" if len(repeated) > 1 else ""), ", ".join(map(str, repeated)))
    return list(seen.values())


def resolve_all(model, config: EvalConfig) -> dict[tuple[str, int], dict[str, Any]]:
    """Resolve every (method, length) before running anything, so bad settings fail in seconds."""
    resolved = {}
    for spec in config.methods:
        method = METHODS.get(spec.name)
        for length in config.lengths:
            resolved[spec.label, length] = method.resolve(model.config, length, dict(spec.params))
    return resolved


def plan(config: EvalConfig) -> list[tuple[int, MethodSpec, float | None, int]]:
    task = TASKS.get(config.task)
    depths: list[float | None] = list(config.depths or [0.5]) if task.uses_depth else [None]
    cells = [(length, spec, depth, i) for length in config.lengths for spec in config.methods
             for depth in depths for i in range(config.samples)]
    if config.shard is None:
        return cells
    k, n = config.shard
    owner = shard_owners([_key(config, c) for c in cells], n)
    return [c for c in cells if owner[_key(config, c)] == k]


def settings_sha(config: EvalConfig, params: dict[str, Any]) -> str:
    """A short hash of everything that made a row besides its cell: the run's identity and the method's
    resolved parameters (two rows with the same hash were made the same way)."""
    made = {"identity": run_identity(config), "params": json_safe(params)}
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_owners(keys: list[tuple], n: int) -> dict[tuple, int]:
    """The shard (1..n) of every cell: the cells in one canonical order (length, method label, depth, sample:
    not the order the flags list them in, so every shard agrees on the split), dealt out in turn. Each shard
    gets the floor or the ceiling of cells / n, no cell is in two shards or none, and each length's cells are
    spread over the shards. Extending the grid may move cells between shards: finished samples are never
    re-run (every shard's file counts as done), but shards running at the same time need the same grid."""
    def canonical(key: tuple) -> tuple:
        task, method, length, depth, sample = key
        return length, method, -1.0 if depth is None else depth, sample

    ordered = sorted(set(keys), key=canonical)
    return {key: i % n + 1 for i, key in enumerate(ordered)}


def check_lengths(tokenizer, config: EvalConfig) -> None:
    """Every length holds the task's prompt template (its text with an empty haystack), checked on the
    shortest length before anything runs: a length that cannot is an error naming every such length."""
    task = TASKS.get(config.task)
    if task.kind == "ppl" or not config.lengths:
        return
    depth = (config.depths or [0.5])[0] if task.uses_depth else None
    try:
        task.make(tokenizer, min(config.lengths), depth, config.seed)
    except TemplateTooLong as err:
        short = [n for n in config.lengths if n < err.tokens]
        raise ValueError(
            f"--lengths {','.join(map(str, short))}: shorter than the {config.task} prompt template itself "
            f"({err.tokens} tokens with this model's tokenizer, before any haystack); use lengths >= "
            f"{err.tokens}") from None


def run_eval(model, tokenizer, config: EvalConfig, out_dir: str | Path,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the evaluation; returns every row of the samples file for this task."""
    task = TASKS.get(config.task)
    out = Path(out_dir)
    part = shard_part(config.shard)
    path = out / SAMPLES_FILE.format(task=config.task + part)
    resolved = resolve_all(model, config)
    check_lengths(tokenizer, config)
    if task.kind == "ppl":
        from .tasks.haystack import corpus_text

        corpus_text(config.task_args.get("corpus", "pydoc"))  # a missing corpus fails before any model run
    if not is_main_process():  # tensor parallel under torchrun: same forwards, rank 0 writes
        _barrier()  # rank 0 has checked and repaired the samples file
        rows = _run(model, tokenizer, config, task, path, resolved, False, write=False)
        _barrier()
        return rows
    with lock(out, config.task + part):
        notes = check_same_settings(out, config, resolved)
        for note in notes.values():
            logger.warning("selfextend: %s", note)
        record_run(out, config, notes)
        remove_corrupt_lines(path)
        _barrier()
        rows = _run(model, tokenizer, config, task, path, resolved, progress, write=True)
        _barrier()
        return rows


class _Discard:
    """The writer of ranks other than 0: they compute every sample with rank 0 and keep nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of a ``torchrun`` launch (tensor-parallel ranks must run the same
    samples, whatever copy of --out they see); ``value`` itself without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    """Wait for every rank of a ``torchrun`` launch (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run(model, tokenizer, config: EvalConfig, task, path: Path, resolved: dict,
         progress: bool, write: bool) -> list[dict[str, Any]]:
    cells = plan(config)
    # done in any of the task's files (unsharded or any shard's): a re-run with other --shard settings must
    # not repeat finished samples, nor skip the settings check that looks at the same rows
    done = latest_rows(task_rows(path.parent, config.task)) if write else {}
    todo = _broadcast([i for i, c in enumerate(cells) if _key(config, c) not in done] if write else None)
    todo = [cells[i] for i in todo]
    prompts: dict[tuple, Sample] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(c[0] for c in todo), unit="tok", unit_scale=True, disable=not progress,
               desc=f"{config.task}: {len(todo)} samples ({len(cells) - len(todo)} done before)")
    applied: tuple | None = None
    try:
        with SampleWriter(path) if write else contextlib.nullcontext(_Discard()) as writer:
            for length, spec, depth, index in todo:
                if applied != (spec.label, length):
                    api.remove(model)
                    api.apply(model, method=spec.name, **resolved[spec.label, length])
                    applied = (spec.label, length)
                bar.set_postfix_str(f"{spec.label} @ {length}" + ("" if depth is None else f" depth {depth}"))
                seed = config.seed + index
                row = {"task": config.task, "method": spec.label, "method_name": spec.name,
                       "settings_sha": settings_sha(config, resolved[spec.label, length]),
                       "params": json_safe(resolved[spec.label, length]), "length": length, "depth": depth,
                       "sample": index, "seed": seed, "model": config.model_name, "dtype": config.dtype}
                t0 = time.perf_counter()
                if task.kind == "ppl":
                    keep = resolved[spec.label, length].get("keep") if spec.name == "truncate" else None
                    row.update(task.evaluate(model, tokenizer, length, seed, keep=keep, **config.task_args))
                    row["prompt_tokens"] = row.pop("n_tokens")
                else:
                    key = (length, depth, index)
                    if key not in prompts:
                        prompts[key] = task.make(tokenizer, length, depth, seed)
                    sample = prompts[key]
                    row["prompt_sha"] = hashlib.sha256(sample.prompt.encode()).hexdigest()[:16]
                    row.update(_answer(model, tokenizer, task, sample))
                row["seconds"] = round(time.perf_counter() - t0, 3)
                writer.write(row)
                bar.update(length)
    finally:
        bar.close()
        api.remove(model)
    return read_rows(path)[0]


IDENTITY = ("model", "model_bytes", "dtype", "seed", "task_args")  # rows made otherwise must not be pooled


def model_identity(name: str) -> dict[str, Any]:
    """The model as the samples file knows it: its name (path or hub id) and its size on disk (0: unknown)."""
    path = None
    if name.startswith("embedded:"):
        from ..models import default_model_path

        try:
            path = default_model_path()
        except FileNotFoundError:
            path = None
    elif name:
        path = Path(name)
    size = 0
    if path is not None and path.is_file():
        size = path.stat().st_size
    elif path is not None and path.is_dir():
        size = sum(p.stat().st_size for p in path.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file())
    return {"model": name, "model_bytes": size}


def run_identity(config: EvalConfig) -> dict[str, Any]:
    return {**model_identity(config.model_name), "dtype": config.dtype, "seed": config.seed,
            "task_args": json.loads(json.dumps(config.task_args, sort_keys=True, default=str))}


def identity_differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The identity fields in which ``recorded`` and ``identity`` differ (an unknown model size matches)."""
    return [k for k in IDENTITY if k in recorded and recorded[k] != identity[k]
            and not (k == "model_bytes" and 0 in (recorded[k], identity[k]))]


def check_same_settings(out: Path, config: EvalConfig, resolved: dict) -> dict[str, str]:
    """Refuse to add rows to a cell (method label, length) whose rows were made with other resolved
    parameters; return a note for each finished cell of this run whose label resolves differently now.

    A label such as ``self-extend`` resolves per model and length (the authors' rule, or settings ``tune``
    saved since): if it resolves differently now, new rows would pool two settings into one number. A finished
    cell stays valid for what made it, so it is kept, with a note that its table shows the settings it was
    made with, not the ones the label gives now."""
    rows = task_rows(out, config.task)
    done = latest_rows(rows)
    cells = {(cell[1].label, cell[0]) for cell in plan(config)}
    adding = {(cell[1].label, cell[0]) for cell in plan(config) if _key(config, cell) not in done}
    notes: dict[str, str] = {}
    for row in rows:
        key = (row.get("method"), int(row.get("length", -1)))
        if key not in cells:
            continue
        was, now = row.get("params") or {}, json_safe(resolved[key])
        differ = sorted(k for k in set(was) & set(now) if was[k] != now[k])
        if differ and key not in adding:
            label, length = key
            notes[f"{label}|{length}"] = (
                f"{label} at {length} tokens: the rows were made with "
                + ", ".join(f"{k}={was[k]!r}" for k in differ) + "; it resolves to "
                + ", ".join(f"{k}={now[k]!r}" for k in differ) + " now (settings `tune` saved since, or "
                "another rule): the table shows the settings the rows were made with; use another --out to "
                "measure the new ones.")
        elif differ:
            label, length = key
            explicit = label + "".join(f":{k}={was[k]}" for k in differ)
            raise ValueError(
                f"{out} holds {label} rows at {length} tokens made with "
                + ", ".join(f"{k}={was[k]!r}" for k in differ) + "; this run resolves "
                + ", ".join(f"{k}={now[k]!r}" for k in differ) + ". Results made with other settings are "
                f"never pooled: ask for those explicitly ({explicit}), use another --out, or delete those "
                "rows.")
    return notes


def record_run(out: Path, config: EvalConfig, notes: dict[str, str] | None = None) -> None:
    """Refuse to add rows to a samples file made by another run (model, dtype, seed, task parameters);
    otherwise record this run's identity, every sample it asks for (``report`` counts the missing ones) and
    the notes on its finished cells (``check_same_settings``; a cell's note is replaced by the next run's)."""
    part = shard_part(config.shard)
    path = out / RUN_FILE.format(task=config.task + part)
    samples = out / SAMPLES_FILE.format(task=config.task + part)
    identity = run_identity(config)
    for other in task_files(out, RUN_FILE, config.task):  # every shard of one grid shares one identity
        if other != path:
            try:
                theirs = json.loads(other.read_text(encoding="utf-8")).get("identity", {})
            except (OSError, json.JSONDecodeError):
                continue
            differ = identity_differences(theirs, identity)
            if differ:
                raise ValueError(f"{other.name} in {out} was made with "
                                 + ", ".join(f"{k}={theirs[k]!r}" for k in differ)
                                 + f"; this run has {', '.join(f'{k}={identity[k]!r}' for k in differ)}. "
                                 "Shards of one grid must share model, dtype, seed and task parameters.")
    previous: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}  # unreadable: rebuilt from this run (the rows are checked below)
    recorded = previous.get("identity")
    if recorded is None:  # results from before run files: the rows carry model, dtype and seed
        rows = read_rows(samples)[0]
        if rows:
            first = rows[0]
            recorded = {"model": first.get("model", ""), "dtype": first.get("dtype", config.dtype),
                        "seed": int(first.get("seed", 0)) - int(first.get("sample", 0))}
    if recorded is not None:
        differ = identity_differences(recorded, identity)
        if differ:
            was = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
            now = ", ".join(f"{k}={identity[k]!r}" for k in differ)
            raise ValueError(f"{out} holds {config.task} samples made with {was}; this run has {now}. "
                             "Results of different runs are never pooled: use another --out, or delete "
                             f"{samples} to start over")
    # every sample any run into this --out asked for (the whole grid, whichever shard this is)
    planned = {tuple(k) for k in previous.get("planned", [])}
    planned |= {_key(config, cell) for cell in plan(EvalConfig(**{**config.__dict__, "shard": None}))}
    cells = {f"{cell[1].label}|{cell[0]}" for cell in plan(config)}
    kept = {k: v for k, v in previous.get("notes", {}).items() if k not in cells}
    write_json_atomic(path, {"task": config.task, "identity": identity, "versions": versions(),
                             "planned": sorted(planned, key=repr), "notes": {**kept, **(notes or {})}})


def _key(config: EvalConfig, cell) -> tuple:
    length, spec, depth, index = cell
    return row_key({"task": config.task, "method": spec.label, "length": length, "depth": depth,
                    "sample": index})


def _answer(model, tokenizer, task, sample: Sample) -> dict[str, Any]:
    from ..generation import greedy_answer

    answer = greedy_answer(model, tokenizer, sample.prompt, max_new_tokens=task.max_new_tokens,
                           progress=False)
    score = task.score(answer.text, sample)
    return {"prompt_tokens": sample.n_tokens, "kept_tokens": answer.kept_tokens, "prediction": answer.text,
            "expected": sample.expected, "score": float(score),
            "prefill_seconds": round(answer.prefill_seconds, 3),
            **({"needle_depth": sample.meta["needle_depth"]} if "needle_depth" in sample.meta else {})}


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"selfextend": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
