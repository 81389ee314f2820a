"""Memory-linear SelfExtend: a neighbor band pass and a grouped causal pass merged by log-sum-exp.

The neighbor keys (distance < W) and grouped keys (distance >= W) of a query are disjoint, so SelfExtend
costs about one causal attention pass, never an L x L matrix:

* neighbor pass: query blocks of ``block_size`` rows against their band of ``W + block`` keys, O(L * W);
* grouped pass: ``grouped_query[W:]`` against ``grouped_key[:L - W]`` with a causal mask, which selects
  exactly the pairs ``i - j >= W`` (bottom-right aligned; split into a full prefix and a causal square
  when there are more keys than queries, as in chunked prefill and decode);
* merge: ``o = o_n * sigmoid(lse_n - lse_g) + o_g * sigmoid(lse_g - lse_n)``; rows with no grouped key
  keep ``o_n``.

Both passes run on ``primitives.attention_with_lse`` (the CPU flash kernel where available). Padding is
handled per row by slicing each row's contiguous run of real tokens, which makes it unpadded; rows whose
padding is not one contiguous block (right padding followed by new tokens) are not supported here and
``backend="auto"`` routes them to the reference backend. The same ``"cpu"`` backend runs DCA
(``dca_blockwise.py``), on the same per-row slicing.
"""

from __future__ import annotations

import torch

from . import BACKENDS
from .base import (
    Backend,
    DCAInputs,
    Inputs,
    SelfExtendInputs,
    contiguous_padding,
    query_range,
    real_key_ranges,
)
from .dca_blockwise import dca_unpadded
from .merge import merge_lse
from .primitives import attention_with_lse, bottom_right_causal

_MERGE_ROWS = 2048


