"""Summaries, markdown tables and plots, computed only from the samples file, so ``selfextend report DIR``
re-renders exactly what the run printed, and a resumed run summarizes exactly like an uninterrupted one."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .results import (
    RESULTS_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    latest_rows,
    read_rows,
    task_files,
    task_of,
    write_json_atomic,
)


def _ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def summarize(rows: list[dict[str, Any]], cells: dict[str, int] | None = None) -> dict[str, Any]:
    """``{method: {length: cell}}`` in first-seen method order; ``cell`` has accuracy (retrieval) or ppl.

    ``cells`` (from the run file: ``"method|length" -> samples asked for``) adds ``expected`` and ``missing``
    to every cell a run asked for, including those with no row yet."""
    rows = list(latest_rows(rows).values())
    cells = cells or {}
    planned = [(k.rsplit("|", 1)[0], int(k.rsplit("|", 1)[1])) for k in cells]
    methods = _ordered([r["method"] for r in rows] + [m for m, _ in planned])
    lengths = sorted({int(r["length"]) for r in rows} | {n for _, n in planned})
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        table[method] = {}
        for length in lengths:
            cell_rows = [r for r in rows if r["method"] == method and int(r["length"]) == length]
            if not cell_rows:
                continue
            if "score" in cell_rows[0]:
                by_depth = defaultdict(list)
                for r in cell_rows:
                    by_depth[r.get("depth")].append(float(r["score"]))
                table[method][str(length)] = {
                    "accuracy": sum(float(r["score"]) for r in cell_rows) / len(cell_rows),
                    "n": len(cell_rows),
                    "correct": sum(float(r["score"]) for r in cell_rows),
                    "by_depth": {
                        str(d): sum(v) / len(v)
                        for d, v in sorted(by_depth.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
                    },
                    "prompt_tokens": sum(int(r["prompt_tokens"]) for r in cell_rows) // len(cell_rows),
                    "seconds": sum(float(r["seconds"]) for r in cell_rows),
                }
            else:
                nll = sum(float(r["nll"]) for r in cell_rows) / len(cell_rows)
                n_buckets = min(len(r["bucket_nll"]) for r in cell_rows)
                bucket_nll = [sum(r["bucket_nll"][b] for r in cell_rows) / len(cell_rows)
                              for b in range(n_buckets)]
                table[method][str(length)] = {
                    "ppl": math.exp(nll), "nll": nll, "n": len(cell_rows), "mode": cell_rows[0]["mode"],
                    "bucket": cell_rows[0]["bucket"], "bucket_ppl": [math.exp(b) for b in bucket_nll],
                    "seconds": sum(float(r["seconds"]) for r in cell_rows),
                }
    missing = 0
    for key, expected in cells.items():
        method, length = key.rsplit("|", 1)
        cell = table[method].setdefault(length, {"n": 0})
        cell["expected"] = expected
        cell["missing"] = max(0, expected - cell["n"])
        missing += cell["missing"]
    params = {r["method"]: {} for r in rows}
    for r in rows:
        params[r["method"]][str(r["length"])] = r.get("params", {})
    return {"methods": methods, "lengths": lengths, "results": table, "params": params, "n_rows": len(rows),
            "missing": missing, "expected": sum(cells.values())}


def markdown(summary: dict[str, Any], task: str) -> str:
    """Methods x lengths: accuracy as ``0.80 (4/5)``, perplexity as a number; ``-`` where not run."""
    lengths = summary["lengths"]
    head = f"| {task} | " + " | ".join(f"{n}" for n in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    for method in summary["methods"]:
        cells = []
        for n in lengths:
            cell = summary["results"][method].get(str(n))
            gap = f"{cell['missing']} missing" if cell and cell.get("missing") else ""
            if cell is None or cell["n"] == 0:
                cells.append(f"- ({gap})" if gap else "-")
            elif "accuracy" in cell:
                suffix = f"; {gap})" if gap else ")"
                cells.append(f"{cell['accuracy']:.2f} ({cell['correct']:g}/{cell['n']}{suffix}")
            else:
                cells.append(f"{cell['ppl']:.2f}" + (f" ({gap})" if gap else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary.get("missing"):
        lines.append(f"\n{summary['missing']} of {summary['expected']} samples the runs asked for are "
                     "missing (interrupted?): re-run the same eval command to complete them.")
    return "\n".join(lines)


def markdown_buckets(summary: dict[str, Any], length: int) -> str:
    """Perplexity per position bucket at one length: methods x buckets (the curve as a table)."""
    cells = {m: summary["results"][m].get(str(length)) for m in summary["methods"]}
    cells = {m: c for m, c in cells.items() if c is not None and "bucket_ppl" in c}
    if not cells:
        return ""
    bucket = next(iter(cells.values()))["bucket"]
    n = max(len(c["bucket_ppl"]) for c in cells.values())
    head = ("| method (mode) | "
            + " | ".join(f"{b * bucket // 1024}-{(b + 1) * bucket // 1024}k" for b in range(n)) + " | all |")
    lines = [head, "|---|" + "---:|" * (n + 1)]
    for m, c in cells.items():
        values = [f"{v:.1f}" for v in c["bucket_ppl"]] + ["-"] * (n - len(c["bucket_ppl"]))
        lines.append(f"| {m} ({c['mode']}) | " + " | ".join(values) + f" | {c['ppl']:.2f} |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, task: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize the samples file into ``results_<task>.json`` (lm-evaluation-harness style) and return it."""
    out = Path(out_dir)
    rows, bad = [], []
    for samples in task_files(out, SAMPLES_FILE, task):  # the whole run's file and every shard's
        file_rows, file_bad = read_rows(samples)
        rows += file_rows
        bad += [f"{samples.name}:{n}" if samples.name != SAMPLES_FILE.format(task=task) else n
                for n in file_bad]
    if not rows:
        raise ValueError(f"no results for task {task!r} in {out} (expected {SAMPLES_FILE.format(task=task)})")
    cells: dict[str, int] = {}
    for run in task_files(out, RUN_FILE, task):
        try:
            for key, n in json.loads(run.read_text(encoding="utf-8")).get("cells", {}).items():
                cells[key] = max(cells.get(key, 0), n)
        except (OSError, json.JSONDecodeError):
            continue
    summary = summarize(rows, cells)
    path = out / RESULTS_FILE.format(task=task)
    try:
        previous = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}  # a torn results file is rebuilt from the samples
    from .runner import versions

    result = {
        "task": task,
        **summary,
        "config": config if config is not None else previous.get("config", {}),
        "versions": versions(),
        "corrupt_lines": bad,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(path, result)
    return result


def plot(out_dir: str | Path, task: str, summary: dict[str, Any]) -> list[Path]:
    """Heatmaps (depth x length per method) for retrieval, NLL-bucket curves for ppl. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'selfextend-llm[plots]'") from exc
    out = Path(out_dir)
    written: list[Path] = []
    results = summary["results"]
    if any("accuracy" in c for m in results.values() for c in m.values()):
        methods = summary["methods"]
        lengths = summary["lengths"]
        depths = sorted({d for m in results.values() for c in m.values() for d in c.get("by_depth", {})},
                        key=lambda d: -1.0 if d == "None" else float(d))
        fig, axes = plt.subplots(1, len(methods), sharey=True, squeeze=False,
                                 figsize=(1.5 + (0.55 * len(lengths) + 0.5) * len(methods),
                                          1.6 + 0.4 * len(depths)))
        for ax, method in zip(axes[0], methods, strict=True):
            grid = [[results[method].get(str(n), {}).get("by_depth", {}).get(d, float("nan"))
                     for n in lengths]
                    for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)),
                          [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths],
                          fontsize=8)
            ax.set_yticks(range(len(depths)), ["-" if d == "None" else f"{float(d):.2f}" for d in depths],
                          fontsize=8)
            ax.set_title(method.replace(":", "\n"), fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=8)
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if v == v:  # not NaN
                        ax.text(x, y, f"{v:.2f}".rstrip("0").rstrip(".") if v not in (0, 1) else f"{v:g}",
                                ha="center", va="center", fontsize=8)
        axes[0][0].set_ylabel("depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{task}: accuracy by depth and length", fontsize=10, y=1.08)
        path = out / f"heatmap_{task}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    else:
        for length in summary["lengths"]:
            fig, ax = plt.subplots(figsize=(7, 4))
            for method in summary["methods"]:
                cell = results[method].get(str(length))
                if cell is None or "bucket_ppl" not in cell:  # not run (yet)
                    continue
                b = cell["bucket"]
                xs = [(i + 0.5) * b / 1024 for i in range(len(cell["bucket_ppl"]))]
                ax.plot(xs, cell["bucket_ppl"], marker="o", markersize=3, label=f"{method} ({cell['mode']})")
            ax.set_yscale("log")
            ax.set_xlabel("position (k tokens)")
            ax.set_ylabel(
                "perplexity per "
                f"{summary['results'][summary['methods'][0]].get(str(length), {}).get('bucket', '')}"
                "-token bucket"
            )
            ax.set_title(f"{task}: {length} tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out / f"{task}_{length}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def report(out_dir: str | Path, tasks: list[str] | None = None, plots: bool = True) -> str:
    """Re-render results files, markdown tables and plots from every samples file in ``out_dir``."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"results directory {out} does not exist")
    names = tasks or sorted({task_of(p.name) for p in out.glob("samples_*.jsonl")})
    if not names:
        raise ValueError(f"no samples_*.jsonl files in {out}")
    texts = []
    for task in names:
        result = write_results(out, task)
        texts.append(markdown(result, task))
        for length in result["lengths"]:
            buckets = markdown_buckets(result, length)
            if buckets:
                texts.append(f"{task} at {length} tokens, perplexity per position bucket:\n\n{buckets}")
        if plots:
            plot(out, task, result)
    return "\n\n".join(texts)
