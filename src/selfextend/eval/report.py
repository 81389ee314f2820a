"""Summaries, markdown tables and plots, computed only from the samples file, so ``selfextend report DIR``
re-renders exactly what the run printed, and a resumed run summarizes exactly like an uninterrupted one."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .results import (
    RESULTS_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    latest_rows,
    read_rows,
    task_files,
    task_of,
    task_rows,
    write_json_atomic,
)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of ``successes`` in ``n`` trials (partial credit counts fractionally).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, the common cells
    here: 5/5 is [0.57, 1.00], not "1.00"."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def bucket_sizes(n_tokens: int, bucket: int) -> list[int]:
    """Tokens scored in each position bucket of an ``n_tokens`` document (tokens 1 .. n-1 are predicted, token
    t in bucket t // bucket): the first bucket has one fewer, the last what is left."""
    last = n_tokens - 1
    return [min((b + 1) * bucket - 1, last) - max(b * bucket, 1) + 1 for b in range(last // bucket + 1)]


def bootstrap_ppl(nlls: list[float], reps: int = 2000, seed: int = 0,
                  weights: list[float] | None = None) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``exp(mean(nlls))``, resampling buckets (or documents).

    ``weights`` (tokens per bucket) make each resample a token-weighted mean, as the point estimate is: a
    short last bucket would otherwise count as much as a full one and the interval could miss the estimate."""
    if not nlls:
        return float("nan"), float("nan")
    if len(nlls) == 1:
        return math.exp(nlls[0]), math.exp(nlls[0])
    values = torch.tensor(nlls, dtype=torch.float64)
    w = torch.ones_like(values) if weights is None else torch.tensor(weights, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(nlls), (reps, len(nlls)), generator=g)
    means = ((values[pick] * w[pick]).sum(1) / w[pick].sum(1)).exp()
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def _bucket_weights(rows: list[dict[str, Any]]) -> list[float] | None:
    """Tokens per bucket of every row, in ``bootstrap_ppl``'s order; None for rows without their size."""
    weights = []
    for r in rows:
        n = r.get("prompt_tokens")  # the document length (the runner renames the task's n_tokens)
        sizes = bucket_sizes(int(n), int(r["bucket"])) if n else []
        if len(sizes) != len(r["bucket_nll"]):
            return None
        weights += sizes
    return weights


def sign_test(a_only: int, b_only: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the pairs where two methods disagree."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(rows: list[dict[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    """Methods ``a`` and ``b`` on the same samples (paired by length, depth and sample index), per length:
    how many pairs, how often each scored higher than the other, both accuracies and the sign test's p-value.

    "Higher" and not "right": on partial-credit tasks (several values to find) 1.0 against 0.5 on every
    sample is a consistent difference the test must see; on 0/1 scores it is the same count. Rows that carry
    a prompt hash must agree on it, or they are not the same sample (a changed template or haystack)."""
    latest = latest_rows(rows)
    by = {m: {(k[2], k[3], k[4]): r for k, r in latest.items() if k[1] == m and "score" in r} for m in (a, b)}
    for m in (a, b):
        if not by[m]:
            raise ValueError(f"no retrieval rows for method {m!r}; methods here: "
                             f"{', '.join(sorted({k[1] for k in latest}))}")
    shared = [k for k in by[a] if k in by[b]]
    if not shared:
        lengths = {m: sorted({k[0] for k in by[m]}) for m in (a, b)}
        raise ValueError(f"{a!r} and {b!r} share no sample (same length, depth and sample index): {a} has "
                         f"lengths {lengths[a]}, {b} has {lengths[b]}; run both on the same "
                         "--lengths/--depths/--samples")
    differ = [k for k in shared
              if None not in (by[a][k].get("prompt_sha"), by[b][k].get("prompt_sha"))
              and by[a][k]["prompt_sha"] != by[b][k]["prompt_sha"]]
    if differ:
        raise ValueError(f"{a!r} and {b!r} were given different prompts for {len(differ)} sample(s) (e.g. "
                         f"length, depth, sample = {differ[0]}): they were run with other task versions, so "
                         "they cannot be paired; re-run one of them into a fresh --out")
    out = []
    for length in sorted({k[0] for k in shared}):
        pairs = [k for k in shared if k[0] == length]
        sa = {k: float(by[a][k]["score"]) for k in pairs}
        sb = {k: float(by[b][k]["score"]) for k in pairs}
        a_only = sum(sa[k] > sb[k] for k in pairs)
        b_only = sum(sb[k] > sa[k] for k in pairs)
        out.append({"length": length, "pairs": len(pairs), "a": a, "b": b,
                    "a_accuracy": sum(sa.values()) / len(pairs), "b_accuracy": sum(sb.values()) / len(pairs),
                    "a_only": a_only, "b_only": b_only, "p_value": sign_test(a_only, b_only)})
    return out


def markdown_compare(table: list[dict[str, Any]]) -> str:
    a, b = table[0]["a"], table[0]["b"]
    lines = [f"| {a} vs {b} | pairs | {a} | {b} | {a} better | {b} better | sign test p |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['length']} | {r['pairs']} | {r['a_accuracy']:.2f} | {r['b_accuracy']:.2f} | "
                     f"{r['a_only']} | {r['b_only']} | {r['p_value']:.3g} |")
    return "\n".join(lines)


def _ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def summarize(rows: list[dict[str, Any]], planned: set[tuple] | None = None) -> dict[str, Any]:
    """``{method: {length: cell}}`` in first-seen method order; ``cell`` has accuracy (retrieval) or ppl.

    ``planned`` (from the run files: every sample key ``(task, method, length, depth, sample)`` a run asked
    for) adds ``expected`` and ``missing`` to every cell a run asked for, counted sample by sample."""
    latest = latest_rows(rows)
    rows = list(latest.values())
    planned = planned or set()
    asked = sorted({(key[1], int(key[2])) for key in planned}, key=repr)
    methods = _ordered([r["method"] for r in rows] + [m for m, _ in asked])
    lengths = sorted({int(r["length"]) for r in rows} | {n for _, n in asked})
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
                    "ci95": list(wilson(sum(float(r["score"]) for r in cell_rows), len(cell_rows))),
                    "n_by_depth": {str(d): len(v) for d, v in by_depth.items()},
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
                    "documents": sorted(int(r["sample"]) for r in cell_rows),
                    "ppl_ci95": list(bootstrap_ppl([b for r in cell_rows for b in r["bucket_nll"]],
                                                   weights=_bucket_weights(cell_rows))),
                    "bucket": cell_rows[0]["bucket"], "bucket_ppl": [math.exp(b) for b in bucket_nll],
                    "window": cell_rows[0].get("window"),
                    "seconds": sum(float(r["seconds"]) for r in cell_rows),
                }
    missing = 0
    for method, length in asked:
        table[method].setdefault(str(length), {"n": 0}).setdefault("missing", 0)
    for key in planned - set(latest):
        table[key[1]][str(key[2])]["missing"] += 1
        missing += 1
    for method, length in asked:
        cell = table[method][str(length)]
        cell["expected"] = cell["n"] + cell["missing"]
    params = {r["method"]: {} for r in rows}
    for r in rows:
        params[r["method"]][str(r["length"])] = r.get("params", {})
    expected = sum(table[method][str(length)]["expected"] for method, length in asked)
    depths = sorted(({r.get("depth") for r in rows} | {key[3] for key in planned}) - {None})
    return {"methods": methods, "lengths": lengths, "depths": depths, "results": table, "params": params,
            "n_rows": len(rows), "missing": missing, "expected": expected}


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
                lo, hi = cell.get("ci95") or wilson(cell["correct"], cell["n"])
                ci = f"[{lo:.2f}-{hi:.2f}]"
                cells.append(f"{cell['accuracy']:.2f} ({cell['correct']:g}/{cell['n']}{suffix} {ci}")
            else:
                lo, hi = cell.get("ppl_ci95", (float("nan"), float("nan")))
                cells.append(f"{cell['ppl']:.2f} [{lo:.2f}-{hi:.2f}]" + (f" ({gap})" if gap else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary.get("missing"):
        lines.append(f"\n{summary['missing']} of {summary['expected']} samples the runs asked for are "
                     "missing (an interrupted run, or shards not run yet): re-run the same eval command "
                     "(each shard with its --shard) to complete them.")
    for note in summary.get("notes", []):
        lines.append(f"\nNote: {note}")
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


def vs_sliding(summary: dict[str, Any], length: int, reps: int = 2000,
               seed: int = 0) -> list[dict[str, Any]]:
    """Every method's perplexity past the sliding baseline's window, divided by the baseline's on the same
    buckets (the text's own difficulty read with the trained window), with a paired bootstrap interval.

    The ratio is ``exp(mean over those buckets of nll_method - nll_baseline)``; buckets are resampled jointly
    for both. A method scored on other documents than the baseline is listed as unpaired, not divided (its
    buckets average other text). Empty without a ``sliding`` row at this length."""
    cells = {m: summary["results"][m].get(str(length)) for m in summary["methods"]}
    cells = {m: c for m, c in cells.items() if c is not None and "bucket_ppl" in c}
    base = next((m for m, c in cells.items() if c.get("mode") == "sliding" and c.get("window")), None)
    if base is None:
        return []
    bucket, window = cells[base]["bucket"], cells[base]["window"]
    first = -(-window // bucket)  # the first bucket that starts at or past the window
    base_nll = [math.log(p) for p in cells[base]["bucket_ppl"]]
    table = []
    for method, cell in cells.items():
        n = min(len(cell["bucket_ppl"]), len(base_nll))
        if method == base or cell["bucket"] != bucket or n <= first:
            continue
        if cell.get("documents") != cells[base].get("documents"):
            table.append({"method": method, "baseline": base, "from_token": first * bucket, "length": length,
                          "buckets": n - first, "unpaired": True, "documents": cell.get("documents"),
                          "baseline_documents": cells[base].get("documents")})
            continue
        diff = torch.tensor([math.log(cell["bucket_ppl"][b]) - base_nll[b] for b in range(first, n)],
                            dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        boot = diff[torch.randint(len(diff), (reps, len(diff)), generator=g)].mean(1).exp()
        lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        worst = int(diff.argmax()) + first
        table.append({"method": method, "baseline": base, "from_token": first * bucket, "length": length,
                      "buckets": n - first, "ratio": math.exp(float(diff.mean())), "ci95": [lo, hi],
                      "worst_bucket": worst * bucket, "worst_ratio": math.exp(float(diff.max())),
                      "ppl": math.exp(float(sum(math.log(cell["bucket_ppl"][b]) for b in range(first, n))
                                            / (n - first))),
                      "baseline_ppl": math.exp(sum(base_nll[first:n]) / (n - first))})
    return table


def markdown_vs_sliding(table: list[dict[str, Any]]) -> str:
    if not table:
        return ""
    t0 = table[0]
    lines = [f"At {t0['length']} tokens, past token {t0['from_token']} (the baseline's window), against "
             f"{t0['baseline']} on the same {t0['buckets']} buckets:", "",
             "| method | ppl | baseline ppl | ratio [95% paired bootstrap] | worst bucket (ratio) |",
             "|---|---:|---:|---|---|"]
    for r in table:
        if r.get("unpaired"):
            lines.append(f"| {r['method']} | - | - | not paired: documents {r['documents']}, the baseline's "
                         f"{r['baseline_documents']} (run both on the same --samples) | - |")
            continue
        lo, hi = r["ci95"]
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {r['baseline_ppl']:.2f} | {r['ratio']:.3f}x "
                     f"[{lo:.3f}-{hi:.3f}] | {r['worst_bucket'] // 1024}k ({r['worst_ratio']:.2f}x) |")
    return "\n".join(lines)


def summary_of(out_dir: str | Path, task: str) -> tuple[dict[str, Any], list]:
    """The summary of every samples file of ``task`` in ``out_dir`` (missing samples from the run files) and
    the corrupt lines skipped; writes nothing, so a page can be checked against committed files."""
    out = Path(out_dir)
    rows, bad = [], []
    for samples in task_files(out, SAMPLES_FILE, task):  # the whole run's file and every shard's
        file_rows, file_bad = read_rows(samples)
        rows += file_rows
        bad += [f"{samples.name}:{n}" if samples.name != SAMPLES_FILE.format(task=task) else n
                for n in file_bad]
    planned: set[tuple] = set()
    notes: dict[str, str] = {}
    for run in task_files(out, RUN_FILE, task):
        try:
            recorded = json.loads(run.read_text(encoding="utf-8"))
            planned |= {tuple(k) for k in recorded.get("planned", [])}
            notes.update(recorded.get("notes", {}))
        except (OSError, json.JSONDecodeError, TypeError, AttributeError):
            continue
    if not rows and not planned:
        raise ValueError(f"no results for task {task!r} in {out}: no rows and no run file that lists the "
                         f"cells asked for (expected {SAMPLES_FILE.format(task=task)})")
    summary = summarize(rows, planned)
    if notes:
        summary["notes"] = [notes[k] for k in sorted(notes)]
    against = {str(n): vs_sliding(summary, n) for n in summary["lengths"]}
    summary["vs_sliding"] = {n: t for n, t in against.items() if t}
    return summary, bad


def write_results(out_dir: str | Path, task: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize the samples files into ``results_<task>.json`` (lm-evaluation-harness style) and return it.

    ``config`` describes the folder's cells, every run's together (methods, lengths, depths), as the results
    do; ``runs`` keeps each run's own settings."""
    out = Path(out_dir)
    summary, bad = summary_of(out, task)
    path = out / RESULTS_FILE.format(task=task)
    try:
        previous = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}  # a torn results file is rebuilt from the samples
    from .runner import versions

    runs = list(previous.get("runs", [previous["config"]] if previous.get("config") else []))
    if config is not None and (not runs or runs[-1] != config):
        runs.append(config)  # each run's own grid: a later run with other lengths or depths adds its own
    grid = dict(config if config is not None else previous.get("config", {}))
    if grid:  # the folder's cells, every run's together: what the results above describe
        grid.update(methods=summary["methods"], lengths=summary["lengths"], depths=summary["depths"])
    result = {
        "task": task,
        **summary,
        "config": grid,
        "runs": runs,
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
                        n_cell = results[method].get(str(lengths[x]), {}).get("n_by_depth", {}).get(depths[y])
                        label = f"{v:.2f}".rstrip("0").rstrip(".") if v not in (0, 1) else f"{v:g}"
                        ax.text(x, y, label if n_cell is None else f"{label}\nn={n_cell}",
                                ha="center", va="center", fontsize=7)
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


PARTS = ("table", "buckets", "vs-sliding", "compare")


def check_parts(parts: list[str] | None, pair: tuple[str, str] | None) -> None:
    bad = sorted(set(parts or ()) - set(PARTS))
    if bad:
        raise ValueError(f"unknown report part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    if parts and "compare" in parts and pair is None:
        raise ValueError("--only compare needs --compare A,B (two method labels)")


def report_parts(text: str) -> list[str]:
    """``--only``: a comma list of ``PARTS``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: parts are {', '.join(PARTS)} (comma list)")
    return parts


def method_pair(text: str) -> tuple[str, str]:
    """``--compare``: two method labels as a results table shows them, e.g. ``self-extend,dynamic-ntk``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give two different method labels, A,B")
    return parts[0], parts[1]


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``report``, defined here so ``selfextend report`` and a page marker (``page.py``) parse
    the same arguments."""
    parser.add_argument("dir")
    parser.add_argument("--compare", type=method_pair, default=None,
                        help="A,B: two method labels on the same samples (paired): who alone was right, "
                             "sign test")
    parser.add_argument("--task", action="append", default=None,
                        help="only these tasks (default: every samples file)")
    parser.add_argument("--only", type=report_parts, default=None,
                        help="the parts to print, a comma list of table, buckets, vs-sliding, compare "
                             "(default: all)")


def task_names(out: Path, tasks: list[str] | None) -> list[str]:
    """``tasks``, or every task with a samples file in ``out``."""
    if not out.is_dir():
        raise ValueError(f"{out} is not a directory of results (the --out of an eval)")
    # a task whose run file exists has a grid even before its first row (an empty shard, a run cut short)
    names = tasks or sorted({task_of(p.name) for p in out.glob("samples_*.jsonl")}
                            | {task_of(p.name) for p in out.glob("run_*.json")})
    if not names:
        raise ValueError(f"no samples_*.jsonl or run_*.json files in {out}: no eval has written there yet")
    return names


def render(out_dir: str | Path, tasks: list[str] | None = None, pair: tuple[str, str] | None = None,
           parts: list[str] | None = None, summaries: dict[str, dict[str, Any]] | None = None) -> str:
    """The markdown ``selfextend report`` prints: per task the methods x lengths table, the perplexity
    buckets and the ratio to the sliding baseline per length, and the paired comparison when ``pair`` is
    given; ``parts`` keeps only some of them (``PARTS``). Reads the samples files, writes nothing."""
    check_parts(parts, pair)
    out = Path(out_dir)
    names = task_names(out, tasks)
    keep = set(parts or PARTS)
    texts = []
    compared = False
    for task in names:
        result = (summaries or {}).get(task) or summary_of(out, task)[0]
        if "table" in keep:
            texts.append(markdown(result, task))
        for length in result["lengths"]:
            buckets = markdown_buckets(result, length) if "buckets" in keep else ""
            if buckets:
                texts.append(f"{task} at {length} tokens, perplexity per position bucket:\n\n{buckets}")
            against = (markdown_vs_sliding(result.get("vs_sliding", {}).get(str(length), []))
                       if "vs-sliding" in keep else "")
            if against:
                texts.append(against)
        if "compare" in keep and pair is not None and any(
                "accuracy" in c for m in result["results"].values() for c in m.values()):
            absent = [m for m in pair if m not in result["results"]]
            if absent and not tasks:  # every task of the directory: say which lacks the pair, go on
                texts.append(f"({task}: no {' or '.join(absent)} rows to compare)")
            else:
                texts.append(markdown_compare(compare(task_rows(out, task), *pair)))
                compared = True
    if "compare" in keep and pair is not None and not compared:
        present = "; ".join(f"{task}: {', '.join(labels(out, task)) or '(no rows yet)'}" for task in names)
        raise ValueError(f"--compare {','.join(pair)}: no task in {out} has retrieval rows of both; the "
                         f"method labels there are {present}")
    return "\n\n".join(texts)


def labels(out: Path, task: str) -> list[str]:
    """The method labels of ``task``'s rows in ``out``, in first-written order."""
    return _ordered([r["method"] for r in task_rows(out, task)])


def report(out_dir: str | Path, tasks: list[str] | None = None, plots: bool = True,
           pair: tuple[str, str] | None = None, parts: list[str] | None = None) -> str:
    """Re-render results files, markdown tables and plots from every samples file in ``out_dir``."""
    check_parts(parts, pair)
    out = Path(out_dir)
    names = task_names(out, tasks)
    summaries = {}
    for task in names:
        summaries[task] = write_results(out, task)
        if plots and summaries[task]["n_rows"]:  # no rows yet: the table lists what is missing, no plot
            plot(out, task, summaries[task])
    return render(out, tasks, pair, parts, summaries)  # tasks as asked: a directory-wide report skips gaps
