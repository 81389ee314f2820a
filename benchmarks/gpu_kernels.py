"""Every SelfExtend backend on the GPU against the fp64 oracle of ``tests/reference.py`` (in gpu_check.sh).

    python benchmarks/gpu_kernels.py --out OUT/kernels.jsonl --budget-s 55  # CUDA: composed/triton/reference
    python benchmarks/gpu_kernels.py --out OUT/kernels.jsonl --dry-run      # CPU: reference, composed, cpu

Cases: bf16, fp16, then fp32, GQA and MHA, head dims 64 and 128, prefill, chunked prefill and decode, left
padding, W % G != 0. The pass rule is flash-attention's: a backend's max error against the fp64 oracle is
at most twice that of the oracle computed in the same low precision (plus half an ulp of the output scale);
fp32 must stay within 1e-5 of the output scale. The oracle runs in fp64 on the device of the backends (on a
GPU it takes milliseconds where the CPU took seconds a case), once per case for every dtype. Flex is not
here: it compiles once per shape (seconds each); ``tests/test_flex.py`` checks it and the timings time it.

One JSON row per (case, backend), flushed as written; a backend missing from ``BACKENDS`` gets one row
``{"status": "skipped", "skipped": "backend not available"}``, and once ``--budget-s`` is spent every case not
reached gets ``"skipped": "out of time"`` rows. The summary line counts them; the exit code is 1 only if a
case fails (a backend error counts as a failure).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from budget import NOT_AVAILABLE, Budget, open_rows, skipped, write_row  # benchmarks/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference  # noqa: E402  (the oracle shares no code with the library)
from reference import selfextend_attention_ref  # noqa: E402

from selfextend.backends import BACKENDS, SelfExtendInputs  # noqa: E402
from selfextend.positions import (  # noqa: E402
    absolute_key_positions,
    grouped_key_positions,
    grouped_query_positions,
)
from selfextend.rope import rotate_by  # noqa: E402

_EXACT: dict[tuple, torch.Tensor] = {}


def case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, kv_len: int, q_len: int,
         window: int, group: int, pad: int, seed: int = 0):
    """Inputs built the way the model integration builds them, and the oracle's fp64 answer (computed on
    ``device``)."""
    g = torch.Generator().manual_seed(seed)
    bsz = 2 if pad else 1
    q = torch.randn(bsz, heads, q_len, dim, generator=g)
    k = torch.randn(bsz, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(bsz, kv_heads, kv_len, dim, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    q_start = kv_len - q_len
    valid = None
    if pad:
        valid = torch.ones(bsz, kv_len, dtype=torch.bool)
        valid[1, :pad] = False
        query_pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
    else:
        query_pos = (q_start + torch.arange(q_len))[None].expand(bsz, -1)
    key_pos, _ = absolute_key_positions(query_pos, valid, q_start, kv_len)
    scaling = dim**-0.5
    key = (device, heads, kv_heads, dim, kv_len, q_len, window, group, pad, seed)
    dev = [t.to(device) for t in (q, k, v, query_pos, key_pos, inv_freq)]
    dev_valid = None if valid is None else valid.to(device)
    if key not in _EXACT:  # the fp64 oracle: once per case, whatever the dtype
        _EXACT[key] = selfextend_attention_ref(*dev[:5], window, group, dev[5], scaling, key_valid=dev_valid,
                                               q_start=q_start)
    exact = _EXACT[key]
    rounded = None
    if dtype != torch.float32:
        rounded = selfextend_attention_ref(*dev[:5], window, group, dev[5], scaling, key_valid=dev_valid,
                                           q_start=q_start, precision=dtype)
    qr, kr = rotate_by(q, query_pos, inv_freq), rotate_by(k, key_pos, inv_freq)
    qg = rotate_by(qr, grouped_query_positions(query_pos, group, window) - query_pos, inv_freq)
    kg = rotate_by(kr, grouped_key_positions(key_pos, group) - key_pos, inv_freq)

    def on(t):
        return t.to(device=device, dtype=dtype)

    inputs = SelfExtendInputs(query=on(qr), key=on(kr), value=on(v), grouped_query=on(qg), grouped_key=on(kg),
                              query_pos=query_pos.to(device), key_pos=key_pos.to(device),
                              key_valid=None if valid is None else valid.to(device), q_start=q_start,
                              window=window, scaling=scaling)
    real = torch.ones(bsz, q_len, dtype=torch.bool) if valid is None else valid[:, q_start:]
    return inputs, exact.double(), None if rounded is None else rounded.double(), real.to(device)


def check(backend, inputs, exact: torch.Tensor, real: torch.Tensor, bar: float, row: dict) -> dict:
    """One backend on one case: ``row`` with its status (pass, FAIL, unsupported, error), error and bar."""
    reason = backend.supports(inputs)
    if reason is not None:
        return {**row, "status": "unsupported", "reason": reason}
    try:
        out = backend.forward(inputs)
    except Exception as err:  # one backend's crash is that backend's failure, not the end of the part
        return {**row, "status": "error", "message": f"{type(err).__name__}: {str(err)[:300]}"}
    err = float(((out.double() - exact).abs() * real[:, None, :, None]).max())
    return {**row, "status": "pass" if err <= bar else "FAIL", "error": err, "bar": bar}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU shapes and backends, in seconds")
    parser.add_argument("--backends", default=None, help="comma-separated (default: composed,triton,"
                        "reference; with --dry-run reference,composed,cpu)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds from the process's start; "
                        "the cases not reached by then are written as skipped rows")
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    if device == "cuda":
        reference._PAIR_ELEMENTS = 1 << 26  # 512 MiB of fp64 pairs a step: a few steps per case on a GPU
    default = "reference,composed,cpu" if args.dry_run else "composed,triton,reference"
    names = (args.backends or default).split(",")
    backends = [n for n in names if n in BACKENDS]
    dtypes = [torch.float32, torch.bfloat16]
    if not args.dry_run:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]  # the low precisions first: fp32 is for tests
    shapes = [(4, 2, 64), (8, 8, 128)] if not args.dry_run else [(4, 2, 64)]  # heads, kv heads, head dim
    lengths = [(300, 300), (300, 37), (300, 1), (700, 700)] if not args.dry_run else [(120, 120), (120, 1)]
    settings = [(64, 4), (37, 3)] if not args.dry_run else [(16, 4), (7, 3)]  # (W, G)
    failures = total = late = 0
    with open_rows(args.out) as f:
        for name in names:
            if name not in backends:
                write_row(f, skipped({"backend": name, "device": device}, NOT_AVAILABLE))
        cases = itertools.product(dtypes, shapes, lengths, settings, (0, 13))
        for dtype, (heads, kv_heads, dim), (kv_len, q_len), (window, group), pad in cases:
            ids = {"device": device, "dtype": str(dtype).removeprefix("torch."), "heads": heads,
                   "kv_heads": kv_heads, "dim": dim, "kv_len": kv_len, "q_len": q_len, "window": window,
                   "group": group, "pad": pad}
            if not budget.allows():
                for name in backends:
                    write_row(f, skipped({"backend": name, **ids}))
                late += len(backends)
                continue
            inputs, exact, rounded, real = case(device, dtype, heads, kv_heads, dim, kv_len, q_len, window,
                                                group, pad)
            scale = float(exact.abs().max())
            if rounded is None:
                bar = 1e-5 * max(1.0, scale)
            else:
                low = float(((rounded - exact).abs() * real[:, None, :, None]).max())
                bar = 2 * low + 0.5 * torch.finfo(dtype).eps * max(1.0, scale)
            for name in backends:
                row = check(BACKENDS[name], inputs, exact, real, bar, {"backend": name, **ids})
                write_row(f, row)
                if row["status"] != "unsupported":
                    total += 1
                    failures += row["status"] != "pass"
    print(f"kernels: {total - failures}/{total} cases within rounding of the fp64 oracle, {late} not reached "
          f"in {args.budget_s} s, backends {backends} (not available: {sorted(set(names) - set(backends))}) "
          f"({args.out}, {budget.elapsed():.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
