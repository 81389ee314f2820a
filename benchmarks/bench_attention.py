"""Attention-level benchmark: SelfExtend backends vs SDPA causal attention vs the official naive formulation.

    python benchmarks/bench_attention.py --device cpu --quick        # smoke run, a few seconds
    python benchmarks/bench_attention.py --device cpu                # 4k..32k, both shapes (long)
    python benchmarks/bench_attention.py --device cuda               # 16k..128k (needs a GPU)
    python benchmarks/bench_attention.py --device cpu --lengths 8192 --shapes embedded --methods sdpa,cpu
    python benchmarks/bench_attention.py --device cuda --in-process --shapes llama3-8b --budget-s 90 \
        --cells prefill:32768,decode:32768:1,decode:32768:16 --methods sdpa,composed,triton,flex \
        --late-methods flex                                       # gpu_check.sh's cells, in its order

Methods (random q/k/v, one attention call; RoPE rotations are inputs, not timed):
* ``sdpa``: ``F.scaled_dot_product_attention`` causal (prefill) or over all keys (decode): the floor;
* ``naive``: the official eager formulation: ``repeat_kv``, two full (H, Lq, L) score matrices,
  ``torch.where`` by distance, causal mask, fp32 softmax. Skipped, and reported as such, when its
  estimated memory exceeds ``--naive-cap-gib``;
* ``composed``, ``cpu``, ``flex``, ``triton``, ``reference``: the SelfExtend backends through
  ``SelfExtendInputs`` (a name missing from ``BACKENDS`` gives a row ``"skipped": "backend not available"``).

Shapes: ``embedded`` (SmolLM2-135M: 9 heads, 3 KV heads, d=64) and ``llama3-8b`` (32 heads, 8 KV heads,
d=128). Modes: ``prefill`` (Lq = L, batch 1) and ``decode`` (one query against L keys, for each batch size
of ``--batches``); ``--cells mode:length[:batch],...`` gives the cells and their order instead.

Each cell runs in a fresh subprocess (``--quick`` or ``--in-process``: in this process, one cell after
another, each cell's inputs built once for all its methods; on CUDA they are drawn on the GPU). Methods in
``--late-methods`` (flex: one compile per shape) run after every cell's other methods. ``--budget-s``: a cell
is started only while its method's reserve is left (20 s for flex, 3 s for the others), the rest are written
as ``{"status": "skipped", "skipped": "out of time"}``. Every row is flushed as written. Memory: on
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
from budget import OUT_OF_TIME, Budget, open_rows, write_row  # benchmarks/ is on sys.path

SHAPES = {"embedded": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # heads, kv heads, head dim
LENGTHS = {"cpu": [4096, 8192, 16384, 32768], "cuda": [16384, 32768, 65536, 131072]}
METHODS = {"cpu": ["sdpa", "naive", "composed", "cpu"],
           "cuda": ["sdpa", "naive", "composed", "triton", "flex"]}
QUICK = {"shapes": ["embedded"], "lengths": [2048], "methods": ["sdpa", "naive", "composed", "cpu"]}
RESERVE_S = {"flex": 20.0}  # seconds a cell may take (flex compiles per shape); others: DEFAULT_RESERVE_S
DEFAULT_RESERVE_S = 3.0


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
                 group: int, batch: int = 1):
    from selfextend.backends import SelfExtendInputs
    from selfextend.positions import grouped_key_positions, grouped_query_positions
    from selfextend.rope import rotate_by

    heads, kv_heads, dim = SHAPES[shape]
    q_len = length if mode == "prefill" else 1
    g = torch.Generator(device=device).manual_seed(0)  # on CUDA drawn there: seconds less at 128k

    def rnd(*s):
        if device == "cpu":
            return torch.randn(*s, generator=g).to(dtype=dtype)
        return torch.randn(*s, generator=g, device=device, dtype=dtype)

    q = rnd(batch, heads, q_len, dim)
    k, v = rnd(batch, kv_heads, length, dim), rnd(batch, kv_heads, length, dim)
    kpos = torch.arange(length, device=device)[None].repeat(batch, 1)
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
        if inp.query.shape[0] != 1:
            raise RuntimeError("unsupported: naive takes batch 1")
        return lambda: naive_attention(inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key,
                                       inp.query_pos, inp.key_pos, inp.window, inp.scaling)
    from selfextend.backends import BACKENDS

    backend = BACKENDS[method]
    reason = backend.supports(inp)
    if reason is not None:
        raise RuntimeError(f"unsupported: {reason}")
    return lambda: backend.forward(inp)


ROW_KEYS = ("device", "shape", "length", "mode", "batch", "method")


def measure(spec: dict, inputs=None) -> dict:
    """One cell: build inputs (or take ``inputs``, built for this cell), warm up, time ``repeats`` calls,
    record the peak memory of the timed calls."""
    device, method = spec["device"], spec["method"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    heads, kv_heads, dim = SHAPES[spec["shape"]]
    batch = spec.get("batch", 1)
    q_len = spec["length"] if spec["mode"] == "prefill" else 1
    row = {k: spec[k] for k in ("device", "shape", "length", "mode", "method", "dtype", "window", "group")}
    row.update(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=dim)
    if method not in ("sdpa", "naive"):
        from selfextend.backends import BACKENDS

        if method not in BACKENDS:
            return {**row, "status": "skipped", "skipped": "backend not available"}
    if method == "naive":
        need = batch * naive_bytes(heads, q_len, spec["length"], dtype.itemsize) / 2**30
        if need > spec["naive_cap_gib"]:
            return {**row, "status": f"skipped: needs ~{need:.1f} GiB > cap {spec['naive_cap_gib']} GiB"}
    try:
        small = build_inputs(spec["shape"], min(512, spec["length"]), spec["mode"], device, dtype,
                             spec["window"], spec["group"], batch)
        make_call(method, small)()  # warm-up: threads, kernels, compilation (shape-specific compiles below)
        del small
        inp = inputs
        if inp is None:
            inp = build_inputs(spec["shape"], spec["length"], spec["mode"], device, dtype, spec["window"],
                               spec["group"], batch)
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
        torch.cuda.empty_cache()
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
        return {k: spec.get(k, 1) for k in ROW_KEYS} | {"status": status}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _in_process(spec: dict, inputs) -> dict:
    """``measure`` in this process; any error is this cell's row, not the end of the run."""
    try:
        return measure(spec, inputs)
    except Exception as err:  # one backend's crash must not lose the other cells
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
        first = (str(err).splitlines() or [""])[0][:200]
        return {k: spec.get(k, 1) for k in ROW_KEYS} | {"status": f"failed: {type(err).__name__}: {first}"}


