"""The vLLM plugin's GPU path on the GPU (part of gpu_check.sh): the paged kernel's correctness, then
issue 27's timings.

    python benchmarks/gpu_paged.py --out OUT/paged.jsonl            # on CUDA: correctness, then timing
    python benchmarks/gpu_paged.py --out OUT/paged.jsonl --dry-run  # CPU shapes, Triton's interpreter
    python benchmarks/gpu_paged.py --parts timing --out OUT/paged_timing.jsonl --budget-s 28

Correctness: a varlen batch (a prefill, a chunk after cached tokens, decode steps) in a scrambled paged cache,
bf16/fp16/fp32, against the fp64 oracle with ``gpu_kernels.py``'s pass rule (at most twice the error of the
oracle computed in the same low precision, plus half an ulp of the output scale); the oracle runs in fp64 on
the kernel's device.

Timing (bf16, Llama-3-8B attention: 32 heads, 8 KV heads, d=128; pages of 16, G=8, W=1024), one row a cell
(``target``): ``decode_batch`` 16 requests x 32k, ``prefill`` one 32k request, ``chunk`` 2k queries after 30k
cached tokens, ``decode_long`` 1 x 128k. Each times, in ms a call after a warm-up call:

* ``sdpa``: vanilla attention on contiguous K/V (no paging), ``F.scaled_dot_product_attention`` (causal for
  the prefill, one batched call for decode); the chunk on CUDA runs the FlashAttention-2 kernel SDPA runs,
  bottom-right causal (``sdpa_op`` names it: SDPA's own ``is_causal`` aligns top-left when lengths differ);
* ``gpu_batch``: ``engine.attend_gpu_batch``, what the plugin's CUDA backend runs: decode requests in one
  launch of the paged kernel, prefill and chunks gathered per request onto the composed backend
  (FlashAttention-2 band + cuDNN grouped pass + Triton merge; ``composed_unsupported`` says if its ops
  refused the input and ``auto`` took another backend);
* ``paged`` (prefill, chunk): the paged kernel alone (``PagedSelfExtend.attend_paged``);
* ``graph`` (decode, CUDA): ``gpu_batch`` captured in a CUDA graph and replayed, as vLLM runs it with
  ``SELFEXTEND_CUDA_GRAPHS=1``, and ``graph_replay_max_abs``: a replay after rewriting ``seq_lens`` against
  an eager call on the same buffers (0 when capture is right).

with ``<name>_extra_mib`` (peak allocated above what was allocated before, CUDA only) and ``<name>_vs_sdpa``,
a time ratio (issue 27's targets: <= 1.2 prefill and chunk, <= 1.25 decode 16 x 32k, <= 1.3 decode 1 x 128k;
``gpu_summary.py`` prints the verdicts). After the prefill and the 128k cell, a ``transient`` row: one layer's
gathered K, V and grouped keys for one request (``kvg_mib`` by arithmetic; on CUDA ``held_mib`` while they
live and ``peak_mib`` while they are built). The dry run runs the same code on CPU shapes (4/2 heads, d=64,
G=4, W=32; decode 2 x 256 and 1 x 512, prefill 256, a 64-token chunk after 192), fp32, the paged kernel
interpreted and the composed backend on its CPU ops.

Rows are flushed as written; with ``--budget-s`` what is not reached in time is written as
``{"status": "skipped", "skipped": "out of time"}`` rows and the exit code stays 0 (1 if a correctness case
fails or a timing cell raises: its row has ``"status": "error"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


LLAMA3_8B = (32, 8, 128)  # query heads, KV heads, head dim
DRY_SHAPE = (4, 2, 64)
PAGE = 16


def timed_ms(fn, reps: int, device: str) -> float:
    """Milliseconds a call, the mean of ``reps`` calls after one warm-up call (compiles, cuDNN plans)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1000 / reps


