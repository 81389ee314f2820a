"""Dual Chunk Attention backends: a dense oracle and a memory-linear blockwise backend.

Both receive q and k rotated at their true positions (for queries below ``exact_below``: plain RoPE),
the keys rotated at ``j mod cl`` (``chunk_key``) and the query rotated three ways (intra, successive,
inter; temperature already folded in), and compute one softmax over the union of the three disjoint key
sets, causal, padding excluded. Padding queries get zeros. See ``dca_positions`` for the maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .base import Backend
from .cpu import _query_range, _valid_ranges
from .merge import merge_lse
from .primitives import attention_with_lse

logger = logging.getLogger("selfextend")

_CHUNK_ELEMENTS = 1 << 23


@dataclass
class DCAInputs:
    query: torch.Tensor  # (B, H, q_len, D) rotated at query_pos
    key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at key_pos
    value: torch.Tensor  # (B, Hkv, kv_len, Dv)
    chunk_key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at key_pos mod chunk_len
    query_intra: torch.Tensor  # (B, H, q_len, D) rotated at i mod cl (times the temperature)
    query_succ: torch.Tensor  # rotated at min(i mod cl + cl, cs)
    query_inter: torch.Tensor  # rotated at cs
    query_pos: torch.Tensor  # (B, q_len) long
    key_pos: torch.Tensor  # (B, kv_len) long (0 at padding)
    key_valid: torch.Tensor | None  # (B, kv_len) bool, None = no padding
    q_start: int  # index in the key tensor of query 0
    chunk_size: int
    local_window: int
    exact_below: int  # queries at positions below it attend with plain RoPE
    scaling: float
    softcap: float | None = None

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[2]


class DCAReferenceBackend(Backend):
    """Exact DCA, deliberately plain: per query chunk, four score matrices in fp32 picked per (i, j) from the
    *positions*, one softmax. O(chunk x kv_len) memory; any padding layout."""

    name = "dca-reference"

    def forward(self, inp: DCAInputs) -> torch.Tensor:
        q = inp.query
        bsz, heads, q_len, dim = q.shape
        kv_heads, kv_len = inp.key.shape[1], inp.key.shape[2]
        rep = heads // kv_heads
        kf, ckf, vf = (t.to(torch.float32)[:, :, None] for t in (inp.key, inp.chunk_key, inp.value))

        def grouped(t):  # (B, H, T, D) -> (B, Hkv, rep, T, D)
            return t.reshape(bsz, kv_heads, rep, q_len, dim)

        qs = [grouped(t) for t in (q, inp.query_intra, inp.query_succ, inp.query_inter)]
        cl = inp.chunk_len
        key_chunk = torch.div(inp.key_pos, cl, rounding_mode="floor")[:, None, :]  # (B, 1, Tk)
        key_idx = torch.arange(kv_len, device=q.device)
        out = torch.empty(bsz, heads, q_len, inp.value.shape[-1], dtype=q.dtype, device=q.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, kv_len * heads * bsz))
        for s in range(0, q_len, chunk):
            e = min(q_len, s + chunk)
            plain, intra, succ, inter = (
                torch.matmul(t[:, :, :, s:e].to(torch.float32), kk.transpose(-1, -2))
                for t, kk in zip(qs, (kf, ckf, ckf, ckf), strict=True)
            )
            qp = inp.query_pos[:, s:e, None]  # (B, t, 1)
            qc = torch.div(qp, cl, rounding_mode="floor")
            part = torch.where(key_chunk == qc, 1, torch.where(key_chunk == qc - 1, 2, 3))
            part = torch.where(qp < inp.exact_below, 0, part)[:, None, None]  # (B, 1, 1, t, Tk)
            scores = torch.where(part == 0, plain, torch.where(part == 1, intra, torch.where(part == 2, succ, inter)))
            scores = scores * inp.scaling
            if inp.softcap is not None:
                scores = torch.tanh(scores / inp.softcap) * inp.softcap
            q_idx = inp.q_start + torch.arange(s, e, device=q.device)
            allowed = (key_idx[None, :] <= q_idx[:, None])[None]
            if inp.key_valid is not None:
                allowed = allowed & inp.key_valid[:, None, :] & inp.key_valid[:, q_idx, None]
            scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[:, :, s:e] = torch.matmul(probs, vf).reshape(bsz, heads, e - s, -1).to(q.dtype)
        return out


def _causal_tail(q, k, v, scale, softcap):
    """Queries are the last ``Tq`` of ``Tk`` keys (bottom-right causal), on unmasked/causal kernel calls."""
    m, n = q.shape[2], k.shape[2]
    if m == n:
        return attention_with_lse(q, k, v, scale, causal=True, softcap=softcap)
    if m == 1:
        return attention_with_lse(q, k, v, scale, softcap=softcap)
    p = n - m
    o1, l1 = attention_with_lse(q, k[:, :, :p], v[:, :, :p], scale, softcap=softcap)
    o2, l2 = attention_with_lse(q, k[:, :, p:], v[:, :, p:], scale, causal=True, softcap=softcap)
    return merge_lse(o1, l1, o2, l2)


class DCABlockwiseBackend(Backend):
    """Exact and memory-linear: per chunk of queries, three kernel calls (intra causal, successive and inter
    unmasked) merged by log-sum-exp; queries below ``exact_below`` take one plain causal pass. Total work is
    about one causal attention pass; no (L x L) tensor exists."""

    name = "dca-cpu"

    def supports(self, inp: DCAInputs) -> str | None:
        if _valid_ranges(inp) is None:
            return "padding is not one contiguous block per row"
        return None

    def forward(self, inp: DCAInputs) -> torch.Tensor:
        ranges = _valid_ranges(inp)
        if ranges is None:
            raise ValueError(f"backend 'cpu' cannot run this input: {self.supports(inp)}; use backend='reference'")
        bsz, heads, q_len, _ = inp.query.shape
        if inp.key_valid is None:
            first, last = ranges[0]
            start = inp.key_pos[:, first]
            if bool((start == start[0]).all()):  # one chunk layout for the whole batch
                return self._unpadded(inp, slice(None), first, last, int(start[0]))
        out = inp.query.new_zeros(bsz, heads, q_len, inp.value.shape[-1])
        for b, (first, last) in enumerate(ranges):
            q_first, q_last = _query_range(inp, first, last)
            if last < first or q_last < q_first:  # no real query in this row
                continue
            p0 = int(inp.key_pos[b, first])
            out[b : b + 1, :, q_first : q_last + 1] = self._unpadded(inp, slice(b, b + 1), first, last, p0)
        return out

    @staticmethod
    def _unpadded(inp: DCAInputs, rows: slice, first: int, last: int, p0: int) -> torch.Tensor:
        """DCA for rows whose real keys are ``[first, last]`` at positions ``p0, p0 + 1, ...``."""
        q_first, q_last = _query_range(inp, first, last)
        sl_q, sl_k = slice(q_first, q_last + 1), slice(first, last + 1)
        q = inp.query[rows, :, sl_q]
        k, ck, v = inp.key[rows, :, sl_k], inp.chunk_key[rows, :, sl_k], inp.value[rows, :, sl_k]
        scale, softcap, cl = inp.scaling, inp.softcap, inp.chunk_len
        m, n = q.shape[2], k.shape[2]
        off = n - m  # query r is key r + off, at position p0 + off + r
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)

        r = min(m, max(0, inp.exact_below - p0 - off))  # rows [0, r) are plain RoPE
        if r > 0:
            out[:, :, :r] = _causal_tail(q[:, :, :r], k[:, :, : off + r], v[:, :, : off + r], scale, softcap)[0]
        qi, qs, qn = (t[rows, :, sl_q] for t in (inp.query_intra, inp.query_succ, inp.query_inter))
        while r < m:
            c = (p0 + off + r) // cl  # chunk of query r
            end = min(m, (c + 1) * cl - p0 - off)  # rows [r, end) share chunk c
            ks = max(0, c * cl - p0)  # first key of chunk c
            ps = max(0, (c - 1) * cl - p0)  # first key of chunk c - 1
            o, lse = _causal_tail(qi[:, :, r:end], ck[:, :, ks : off + end], v[:, :, ks : off + end], scale, softcap)
            if ks > ps:
                o2, l2 = attention_with_lse(qs[:, :, r:end], ck[:, :, ps:ks], v[:, :, ps:ks], scale, softcap=softcap)
                o, lse = merge_lse(o, lse, o2, l2)
            if ps > 0:
                o2, l2 = attention_with_lse(qn[:, :, r:end], ck[:, :, :ps], v[:, :, :ps], scale, softcap=softcap)
                o, lse = merge_lse(o, lse, o2, l2)
            out[:, :, r:end] = o.to(out.dtype)
            r = end
        return out


DCA_BACKENDS: dict[str, Backend] = {"reference": DCAReferenceBackend(), "cpu": DCABlockwiseBackend()}
AUTO_ORDER = ("cpu", "reference")


def check_dca_backend(name: str) -> str:
    if name != "auto" and name not in DCA_BACKENDS:
        raise ValueError(f"unknown DCA backend {name!r}; available: auto, {', '.join(sorted(DCA_BACKENDS))}.")
    return name


def select_dca_backend(name: str, inputs: DCAInputs) -> Backend:
    """The backend to run ``inputs``. A named backend that cannot run them raises; only ``auto`` falls back."""
    check_dca_backend(name)
    if name != "auto":
        backend = DCA_BACKENDS[name]
        reason = backend.supports(inputs)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this input: {reason}. Use backend='reference' or 'auto'.")
        return backend
    for candidate in AUTO_ORDER:
        backend = DCA_BACKENDS[candidate]
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        logger.info("selfextend: DCA backend %r skipped: %s", candidate, reason)
    return DCA_BACKENDS["reference"]
