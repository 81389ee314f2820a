"""Fused SelfExtend attention in Triton: the kernels and their launcher (imported only when triton is).

The interface (capability checks, dtype policy, fallbacks) lives in ``triton.py``; this module is the
kernel side only, flash-attention style, so it can be imported, tested and tuned on its own.

One kernel, ``_selfextend_fwd``, serves prefill, chunked prefill and decode:

* **GQA packing.** A program owns one (batch row, KV head) and a tile of ``BLOCK_M`` *rows*, where row
  ``r`` is query ``r // REP`` of query head ``kv_head * REP + r % REP``. Every K/V tile is loaded once
  for all the query heads that share it (no ``repeat_kv``), and a decode step (one query, REP heads)
  still fills a tile.
* **Tile classes from positions.** A row's real keys are one contiguous block whose positions count up
  by one, so the key index where ``q_pos - k_pos`` crosses ``W`` follows from the tile's smallest and
  largest query position by arithmetic. The key range then splits into three loops: grouped-only tiles
  (every pair ``>= W``: only ``q_g . k_g``, only K_g and V loaded), boundary tiles (both products, chosen
  per element) and neighbor-only tiles (only ``q . k``). Keeping the class out of the loop body (no
  per-tile branch around the loads) lets Triton software-pipeline the loads of every loop.
* **Skipped work.** Key tiles past the causal diagonal of the tile's last query and tiles before the
  row's first real key are never visited; masks are applied only on tiles that cross the diagonal, the
  end of the keys, or padding.
* **One online softmax** over neighbor and grouped scores together: no merge inside the kernel.
* **Split-KV decode.** With few query rows the key range is cut into ``num_splits`` parts that run as
  separate programs, each writing an fp32 partial output and its log-sum-exp; ``_combine`` merges them
  by LSE.

RoPE: the kernel consumes the grouped q/k that ``SelfExtendInputs`` already carries (rotated by fp32
deltas in ``rope.py``; grouped keys are rotated once per key, in the KV cache, by
``integrations.hf.grouped_cache.GroupedCache``). Rotating inside the kernel would need every RoPE
layout variant (rotate-half, interleaved, partial rotary, per layer-type frequencies) re-implemented in
Triton and would re-rotate each key tile for every query tile that reads it; it would save the grouped-key
copy (0.5x KV memory while decoding). ``triton_paged.py`` does exactly that for the vLLM plugin (rotate-half,
full rotary: the layouts vLLM's supported models use), where no grouped copy can be kept.

Positions are per row (``query_pos``, ``key_pos``, ``key_valid``), so left padding, batches of different
lengths and chunked prefill (``q_start > 0``) need nothing special. Causality is by index
(key ``j <= q_start + i``), exactly like the reference backend. Padding must be one contiguous block
per row (``TritonBackend.supports`` checks it), as for the CPU backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BIG = tl.constexpr(1 << 30)  # "no position" sentinel for min/max over masked lanes
_NEIGHBOR, _GROUPED, _BOUNDARY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# Reductions call tl.reduce with the library's own combine functions (exactly what tl.max / tl.sum
# compile to) instead of tl.max / tl.sum: those are @jit functions fixed when triton is first imported,
# and torch / transformers import triton before a test can set TRITON_INTERPRET, after which the
# interpreter cannot call them. The interpreter recognises these combine functions and runs numpy
# reductions without calling them; our own fallbacks (slow under the interpreter) cover triton versions
# that rename them.


@triton.jit
def _max_fallback(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_fallback(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add_fallback(a, b):
    return a + b


_max = getattr(tl.standard, "_elementwise_max", _max_fallback)
_min = getattr(tl.standard, "_elementwise_min", _min_fallback)
_add = getattr(tl.standard, "_sum_combine", _add_fallback)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, qg, qpos, qi, k_tile, kg_tile, v_tile, KPOS_ROW, KVALID_ROW, start_n, end, causal_lim,
    Q_START, WINDOW, qk_scale, TILES,
    KIND: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """One key tile of the online softmax; ``KIND`` says which dot products it needs.

    K, K_g and V rows are contiguous (row stride = head dim, a compile-time constant), so tile addresses
    are the tile base plus constant offsets: no per-element offset tensors held in registers.
    """
    offs_t = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_t
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_ok = offs_n < end
    if HAS_PAD:
        k_ok = k_ok & (tl.load(KVALID_ROW + offs_n, mask=k_ok, other=0) != 0)
    if KIND == _NEIGHBOR:
        k = tl.load(k_tile + offs_t[None, :] * HEAD_DIM + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision="ieee")
    elif KIND == _GROUPED:
        kg = tl.load(kg_tile + offs_t[None, :] * HEAD_DIM + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        qk = tl.dot(qg, kg, input_precision="ieee")
    else:  # boundary: both products, chosen per element by the position distance
        k = tl.load(k_tile + offs_t[None, :] * HEAD_DIM + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        kg = tl.load(kg_tile + offs_t[None, :] * HEAD_DIM + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        kpos = tl.load(KPOS_ROW + offs_n, mask=k_ok, other=0)
        is_neighbor = (qpos[:, None] - kpos[None, :]) < WINDOW
        qk = tl.where(is_neighbor, tl.dot(q, k, input_precision="ieee"),
                      tl.dot(qg, kg, input_precision="ieee"))
    if COUNT_TILES:
        tl.atomic_add(TILES + KIND, 1)
    qk = qk * qk_scale
    n_ok = tl.reduce(k_ok.to(tl.int32), 0, _add)
    if (start_n + BLOCK_N > causal_lim) | (n_ok < BLOCK_N):  # crosses the diagonal, the end or padding
        allowed = k_ok[None, :] & (offs_n[None, :] <= (Q_START + qi)[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no inf - inf
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    v = tl.load(v_tile + offs_t[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=k_ok[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _selfextend_fwd(
    Q, K, V, QG, KG, QPOS, KPOS, KVALID, KFIRST, OUT, LSE, TILES,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_vb, s_vh,
    s_gqb, s_gqh, s_gqm, s_gqd,
    s_gkb, s_gkh,
    s_ob, s_oh, s_om, s_od,
    M, N, Q_START, WINDOW, qk_scale, n_splits,
    HKV: tl.constexpr, REP: tl.constexpr, HAS_PAD: tl.constexpr, SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    R = M * REP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows // REP  # query index
    hq = (hk * REP + rows % REP).to(tl.int64)  # query head
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    KPOS_ROW = KPOS + b64 * N
    KVALID_ROW = KVALID + b64 * N

    qpos = tl.load(QPOS + b64 * M + qi, mask=row_ok, other=0)
    q_ok = row_ok
    if HAS_PAD:
        q_ok = row_ok & (tl.load(KVALID_ROW + Q_START + qi, mask=row_ok, other=0) != 0)
    qmin = tl.reduce(tl.where(q_ok, qpos, _BIG), 0, _min)
    qmax = tl.reduce(tl.where(q_ok, qpos, -_BIG), 0, _max)

    # keys this tile can see: causal bound from its last query, padding bound from the row's first key
    i_lo = (pid_m * BLOCK_M) // REP
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // REP, M - 1)
    causal_lim = Q_START + i_lo + 1  # key tiles ending past this cross the diagonal of some row
    hi = tl.minimum(N, Q_START + i_hi + 1)
    first = 0
    if HAS_PAD:
        first = tl.load(KFIRST + b)
    lo = (first // BLOCK_N) * BLOCK_N
    hi = tl.where(qmin <= qmax, hi, lo)  # no real query in this tile: nothing to do
    if SPLIT:
        n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
        per = (n_tiles + n_splits - 1) // n_splits
        start = lo + pid_s * per * BLOCK_N
        end = tl.minimum(hi, start + per * BLOCK_N)
    else:
        start = lo
        end = hi
    end = tl.maximum(end, start)

    # phase limits: real key j has position p0 + (j - first), so key j is grouped for every row of the
    # tile iff j <= first + qmin - W - p0, and a neighbor for every row iff j > first + qmax - W - p0
    p0 = tl.load(KPOS_ROW + tl.minimum(first, N - 1))
    g_idx = tl.minimum(tl.maximum(first + (qmin - WINDOW - p0) + 1, start), end)
    g_hi = tl.where(g_idx >= end, end, start + ((g_idx - start) // BLOCK_N) * BLOCK_N)
    n_idx = first + (qmax - WINDOW - p0) + 1
    n_idx = tl.where(n_idx <= first, start, n_idx)  # every real key is a neighbor: padding needs no q_g
    n_idx = tl.minimum(tl.maximum(n_idx, g_hi), end)
    n_lo = tl.minimum(g_hi + ((n_idx - g_hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_V], 0.0, tl.float32)
    k_base = K + b64 * s_kb + hk * s_kh
    kg_base = KG + b64 * s_gkb + hk * s_gkh
    v_base = V + b64 * s_vb + hk * s_vh

    qg_rows = b64 * s_gqb + hq * s_gqh + qi64 * s_gqm
    qg = tl.load(QG + qg_rows[:, None] + offs_d[None, :] * s_gqd, mask=row_ok[:, None], other=0.0)
    for start_n in range(start, g_hi, BLOCK_N):  # grouped-only tiles: q is not needed yet
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, qg, qg, qpos, qi, k_base, kg_base + tl.cast(start_n, tl.int64) * HEAD_DIM,
            v_base + tl.cast(start_n, tl.int64) * HEAD_DIM_V, KPOS_ROW, KVALID_ROW, start_n, end, causal_lim,
            Q_START, WINDOW, qk_scale, TILES,
            _GROUPED, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES,
        )
    q_rows = b64 * s_qb + hq * s_qh + qi64 * s_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    for start_n in range(g_hi, n_lo, BLOCK_N):  # boundary tiles
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, qg, qpos, qi, k_base + tl.cast(start_n, tl.int64) * HEAD_DIM,
            kg_base + tl.cast(start_n, tl.int64) * HEAD_DIM, v_base + tl.cast(start_n, tl.int64) * HEAD_DIM_V,
            KPOS_ROW, KVALID_ROW, start_n, end, causal_lim,
            Q_START, WINDOW, qk_scale, TILES,
            _BOUNDARY, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES,
        )
    for start_n in range(n_lo, end, BLOCK_N):  # neighbor-only tiles: q_g is dead
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q, qpos, qi, k_base + tl.cast(start_n, tl.int64) * HEAD_DIM, kg_base,
            v_base + tl.cast(start_n, tl.int64) * HEAD_DIM_V, KPOS_ROW, KVALID_ROW, start_n, end, causal_lim,
            Q_START, WINDOW, qk_scale, TILES,
            _NEIGHBOR, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES,
        )

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out = tl.where(q_ok[:, None], out, 0.0)  # padding queries get zeros, like the reference
    lse = tl.where(q_ok, lse, float("-inf"))
    if SPLIT:  # fp32 partials (S, B*HKV, R, DV) and (S, B*HKV, R), merged by _combine
        part = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * R + rows
        tl.store(OUT + part[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=row_ok[:, None])
        tl.store(LSE + part, lse, mask=row_ok)
    else:
        o_rows = b64 * s_ob + hq * s_oh + qi64 * s_om
        tl.store(OUT + o_rows[:, None] + offs_dv[None, :] * s_od, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + (b64 * (HKV * REP) + hq) * M + qi, lse, mask=row_ok)


INTERPRET = type(_selfextend_fwd).__name__ == "InterpretedFunction"  # built under TRITON_INTERPRET=1

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim. Not timed on a GPU (none was available when this
# was written): chosen as the largest tiles that compile for sm_90 without register spills (ptxas -v from
# the triton wheel, bf16/fp16). Tune with a GPU before trusting them.
_PREFILL_CONFIG = {64: (128, 64, 8, 2), 128: (64, 32, 4, 2), 256: (64, 32, 8, 3)}
_DECODE_CONFIG = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 8, 3)}  # (BLOCK_N, num_warps, num_stages)
_DECODE_MAX_QUERIES = 16  # at most this many queries per row: split the keys instead of the queries


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, enough to exercise the combine


def _combine(part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partials by log-sum-exp: (S, ..., R, DV), (S, ..., R) -> (..., R, DV), (..., R)."""
    lse = torch.logsumexp(part_lse, dim=0)
    weight = torch.exp(part_lse - lse).nan_to_num(0.0)  # splits with no key (lse = -inf) weigh 0
    return (part * weight[..., None]).sum(dim=0), lse