def timing(args, out, budget: Budget) -> int:
    """Issue 27's four cells, then one layer's gathered K, V and grouped keys at two lengths; the number of
    rows with an error."""
    device = "cpu" if args.dry_run else "cuda"
    heads, kv_heads, dim = DRY_SHAPE if args.dry_run else LLAMA3_8B
    dtype = torch.float32 if args.dry_run else torch.bfloat16  # the interpreter has no bf16 arithmetic
    n, long, chunk, batch = args.context, args.long_context, args.chunk, args.batch
    # target, case, requests, tokens a request (cached included), query tokens a request, seconds it may take
    cells = [("decode_batch", "decode", batch, n, 1, 4), ("prefill", "prefill", 1, n, n, 6),
             ("chunk", "chunk", 1, n, chunk, 5), ("decode_long", "decode", 1, long, 1, 4)]
    common = {"part": "timing", "group": args.group, "window": args.window, "dtype": str(dtype)[6:],
              "heads": heads, "kv_heads": kv_heads, "dim": dim, "page": PAGE}
    method = None
    errors = 0
    for target, case, requests, seq_len, q_len, reserve in cells:
        ids = {**common, "target": target, "case": case, "batch": requests, "context": seq_len,
               "query_tokens": q_len, "cached": seq_len - q_len}
        rows = [ids]
        if target in ("prefill", "decode_long"):  # one layer's gathered K, V, grouped K at this length
            rows.append({**common, "target": "transient", "case": "gathered K, V, grouped K",
                         "context": seq_len})
        if not budget.allows(reserve if device == "cuda" else 0):
            rows = [skipped(r) for r in rows]
        else:
            try:
                if method is None:
                    method = paged_method(args, dim, device, max(n, long))
                b = make_batch(requests, seq_len, q_len, heads, kv_heads, dim, device, dtype)
                rows[0] = {**ids, **time_cell(method, b, case, device, args.reps)}
                if len(rows) > 1:
                    rows[1] = {**rows[1], **transient(method, b, device)}
            except Exception as e:  # noqa: BLE001  (rows that say what broke; the other cells still run)
                error = f"{type(e).__name__}: {e}"[:300]
                rows = [r if r.get("status") == "ok" else {**r, "status": "error", "error": error}
                        for r in rows]
            b = None
            if device == "cuda":
                torch.cuda.empty_cache()
        for r in rows:
            errors += r.get("status") == "error"
            write_row(out, r)
            print(json.dumps(r), flush=True)
    return errors


