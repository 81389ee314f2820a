"""lm-eval task folders from ``selfextend eval``'s own generators, so both harnesses read the same prompts.

    selfextend lm-eval-tasks --out DIR --tasks passkey,niah --lengths 4k,16k
    selfextend lm-eval --model selfextend --include_path DIR --tasks selfextend_passkey_16k ...

Each (task, length) becomes ``<task>_<length>.jsonl`` (one doc per depth and sample, made by
``TASKS[task].make(tokenizer, length, depth, seed + i)``, the prompt ``selfextend eval`` makes for that cell)
and ``<task>_<length>.yaml``: ``dataset_path: json`` over that local file, ``generate_until`` greedy with the
task's own answer budget, scored by the task's own scorer (``process_results`` here, imported by lm-eval's
``!function`` tag). Nothing reaches a hub. The YAML names the data file by the path ``--out`` was given as:
relative to the directory the command ran in (the repo root for ``benchmarks/lm_eval_tasks``), or absolute.
Prompts are sized in the tokenizer's tokens: build the folder with the model you evaluate (``--model``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PREFIX = "selfextend_"  # lm-eval task names: selfextend_<task>_<length>


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def task_name(task: str, length: int) -> str:
    return f"{PREFIX}{task}_{length_label(length)}"


def docs(tokenizer, task: str, length: int, depths: Iterable[float], samples: int, seed: int) -> list[dict]:
    """The docs of one (task, length): each depth's samples, in ``selfextend eval``'s order and seeds."""
    from ...eval.tasks import TASKS

    impl = TASKS.get(task)
    if impl.kind != "retrieval":
        raise ValueError(f"task {task!r} is {impl.kind}: only retrieval tasks (generate and score) are "
                         "written; for perplexity use an lm-eval loglikelihood_rolling task")
    out = []
    for depth in (list(depths) if impl.uses_depth else [None]):
        for index in range(samples):
            sample = impl.make(tokenizer, length, depth, seed + index)
            out.append({
                "task": task, "prompt": sample.prompt, "target": ", ".join(sample.expected),
                "expected": list(sample.expected), "length": length, "depth": depth, "sample": index,
                "seed": seed + index, "n_tokens": sample.n_tokens, "max_new_tokens": impl.max_new_tokens,
                # the hash `selfextend eval` writes in its rows: two harnesses, one prompt
                "prompt_sha": hashlib.sha256(sample.prompt.encode()).hexdigest()[:16],
            })
    return out


def task_yaml(name: str, task: str, length: int, data_file: str, rows: list[dict], model: str) -> str:
    """One task's YAML, written as text: ``!function`` is a tag a YAML dumper would quote."""
    max_new = rows[0]["max_new_tokens"]
    return "\n".join([
        "# Written by `selfextend lm-eval-tasks`; regenerate rather than edit.",
        f"task: {name}",
        "tag:",
        f"  - {PREFIX}{task}",
        f"  - {PREFIX.rstrip('_')}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(data_file)}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_text: prompt",
        "doc_to_target: target",
        "generation_kwargs:",
        "  until: []  # only the end-of-text token stops, as in `selfextend eval`",
        f"  max_gen_toks: {max_new}",
        "  do_sample: false",
        "process_results: !function selfextend.integrations.lm_eval.tasks.process_results",
        "metric_list:",
        "  - metric: score",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        f"  selfextend_task: {task}",
        f"  length: {length}",
        f"  max_prompt_tokens: {max(r['n_tokens'] for r in rows)}",
        f"  max_new_tokens: {max_new}",
        f"  tokenizer: {json.dumps(model)}",
        "",
    ])


def write_tasks(out: str | Path, tokenizer, tasks: Iterable[str], lengths: Iterable[int],
                depths: Iterable[float], samples: int = 1, seed: int = 0,
                model: str = "embedded:SmolLM2-135M-Instruct") -> list[str]:
    """Write the JSONL and YAML of every (task, length) into ``out``; returns the task names."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        for length in lengths:
            rows = docs(tokenizer, task, length, depths, samples, seed)
            stem = f"{task}_{length_label(length)}"
            with open(folder / f"{stem}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            name = task_name(task, length)
            text = task_yaml(name, task, length, str(folder / f"{stem}.jsonl"), rows, model)
            (folder / f"{stem}.yaml").write_text(text, encoding="utf-8")
            names.append(name)
    return names


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's per-doc hook: the selfextend task's own ``score`` of the answer."""
    from ...eval.tasks import TASKS, Sample

    sample = Sample(doc["task"], doc["prompt"], list(doc["expected"]), doc["length"], doc["depth"],
                    doc["seed"], doc["n_tokens"])
    return {"score": float(TASKS.get(doc["task"]).score(results[0], sample))}


def read_yaml(path: Path) -> dict:
    """An lm-eval task file, its ``!function`` tags read as None (nothing of it runs); {} if unreadable."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def needs(include_paths: Iterable[str], requested: Iterable[str]) -> dict[str, int]:
    """Tokens (longest prompt + answer budget) each requested task of ours needs, found by name or tag in the
    YAMLs under ``include_paths``; tasks we did not write are not listed (their length is known only when
    their requests arrive, and the model checks them then)."""
    wanted = set(requested)
    found: dict[str, int] = {}
    for root in include_paths:
        for path in sorted(Path(root).rglob("*.yaml")) if Path(root).is_dir() else []:
            data = read_yaml(path)
            meta = data.get("metadata") or {}
            if not isinstance(meta, dict) or "max_prompt_tokens" not in meta or "task" not in data:
                continue
            tags = data.get("tag") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            if data["task"] in wanted or wanted & set(tags):
                found[data["task"]] = int(meta["max_prompt_tokens"]) + int(meta.get("max_new_tokens", 0))
    return found
