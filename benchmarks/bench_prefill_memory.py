"""What a prefill holds, allocator aside: glibc's live bytes during one forward, vanilla against a method.

    python benchmarks/bench_prefill_memory.py --lengths 16k,32k --methods vanilla,self-extend
    python benchmarks/bench_prefill_memory.py --lengths 4k --target-length 16k  # a quick look (G=4)

``bench_model.py`` measures peak RSS, which is what a user sees but also what glibc keeps of freed blocks (its
prefill growth moved by hundreds of MiB with the allocator settings alone). This script measures the program's
own memory: ``mallinfo2()`` in-use bytes (``uordblks + hblkhd``: heap chunks in use plus mmapped chunks),
sampled by a thread every ~0.2 ms during the prefill (torch ops release the GIL), relative to the start of the
prefill; and the same bytes at the end of every decoder layer (a forward hook), so memory that outlives a
layer shows as a per-layer slope above vanilla's (whose slope is its KV cache). Each (length, method) runs in
a fresh subprocess on the first ``length`` tokens of the essays (held-out prose) with ``logits_to_keep=1``,
fp32, settings from ``target_length=length`` (or ``--target-length``: below the trained 8k that rule gives
G=1, which is vanilla, so a short run needs e.g. ``--target-length 16k``). Rows go to ``--out`` (resumable).
The code measured is the ``selfextend`` on ``sys.path`` (``PYTHONPATH=<checkout>/src``); rows record its
commit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from bench_model import _source_commit, corpus_ids
from common import read_jsonl  # benchmarks/ is on sys.path when a script runs


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _live_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@torch.no_grad()
def measure(method: str, length: int, threads: int, target_length: int | None = None) -> dict:
    import selfextend

    torch.set_num_threads(threads)
    model, tok = selfextend.load_model(dtype=torch.float32)
    if method != "vanilla":
        selfextend.apply(model, method=method, target_length=target_length or length)
    params = selfextend.active(model).params if method != "vanilla" else {}
    ids = corpus_ids(tok, length, "essays")
    model(ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    base = _live_bytes()
    peak, stop, layer_end = [base], threading.Event(), []

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _live_bytes())
            time.sleep(0.0002)

    hooks = [layer.register_forward_hook(lambda *_: layer_end.append(_live_bytes()))
             for layer in model.model.layers]
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    stop.set()
    sampler.join()
    for h in hooks:
        h.remove()
    held = _live_bytes()
    del out
    mib = 2**20
    return dict(method=method, params={k: v for k, v in params.items() if not isinstance(v, bool)},
                length=length, target_length=target_length or length, dtype="float32", threads=threads,
                prompt="essays", prefill_s=prefill,
                live_peak_mib=(peak[0] - base) / mib, live_after_prefill_mib=(held - base) / mib,
                live_after_dropping_output_mib=(_live_bytes() - base) / mib,
                layer_end_live_mib=[round((x - base) / mib, 1) for x in layer_end],
                commit=_source_commit(selfextend), torch=torch.__version__)


def report(rows: list[dict]) -> str:
    lines = ["| commit | length | method | G, W | live peak MiB | ratio | live after prefill MiB | "
             "held per layer MiB | after dropping the output MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    # vanilla runs no selfextend code: its row of the same length serves every commit's (its own first)
    vanilla: dict[int, dict] = {}
    for r in rows:
        if r["method"] == "vanilla":
            vanilla.setdefault(r["length"], r)
    for r in sorted(rows, key=lambda r: (r["length"], r["method"] != "vanilla", str(r["commit"]),
                                        r.get("target_length", 0))):
        v = next((x for x in rows if x["method"] == "vanilla" and x["length"] == r["length"]
                  and x["commit"] == r["commit"]), vanilla.get(r["length"]))
        ratio = f"{r['live_peak_mib'] / v['live_peak_mib']:.3f}x" if v else "-"
        ends = r["layer_end_live_mib"]
        slope = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
        gw = (f"{r['params']['group_size']}, {r['params']['window']}" if "group_size" in r["params"]
              else "-")
        lines.append(f"| {r['commit']} | {r['length']} | {r['method']} | {gw} | {r['live_peak_mib']:.1f} | "
                     f"{ratio} | {r['live_after_prefill_mib']:.1f} | {slope:.1f} | "
                     f"{r['live_after_dropping_output_mib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16k")
    p.add_argument("--methods", default="vanilla,self-extend")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-length", default=None, help="settings for this length (default: each length)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "model_prefill_live_memory.jsonl")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="print the report of --out and measure nothing")
    args = p.parse_args()
    from selfextend.eval.runner import parse_length

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    target = parse_length(args.target_length) if args.target_length else None
    if args.child:
        print(json.dumps(measure(args.child, lengths[0], args.threads, target)))
        return
    rows = read_jsonl(args.out)
    if args.report:
        print(report(rows))
        return
    import selfextend

    commit = _source_commit(selfextend)
    done = {(r["method"], r["length"], r["threads"], r["commit"], r.get("target_length", r["length"]))
            for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for length in lengths:
        for method in args.methods.split(","):
            if (method, length, args.threads, commit, target or length) in done:
                continue
            cmd = [sys.executable, __file__, "--child", method, "--lengths", str(length),
                   "--threads", str(args.threads)] + (["--target-length", str(target)] if target else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if res.returncode != 0:
                raise SystemExit(f"{method} {length} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{method} {length} ({row['commit']}): live peak {row['live_peak_mib']:.1f} MiB, "
                  f"after prefill {row['live_after_prefill_mib']:.1f} MiB", file=sys.stderr)
    print(report(rows))


if __name__ == "__main__":
    main()
