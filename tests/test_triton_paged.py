"""The paged Triton kernel (``backends/triton_paged.py``), run on the CPU by Triton's interpreter, against
the independent fp64 oracle: a varlen batch (a prefill, a chunk, a decode step) whose K/V sit in a scrambled
paged cache. fp32 within the oracle's fp32 tolerance, fp16 by the 2x rule (``reference.rounding_tolerance``).

The kernel comes from the ``tp`` fixture: the module built for the interpreter (``interpreted.py``: a private
copy when this process imported the compiled one first, so test order cannot turn these tests into skips),
installed where the plugin imports it from; the test fails if the kernel never launched."""

import math

import interpreted
import pytest
import torch
from reference import fp32_tolerance, rope, rounding_tolerance, selfextend_attention_ref

from selfextend.config import SelfExtendConfig
from selfextend.integrations.vllm.paged import PagedSelfExtend, write

pytest.importorskip("triton", reason="triton is not installed: pip install 'selfextend-llm[triton]'")


@pytest.fixture
def paged_module():
    """The paged kernel module built for the interpreter, installed where the plugin imports it from."""
    with interpreted.installed() as built:
        yield built["triton_paged"]


@pytest.fixture
def tp():
    """``paged_module``, for a test that must launch the kernel (it fails if the kernel never ran)."""
    yield from interpreted.launching("triton_paged", "_paged_selfextend_fwd")


D = 64
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float) / D))


def paged_batch(seq_lens, q_lens, heads=4, kv_heads=2, page=16, dtype=torch.float32, seed=0):
    """Unrotated q/k/v per request, keys rotated at their true positions and written to one paged cache
    through a scrambled block table, and the batch's packed queries (rotated at their true positions)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // page) for n in seq_lens) + 3
    key_cache = torch.zeros(n_blocks, kv_heads, page, D)
    value_cache = torch.zeros(n_blocks, kv_heads, page, D)
    order = torch.randperm(n_blocks, generator=g)
    width = max(-(-n // page) for n in seq_lens)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    requests, queries, used = [], [], 0
    for r, (n, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        # values of ``dtype``: the oracle then starts from the very inputs the kernel gets
        q, k, v = ((torch.randn(1, h, n, D, generator=g) * 2).to(dtype).float()
                   for h in (heads, kv_heads, kv_heads))
        pos = torch.arange(n)[None]
        blocks = order[used : used + -(-n // page)]
        used += len(blocks)
        table[r, : len(blocks)] = blocks.to(torch.int32)
        slots = (blocks[:, None] * page + torch.arange(page)).flatten()[:n]
        write(key_cache, rope(k, pos, INV_FREQ).float()[0].transpose(0, 1), slots)
        write(value_cache, v[0].transpose(0, 1), slots)
        queries.append(rope(q, pos, INV_FREQ).float()[0, :, n - q_len :].transpose(0, 1))
        requests.append((q, k, v, blocks))
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return (requests, torch.cat(queries).to(dtype), key_cache.to(dtype), value_cache.to(dtype), table,
            torch.tensor(seq_lens, dtype=torch.int32), starts)


def run_kernel(method, query, key_cache, value_cache, table, seq_lens, starts, **kw):
    q_lens = starts[1:] - starts[:-1]
    return method.attend_paged(query, key_cache, value_cache, table, seq_lens, starts, D ** -0.5,
                               max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()), **kw)


def oracle_rows(q, k, v, n, q_len, group_size, window, scale=1.0, base=0, precision=None):
    """The fp64 oracle's output for one request's last ``q_len`` queries, as (q_len, H, D); ``base``: the
    log scaling of the query rows, by hand; ``precision``: as ``attention_ref``."""
    pos = torch.arange(n)[None]
    query = q[:, :, n - q_len :].double()
    if base:
        query = query * (torch.log(pos[0, n - q_len :].double() + 1) / math.log(base)).clamp(min=1)[:, None]
    out = selfextend_attention_ref(query, k, v, pos[:, n - q_len :], pos, window, group_size,
                                   INV_FREQ, D ** -0.5, grouped_scale=scale, precision=precision)
    return out[0].transpose(0, 1)


def oracle_batch(requests, starts, group_size, window, **kw):
    """``oracle_rows`` of every request of a ``paged_batch``, packed like its queries: (T, H, D) fp64."""
    return torch.cat([oracle_rows(q, k, v, q.shape[2], int(starts[r + 1] - starts[r]), group_size, window,
                                  **kw) for r, (q, k, v, _) in enumerate(requests)])


def oracle_and_bound(q, k, v, n, q_len, group_size, window, dtype):
    """``oracle_rows`` and how far a computation in ``dtype`` may be off it (the fp32 tolerance, or the 2x
    rule)."""
    expected = oracle_rows(q, k, v, n, q_len, group_size, window)
    if dtype == torch.float32:
        return expected, fp32_tolerance(expected)
    plain = oracle_rows(q, k, v, n, q_len, group_size, window, precision=dtype)
    return expected, rounding_tolerance(plain, expected, dtype)


def error(out, expected):
    return float((out.double() - expected).abs().max())


BATCH = ([150, 90, 61], [150, 1, 23])  # a prefill, a decode step, a chunk after 38 cached tokens


@pytest.mark.parametrize("group_size,window,scale,base", [(4, 16, 1.0, 0), (3, 40, 1.0, 0), (2, 200, 1.0, 0),
                                                           (4, 16, 1.7, 0), (4, 16, 1.0, 40)])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 32)])  # key tiles within one page / across two
def test_paged_kernel_equals_oracle(tp, group_size, window, scale, base, tiles):
    """Past the window, every pair a neighbor (W = 200), a sharper grouped part (``grouped_scale``) and the
    authors' log scaling of the query rows (``scale_base``)."""
    requests, query, kc, vc, table, seq_lens, starts = paged_batch(*BATCH)
    method = PagedSelfExtend(SelfExtendConfig(group_size, window, 64, backend="reference",
                                              grouped_scale=scale, scale_base=base), INV_FREQ)
    out = run_kernel(method, query, kc, vc, table, seq_lens, starts, block_m=tiles[0], block_n=tiles[1])
    want = oracle_batch(requests, starts, group_size, window, scale=scale, base=base)
    assert error(out, want) <= fp32_tolerance(want)


