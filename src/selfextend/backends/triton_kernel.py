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
  separate programs, each writing an fp32 partial output and its log-sum-exp; ``combine`` merges them
  by LSE.

The loop around the tiles (GQA rows, split range, tile-class bounds, online softmax, epilogue, launch
heuristics) is ``triton_common.py``, shared with the paged kernel; this module scores a tile.

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

from .triton_common import (
    BIG,
    BOUNDARY,
    GROUPED,
    INTERPRET,
    NEIGHBOR,
    TileConfigs,
    add_fn,
    class_bounds,
    combine,
    max_fn,
    min_fn,
    packed_rows,
    program_ids,
    softmax_finish,
    softmax_init,
    softmax_step,
    split_range,
    store_partials,
    tile_loop,
)

__all__ = ["INTERPRET", "LAUNCH", "selfextend_attention"]


@triton.jit
def _attend_tile(
    acc, m_i, l_i, start_n, q, qg, qpos, k_last, K_BASE, KG_BASE, V_BASE, KPOS_ROW, KVALID_ROW, end,
    causal_lim, WINDOW, qk_scale, TILES,
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
    tile = tl.cast(start_n, tl.int64)
    k_tile = K_BASE + tile * HEAD_DIM
    kg_tile = KG_BASE + tile * HEAD_DIM
    k_ok = offs_n < end
    if HAS_PAD:
        k_ok = k_ok & (tl.load(KVALID_ROW + offs_n, mask=k_ok, other=0) != 0)
    if KIND == NEIGHBOR:
        k = tl.load(k_tile + offs_t[None, :] * HEAD_DIM + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision="ieee")
    elif KIND == GROUPED:
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
    n_ok = tl.reduce(k_ok.to(tl.int32), 0, add_fn)
    masked = (start_n + BLOCK_N > causal_lim) | (n_ok < BLOCK_N)  # crosses the diagonal, the end or padding
    v_ptrs = V_BASE + tile * HEAD_DIM_V + offs_t[:, None] * HEAD_DIM_V + offs_dv[None, :]
    return softmax_step(acc, m_i, l_i, qk, qk_scale, masked, k_ok, offs_n, k_last, v_ptrs)


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
    pid_m, b, hk, pid_s = program_ids(HKV)
    b64 = b.to(tl.int64)
    rows, row_ok, qi, hq, i_lo, i_hi = packed_rows(pid_m, hk, M, REP, BLOCK_M)
    hq = hq.to(tl.int64)
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    KPOS_ROW = KPOS + b64 * N
    KVALID_ROW = KVALID + b64 * N

    qpos = tl.load(QPOS + b64 * M + qi, mask=row_ok, other=0)
    q_ok = row_ok
    if HAS_PAD:
        q_ok = row_ok & (tl.load(KVALID_ROW + Q_START + qi, mask=row_ok, other=0) != 0)
    qmin = tl.reduce(tl.where(q_ok, qpos, BIG), 0, min_fn)
    qmax = tl.reduce(tl.where(q_ok, qpos, -BIG), 0, max_fn)

    # keys this tile can see: causal bound from its last query, padding bound from the row's first key
    causal_lim = Q_START + i_lo + 1  # key tiles ending past this cross the diagonal of some row
    hi = tl.minimum(N, Q_START + i_hi + 1)
    first = 0
    if HAS_PAD:
        first = tl.load(KFIRST + b)
    lo = (first // BLOCK_N) * BLOCK_N
    hi = tl.where(qmin <= qmax, hi, lo)  # no real query in this tile: nothing to do
    start, end = split_range(lo, hi, pid_s, n_splits, SPLIT, BLOCK_N)
    # real key j has position p0 + (j - first)
    p0 = tl.load(KPOS_ROW + tl.minimum(first, N - 1))
    g_hi, n_lo = class_bounds(qmin, qmax, first, p0, start, end, WINDOW, BLOCK_N)

    acc, m_i, l_i = softmax_init(BLOCK_M, HEAD_DIM_V)
    k_base = K + b64 * s_kb + hk * s_kh
    kg_base = KG + b64 * s_gkb + hk * s_gkh
    v_base = V + b64 * s_vb + hk * s_vh
    k_last = Q_START + qi  # causality by index: row i sees keys j <= q_start + i

    qg_rows = b64 * s_gqb + hq * s_gqh + qi64 * s_gqm
    qg = tl.load(QG + qg_rows[:, None] + offs_d[None, :] * s_gqd, mask=row_ok[:, None], other=0.0)
    acc, m_i, l_i = tile_loop(  # grouped-only tiles: q is not needed yet
        _attend_tile, start, g_hi, acc, m_i, l_i,
        (qg, qg, qpos, k_last, k_base, kg_base, v_base, KPOS_ROW, KVALID_ROW, end, causal_lim, WINDOW,
         qk_scale, TILES, GROUPED, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES), BLOCK_N)
    q_rows = b64 * s_qb + hq * s_qh + qi64 * s_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    acc, m_i, l_i = tile_loop(  # boundary tiles
        _attend_tile, g_hi, n_lo, acc, m_i, l_i,
        (q, qg, qpos, k_last, k_base, kg_base, v_base, KPOS_ROW, KVALID_ROW, end, causal_lim, WINDOW,
         qk_scale, TILES, BOUNDARY, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES), BLOCK_N)
    acc, m_i, l_i = tile_loop(  # neighbor-only tiles: q_g is dead
        _attend_tile, n_lo, end, acc, m_i, l_i,
        (q, q, qpos, k_last, k_base, kg_base, v_base, KPOS_ROW, KVALID_ROW, end, causal_lim, WINDOW,
         qk_scale, TILES, NEIGHBOR, HAS_PAD, HEAD_DIM, HEAD_DIM_V, BLOCK_N, COUNT_TILES), BLOCK_N)

    out, lse = softmax_finish(acc, m_i, l_i)
    out = tl.where(q_ok[:, None], out, 0.0)  # padding queries get zeros, like the reference
    lse = tl.where(q_ok, lse, float("-inf"))
    if SPLIT:  # fp32 partials (S, B*HKV, R, DV) and (S, B*HKV, R)
        part = (pid_s * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (M * REP) + rows
        store_partials(OUT, LSE, part, out, lse, row_ok, HEAD_DIM_V)
    else:
        o_rows = b64 * s_ob + hq * s_oh + qi64 * s_om
        tl.store(OUT + o_rows[:, None] + offs_dv[None, :] * s_od, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + (b64 * (HKV * REP) + hq) * M + qi, lse, mask=row_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim for prefill, (BLOCK_N, num_warps, num_stages) for
# decode. Untimed on a GPU: the largest tiles that compile for sm_90 without register spills (ptxas -v from
# the triton wheel, bf16/fp16), to be tuned by measurement on a GPU before they are trusted.
LAUNCH = TileConfigs(
    prefill={64: (128, 64, 8, 2), 128: (64, 32, 4, 2), 256: (64, 32, 8, 3)},
    decode={64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 8, 3)},
    prefill_default=(64, 32, 4, 2),
    decode_default=(32, 4, 2),
)


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
    tile_counts: torch.Tensor | None = None,
    **launch: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused kernel; see ``SelfExtendInputs`` for the meaning of the arguments.

    Args:
        q, qg: (B, H, M, D), any strides; k, kg: (B, Hkv, N, D); v: (B, Hkv, N, Dv). K, K_g and V are
            copied if their rows are not contiguous (the kernel hard-codes the row stride).
        key_valid: (B, N) bool or None; each row's real keys must be one contiguous block.
        tile_counts: optional int32 tensor of 3, incremented with the number of (neighbor-only,
            grouped-only, boundary) key tiles visited: lets tests check what work is skipped.
        launch: ``block_m``, ``block_n``, ``num_splits``, ``num_warps``, ``num_stages`` instead of the
            heuristics' (``TileConfigs.plan``; tests use small tiles).

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

    plan = LAUNCH.plan(dim, m, rep, n, bsz * kv_heads, device, **launch)
    num_splits = plan.num_splits
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
    grid = (plan.row_tiles, bsz * kv_heads, num_splits)
    _selfextend_fwd[grid](
        q, k, v, qg, kg, qpos, kpos, valid, first, out_buf, lse_buf,
        tile_counts if tile_counts is not None else qpos,
        *q.stride(), *k.stride()[:2], *v.stride()[:2], *qg.stride(), *kg.stride()[:2], *o_strides,
        m, n, q_start, window, scale * 1.4426950408889634, num_splits,
        HKV=kv_heads, REP=rep, HAS_PAD=has_pad, SPLIT=split, HEAD_DIM=dim, HEAD_DIM_V=dim_v,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, COUNT_TILES=tile_counts is not None,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if not split:
        return out_buf, lse
    out, lse_rows = combine(out_buf, lse_buf)  # (B*Hkv, R, Dv): row r = query r // rep, head r % rep
    out = out.view(bsz, kv_heads, m, rep, dim_v).transpose(2, 3).reshape(bsz, heads, m, dim_v)
    lse = lse_rows.view(bsz, kv_heads, m, rep).transpose(2, 3).reshape(bsz, heads, m)
    return out.to(q.dtype), lse