def paged_method(args, dim: int, device: str, longest: int):
    from selfextend.config import SelfExtendConfig
    from selfextend.integrations.vllm.paged import PagedSelfExtend

    inv_freq = 1.0 / (500000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    # backend "composed": the gathered requests' backend on CUDA (FlashAttention-2 band + cuDNN grouped pass)
    method = PagedSelfExtend(SelfExtendConfig(args.group, args.window, 1 << 20, backend="composed"),
                             inv_freq.to(device))
    method.keys.table(longest, torch.device(device))  # built once per engine: not part of a step
    method.queries.table(longest, torch.device(device))
    return method


def make_batch(requests: int, seq_len: int, q_len: int, heads: int, kv_heads: int, dim: int, device: str,
               dtype: torch.dtype) -> SimpleNamespace:
    """``requests`` requests of ``seq_len`` tokens in a scrambled paged cache, their last ``q_len`` tokens
    as packed queries, vLLM's metadata (the fields ``attend_gpu_batch`` reads), and the same K/V contiguous
    (B, Hkv, T, D) for SDPA."""
    g = torch.Generator(device=device).manual_seed(0)
    pages = -(-seq_len // PAGE)
    kc = torch.randn(pages * requests, kv_heads, PAGE, dim, device=device, dtype=dtype, generator=g)
    vc = torch.randn(kc.shape, device=device, dtype=dtype, generator=g)
    table = torch.randperm(pages * requests, device=device, generator=g).view(requests, pages)
    table = table.to(torch.int32)
    query = torch.randn(requests * q_len, heads, dim, device=device, dtype=dtype, generator=g)
    lens = torch.full((requests,), seq_len, dtype=torch.int32, device=device)
    starts = torch.arange(requests + 1, dtype=torch.int32, device=device) * q_len
    meta = SimpleNamespace(num_actual_tokens=requests * q_len, query_start_loc=starts, seq_lens=lens,
                           block_table=table, max_query_len=q_len, max_seq_len=seq_len)

    def contiguous(cache):  # (B, Hkv, T, D), one copy
        picked = cache[table.long()]  # (B, pages, Hkv, PAGE, D)
        return picked.permute(0, 2, 1, 3, 4).reshape(requests, kv_heads, -1, dim)[:, :, :seq_len].contiguous()

    return SimpleNamespace(kc=kc, vc=vc, table=table, query=query, lens=lens, starts=starts, meta=meta,
                           q=query.view(requests, q_len, heads, dim).transpose(1, 2).contiguous(),
                           k=contiguous(kc), v=contiguous(vc), heads=heads, dim=dim, seq_len=seq_len,
                           q_len=q_len, requests=requests,
                           output=torch.empty(requests * q_len, heads * dim, device=device, dtype=dtype))


def lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple:
    """Vanilla attention for a chunk after cached tokens (query r of m sees keys <= n - m + r) and its name.
    ``F.scaled_dot_product_attention``'s ``is_causal`` aligns top-left when the lengths differ, so on CUDA
    this is the FlashAttention-2 kernel SDPA runs (``aten._flash_attention_forward``: bottom-right causal,
    native GQA, what vLLM's own attention does on contiguous K/V), elsewhere SDPA with a lower-right mask."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    if q.is_cuda:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) views, last dim contiguous

        def flash():
            return torch.ops.aten._flash_attention_forward(qt, kt, vt, None, None, qt.shape[1], kt.shape[1],
                                                           0.0, True, False, scale=scale)[0]
        try:
            flash()
            return flash, "aten._flash_attention_forward (causal, bottom-right)"
        except Exception:  # noqa: BLE001  (an op this torch lacks: SDPA's public lower-right mask)
            pass
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
            "sdpa causal_lower_right")


def time_cell(method, b: SimpleNamespace, case: str, device: str, reps: int | None) -> dict:
    """SDPA on contiguous K/V, the plugin's GPU path (``attend_gpu_batch``: decode on the paged kernel,
    prefill and chunks gathered onto the composed backend) and, beyond decode, the paged kernel alone; ms a
    call, peak extra memory (CUDA), time ratios to SDPA."""
    import torch.nn.functional as F

    from selfextend.backends import lse_ops
    from selfextend.integrations.vllm.engine import attend_gpu_batch

    scale = b.dim ** -0.5
    row: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if case == "chunk":
        sdpa, row["sdpa_op"] = lower_right(b.q, b.k, b.v, scale)
    else:
        causal = case == "prefill"
        row["sdpa_op"] = "sdpa causal" if causal else "sdpa"

        def sdpa():
            return F.scaled_dot_product_attention(b.q, b.k, b.v, is_causal=causal, scale=scale,
                                                  enable_gqa=True)

    def gpu_batch():
        return attend_gpu_batch(method, b.query, b.kc, b.vc, b.meta, b.output, b.heads, b.dim, scale)

    def paged():
        return method.attend_paged(b.query, b.kc, b.vc, b.table, b.lens, b.starts, scale,
                                   max_query_len=b.q_len, max_seq_len=b.seq_len)

    row["paged_reason"] = method.paged_reason(b.query, b.vc.shape[-1])  # None: the paged kernel runs
    if case != "decode":  # which ops the gathered requests' composed backend runs on (None: CUDA's or CPU's)
        ops = lse_ops.ops_for(b.query)
        row["composed_ops"] = ops.name
        row["composed_unsupported"] = ops.supports(b.q, b.v, None)
    fns = [("sdpa", sdpa), ("gpu_batch", gpu_batch)] + ([("paged", paged)] if case != "decode" else [])
    if reps is None:
        reps = 1 if device == "cpu" else (20 if case == "decode" else 5 if case == "chunk" else 3)
    row["reps"] = reps
    for name, fn in fns:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        row[f"{name}_ms"] = timed_ms(fn, reps, device)
        row[f"{name}_extra_mib"] = ((torch.cuda.max_memory_allocated() - base) / 2**20
                                    if device == "cuda" else None)
    if case == "decode" and device == "cuda":  # what vLLM replays with SELFEXTEND_CUDA_GRAPHS=1
        row.update(graph_replay(gpu_batch, b, reps))
        fns.append(("graph", None))
    for name, _ in fns[1:]:
        row[f"{name}_vs_sdpa"] = row[f"{name}_ms"] / row["sdpa_ms"]  # time ratio: <= 1 is as fast as SDPA
    if case != "decode":  # the two SelfExtend paths agree (both bf16 on CUDA: about 1e-2)
        got = gpu_batch()[: b.query.shape[0]].view(b.query.shape).float()
        row["gpu_batch_vs_paged_max_abs"] = float((got - paged().float()).abs().max())
    row["status"] = "ok"
    return row


def graph_replay(gpu_batch, b: SimpleNamespace, reps: int) -> dict:
    """The decode batch captured in a CUDA graph as vLLM captures it (host values of capture: ``max_seq_len``
    stays what it was), replayed: ``graph_ms`` a replay, and ``graph_replay_max_abs``, how far a replay after
    rewriting ``seq_lens`` (other lengths per request, the same buffers) is from an eager call on them (the
    same kernel and split count: 0 when capture is right)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a warm-up on a side stream, as graph capture asks
        gpu_batch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu_batch()
    row = {"graph_ms": timed_ms(graph.replay, reps, "cuda")}
    saved = b.lens.clone()
    b.lens.copy_(saved - 1 - 37 * torch.arange(b.requests, device=saved.device, dtype=saved.dtype))
    graph.replay()
    replayed = b.output.clone()
    eager = gpu_batch().clone()
    b.lens.copy_(saved)
    row["graph_replay_max_abs"] = float((replayed.float() - eager.float()).abs().max())
    return row


def transient(method, b: SimpleNamespace, device: str) -> dict:
    """One layer's transient memory on the gathered path for request 0 at ``b.seq_len``: its K and V gathered
    and its keys rotated to grouped positions (``engine.attend_requests`` + ``PagedSelfExtend.inputs``).
    ``kvg_mib``: their size (arithmetic); on CUDA ``held_mib`` (allocated while they live) and ``peak_mib``
    (the peak while they are built: the rotation's fp32 temporaries included)."""
    from selfextend.integrations.vllm.paged import gather

    n, kv_heads, dim = b.seq_len, b.kc.shape[1], b.dim
    size = b.kc.element_size()
    row = {"kvg_mib": 3 * n * kv_heads * dim * size / 2**20,
           "grouped_query_mib": n * b.heads * dim * size / 2**20,  # a full prefill's rotated queries
           "held_mib": None, "peak_mib": None}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    blocks = b.table[0, : -(-n // PAGE)].long()
    k, v = gather(b.kc, blocks, n), gather(b.vc, blocks, n)
    kg = method.keys.rotate(k, torch.arange(n, device=k.device), method.layout, need=n)
    if device == "cuda":
        torch.cuda.synchronize()
        row["held_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del k, v, kg
    row["status"] = "ok"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes under Triton's interpreter")
    parser.add_argument("--parts", default="correctness,timing", help="correctness, timing or both")
    # timing; defaults: issue 27's cells on a GPU, CPU shapes with --dry-run (in brackets)
    parser.add_argument("--context", type=int, default=None, help="prefill and decode batch length, 32768 "
                        "[256]")
    parser.add_argument("--long-context", type=int, default=None, help="one decode request, 131072 [512]")
    parser.add_argument("--chunk", type=int, default=None, help="query tokens of a prefill chunk ending at "
                        "--context, 2048 [64]")
    parser.add_argument("--batch", type=int, default=None, help="decode requests, 16 [2]")
    parser.add_argument("--group", type=int, default=None, help="G, 8 [4]")
    parser.add_argument("--window", type=int, default=None, help="W, 1024 [32]")
    parser.add_argument("--reps", type=int, default=None, help="timed calls a cell after one warm-up call "
                        "(default: decode 20, chunk 5, prefill 3; 1 on the CPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds from the process's start; "
                        "what is not reached by then is written as skipped rows")
    args = parser.parse_args()
    shapes = {"context": (32768, 256), "long_context": (131072, 512), "chunk": (2048, 64), "batch": (16, 2),
              "group": (8, 4), "window": (1024, 32)}
    for key, (gpu, dry) in shapes.items():
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else gpu)
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
            failures += timing(args, out, budget)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