@BACKENDS.register()
class BlockwiseBackend(Backend):
    """The default backend: exact, memory-linear, at the cost of about one causal attention pass.

    SelfExtend here; DCA's blockwise form is ``dca_blockwise.py``. Both run per row on its real tokens."""

    name = "cpu"
    methods = ("self-extend", "dca")

    def __init__(self, block_size: int = 256):  # at 16k, 2 threads: 1.08x SDPA vs 1.11x with 512
        self.block_size = block_size

    def supports(self, inp: Inputs) -> str | None:
        if not contiguous_padding(inp):
            return "padding is not one contiguous block per row"
        return None

    def forward(self, inp: Inputs) -> torch.Tensor:
        unpadded = dca_unpadded if isinstance(inp, DCAInputs) else self._unpadded
        ranges = real_key_ranges(inp)
        if ranges is None:
            raise ValueError(f"backend 'cpu' cannot run this input: {self.supports(inp)}; "
                             "use backend='reference'")
        bsz, heads, q_len, _ = inp.query.shape
        if inp.key_valid is None:
            first, last = ranges[0]
            start = inp.key_pos[:, first]
            if bool((start == start[0]).all()):  # one position layout for the whole batch
                return unpadded(inp, slice(None), first, last)
        out = inp.query.new_zeros(bsz, heads, q_len, inp.value.shape[-1])
        for b, (first, last) in enumerate(ranges):
            q_first, q_last = query_range(inp, first, last)
            if last < first or q_last < q_first:  # no real query in this row
                continue
            out[b : b + 1, :, q_first : q_last + 1] = unpadded(inp, slice(b, b + 1), first, last)
        return out

    def _unpadded(self, inp: SelfExtendInputs, rows: slice, first: int, last: int) -> torch.Tensor:
        """SelfExtend for rows whose real keys are ``[first, last]`` and whose real queries end at
        ``last``."""
        q_first, q_last = query_range(inp, first, last)
        q = inp.query[rows, :, q_first : q_last + 1]
        qg = inp.grouped_query[rows, :, q_first : q_last + 1]
        k = inp.key[rows, :, first : last + 1]
        kg = inp.grouped_key[rows, :, first : last + 1]
        v = inp.value[rows, :, first : last + 1]
        window, scale, softcap = inp.window, inp.scaling, inp.softcap
        n, m = k.shape[2], q.shape[2]
        off = n - m  # query r is key r + off
        if m == 1:  # decode: the last W keys, the grouped rest, one merge (no block loop, no chunked merge)
            ks = max(0, n - window)
            out, lse = attention_with_lse(q, k[:, :, ks:], v[:, :, ks:], scale, softcap=softcap)
            if ks == 0:
                return out
            out_g, lse_g = attention_with_lse(qg, kg[:, :, :ks], v[:, :, :ks], scale, softcap=softcap)
            # merge_lse without its lse output and NaN guard: both passes have keys, so both lse are finite
            w = torch.sigmoid(lse - lse_g).unsqueeze(-1)
            return torch.lerp(out_g.to(torch.float32), out.to(torch.float32), w).to(out.dtype)

        out, lse = self._neighbor_pass(q, k, v, off, window, scale, softcap)

        r0 = max(0, window - off)  # first query with a grouped key
        if r0 < m:
            n_g, m_g = n - window, m - r0
            # grouped query r0 + t sees grouped keys [0, n_g - m_g + t]: bottom-right causal
            out_g, lse_g = bottom_right_causal(qg[:, :, r0:], kg[:, :, :n_g], v[:, :, :n_g], scale, softcap)
            for s in range(0, m_g, _MERGE_ROWS):  # fp32 merge temporaries per chunk of rows
                e = min(m_g, s + _MERGE_ROWS)
                rows_ = slice(r0 + s, r0 + e)
                merged, _ = merge_lse(out[:, :, rows_], lse[:, :, rows_], out_g[:, :, s:e], lse_g[:, :, s:e])
                out[:, :, rows_] = merged.to(out.dtype)
        return out

    def _neighbor_pass(self, q, k, v, off, window, scale, softcap):
        """Band attention ``0 <= t - j < W`` per block of queries, as three unmasked kernel calls.

        For the block of queries at keys ``[t0, t0 + b)`` the band splits into
        * the diagonal square ``[t0, t0 + b)``: causal;
        * the middle ``[t0 - W + b, t0)``: seen by every query of the block, no mask;
        * the left triangle ``[t0 - W + 1, t0 - W + b)``: query r sees column c iff c >= r, i.e. causal
          after reversing both queries and keys, so it also runs on the causal kernel.
        Clipped at key 0. Masked kernel calls cost about twice as much per element, so none are used.
        """
        m = q.shape[2]
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for rs in range(0, m, self.block_size):
            re = min(m, rs + self.block_size)
            o, lse_blk = self._band_block(q[:, :, rs:re], k, v, off + rs, window, scale, softcap)
            out[:, :, rs:re], lse[:, :, rs:re] = o, lse_blk
        return out, lse

    @staticmethod
    def _band_block(q, k, v, t0, window, scale, softcap):
        b = q.shape[2]
        if b == 1:  # decode: the last W keys, no mask
            ks = max(0, t0 - window + 1)
            return attention_with_lse(q, k[:, :, ks : t0 + 1], v[:, :, ks : t0 + 1], scale, softcap=softcap)
        if b >= window:  # band narrower than the block: one masked call
            ks = max(0, t0 - window + 1)
            dist = ((t0 + torch.arange(b, device=q.device))[:, None]
                    - torch.arange(ks, t0 + b, device=q.device)[None, :])
            band = (dist >= 0) & (dist < window)
            return attention_with_lse(q, k[:, :, ks : t0 + b], v[:, :, ks : t0 + b], scale, mask=band,
                                      softcap=softcap)
        out, lse = attention_with_lse(q, k[:, :, t0 : t0 + b], v[:, :, t0 : t0 + b], scale, causal=True,
                                      softcap=softcap)
        mid_s, mid_e = max(0, t0 - window + b), t0
        if mid_e > mid_s:
            o, l_ = attention_with_lse(q, k[:, :, mid_s:mid_e], v[:, :, mid_s:mid_e], scale, softcap=softcap)
            out, lse = merge_lse(out, lse, o, l_)
        # left triangle: columns c = 0..b-2 are keys tri_s + c; row r sees c >= r (row b-1 sees none)
        tri_s = t0 - window + 1
        lo = max(0, -tri_s)  # columns before key 0 do not exist
        if lo < b - 1:
            kt, vt = k[:, :, tri_s + lo : tri_s + b - 1], v[:, :, tri_s + lo : tri_s + b - 1]
            # rows lo..b-2 against columns lo..b-2: c >= r is causal once both are reversed
            o, l_ = attention_with_lse(
                q[:, :, lo : b - 1].flip(2), kt.flip(2), vt.flip(2), scale, causal=True, softcap=softcap
            )
            tri_out, tri_lse = merge_lse(out[:, :, lo : b - 1], lse[:, :, lo : b - 1], o.flip(2), l_.flip(2))
            out = out.to(torch.float32)  # merged rows are fp32; out is a fresh tensor, safe to write into
            out[:, :, lo : b - 1], lse[:, :, lo : b - 1] = tri_out, tri_lse
            if lo > 0:  # rows 0..lo-1 see every existing column
                o, l_ = attention_with_lse(q[:, :, :lo], kt, vt, scale, softcap=softcap)
                out[:, :, :lo], lse[:, :, :lo] = merge_lse(out[:, :, :lo], lse[:, :, :lo], o, l_)
        return out, lse
