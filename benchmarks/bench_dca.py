"""DCA against SelfExtend on the embedded model: prefill time and peak memory on the same prompt.

    python benchmarks/bench_dca.py --threads 2                       # 16384 tokens, speed + passkey
    python benchmarks/bench_dca.py --parts speed --length 4096       # a quick look

Parts (each row is appended to ``--out`` as JSON; a re-run skips rows already there):
* ``speed``: each method in a fresh subprocess (peak RSS is per process; VmHWM is reset after loading the
  model): prefill time of the ``pydoc_data.topics`` prompt, peak RSS over prefill plus ``--new-tokens``
  decode steps, decode tokens/s;
* ``passkey``: one Landmark passkey at ``--length - 700`` tokens, depth 0.5, with DCA (a sanity check).

Methods: SelfExtend G=4, W=1024 (the core benchmark's setting) and DCA with its defaults for L = 8192
(chunk_size 6144, local_window 512, exact within the trained length, no temperature). Prints DCA / SE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_core import _corpus_ids, _done, _peak_reset, _peak_rss_mib, _rss_mib

METHODS = {"selfextend": {"group_size": 4, "window": 1024, "allow_overflow": True}, "dca": {"method": "dca"}}


def _load(method: str, threads: int):
    import selfextend

    torch.set_num_threads(threads)
    model, tok = selfextend.load_model()
    selfextend.apply(model, **METHODS[method])
    return model, tok


@torch.no_grad()
def speed_child(method: str, length: int, threads: int, new_tokens: int) -> dict:
    model, tok = _load(method, threads)
    ids = _corpus_ids(tok, length)
    model(ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    base = _rss_mib()
    _peak_reset()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    prefill_peak = _peak_rss_mib()
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - t1
    import selfextend

    return dict(part="speed", method=method, params=selfextend.active(model).params, length=ids.shape[1],
                threads=threads, prefill_s=prefill, prefill_peak_rss_mib=prefill_peak, peak_rss_mib=_peak_rss_mib(),
                rss_before_mib=base, peak_over_baseline_mib=_peak_rss_mib() - base,
                decode_tok_s=new_tokens / decode if new_tokens else None)


@torch.no_grad()
def passkey_row(length: int, threads: int, depth: float = 0.5) -> dict:
    from selfextend.generation import greedy_answer
    from selfextend.tasks.passkey import make_passkey, score_passkey

    model, tok = _load("dca", threads)
    sample = make_passkey(tok, length, depth, seed=0)
    ans = greedy_answer(model, tok, sample.prompt, max_new_tokens=8, progress=False)
    return dict(part="passkey", method="dca", length=sample.n_tokens, depth=depth, passkey=sample.expected[0],
                answer=ans.text, correct=score_passkey(ans.text, sample.expected[0]), prefill_s=ans.prefill_seconds)


def _append(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def report(rows: list[dict], length: int) -> None:
    print(f"\n# DCA vs SelfExtend (G=4, W=1024), {length} tokens, embedded SmolLM2-135M-Instruct")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    speed = {r["method"]: r for r in rows if r["part"] == "speed" and r.get("target") == length}
    if len(speed) == 2:
        s, d = speed["selfextend"], speed["dca"]
        print("\n| metric | selfextend | dca | dca / se | target |\n|---|---|---|---|---|")
        for key, label, target in [("prefill_s", "prefill s", "<= 1.2x"), ("prefill_peak_rss_mib", "peak RSS prefill MiB", ""),
                                   ("peak_rss_mib", "peak RSS prefill+decode MiB", "<= 1.2x"),
                                   ("peak_over_baseline_mib", "peak over loaded model MiB", ""),
                                   ("decode_tok_s", "decode tok/s", "")]:
            if s.get(key) and d.get(key):
                print(f"| {label} | {s[key]:.1f} | {d[key]:.1f} | {d[key] / s[key]:.3f}x | {target} |")
    for r in rows:
        if r["part"] == "passkey" and r.get("target") == length:
            verdict = "right" if r["correct"] else "wrong"
            print(f"\npasskey (DCA, {r['length']} tokens, depth {r['depth']}): {verdict}, answer {r['answer'].strip()!r}, "
                  f"expected {r['passkey']}, prefill {r['prefill_s']:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default="speed,passkey")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dca_speed.jsonl")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one speed measurement in this fresh process
        print(json.dumps(speed_child(args.child, args.length, args.threads, args.new_tokens)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(args.out)

    def have(**kw) -> bool:
        return any(all(r.get(k) == v for k, v in kw.items()) for r in done)

    parts = args.parts.split(",")
    if "speed" in parts:
        for method in METHODS:
            if have(part="speed", method=method, target=args.length):
                continue
            res = subprocess.run([sys.executable, __file__, "--child", method, "--length", str(args.length),
                                  "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            row = {**json.loads(res.stdout.strip().splitlines()[-1]), "target": args.length}
            _append(args.out, row)
            done.append(row)
            print(f"speed {method}: {row}", file=sys.stderr)
    if "passkey" in parts and not have(part="passkey", method="dca", target=args.length):
        row = {**passkey_row(args.length - 700, args.threads), "target": args.length}
        _append(args.out, row)
        done.append(row)
        print(f"passkey dca: {row['answer']!r} correct={row['correct']}", file=sys.stderr)
    report(done, args.length)


if __name__ == "__main__":
    main()