def _cells(args) -> list[tuple[str, int, int]]:
    """(mode, length, batch) in the order they run."""
    if args.cells:
        cells = []
        for item in args.cells.split(","):
            mode, length, *batch = item.split(":")
            cells.append((mode, int(length), int(batch[0]) if batch else 1))
        return cells
    lengths = (QUICK["lengths"] if args.quick
               else [int(x) for x in (args.lengths.split(",") if args.lengths else LENGTHS[args.device])])
    batches = [int(b) for b in args.batches.split(",")]
    return [(mode, length, batch) for length in lengths for mode in args.modes.split(",")
            for batch in (batches if mode == "decode" else [1])]


def _fmt(row: dict) -> str:
    head = (f"{row['shape']:>10} {row['length']:>7} {row['mode']:>7} x{row.get('batch', 1):<3}"
            f"{row['method']:>9}")
    if row.get("status") != "ok":
        return f"{head}  {row.get('status')}" + (f": {row['skipped']}" if "skipped" in row else "")
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
    p.add_argument("--batches", default="1", help="decode batch sizes, comma-separated (prefill: batch 1)")
    p.add_argument("--cells", default=None, help="mode:length[:batch],... in this order (overrides "
                   "--lengths/--modes/--batches)")
    p.add_argument("--methods", default=None, help="comma-separated; default by device (sdpa always first)")
    p.add_argument("--late-methods", default="", help="methods run after every cell's other methods")
    p.add_argument("--in-process", action="store_true", help="all cells in this process (on CUDA: memory is "
                   "max_memory_allocated, so no fresh process is needed)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds from the process's start; cells not "
                   "started by then are written as skipped rows")
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
    budget = Budget(args.budget_s)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    shapes = QUICK["shapes"] if args.quick else args.shapes.split(",")
    methods = (args.methods.split(",") if args.methods
               else (QUICK["methods"] if args.quick else METHODS[args.device]))
    methods = ["sdpa", *[m for m in methods if m != "sdpa"]]  # the ratios need SDPA from this run
    late = [m for m in methods if m in args.late_methods.split(",")]
    early = [m for m in methods if m not in late]
    in_process = args.quick or args.in_process
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    cap = args.naive_cap_gib
    if cap is None:  # CPU: this machine class has 24 GiB and shares it with other runs
        cap = 0.6 * torch.cuda.get_device_properties(0).total_memory / 2**30 if args.device == "cuda" else 8.0
    out = args.out or Path(__file__).parent / "results" / f"attention_{args.device}.jsonl"
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "threads": args.threads}
    print(f"# run {run_id} {env} dtype={dtype} W={args.window} G={args.group} naive cap {cap:.1f} GiB"
          f" -> {out}")
    cells = [(shape, *cell) for shape in shapes for cell in _cells(args)]
    sdpa_rows: dict[tuple, dict] = {}
    with open_rows(out, "a") as f:
        for cell_methods in (early, late):
            for shape, mode, length, batch in cells:
                inputs = None
                for method in cell_methods:
                    repeats = args.repeats or (3 if length <= 8192 or args.device == "cuda" else 1)
                    if mode == "decode":
                        repeats = args.repeats or (20 if args.device == "cuda" else 3)
                    spec = dict(device=args.device, shape=shape, length=length, mode=mode, batch=batch,
                                method=method, dtype=dtype, window=args.window, group=args.group,
                                threads=args.threads, repeats=repeats, naive_cap_gib=cap)
                    if not budget.allows(RESERVE_S.get(method, DEFAULT_RESERVE_S)):
                        row = {k: spec[k] for k in ROW_KEYS} | {"status": "skipped", "skipped": OUT_OF_TIME}
                    elif in_process:
                        if inputs is None:
                            inputs = build_inputs(shape, length, mode, args.device, getattr(torch, dtype),
                                                  args.window, args.group, batch)
                        row = _in_process(spec, inputs)
                    else:
                        row = _child(spec)
                    key = (shape, length, mode, batch)
                    if method == "sdpa" and row.get("status") == "ok":
                        sdpa_rows[key] = row
                    sdpa = sdpa_rows.get(key)
                    if row.get("status") == "ok" and sdpa is not None:
                        row["time_vs_sdpa"] = row["time_s"] / sdpa["time_s"]
                        row["extra_vs_sdpa"] = (row["extra_mib"] / sdpa["extra_mib"]
                                                if sdpa["extra_mib"] > 1 else None)
                    row.update(run=run_id, quick=args.quick, env=env)
                    write_row(f, row)
                    print(_fmt(row), flush=True)
                del inputs
    print(f"# done in {budget.elapsed():.0f} s")


if __name__ == "__main__":
    main()