def selfextend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qg: torch.Tensor,
    kg: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    q_start: int,
    window: int,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tile_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused kernel; see ``SelfExtendInputs`` for the meaning of the arguments.

    Args:
        q, qg: (B, H, M, D), any strides; k, kg: (B, Hkv, N, D); v: (B, Hkv, N, Dv). K, K_g and V are
            copied if their rows are not contiguous (the kernel hard-codes the row stride).
        key_valid: (B, N) bool or None; each row's real keys must be one contiguous block.
        block_m, block_n, num_splits: override the launch heuristics (tests use small tiles).
        tile_counts: optional int32 tensor of 3, incremented with the number of (neighbor-only,
            grouped-only, boundary) key tiles visited: lets tests check what work is skipped.

    Returns:
        ``out`` (B, H, M, Dv) in q's dtype and ``lse`` (B, H, M) fp32 (natural log; ``-inf`` for padding).
    """
    bsz, heads, m, dim = q.shape
    kv_heads, n, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of KV heads {kv_heads}")
    rep = heads // kv_heads
    k, kg, v = (t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()
                for t in (k, kg, v))
    rows = m * rep
    device = q.device
    qpos = query_pos.to(device=device, dtype=torch.int32).expand(bsz, m).contiguous()
    kpos = key_pos.to(device=device, dtype=torch.int32).expand(bsz, n).contiguous()
    has_pad = key_valid is not None
    if has_pad:
        valid = key_valid.to(device=device, dtype=torch.int8).contiguous()
        idx = torch.arange(n, device=device, dtype=torch.int32)
        first = torch.where(key_valid.to(device), idx, n).amin(dim=1).to(torch.int32).contiguous()
    else:
        valid, first = kpos, kpos  # unused placeholders

    decode = m <= _DECODE_MAX_QUERIES
    if decode:
        bm = block_m or min(64, max(16, _next_pow2(rows)))
        cfg_n, warps, stages = _DECODE_CONFIG.get(dim, (32, 4, 2))
        bn = block_n or cfg_n
        warps, stages = num_warps or warps, num_stages or stages
    else:
        cfg_m, cfg_n, warps, stages = _PREFILL_CONFIG.get(dim, (64, 32, 4, 2))
        bm, bn = block_m or cfg_m, block_n or cfg_n
        warps, stages = num_warps or warps, num_stages or stages
    row_tiles = triton.cdiv(rows, bm)
    programs = row_tiles * bsz * kv_heads
    if num_splits is None:
        num_splits = 1
        if decode:
            num_splits = max(1, min(64, triton.cdiv(2 * _num_sms(device), programs), triton.cdiv(n, 4 * bn)))
    split = num_splits > 1

    lse = torch.empty(bsz, heads, m, device=device, dtype=torch.float32)
    if split:
        out_buf = torch.empty(num_splits, bsz * kv_heads, rows, dim_v, device=device, dtype=torch.float32)
        lse_buf = torch.empty(num_splits, bsz * kv_heads, rows, device=device, dtype=torch.float32)
        o_strides = (0, 0, 0, 0)
    else:
        out_buf = torch.empty(bsz, heads, m, dim_v, device=device, dtype=q.dtype)
        lse_buf = lse
        o_strides = out_buf.stride()
    grid = (row_tiles, bsz * kv_heads, num_splits)
    _selfextend_fwd[grid](
        q, k, v, qg, kg, qpos, kpos, valid, first, out_buf, lse_buf,
        tile_counts if tile_counts is not None else qpos,
        *q.stride(), *k.stride()[:2], *v.stride()[:2], *qg.stride(), *kg.stride()[:2], *o_strides,
        m, n, q_start, window, scale * 1.4426950408889634, num_splits,
        HKV=kv_heads, REP=rep, HAS_PAD=has_pad, SPLIT=split, HEAD_DIM=dim, HEAD_DIM_V=dim_v,
        BLOCK_M=bm, BLOCK_N=bn, COUNT_TILES=tile_counts is not None, num_warps=warps, num_stages=stages,
    )
    if not split:
        return out_buf, lse
    out, lse_rows = _combine(out_buf, lse_buf)  # (B*Hkv, R, Dv): row r = query r // rep, head r % rep
    out = out.view(bsz, kv_heads, m, rep, dim_v).transpose(2, 3).reshape(bsz, heads, m, dim_v)
    lse = lse_rows.view(bsz, kv_heads, m, rep).transpose(2, 3).reshape(bsz, heads, m)
    return out.to(q.dtype), lse
