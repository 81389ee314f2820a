"""Attention-level benchmark: SelfExtend backends vs SDPA causal attention vs the official naive formulation.

    python benchmarks/bench_attention.py --device cpu --quick        # smoke run, a few seconds
    python benchmarks/bench_attention.py --device cpu                # 4k..32k, both shapes (long)
    python benchmarks/bench_attention.py --device cuda               # 16k..128k (needs a GPU)
    python benchmarks/bench_attention.py --device cpu --lengths 8192 --shapes embedded --methods sdpa,cpu

Methods (random q/k/v, batch 1, one attention call; RoPE rotations are inputs, not timed):
* ``sdpa``: ``F.scaled_dot_product_attention`` causal (prefill) or over all keys (decode): the floor;
* ``naive``: the official eager formulation: ``repeat_kv``, two full (H, Lq, L) score matrices,
  ``torch.where`` by distance, causal mask, fp32 softmax. Skipped, and reported as such, when its
  estimated memory exceeds ``--naive-cap-gib``;
* ``cpu``, ``flex``, ``triton``, ``reference``: the SelfExtend backends through ``SelfExtendInputs``.

Shapes: ``embedded`` (SmolLM2-135M: 9 heads, 3 KV heads, d=64) and ``llama3-8b`` (32 heads, 8 KV heads,
d=128). Modes: ``prefill`` (Lq = L) and ``decode`` (one query against L keys).

Each cell runs in a fresh subprocess (``--quick``: in this process, one cell after another). Memory: on
CPU the peak RSS (VmHWM, reset after the inputs are built, so ``extra`` is what the call itself
allocated); on CUDA ``torch.cuda.max_memory_allocated`` above the inputs. Every row carries its ratio to
SDPA measured in the same run (time, and extra memory). Rows go to
``benchmarks/results/attention_<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"embedded": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # heads, kv heads, head dim
LENGTHS = {"cpu": [4096, 8192, 16384, 32768], "cuda": [16384, 32768, 65536, 131072]}
METHODS = {"cpu": ["sdpa", "naive", "cpu"], "cuda": ["sdpa", "naive", "triton", "flex"]}
QUICK = {"shapes": ["embedded"], "lengths": [2048], "methods": ["sdpa", "naive", "cpu"]}


# ---------------------------------------------------------------------------------------------- memory
def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: str) -> float:
    """Reset the peak counter; return the current baseline (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    _trim()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    return _status_mib("VmRSS")


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


# --------------------------------------------------------------------------------------------- methods
def naive_attention(q, k, v, qg, kg, qpos, kpos, window, scale):
    """The official eager path: both full score matrices, merged by torch.where, one softmax."""
    rep = q.shape[1] // k.shape[1]
    k, v, kg = (t.repeat_interleave(rep, dim=1) for t in (k, v, kg))  # repeat_kv
    neighbor = torch.matmul(q, k.transpose(-1, -2)) * scale
    grouped = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    dist = qpos[0][:, None] - kpos[0][None, :]
    scores = torch.where(dist < window, neighbor, grouped)
    del neighbor, grouped
    if q.shape[2] > 1:
        scores = scores.masked_fill(dist < 0, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def naive_bytes(heads: int, q_len: int, kv_len: int, elem: int) -> int:
    """Estimated peak of ``naive_attention``: two score matrices, the merged one, fp32 probs, the cast."""
    return heads * q_len * kv_len * (3 * elem + 4 + elem) + q_len * kv_len * 9


def build_inputs(shape: str, length: int, mode: str, device: str, dtype: torch.dtype, window: int,
                 group: int):
    from selfextend.backends import SelfExtendInputs
    from selfextend.positions import grouped_key_positions, grouped_query_positions
    from selfextend.rope import rotate_by

    heads, kv_heads, dim = SHAPES[shape]
    q_len = length if mode == "prefill" else 1
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(1, heads, q_len, dim), rnd(1, kv_heads, length, dim), rnd(1, kv_heads, length, dim)
    kpos = torch.arange(length, device=device)[None]
    qpos = kpos[:, length - q_len :]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    qg = rotate_by(q, grouped_query_positions(qpos, group, window) - qpos, inv_freq)
    kg = rotate_by(k, grouped_key_positions(kpos, group) - kpos, inv_freq)
    return SelfExtendInputs(query=q, key=k, value=v, grouped_query=qg, grouped_key=kg, query_pos=qpos,
                            key_pos=kpos, key_valid=None, q_start=length - q_len, window=window,
                            scaling=dim**-0.5)


def make_call(method: str, inp):
    if method == "sdpa":
        causal = inp.q_len > 1
        return lambda: F.scaled_dot_product_attention(inp.query, inp.key, inp.value, is_causal=causal,
                                                      enable_gqa=True)
    if method == "naive":
        return lambda: naive_attention(inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key,
                                       inp.query_pos, inp.key_pos, inp.window, inp.scaling)
    from selfextend.backends import BACKENDS

    backend = BACKENDS[method]
    reason = backend.supports(inp)
    if reason is not None:
        raise RuntimeError(f"unsupported: {reason}")
    return lambda: backend.forward(inp)


def measure(spec: dict) -> dict:
    """One cell: build inputs, warm up, time ``repeats`` calls, record the peak memory of the timed calls."""
    device, method = spec["device"], spec["method"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    heads, kv_heads, dim = SHAPES[spec["shape"]]
    q_len = spec["length"] if spec["mode"] == "prefill" else 1
    row = {k: spec[k] for k in ("device", "shape", "length", "mode", "method", "dtype", "window", "group")}
    row.update(heads=heads, kv_heads=kv_heads, head_dim=dim)
    if method == "naive":
        need = naive_bytes(heads, q_len, spec["length"], dtype.itemsize) / 2**30
        if need > spec["naive_cap_gib"]:
            return {**row, "status": f"skipped: needs ~{need:.1f} GiB > cap {spec['naive_cap_gib']} GiB"}
    try:
        small = build_inputs(spec["shape"], min(512, spec["length"]), spec["mode"], device, dtype,
                             spec["window"], spec["group"])
        make_call(method, small)()  # warm-up: threads, kernels, compilation (shape-specific compiles below)
        del small
        inp = build_inputs(spec["shape"], spec["length"], spec["mode"], device, dtype, spec["window"],
                           spec["group"])
        call = make_call(method, inp)
        if device == "cuda":
            call()  # compile for this shape outside the timing
            torch.cuda.synchronize()
        base = _reset_peak(device)
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            out = call()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
        peak = _peak(device)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "OOM"}
    except RuntimeError as err:
        if "unsupported" in str(err) or "out of memory" in str(err).lower():
            return {**row, "status": str(err).splitlines()[0][:200]}
        raise
    return {**row, "status": "ok", "time_s": min(times), "times_s": times, "peak_mib": peak,
            "extra_mib": peak - base}


# ------------------------------------------------------------------------------------------------ runner
def _child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        status = "killed (out of memory?)" if res.returncode in (-9, 137) else f"failed: {tail[:200]}"
        return {k: spec[k] for k in ("device", "shape", "length", "mode", "method")} | {"status": status}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(row: dict) -> str:
    head = f"{row['shape']:>10} {row['length']:>7} {row['mode']:>7} {row['method']:>9}"
    if row.get("status") != "ok":
        return f"{head}  {row.get('status')}"
    def ratio(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.2f}x"

    return (f"{head} {row['time_s'] * 1e3:>11.2f} ms  peak {row['peak_mib']:>9.1f} MiB"
            f"  extra {row['extra_mib']:>9.1f} MiB"
            f"  time/sdpa {ratio('time_vs_sdpa'):>7}  extra/sdpa {ratio('extra_vs_sdpa'):>7}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: embedded shape, 2048 tokens, in-process")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default=None, help="comma-separated; default by device")
    p.add_argument("--modes", default="prefill,decode")
    p.add_argument("--methods", default=None, help="comma-separated; default by device (sdpa always first)")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (min is reported)")
    p.add_argument("--naive-cap-gib", type=float, default=None, help="skip naive above this estimate")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    shapes = QUICK["shapes"] if args.quick else args.shapes.split(",")
    lengths = (QUICK["lengths"] if args.quick
               else [int(x) for x in (args.lengths.split(",") if args.lengths else LENGTHS[args.device])])
    methods = (args.methods.split(",") if args.methods
               else (QUICK["methods"] if args.quick else METHODS[args.device]))
    methods = ["sdpa", *[m for m in methods if m != "sdpa"]]  # the ratios need SDPA from this run
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    cap = args.naive_cap_gib
    if cap is None:  # CPU: this machine class has 24 GiB and shares it with other runs
        cap = 0.6 * torch.cuda.get_device_properties(0).total_memory / 2**30 if args.device == "cuda" else 8.0
    out = args.out or Path(__file__).parent / "results" / f"attention_{args.device}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "threads": args.threads}
    print(f"# run {run_id} {env} dtype={dtype} W={args.window} G={args.group} naive cap {cap:.1f} GiB"
          f" -> {out}")
    for shape in shapes:
        for length in lengths:
            for mode in args.modes.split(","):
                sdpa = None
                for method in methods:
                    repeats = args.repeats or (3 if mode == "decode" or length <= 8192
                                               or args.device == "cuda" else 1)
                    spec = dict(device=args.device, shape=shape, length=length, mode=mode, method=method,
                                dtype=dtype, window=args.window, group=args.group, threads=args.threads,
                                repeats=repeats, naive_cap_gib=cap)
                    row = measure(spec) if args.quick else _child(spec)
                    if method == "sdpa" and row.get("status") == "ok":
                        sdpa = row
                    if row.get("status") == "ok" and sdpa is not None:
                        row["time_vs_sdpa"] = row["time_s"] / sdpa["time_s"]
                        row["extra_vs_sdpa"] = (row["extra_mib"] / sdpa["extra_mib"]
                                                if sdpa["extra_mib"] > 1 else None)
                    row.update(run=run_id, quick=args.quick, env=env)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(_fmt(row), flush=True)


if __name__ == "__main__":
    main()
