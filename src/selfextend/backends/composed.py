"""SelfExtend as two fast attention calls merged once: the default backend, on every device.

The neighbor keys (distance < W) and grouped keys (distance >= W) of a query are disjoint, so SelfExtend
costs about one causal attention pass, never an L x L matrix:

* neighbor pass: a causal band of width W over the keys at their true positions;
* grouped pass: ``grouped_query[W:]`` against ``grouped_key[:L - W]``, an ordinary (bottom-right) causal
  attention, which selects exactly the pairs ``i - j >= W``;
* merge: one softmax over both by their log-sum-exp, written into the neighbor pass's output in place (its
  dtype, and on CUDA the (B, T, H, D) layout the attention layer returns, so no copy follows).

The passes run on the device's ops that return the LSE (``lse_ops.py``): on CUDA FlashAttention-2 (the band
as one windowed call that skips key blocks outside it) and cuDNN attention for the grouped pass, merged by a
Triton kernel; on CPU torch's CPU flash kernel, the band built from unmasked calls per block of queries. In
prefill the grouped pass is ``((N - W) / N)^2`` of a causal pass and the band ``~2W / N``, so SelfExtend
costs about 1.02-1.10x one causal attention at 32k-128k. A decode step is two calls on slices of the one
cache (the last W keys, the grouped rest) and the merge, with no host read when the batch has no padding.

Padding is handled per row by slicing each row's contiguous run of real tokens, which makes it unpadded;
rows whose padding is not one contiguous block (right padding followed by new tokens) are not supported
here and ``backend="auto"`` routes them to the reference backend. The same backend runs DCA
(``dca_blockwise.py``) on the same ops and per-row slicing.
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
from .lse_ops import CPU_OPS, CpuOps, CudaOps, ops_for
from .merge import merge_lse


@BACKENDS.register()
class ComposedBackend(Backend):
    """The default backend: exact, memory-linear, at the cost of about one causal attention pass.

    Args:
        block_size: queries per block of the CPU band (at 16k, 2 threads: 1.08x SDPA vs 1.11x with 512).
        ops: the attention ops to compose (``lse_ops``); None picks them per device.
    """

    name = "composed"
    methods = ("self-extend", "dca")
    fallback_when_unsupported = True  # on CUDA its kernels take fp16/bf16 only, no soft-capping

    def __init__(self, block_size: int = 256, ops: CpuOps | CudaOps | None = None):
        self.block_size = block_size
        self.ops = ops

    def ops_for(self, inp: Inputs) -> CpuOps | CudaOps:
        return self.ops if self.ops is not None else ops_for(inp.query)

    def supports(self, inp: Inputs) -> str | None:
        reason = self.ops_for(inp).supports(inp.query, inp.value, inp.softcap)
        if reason is not None:
            return reason
        if not inp.ends_contiguous and not contiguous_padding(inp):
            return "padding is not one contiguous block per row"
        return None

    def forward(self, inp: Inputs) -> torch.Tensor:
        ops = self.ops_for(inp)
        bsz, heads, q_len, _ = inp.query.shape
        last_query_key = inp.q_start + q_len - 1
        if inp.key_valid is None and isinstance(inp, SelfExtendInputs):
            # index distances are position distances in every row: one call for the batch, no host read
            return self._unpadded(inp, slice(None), 0, last_query_key, ops)
        ranges = real_key_ranges(inp)
        if ranges is None:
            raise ValueError(f"backend {self.name!r} cannot run this input: padding is not one contiguous "
                             "block per row; use backend='reference'")
        if isinstance(inp, DCAInputs):
            def unpadded(inp, rows, first, last, ops):
                return dca_unpadded(inp, rows, first, last, ops)
        else:
            unpadded = self._unpadded
        if inp.key_valid is None:
            start = inp.key_pos[:, 0]
            if bool((start == start[0]).all()):  # DCA: one position layout for the whole batch
                return unpadded(inp, slice(None), 0, last_query_key, ops)
        out = _output_like(inp)
        out.zero_()
        for b, (first, last) in enumerate(ranges):
            q_first, q_last = query_range(inp, first, last)
            if last < first or q_last < q_first:  # no real query in this row
                continue
            out[b : b + 1, :, q_first : q_last + 1] = unpadded(inp, slice(b, b + 1), first, last, ops)
        return out

    def _unpadded(self, inp: SelfExtendInputs, rows: slice, first: int, last: int,
                  ops: CpuOps | CudaOps) -> torch.Tensor:
        """SelfExtend for rows whose real keys are ``[first, last]`` and whose real queries end at
        ``last``."""
        q_first, q_last = query_range(inp, first, last)
        q, qg, k, kg, v = inp.query, inp.grouped_query, inp.key, inp.grouped_key, inp.value
        if (rows != slice(None) or first != 0 or last + 1 != k.shape[2] or q_first != 0
                or q_last + 1 != q.shape[2]):  # a part of the batch (views cost microseconds a decode step)
            q, qg = q[rows, :, q_first : q_last + 1], qg[rows, :, q_first : q_last + 1]
            keys = slice(first, last + 1)
            k, kg, v = k[rows, :, keys], kg[rows, :, keys], v[rows, :, keys]
        window, scale, softcap = inp.window, inp.scaling, inp.softcap
        n, m = k.shape[2], q.shape[2]
        off = n - m  # query r is key r + off
        if m == 1:  # decode: the last W keys, the grouped rest, one merge
            ks = max(0, n - window)
            if ks == 0:
                return ops.full(q, k, v, scale, softcap)[0]
            # the grouped keys, then the band, one merge (symmetric: the order leaves the output as it is)
            out_g, lse_g = ops.full(qg, kg[:, :, :ks], v[:, :, :ks], scale, softcap)
            out, lse = ops.full(q, k[:, :, ks:], v[:, :, ks:], scale, softcap)
            ops.merge_(out, lse, out_g, lse_g)
            return out

        if ops.band is not None:
            out, lse = ops.band(q, k, v, window, scale, softcap)
        else:
            out, lse = self._neighbor_pass(q, k, v, off, window, scale, softcap, ops)
        r0 = max(0, window - off)  # first query with a grouped key
        if r0 < m:
            n_g = n - window
            # grouped query r0 + t sees grouped keys [0, n_g - m_g + t]: bottom-right causal
            out_g, lse_g = ops.causal(qg[:, :, r0:], kg[:, :, :n_g], v[:, :, :n_g], scale, softcap)
            ops.merge_(out[:, :, r0:], lse[:, :, r0:], out_g, lse_g)
        return out

    def _neighbor_pass(self, q, k, v, off, window, scale, softcap, ops):
        """Band attention ``0 <= t - j < W`` per block of queries, as three unmasked kernel calls.

        For the block of queries at keys ``[t0, t0 + b)`` the band splits into
        * the diagonal square ``[t0, t0 + b)``: causal;
        * the middle ``[t0 - W + b, t0)``: seen by every query of the block, no mask;
        * the left triangle ``[t0 - W + 1, t0 - W + b)``: query r sees column c iff c >= r, i.e. causal
          after reversing both queries and keys, so it also runs on the causal kernel.
        Clipped at key 0. Masked kernel calls cost about twice as much per element, so none are used.
        The output is allocated (B, T, H, D) and returned as a (B, H, T, D) view: the layout the attention
        layer hands back, so no copy follows.
        """
        bsz, heads, m, _ = q.shape
        out = q.new_empty(bsz, m, heads, v.shape[-1]).transpose(1, 2)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for rs in range(0, m, self.block_size):
            re = min(m, rs + self.block_size)
            o, lse_blk = self._band_block(q[:, :, rs:re], k, v, off + rs, window, scale, softcap, ops)
            out[:, :, rs:re], lse[:, :, rs:re] = o, lse_blk
        return out, lse

    @staticmethod
    def _band_block(q, k, v, t0, window, scale, softcap, ops):
        b = q.shape[2]
        if b >= window:  # band narrower than the block: one masked call
            ks = max(0, t0 - window + 1)
            dist = ((t0 + torch.arange(b, device=q.device))[:, None]
                    - torch.arange(ks, t0 + b, device=q.device)[None, :])
            band = (dist >= 0) & (dist < window)
            return ops.full(q, k[:, :, ks : t0 + b], v[:, :, ks : t0 + b], scale, softcap, mask=band)
        out, lse = ops.causal(q, k[:, :, t0 : t0 + b], v[:, :, t0 : t0 + b], scale, softcap)
        mid_s, mid_e = max(0, t0 - window + b), t0
        if mid_e > mid_s:
            o, l_ = ops.full(q, k[:, :, mid_s:mid_e], v[:, :, mid_s:mid_e], scale, softcap)
            out, lse = merge_lse(out, lse, o, l_)
        # left triangle: columns c = 0..b-2 are keys tri_s + c; row r sees c >= r (row b-1 sees none)
        tri_s = t0 - window + 1
        lo = max(0, -tri_s)  # columns before key 0 do not exist
        if lo < b - 1:
            kt, vt = k[:, :, tri_s + lo : tri_s + b - 1], v[:, :, tri_s + lo : tri_s + b - 1]
            # rows lo..b-2 against columns lo..b-2: c >= r is causal once both are reversed
            o, l_ = ops.causal(q[:, :, lo : b - 1].flip(2), kt.flip(2), vt.flip(2), scale, softcap)
            tri_out, tri_lse = merge_lse(out[:, :, lo : b - 1], lse[:, :, lo : b - 1], o.flip(2), l_.flip(2))
            out = out.to(torch.float32)  # merged rows are fp32; out is a fresh tensor, safe to write into
            out[:, :, lo : b - 1], lse[:, :, lo : b - 1] = tri_out, tri_lse
            if lo > 0:  # rows 0..lo-1 see every existing column
                o, l_ = ops.full(q[:, :, :lo], kt, vt, scale, softcap)
                out[:, :, :lo], lse[:, :, :lo] = merge_lse(out[:, :, :lo], lse[:, :, :lo], o, l_)
        return out, lse


@BACKENDS.register()
class CpuBackend(ComposedBackend):
    """``"cpu"``: the composed backend on the CPU ops on any device (on CUDA their exact, memory-bounded
    matmul path): what ``auto`` takes on CUDA for what no kernel runs (fp32 beyond Triton, soft-capping
    beyond Flex) before the dense reference. On CPU it is ``"composed"``."""

    name = "cpu"
    fallback_when_unsupported = False

    def __init__(self, block_size: int = 256, ops: CpuOps | CudaOps | None = None):
        super().__init__(block_size, ops if ops is not None else CPU_OPS)


def _output_like(inp: Inputs) -> torch.Tensor:
    """An uninitialised (B, H, q_len, Dv) output stored as (B, q_len, H, Dv), the attention layer's layout."""
    bsz, heads, q_len, _ = inp.query.shape
    return inp.query.new_empty(bsz, q_len, heads, inp.value.shape[-1]).transpose(1, 2)
