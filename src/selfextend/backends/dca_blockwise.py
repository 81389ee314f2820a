"""Memory-linear Dual Chunk Attention: the composed backend's DCA form (``composed.py`` dispatches here).

It receives q and k rotated at their true positions (for queries below ``exact_below``: plain RoPE), the
keys rotated at ``j mod cl`` (``chunk_key``) and the query rotated three ways (intra, successive, inter;
temperature already folded in), and computes one softmax over the union of the three disjoint key sets,
causal, padding excluded: per chunk of queries, three kernel calls (intra causal, successive and inter
unmasked) merged by log-sum-exp; queries below ``exact_below`` take one plain causal pass. Total work is about
one causal attention pass; no (L x L) tensor exists. See ``positions.py`` for the maps.
"""

from __future__ import annotations

import torch

from .base import DCAInputs, query_range
from .merge import merge_lse


def dca_unpadded(inp: DCAInputs, rows: slice, first: int, last: int, ops) -> torch.Tensor:
    """DCA for rows whose real keys are ``[first, last]`` at positions ``p0, p0 + 1, ...``, on the device's
    ``lse_ops``."""
    q_first, q_last = query_range(inp, first, last)
    p0 = int(inp.key_pos[rows][0, first])
    sl_q, sl_k = slice(q_first, q_last + 1), slice(first, last + 1)
    q = inp.query[rows, :, sl_q]
    k, ck, v = inp.key[rows, :, sl_k], inp.chunk_key[rows, :, sl_k], inp.value[rows, :, sl_k]
    scale, softcap, cl = inp.scaling, inp.softcap, inp.chunk_len
    m, n = q.shape[2], k.shape[2]
    off = n - m  # query r is key r + off, at position p0 + off + r
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)

    r = min(m, max(0, inp.exact_below - p0 - off))  # rows [0, r) are plain RoPE
    if r > 0:
        out[:, :, :r] = ops.causal(q[:, :, :r], k[:, :, : off + r], v[:, :, : off + r], scale, softcap)[0]
    qi, qs, qn = (t[rows, :, sl_q] for t in (inp.query_intra, inp.query_succ, inp.query_inter))
    while r < m:
        c = (p0 + off + r) // cl  # chunk of query r
        end = min(m, (c + 1) * cl - p0 - off)  # rows [r, end) share chunk c
        ks = max(0, c * cl - p0)  # first key of chunk c
        ps = max(0, (c - 1) * cl - p0)  # first key of chunk c - 1
        o, lse = ops.causal(qi[:, :, r:end], ck[:, :, ks : off + end], v[:, :, ks : off + end], scale,
                            softcap)
        if ks > ps:
            o2, l2 = ops.full(qs[:, :, r:end], ck[:, :, ps:ks], v[:, :, ps:ks], scale, softcap)
            o, lse = merge_lse(o, lse, o2, l2)
        if ps > 0:
            o2, l2 = ops.full(qn[:, :, r:end], ck[:, :, :ps], v[:, :, :ps], scale, softcap)
            o, lse = merge_lse(o, lse, o2, l2)
        out[:, :, r:end] = o.to(out.dtype)
        r = end
    return out
