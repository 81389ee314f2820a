"""SelfExtend core benchmark on the embedded model: quality against vanilla
(speed and memory: bench_model.py).

    python benchmarks/bench_core.py --threads 2                     # both parts, 16384 tokens
    python benchmarks/bench_core.py --parts ppl --length 4096       # a quick look

Parts (each row is appended to ``--out`` as JSON as soon as it is measured; a re-run skips rows already
there, so an interrupted run resumes):
* ``ppl``: perplexity of each 2048-token bucket of one single pass over ``pydoc_data.topics``
  (mode: single-pass, NLL from hidden states in chunks, no full logits tensor);
* ``passkey``: Landmark passkey at ``--length - 700`` tokens (15.7k by default) for 5 depths.
The report prints SelfExtend next to vanilla.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from common import read_jsonl  # benchmarks/ is on sys.path when a script runs

METHODS = {"vanilla": None, "selfextend": (4, 1024)}  # name -> (group_size, window)
DEPTHS = (0.05, 0.3, 0.5, 0.7, 0.95)
BUCKET = 2048


def _load(method: str, threads: int):
    import selfextend

    torch.set_num_threads(threads)
    model, tok = selfextend.load_model()
    if METHODS[method] is not None:
        g, w = METHODS[method]
        selfextend.apply(model, group_size=g, window=w, allow_overflow=True)
    return model, tok


def _corpus_ids(tok, length: int) -> torch.Tensor:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values())
    return tok(text, return_tensors="pt").input_ids[:, :length]


@torch.no_grad()
def ppl_rows(method: str, length: int, threads: int) -> list[dict]:
    model, tok = _load(method, threads)
    ids = _corpus_ids(tok, length)
    t0 = time.perf_counter()
    hidden = model.model(ids, use_cache=False).last_hidden_state[0]  # (T, hidden): no (T, vocab) logits
    nll = torch.empty(ids.shape[1] - 1)
    for s in range(0, ids.shape[1] - 1, 1024):
        e = min(ids.shape[1] - 1, s + 1024)
        logits = model.lm_head(hidden[s:e]).float()
        nll[s:e] = torch.nn.functional.cross_entropy(logits, ids[0, s + 1 : e + 1], reduction="none")
    seconds = time.perf_counter() - t0
    rows = []
    for b in range(0, ids.shape[1] - 1, BUCKET):
        chunk = nll[b : b + BUCKET]
        rows.append(dict(part="ppl", mode="single-pass", method=method, length=ids.shape[1], bucket_start=b,
                         bucket_end=b + chunk.numel(), ppl=float(chunk.mean().exp()), seconds=seconds))
    return rows


@torch.no_grad()
def passkey_rows(model, tok, method: str, length: int, depth: float) -> dict:
    from selfextend.eval.tasks.passkey import make_passkey, score_passkey
    from selfextend.generation import greedy_answer

    sample = make_passkey(tok, length, depth, seed=0)
    ans = greedy_answer(model, tok, sample.prompt, max_new_tokens=8, progress=False)
    return dict(part="passkey", method=method, length=sample.n_tokens, depth=depth,
                passkey=sample.expected[0], answer=ans.text,
                correct=score_passkey(ans.text, sample.expected[0]), prefill_s=ans.prefill_seconds)


def _append(out: Path, rows) -> None:
    with out.open("a") as f:
        for row in rows if isinstance(rows, list) else [rows]:
            f.write(json.dumps(row) + "\n")


def report(rows: list[dict], length: int) -> None:
    print(f"\n# SelfExtend core benchmark (G=4, W=1024), {length} tokens, embedded SmolLM2-135M-Instruct")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    ppl = [r for r in rows if r["part"] == "ppl" and r["length"] >= length * 0.99]
    if ppl:
        print("\n| tokens (single-pass, pydoc_data.topics) | " + " | ".join(METHODS) + " |\n|---|---|---|")
        for b in sorted({r["bucket_start"] for r in ppl}):
            vals = {r["method"]: r["ppl"] for r in ppl if r["bucket_start"] == b}
            end = next(r["bucket_end"] for r in ppl if r["bucket_start"] == b)
            print(f"| {b}-{end} | " + " | ".join(f"{vals.get(m, float('nan')):.2f}" for m in METHODS) + " |")
        se = sorted((r for r in ppl if r["method"] == "selfextend"), key=lambda r: r["bucket_start"])
        if se:
            first = [r["ppl"] for r in se if r["bucket_end"] <= 8192]
            mean_first = sum(first) / max(1, len(first))
            print(f"\nselfextend last bucket / mean of the first 8192 tokens: "
                  f"{se[-1]['ppl']:.2f} / {mean_first:.2f} "
                  f"= {se[-1]['ppl'] / mean_first:.2f}x (target <= 1.5x)")
    pk = [r for r in rows if r["part"] == "passkey"]
    if pk:
        depths = sorted({r["depth"] for r in pk})
        print("\n| passkey (Landmark) | " + " | ".join(f"depth {d}" for d in depths) + " | total |\n|---|"
              + "---|" * (len(depths) + 1))
        for m in METHODS:
            cells = {r["depth"]: r for r in pk if r["method"] == m}
            if cells:
                n = next(iter(cells.values()))["length"]
                print(f"| {m} ({n} tok) | " + " | ".join(
                    ("right" if cells[d]["correct"] else f"wrong ({cells[d]['answer'].strip()[:14]!r})")
                    if d in cells else "-"
                    for d in depths) + f" | {int(sum(c['correct'] for c in cells.values()))}/{len(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default="ppl,passkey")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "core.jsonl")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(args.out)

    def have(**kw) -> bool:
        return any(all(r.get(k) == v for k, v in kw.items()) and r.get("length", 0) >= args.length * 0.98
                   for r in done)

    parts = args.parts.split(",")
    for method in METHODS:
        if "ppl" in parts and not have(part="ppl", method=method):
            rows = ppl_rows(method, args.length, args.threads)
            _append(args.out, rows)
            done.extend(rows)
            print(f"ppl {method}: {[round(r['ppl'], 2) for r in rows]}", file=sys.stderr)
    if "passkey" in parts:
        pk_len = args.length - 700  # about 15.7k tokens at the default length
        for method in METHODS:
            todo = [d for d in DEPTHS if not any(r["part"] == "passkey" and r["method"] == method
                                                 and r["depth"] == d and r["length"] >= pk_len * 0.98
                                                 for r in done)]
            model, tok = _load(method, args.threads) if todo else (None, None)
            for depth in todo:
                row = passkey_rows(model, tok, method, pk_len, depth)
                _append(args.out, row)
                done.append(row)
                print(f"passkey {method} depth {depth}: {row['answer']!r} correct={row['correct']}",
                      file=sys.stderr)
    report(done, args.length)


if __name__ == "__main__":
    main()
