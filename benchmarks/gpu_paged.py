"""The vLLM plugin's paged kernel (``backends/triton_paged.py``) on the GPU (part of gpu_check.sh).

    python benchmarks/gpu_paged.py --out OUT/paged.jsonl            # on CUDA: correctness, then timing
    python benchmarks/gpu_paged.py --out OUT/paged.jsonl --dry-run  # tiny shapes, Triton's interpreter
    python benchmarks/gpu_paged.py --parts timing --out OUT/paged_timing.jsonl --budget-s 20

Correctness: a varlen batch (a prefill, a chunk after cached tokens, decode steps) in a scrambled paged cache,
bf16/fp16/fp32, against the fp64 oracle with ``gpu_kernels.py``'s pass rule (at most twice the error of the
oracle computed in the same low precision, plus half an ulp of the output scale); the oracle runs in fp64 on
the kernel's device. Timing (CUDA only, bf16, Llama-3-8B attention shapes, pages of 16): decode steps of
``--batch`` requests at ``--context`` tokens and one ``--context`` prefill, the paged kernel against the
gather path (each request's K/V gathered, then the contiguous Triton kernel) and against SDPA on contiguous
K/V (vanilla attention, no paging: a lower bound). Without CUDA the timing rows say so.

Rows are flushed as written; with ``--budget-s`` what is not reached in time is written as
``{"status": "skipped", "skipped": "out of time"}`` rows and the exit code stays 0 (1 only if a case fails).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from budget import Budget, open_rows, skipped, write_row  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference  # noqa: E402  (shares no code with the library)
from reference import rope, selfextend_attention_ref  # noqa: E402


def paged(seq_lens, q_lens, heads, kv_heads, dim, page, device, dtype, seed=0):
    """Per-request unrotated q/k/v (fp32, CPU) and the batch: packed rotated queries, paged caches, table."""
    from selfextend.integrations.vllm.paged import write

    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    blocks_needed = [-(-n // page) for n in seq_lens]
    n_blocks = sum(blocks_needed) + 1
    kc, vc = torch.zeros(n_blocks, kv_heads, page, dim), torch.zeros(n_blocks, kv_heads, page, dim)
    order = torch.randperm(n_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks_needed), dtype=torch.int32)
    requests, queries, used = [], [], 0
    for r, (n, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        q = torch.randn(1, heads, q_len, dim, generator=g)
        k, v = (torch.randn(1, kv_heads, n, dim, generator=g) for _ in range(2))
        pos = torch.arange(n)[None]
        blocks = order[used : used + blocks_needed[r]]
        used += blocks_needed[r]
        table[r, : len(blocks)] = blocks.to(torch.int32)
        slots = (blocks[:, None] * page + torch.arange(page)).flatten()[:n]
        write(kc, rope(k, pos, inv_freq).float()[0].transpose(0, 1), slots)
        write(vc, v[0].transpose(0, 1), slots)
        queries.append(rope(q, pos[:, n - q_len :], inv_freq).float()[0].transpose(0, 1))
        requests.append((q, k, v))
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)

    def on(t):
        return t.to(device=device, dtype=dtype)

    batch = (on(torch.cat(queries)), on(kc), on(vc), table.to(device),
             torch.tensor(seq_lens, dtype=torch.int32, device=device), starts.to(device))
    return requests, batch, inv_freq


def correctness(device, dtypes, shapes, out, budget: Budget) -> tuple[int, int]:
    from selfextend.config import SelfExtendConfig
    from selfextend.integrations.vllm.paged import PagedSelfExtend

    seq_lens, q_lens = ([700, 300, 300, 61], [700, 37, 1, 1]) if device == "cuda" else ([90, 40], [90, 1])
    failures = total = 0
    for heads, kv_heads, dim in shapes:
        for window, group in ((64, 4), (37, 3)) if device == "cuda" else ((16, 4),):
            exact = rounded = None
            for dtype in dtypes:
                ids = {"part": "correctness", "device": device, "dtype": str(dtype)[6:], "heads": heads,
                       "kv_heads": kv_heads, "dim": dim, "window": window, "group": group,
                       "seq_lens": seq_lens, "q_lens": q_lens}
                if not budget.allows():
                    write_row(out, skipped(ids))
                    continue
                requests, batch, inv_freq = paged(seq_lens, q_lens, heads, kv_heads, dim, 16, device, dtype)
                requests = [tuple(t.to(device) for t in r) for r in requests]  # the oracle runs there too
                method = PagedSelfExtend(SelfExtendConfig(group, window, 1 << 20), inv_freq.to(device))
                got = method.attend_paged(*batch, dim ** -0.5, max_query_len=max(q_lens),
                                          max_seq_len=max(seq_lens)).double().cpu()
                if exact is None:
                    exact = torch.cat([ref(q, k, v, m, window, group, inv_freq.to(device), None)
                                       for (q, k, v), m in zip(requests, q_lens, strict=True)]).cpu()
                scale = float(exact.abs().max())
                if dtype == torch.float32:
                    bar = 1e-5 * max(1.0, scale)
                else:
                    rounded = torch.cat([ref(q, k, v, m, window, group, inv_freq.to(device), dtype)
                                         for (q, k, v), m in zip(requests, q_lens, strict=True)]).cpu()
                    low = float((rounded - exact).abs().max())
                    bar = 2 * low + 0.5 * torch.finfo(dtype).eps * max(1, scale)
                err = float((got - exact).abs().max())
                ok = err <= bar
                failures += not ok
                total += 1
                write_row(out, {**ids, "error": err, "bar": bar, "status": "pass" if ok else "FAIL"})
    return failures, total


def ref(q, k, v, q_len, window, group, inv_freq, precision):
    n = k.shape[2]
    pos = torch.arange(n, device=k.device)[None]
    kw = {} if precision is None else {"precision": precision}
    out = selfextend_attention_ref(q, k, v, pos[:, n - q_len :], pos, window, group, inv_freq,
                                   q.shape[-1] ** -0.5, **kw)
    return out[0].transpose(0, 1).double()


def cuda_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / reps


def timing(args, out, budget: Budget) -> None:
    n = args.context
    for label, seq_lens, q_lens in (("decode", [n] * args.batch, [1] * args.batch), ("prefill", [n], [n])):
        ids = {"part": "timing", "case": label, "batch": len(seq_lens), "context": n, "group": args.group}
        if not torch.cuda.is_available():
            row = skipped(ids, "needs CUDA")
        elif not budget.allows(5):  # a case: inputs, a compile of the gather path's kernel, 20 + 3 calls
            row = skipped(ids)
        else:
            row = time_case(label, seq_lens, q_lens, args.group)
        write_row(out, row)
        print(json.dumps(row))


def time_case(label: str, seq_lens: list[int], q_lens: list[int], group: int) -> dict:
    import torch.nn.functional as F

    from selfextend.config import SelfExtendConfig
    from selfextend.integrations.vllm.paged import PagedSelfExtend, gather

    heads, kv_heads, dim, n, scale = 32, 8, 128, seq_lens[0], 128 ** -0.5
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = -(-n // 16)
    kc = torch.randn(pages * len(seq_lens), kv_heads, 16, dim, device="cuda", dtype=torch.bfloat16,
                     generator=g)
    vc = torch.randn_like(kc)
    table = torch.randperm(pages * len(seq_lens), device="cuda", generator=g).view(len(seq_lens), pages)
    table = table.to(torch.int32)
    query = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    seqs = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    inv_freq = (1.0 / (500000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).cuda()
    method = PagedSelfExtend(SelfExtendConfig(group, 1024, 1 << 20, backend="triton"), inv_freq)
    method.keys.table(n, torch.device("cuda"))  # built once per engine: not part of a step
    method.queries.table(n, torch.device("cuda"))
    qs = [query[starts[r] : starts[r + 1]] for r in range(len(seq_lens))]
    contiguous = [(q.transpose(0, 1)[None], gather(kc, table[r].long(), n).transpose(0, 1)[None],
                   gather(vc, table[r].long(), n).transpose(0, 1)[None]) for r, q in enumerate(qs)]

    def paged_kernel():
        method.attend_paged(query, kc, vc, table, seqs, starts, scale, max_query_len=max(q_lens),
                            max_seq_len=n)

    def gather_path():
        for r, q in enumerate(qs):
            method.attend(q, gather(kc, table[r].long(), n), gather(vc, table[r].long(), n), scale)

    def sdpa():
        for q, k, v in contiguous:
            F.scaled_dot_product_attention(q, k, v, is_causal=label == "prefill", enable_gqa=True)

    row = {"part": "timing", "case": label, "batch": len(seq_lens), "context": n, "group": group,
           "window": 1024, "dtype": "bfloat16", "heads": heads, "kv_heads": kv_heads, "dim": dim,
           "device": torch.cuda.get_device_name()}
    for name, fn in (("sdpa_contiguous", sdpa), ("paged", paged_kernel), ("gather", gather_path)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[f"{name}_ms"] = cuda_ms(fn, 20 if label == "decode" else 3)
        row[f"{name}_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["paged_vs_sdpa"] = row["sdpa_contiguous_ms"] / row["paged_ms"]  # throughput ratios
    row["paged_vs_gather"] = row["gather_ms"] / row["paged_ms"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes under Triton's interpreter")
    parser.add_argument("--parts", default="correctness,timing", help="correctness, timing or both")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=None, help="seconds from the process's start; "
                        "what is not reached by then is written as skipped rows")
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    parts = args.parts.split(",")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":
        reference._PAIR_ELEMENTS = 1 << 26  # 512 MiB of fp64 pairs a step: a few steps per case on a GPU
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if args.dry_run:
        dtypes = [torch.float32, torch.float16]  # the interpreter has no bf16 arithmetic
    shapes = [(4, 2, 64)] if args.dry_run else [(4, 2, 64), (32, 8, 128)]
    failures = 0
    with open_rows(args.out) as out:
        if "correctness" in parts:
            failures, total = correctness(device, dtypes, shapes, out, budget)
            print(f"paged: {total - failures}/{total} cases within rounding of the fp64 oracle ({args.out}, "
                  f"{budget.elapsed():.0f} s)")
        if "timing" in parts:
            timing(args, out, budget)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
