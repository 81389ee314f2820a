"""SelfExtend over a paged KV cache in Triton: keys read through the block table, grouped keys rotated in
the kernel (imported only when triton is; the vLLM plugin's GPU backend calls it).

A serving engine keeps each key once, rotated at its true position, in fixed-size blocks that requests
share (prefix caching) and that chunked prefill, preemption and recompute rewrite freely. ``triton_kernel``
needs each request's keys contiguous plus a second, grouped copy; here neither copy exists:

* **Paged reads.** Key ``j`` of request ``r`` lives in block ``block_table[r, j // PAGE]``, slot
  ``j % PAGE``; a key tile loads its block ids, then K and V rows through them (any cache strides, so
  vLLM's interleaved K/V layout is read in place).
* **Grouped keys rotated per tile.** A grouped key is the cached key rotated by ``delta(j) = j // G - j``.
  Grouped-only and boundary tiles load the fp32 ``cos``/``sin`` rows of ``delta(j)`` from a table that
  depends on positions only (one per engine, shared by every layer; angles computed in fp64, the same rows
  the gather path uses, so the two paths agree to rounding). The rotation is rotate-half: the tile is
  loaded as its two halves, ``k1 c - k2 s`` and ``k2 c + k1 s``, rounded to the cache dtype as a stored
  grouped key would be, and ``q . k`` is the sum of two half-width products.
* **Everything else is ``triton_kernel``'s, from ``triton_common``:** GQA-packed rows, three tile loops by
  class (grouped-only, boundary, neighbor-only) found from positions, one online softmax over both scores,
  causal and length masks only on the tiles that need them, split-KV decode merged by log-sum-exp.

Requests are packed varlen (``query_start_loc``); request ``r``'s ``q_len`` queries are its last tokens, so
query ``i`` has position ``seq_len - q_len + i`` and key ``j`` position ``j``: prefill, chunked prefill,
decode and prefix-cache hits are the same case. Grouped queries (one per query token, cheap) arrive rotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    BOUNDARY,
    GROUPED,
    NEIGHBOR,
    TileConfigs,
    class_bounds,
    combine,
    packed_rows,
    program_ids,
    softmax_finish,
    softmax_init,
    softmax_step,
    split_range,
    store_partials,
    tile_loop,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim for prefill, (BLOCK_N, num_warps, num_stages) for
# decode: the largest tiles that compile for sm_90 (bf16) without register spills (ptxas -v from the triton
# wheel; a grouped tile also holds its fp32 cos/sin rows, so key tiles are smaller than ``triton_kernel``'s).
# Not yet timed on a GPU.
LAUNCH = TileConfigs(prefill={64: (64, 32, 4, 2), 128: (128, 32, 8, 2), 256: (16, 32, 8, 2)},
                     decode={64: (32, 4, 2), 128: (32, 4, 2), 256: (16, 8, 2)})


@triton.jit
def _paged_tile(
    acc, m_i, l_i, start_n, q1, q2, qg1, qg2, qpos, K, V, BT_ROW, COS, SIN, k_head, v_head, end, causal_lim,
    WINDOW, qk_scale, s_kblk, s_kslot, s_vblk, s_vslot,
    KIND: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key tile of the online softmax, its K/V rows found through the block table."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_ok = offs_n < end
    block = tl.load(BT_ROW + offs_n // PAGE, mask=k_ok, other=0).to(tl.int64)
    slot = (offs_n % PAGE).to(tl.int64)
    k_rows = K + k_head + block * s_kblk + slot * s_kslot  # (BLOCK_N,) pointers to each key's row
    k1 = tl.load(k_rows[None, :] + offs_h[:, None], mask=k_ok[None, :], other=0.0)  # (HALF, BLOCK_N)
    k2 = tl.load(k_rows[None, :] + (offs_h[:, None] + HALF), mask=k_ok[None, :], other=0.0)
    if KIND != GROUPED:
        qk_n = tl.dot(q1, k1, input_precision="ieee") + tl.dot(q2, k2, input_precision="ieee")
    if KIND != NEIGHBOR:
        rot = offs_n[None, :] * HALF + offs_h[:, None]
        c = tl.load(COS + rot, mask=k_ok[None, :], other=1.0)
        s = tl.load(SIN + rot, mask=k_ok[None, :], other=0.0)
        k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
        g1 = (k1f * c - k2f * s).to(k1.dtype)
        g2 = (k2f * c + k1f * s).to(k1.dtype)
        qk_g = tl.dot(qg1, g1, input_precision="ieee") + tl.dot(qg2, g2, input_precision="ieee")
    if KIND == NEIGHBOR:
        qk = qk_n
    elif KIND == GROUPED:
        qk = qk_g
    else:
        qk = tl.where((qpos[:, None] - offs_n[None, :]) < WINDOW, qk_n, qk_g)
    masked = (start_n + BLOCK_N > causal_lim) | (start_n + BLOCK_N > end)  # crosses a diagonal or the end
    v_ptrs = (V + v_head + block * s_vblk + slot * s_vslot)[:, None] + offs_dv[None, :]
    return softmax_step(acc, m_i, l_i, qk, qk_scale, masked, k_ok, offs_n, qpos, v_ptrs)


@triton.jit
def _paged_selfextend_fwd(
    Q, QG, K, V, BT, SEQ, QSL, COS, SIN, OUT, LSE,
    s_qt, s_qh, s_gqt, s_gqh, s_ot, s_oh,
    s_kblk, s_kh, s_kslot, s_vblk, s_vh, s_vslot, s_bt,
    n_rows, WINDOW, qk_scale, n_splits,
    HKV: tl.constexpr, REP: tl.constexpr, SPLIT: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, r, hk, pid_s = program_ids(HKV)
    q0 = tl.load(QSL + r)
    q_len = tl.load(QSL + r + 1) - q0
    ctx = tl.load(SEQ + r) - q_len  # tokens before this step's queries (cached or earlier chunks)

    rows, row_ok, qi, hq, i_lo, i_hi = packed_rows(pid_m, hk, q_len, REP, BLOCK_M)
    qpos = ctx + qi  # key j sits at position j: row i sees keys j <= qpos
    tok = (q0 + qi).to(tl.int64)
    qmin = ctx + i_lo
    qmax = ctx + i_hi
    causal_lim = qmin + 1  # key tiles ending past this cross the diagonal of some row
    hi = tl.where(i_lo < q_len, qmax + 1, 0)  # no query of this request in this tile: nothing to do
    start, end = split_range(0, hi, pid_s, n_splits, SPLIT, BLOCK_N)
    g_hi, n_lo = class_bounds(qmin, qmax, 0, 0, start, end, WINDOW, BLOCK_N)

    offs_h = tl.arange(0, HALF)
    q_rows = Q + tok * s_qt + hq * s_qh
    g_rows = QG + tok * s_gqt + hq * s_gqh
    q1 = tl.load(q_rows[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_rows[:, None] + (offs_h[None, :] + HALF), mask=row_ok[:, None], other=0.0)
    qg1 = tl.load(g_rows[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    qg2 = tl.load(g_rows[:, None] + (offs_h[None, :] + HALF), mask=row_ok[:, None], other=0.0)
    BT_ROW = BT + r.to(tl.int64) * s_bt
    k_head = hk.to(tl.int64) * s_kh
    v_head = hk.to(tl.int64) * s_vh

    acc, m_i, l_i = softmax_init(BLOCK_M, HEAD_DIM_V)
    acc, m_i, l_i = tile_loop(
        _paged_tile, start, g_hi, acc, m_i, l_i,
        (q1, q2, qg1, qg2, qpos, K, V, BT_ROW, COS, SIN, k_head, v_head, end, causal_lim, WINDOW, qk_scale,
         s_kblk, s_kslot, s_vblk, s_vslot, GROUPED, PAGE, HALF, HEAD_DIM_V, BLOCK_N), BLOCK_N)
    acc, m_i, l_i = tile_loop(
        _paged_tile, g_hi, n_lo, acc, m_i, l_i,
        (q1, q2, qg1, qg2, qpos, K, V, BT_ROW, COS, SIN, k_head, v_head, end, causal_lim, WINDOW, qk_scale,
         s_kblk, s_kslot, s_vblk, s_vslot, BOUNDARY, PAGE, HALF, HEAD_DIM_V, BLOCK_N), BLOCK_N)
    acc, m_i, l_i = tile_loop(
        _paged_tile, n_lo, end, acc, m_i, l_i,
        (q1, q2, qg1, qg2, qpos, K, V, BT_ROW, COS, SIN, k_head, v_head, end, causal_lim, WINDOW, qk_scale,
         s_kblk, s_kslot, s_vblk, s_vslot, NEIGHBOR, PAGE, HALF, HEAD_DIM_V, BLOCK_N), BLOCK_N)

    out, lse = softmax_finish(acc, m_i, l_i)
    if SPLIT:  # fp32 partials (S, T * H, Dv) and (S, T * H)
        part = pid_s.to(tl.int64) * n_rows + tok * (HKV * REP) + hq
        store_partials(OUT, LSE, part, out, lse, row_ok, HEAD_DIM_V)
    else:
        o_rows = OUT + tok * s_ot + hq * s_oh
        offs_dv = tl.arange(0, HEAD_DIM_V)
        tl.store(o_rows[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def paged_selfextend_attention(
    query: torch.Tensor,
    grouped_query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    key_cos: torch.Tensor,
    key_sin: torch.Tensor,
    window: int,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    **launch: int | None,
) -> torch.Tensor:
    """SelfExtend attention for a varlen batch of requests whose K/V sit in a paged cache.

    Args:
        query, grouped_query: (T, H, D), the batch's query tokens packed request after request, rotated at
            their true and their grouped positions (``i // G + W - W // G``). Last-dim stride 1.
        key_cache, value_cache: (num_blocks, Hkv, PAGE, D) and (num_blocks, Hkv, PAGE, Dv), any strides but
            the last (1); keys rotated at their true positions.
        block_table: (R, max_blocks) int32 block ids per request; seq_lens: (R,) tokens per request, this
            step's queries included; query_start_loc: (R + 1,) offsets of each request's queries in ``query``.
        key_cos, key_sin: (P, D / 2) fp32, row ``j`` the rotation by ``j // G - j`` (``P >= max seq_len``).
        max_query_len, max_seq_len: host-side bounds (vLLM's metadata has them); read from the tensors if
            omitted, which synchronizes.
        out: (T, H, Dv) to write into (e.g. the engine's output buffer); allocated if None.
        launch: ``block_m``, ``block_n``, ``num_splits``, ``num_warps``, ``num_stages`` instead of the
            heuristics' (``TileConfigs.plan``; tests use small tiles).

    Returns:
        ``out`` (T, H, Dv) in ``query``'s dtype.
    """
    tokens, heads, dim = query.shape
    kv_heads, page, dim_v = key_cache.shape[1], key_cache.shape[2], value_cache.shape[-1]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of KV heads {kv_heads}")
    if dim % 2 or key_cos.shape[-1] != dim // 2:
        raise ValueError(f"cos/sin tables of width {key_cos.shape[-1]} do not rotate head dim {dim} "
                         "(rotate-half over the whole head is the only layout of this kernel)")
    for name, t in (("query", query), ("grouped_query", grouped_query), ("key_cache", key_cache),
                    ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dim (got {t.stride()})")
    rep = heads // kv_heads
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if key_cos.shape[0] < max_seq_len:
        raise ValueError(f"cos/sin tables cover {key_cos.shape[0]} positions; the batch reaches "
                         f"{max_seq_len}")
    requests = query_start_loc.shape[0] - 1
    if seq_lens.shape[0] < requests or block_table.shape[0] < requests:
        raise ValueError(f"{requests} requests in query_start_loc, but seq_lens has {seq_lens.shape[0]} and "
                         f"block_table {block_table.shape[0]} rows")
    key_cos, key_sin = key_cos.contiguous(), key_sin.contiguous()
    seq_lens = seq_lens.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)
    block_table = block_table.to(torch.int32)

    plan = LAUNCH.plan(dim, max_query_len, rep, max_seq_len, requests * kv_heads, query.device, **launch)
    num_splits = plan.num_splits
    split = num_splits > 1
    if out is None:
        out = torch.empty(tokens, heads, dim_v, device=query.device, dtype=query.dtype)
    elif out.stride(-1) != 1 or out.shape != (tokens, heads, dim_v):
        raise ValueError(f"out must be ({tokens}, {heads}, {dim_v}) with a unit last stride, got "
                         f"{tuple(out.shape)} strides {out.stride()}")
    if split:
        out_buf = torch.empty(num_splits, tokens * heads, dim_v, device=query.device, dtype=torch.float32)
        lse_buf = torch.empty(num_splits, tokens * heads, device=query.device, dtype=torch.float32)
    else:
        out_buf, lse_buf = out, seq_lens  # lse unused without splits
    grid = (plan.row_tiles, requests * kv_heads, num_splits)
    _paged_selfextend_fwd[grid](
        query, grouped_query, key_cache, value_cache, block_table, seq_lens, query_start_loc, key_cos,
        key_sin, out_buf, lse_buf,
        *query.stride()[:2], *grouped_query.stride()[:2], *out.stride()[:2],
        *key_cache.stride()[:3], *value_cache.stride()[:3], block_table.stride(0),
        tokens * heads, window, scale * 1.4426950408889634, num_splits,
        HKV=kv_heads, REP=rep, SPLIT=split, PAGE=page, HALF=dim // 2, HEAD_DIM_V=dim_v, BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if split:
        merged, _ = combine(out_buf, lse_buf)  # (T * H, Dv)
        out.copy_(merged.view(tokens, heads, dim_v))
    return out