def test_paged_kernel_equals_oracle_mqa_and_large_pages(tp):
    """Eight query heads on one KV head, pages of 32 keys, tiles of 16."""
    requests, *batch = paged_batch([200, 47], [5, 47], heads=8, kv_heads=1, page=32, seed=1)
    method = PagedSelfExtend(SelfExtendConfig(5, 24, 64, backend="reference"), INV_FREQ)
    out = run_kernel(method, *batch, block_m=16, block_n=16)
    want = oracle_batch(requests, batch[-1], 5, 24)
    assert error(out, want) <= fp32_tolerance(want)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_split_kv_decode(tp, num_splits):
    """Decode steps of three requests of different lengths, the keys split over programs, merged by LSE."""
    requests, *batch = paged_batch([300, 17, 129], [1, 1, 1], seed=2)
    method = PagedSelfExtend(SelfExtendConfig(4, 32, 64, backend="reference"), INV_FREQ)
    out = run_kernel(method, *batch, num_splits=num_splits, block_n=16)
    want = oracle_batch(requests, batch[-1], 4, 32)
    assert error(out, want) <= fp32_tolerance(want)


def test_fp16_within_rounding_of_oracle(tp):
    """fp16 cache and queries, the 2x rule: off the oracle by at most twice what attention written plainly
    in fp16 is off (bf16 is checked on a GPU by ``benchmarks/gpu_check.sh``: Triton's interpreter has no bf16
    arithmetic)."""
    requests, query, kc, vc, table, seq_lens, starts = paged_batch(*BATCH, dtype=torch.float16)
    method = PagedSelfExtend(SelfExtendConfig(4, 16, 64, backend="reference"), INV_FREQ)
    out = run_kernel(method, query, kc, vc, table, seq_lens, starts, block_m=16, block_n=16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    exact = oracle_batch(requests, starts, 4, 16)
    plain = oracle_batch(requests, starts, 4, 16, precision=torch.float16)
    assert error(out, exact) <= rounding_tolerance(plain, exact, torch.float16)


def test_bad_tables_are_refused(paged_module):
    batch = paged_batch([40], [40])
    method = PagedSelfExtend(SelfExtendConfig(4, 16, 64), INV_FREQ)
    query, kc, vc, table, seq_lens, starts = batch[1:]
    cos, sin = method.keys.table(8, query.device)
    with pytest.raises(ValueError, match="tables cover 4096 positions; the batch reaches 5000"):
        paged_module.paged_selfextend_attention(query, query, kc, vc, table, torch.tensor([5000]), starts,
                                                cos, sin, 16, 0.1)
    with pytest.raises(ValueError, match="do not rotate head dim 64"):
        paged_module.paged_selfextend_attention(query, query, kc, vc, table, seq_lens, starts, cos[:, :8],
                                                sin[:, :8], 16, 0.1)


def test_paged_reason_reads_the_kernel_capabilities():
    """The plugin's paged path refuses what the one capability declaration (``backends.triton.KERNELS``)
    leaves out, with the contiguous kernel's words."""
    from selfextend.backends.triton import KERNELS

    method = PagedSelfExtend(SelfExtendConfig(4, 16, 64), INV_FREQ)
    assert method.paged_reason(torch.zeros(3, 4, 32), 32) == KERNELS.head_dim_reason(32, 32)
    assert method.paged_reason(torch.zeros(3, 4, 64), 48) == KERNELS.head_dim_reason(64, 48)
    assert method.paged_reason(torch.zeros(3, 4, 64, dtype=torch.float64), 64) == \
        KERNELS.dtype_reason(torch.float64)
    assert "float64" in KERNELS.dtype_reason(torch.float64) and "32" in KERNELS.head_dim_reason(32, 32)


def test_compiles_for_nvidia(paged_module):
    """Compile (not run) the paged kernel to cubin for sm_90 (bf16 prefill) and sm_80 (fp16 split decode)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if type(triton.language.standard.max).__name__ == "InterpretedFunction":
        pytest.skip("triton itself was imported under TRITON_INTERPRET=1: no compiled library to build with")
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip("this triton wheel has no NVIDIA backend")
    fn = interpreted.compiled()["triton_paged"]._paged_selfextend_fwd
    launch = paged_module.LAUNCH
    for dtype, dim, (bm, bn, warps, stages), split, arch in (
            ("bf16", 128, launch.prefill[128], False, 90), ("fp16", 64, (16, *launch.decode[64]), True, 80)):
        sig = {name: "i32" for name in fn.arg_names}
        sig.update({p: f"*{dtype}" for p in ("Q", "QG", "K", "V")})
        sig.update(BT="*i32", SEQ="*i32", QSL="*i32", COS="*fp32", SIN="*fp32", LSE="*fp32", qk_scale="fp32")
        sig["OUT"] = "*fp32" if split else f"*{dtype}"
        consts = dict(HKV=8, REP=4, SPLIT=split, PAGE=16, HALF=dim // 2, HEAD_DIM_V=dim, BLOCK_M=bm,
                      BLOCK_N=bn)
        sig.update({c: "constexpr" for c in consts})
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
        except RuntimeError as err:
            if "ptxas" in str(err) and "not found" in str(err):
                pytest.skip(f"no ptxas: {err}")
            raise
        assert kernel.asm["cubin"], (dtype, dim, arch)


def test_padded_request_arrays_are_read_by_query_start_loc(tp):
    """vLLM may pad seq_lens and the block table past the batch's requests: only query_start_loc counts."""
    query, kc, vc, table, seq_lens, starts = paged_batch([60, 33], [60, 1], seed=3)[1:]
    method = PagedSelfExtend(SelfExtendConfig(4, 8, 64, backend="reference"), INV_FREQ)
    want = run_kernel(method, query, kc, vc, table, seq_lens, starts)
    padded_lens = torch.cat([seq_lens, torch.tensor([0, 0], dtype=torch.int32)])
    padded_table = torch.cat([table, torch.zeros(2, table.shape[1], dtype=torch.int32)])
    got = method.attend_paged(query, kc, vc, padded_table, padded_lens, starts, D ** -0.5, max_query_len=60,
                              max_seq_len=60)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 tl.dot is wrong
def test_gpu_batch_split_decode_paged_prefill_composed(tp, monkeypatch, dtype):
    """``engine.attend_gpu_batch``, the plugin's CUDA path: in a mixed batch the decode requests run as one
    packed sub-batch of the paged kernel and the prefill/chunk requests are gathered and run on the composed
    backend's CUDA ops (here their CPU stand-ins), each equal to the fp64 oracle; seq_lens and the block table
    padded past the batch, as vLLM pads them, change nothing; a decode-only batch reads nothing back."""
    from types import SimpleNamespace

    from standins import AtenStandins

    from selfextend.backends import composed, lse_ops
    from selfextend.integrations.vllm.engine import attend_gpu_batch

    ops = lse_ops.CudaOps(aten=AtenStandins(), merge=lse_ops.merge_into_torch)
    ops.dtypes = (torch.float16, torch.bfloat16, torch.float32)
    monkeypatch.setattr(composed, "ops_for", lambda tensor: ops)
    method = PagedSelfExtend(SelfExtendConfig(group_size=4, window=24, trained_length=64), INV_FREQ)
    seq_lens, q_lens = [90, 130, 57, 200], [1, 40, 1, 200]  # decode, chunk after 90 cached, decode, prefill
    requests, query, key_cache, value_cache, table, lens, starts = paged_batch(seq_lens, q_lens, dtype=dtype)
    heads, n = query.shape[1], query.shape[0]
    pad_lens = torch.cat([lens, torch.zeros(3, dtype=lens.dtype)])  # vLLM pads per-request arrays
    pad_table = torch.cat([table, torch.zeros(3, table.shape[1], dtype=table.dtype)])
    meta = SimpleNamespace(num_actual_tokens=n, query_start_loc=starts, seq_lens=pad_lens,
                           block_table=pad_table, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    output = torch.zeros(n + 5, heads * D, dtype=dtype)  # padded past the real tokens
    assert ops.supports(query[None].transpose(1, 2), value_cache.transpose(0, 2), None) is None  # probed
    ops.aten.calls.clear()
    attend_gpu_batch(method, query, key_cache, value_cache, meta, output, heads, D, D ** -0.5)
    assert ops.aten.calls["cudnn"] == 1 and ops.aten.calls["flash-window"] == 2  # prefill; prefill + chunk
    out = output[:n].view(n, heads, D)
    for r, (q, k, v, _) in enumerate(requests):
        expected, bound = oracle_and_bound(q, k, v, seq_lens[r], q_lens[r], 4, 24, dtype)
        assert error(out[starts[r] : starts[r + 1]], expected) <= bound, r
    assert torch.equal(output[n:], torch.zeros_like(output[n:]))

    # decode only: the whole batch in one launch, the same rows as the mixed batch's decode requests
    requests, query, key_cache, value_cache, table, lens, starts = paged_batch([90, 57], [1, 1], dtype=dtype)
    meta = SimpleNamespace(num_actual_tokens=2, query_start_loc=starts, seq_lens=lens, block_table=table,
                           max_query_len=1, max_seq_len=90)
    output = torch.zeros(2, heads * D, dtype=dtype)
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1))
    attend_gpu_batch(method, query, key_cache, value_cache, meta, output, heads, D, D ** -0.5)
    monkeypatch.undo()
    assert not reads
    for r, (q, k, v, _) in enumerate(requests):
        expected, bound = oracle_and_bound(q, k, v, [90, 57][r], 1, 4, 24, dtype)
        assert error(output[r].view(1, heads, D), expected) <= bound, r


