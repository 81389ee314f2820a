"""``selfextend tune``: choose SelfExtend's group size and window for one model and length from evidence.

The authors give a rule of thumb only (``W`` in 512..2048, the smallest ``G`` with
``W + (N - W) / G <= 2/3 L``). ``tune`` runs a seeded sweep of ``G x W`` at the target length on two
probes, passkey retrieval at a few depths and single-pass perplexity on ``pydoc_data.topics``, ranks the
candidates (accuracy first, then the perplexity of the last quarter of the document, where extension
matters), and saves the winner for ``apply(model, target_length=N)``. Candidates are tried
nearest-to-the-rule first, so a short budget still covers the likeliest settings; the sweep stops when
the next candidate would overrun the budget.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import trained_length_of
from ..positions import max_reach, recommended_group_size, recommended_window
from .results import latest_rows, read_rows
from .runner import EvalConfig, MethodSpec, parse_depths, run_eval

WINDOWS = (256, 512, 1024, 2048, 4096)
GROUPS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def candidates(target_length: int, trained_length: int) -> list[tuple[int, int]]:
    """Every ``(G, W)`` whose reach covers the target, nearest the authors' rule first."""
    L = trained_length
    rule_w = recommended_window(L)
    rule_g = recommended_group_size(target_length, L, rule_w)
    out = [(g, w) for w in WINDOWS if w <= L // 2 for g in GROUPS if max_reach(L, w, g) >= target_length]
    return sorted(out, key=lambda gw: (abs(math.log(gw[0] / rule_g))
                                       + 0.5 * abs(math.log2(gw[1] / rule_w)), gw))


def _label(g: int, w: int) -> str:
    return f"self-extend:group_size={g}:window={w}"


def tune(model, tokenizer, target_length: int, *, budget_minutes: float = 30.0, depths: str = "0.1,0.5,0.9",
         seed: int = 0, out: str | Path | None = None, save: bool = True, max_candidates: int | None = None,
         progress: bool = True, stream=sys.stdout, model_name: str = "", dtype: str = "float32",
         ) -> list[dict[str, Any]]:
    """Run the sweep and return the ranked rows (best first); saves the winner unless ``save=False``."""
    L = trained_length_of(model.config)
    if target_length <= L:
        raise ValueError(f"target_length={target_length} fits the trained length {L}: "
                         "nothing to tune (vanilla).")
    if budget_minutes < 0:
        raise ValueError(f"budget_minutes={budget_minutes} is negative; give the minutes the sweep may take")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates={max_candidates}: try at least 1 candidate, or leave it unset")
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="selfextend-tune-"))
    depth_list = parse_depths(depths)
    todo = candidates(target_length, L)[:max_candidates]
    deadline = time.monotonic() + budget_minutes * 60
    costs: list[float] = []
    print(f"tune: {len(todo)} candidates (G x W) at {target_length} tokens, budget {budget_minutes:g} min, "
          f"probes: passkey at depths {depth_list} + ppl (pydoc, single pass); results in {out_dir}",
          file=stream)
    tried = []
    for i, (g, w) in enumerate(todo):
        if costs and time.monotonic() + max(costs) > deadline:
            print(f"tune: budget reached after {len(tried)} of {len(todo)} candidates", file=stream)
            break
        t0 = time.monotonic()
        spec = MethodSpec(_label(g, w), "self-extend", {"group_size": g, "window": w})
        print(f"tune: [{i + 1}/{len(todo)}] G={g} W={w}", file=stream, flush=True)
        # the model and dtype go into every row and the run's identity, so a second model's tune into the
        # same --out is refused instead of ranking the first model's rows
        run_eval(model, tokenizer, EvalConfig("passkey", [spec], [target_length], depth_list, 1, seed,
                                              model_name=model_name, dtype=dtype),
                 out_dir, progress=progress)
        run_eval(model, tokenizer, EvalConfig("ppl", [spec], [target_length], None, 1, seed,
                                              {"corpus": "pydoc", "mode": "single-pass", "bucket": 1024},
                                              model_name=model_name, dtype=dtype),
                 out_dir, progress=progress)
        costs.append(time.monotonic() - t0)
        tried.append((g, w))
    ranked = rank(out_dir, target_length, tried)
    table = format_table(ranked)
    print("\n" + table, file=stream, end="")
    write_ranking(out_dir, target_length, L, depth_list, seed, ranked, table)
    if ranked and save:
        from ..tuned import save_tuned

        best = ranked[0]
        path = save_tuned(model.config, target_length,
                          {"group_size": best["group_size"], "window": best["window"]},
                          {k: best[k] for k in ("passkey", "tail_ppl", "ppl")} | {"candidates": len(ranked)})
        print(f"tune: saved G={best['group_size']} W={best['window']} for {target_length} tokens to {path}; "
              f"apply(model, target_length={target_length}) now uses it", file=stream)
    return ranked


def rank(out_dir: Path, target_length: int, tried: list[tuple[int, int]]) -> list[dict[str, Any]]:
    passkey = latest_rows(read_rows(out_dir / "samples_passkey.jsonl")[0]).values()
    ppl = latest_rows(read_rows(out_dir / "samples_ppl.jsonl")[0]).values()
    rows = []
    for g, w in tried:
        label = _label(g, w)
        scores = [r["score"] for r in passkey if r["method"] == label and int(r["length"]) == target_length]
        docs = [r for r in ppl if r["method"] == label and int(r["length"]) == target_length]
        if not scores or not docs:
            continue
        buckets = docs[0]["bucket_nll"]
        tail = buckets[len(buckets) * 3 // 4 :] or buckets
        rows.append({"group_size": g, "window": w, "passkey": sum(scores) / len(scores), "n": len(scores),
                     "ppl": docs[0]["ppl"], "tail_ppl": math.exp(sum(tail) / len(tail)),
                     "reach": max_reach(docs[0]["params"]["trained_length"], w, g)})
    return sorted(rows, key=lambda r: (-r["passkey"], r["tail_ppl"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| rank | G | W | reach | passkey | ppl (all) | ppl (last quarter) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['group_size']} | {r['window']} | {r['reach']} | {r['passkey']:.2f} "
                     f"({r['passkey'] * r['n']:g}/{r['n']}) | {r['ppl']:.2f} | {r['tail_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def write_ranking(out_dir: Path, target_length: int, trained_length: int, depths: list[float], seed: int,
                  ranked: list[dict[str, Any]], table: str) -> None:
    """``results_tune.json`` (the ranked rows and the probes that made them) and ``tune.md`` next to the
    samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"target_length": target_length, "trained_length": trained_length, "depths": depths,
              "seed": seed, "ranked": ranked}
    (out_dir / "results_tune.json").write_text(json.dumps(result, indent=2))
    (out_dir / "tune.md").write_text(table)