def test_decode_launch_replays_like_a_captured_graph(tp, monkeypatch):
    """What vLLM replays when it captures a decode batch in a CUDA graph: the Python of
    ``engine.attend_gpu_batch`` ran once, at capture, with vLLM's capture-time host values (``max_seq_len =
    max_model_len``); every later step only rewrites the buffers. So a replay computes what an eager call
    does iff (1) the decode branch reads nothing from the device (each aten read and ``tolist`` counted) and
    (2) the host values of capture serve batches of any other lengths (checked against the oracle), and (3)
    nothing the launch reads is reallocated later: the rotation tables, built for ``max_len`` positions at the
    first call, stay the same tensors."""
    from collections import Counter
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from selfextend.integrations.vllm.engine import attend_gpu_batch

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "is_nonzero", "equal", "item"):
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    max_len = 5000  # past the tables' growth step (4096): built for it at once, or rebuilt later
    method = PagedSelfExtend(SelfExtendConfig(4, 32, 64, scale_base=40), INV_FREQ, max_len=max_len)
    tables = None
    for seed, seq_lens in enumerate(([300, 17, 129], [45, 390, 2], [33, 33, 33])):
        requests, query, kc, vc, table, lens, starts = paged_batch(seq_lens, [1, 1, 1], seed=seed)
        # an eager step first (its own longest request), then steps with the capture-time max_model_len
        meta = SimpleNamespace(num_actual_tokens=3, query_start_loc=starts, seq_lens=lens, block_table=table,
                               max_query_len=1, max_seq_len=max(seq_lens) if seed == 0 else max_len)
        output = torch.zeros(3, query.shape[1] * D)
        reads, tolist = Reads(), []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self, seen=tolist: seen.append(1))
        with reads:
            attend_gpu_batch(method, query, kc, vc, meta, output, query.shape[1], D, D ** -0.5)
        monkeypatch.undo()
        assert not reads.ops and not tolist, (reads.ops, tolist)
        want = oracle_batch(requests, starts, 4, 32, base=40)
        assert error(output.view(3, -1, D), want) <= fp32_tolerance(want), seq_lens
        now = [t for rt in (method.keys, method.queries) for t in rt.tables[query.device]]
        assert now[0].shape[0] >= max_len
        if tables is None:
            tables = now
        assert all(a is b for a, b in zip(now, tables, strict=True))  # never rebuilt


def test_log_scaled_queries_read_nothing_back():
    """The optional query scaling of the paged path multiplies every row (by 1 where it does not scale)
    instead of asking the device whether any row scales: the same rows as the host-checked factor."""
    from selfextend.positions import query_scale

    method = PagedSelfExtend(SelfExtendConfig(4, 16, 64, scale_base=40), INV_FREQ)
    query = torch.randn(6, 4, D)
    for pos in (torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([10, 39, 40, 41, 200, 900])):
        host = query_scale(pos[None], 64, query.dtype, scale_base=40)
        want = query if host is None else query * host[0, 0, :, :, None]
        assert torch.equal(method.scaled_queries(query, pos), want)
