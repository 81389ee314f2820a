"""What the two SelfExtend kernels share: the flash-attention loop around the key tiles (imported only when
triton is).

``triton_kernel.py`` (contiguous K/V plus a grouped copy) and ``triton_paged.py`` (a paged cache, grouped keys
rotated per tile) differ only in how a key tile is found and scored. Everything around that lives here once,
so both kernels get the same math and a fix reaches both:

* GQA packing: a program owns one (sequence, KV head) and ``BLOCK_M`` rows, row ``r`` being query
  ``r // REP`` of query head ``kv_head * REP + r % REP``;
* the part of the key range one split-KV program visits;
* the three tile classes (grouped-only, boundary, neighbor-only) from the tile's smallest and largest query
  position, so each loop runs one kind of tile with no per-tile branch around its loads;
* the tile loop, one online-softmax step, the epilogue and the split partials' stores;
* the launch heuristics (tile sizes per head dim, split count) and the LSE merge of split partials.

The ``@triton.jit`` functions are inlined where they are called: the compiled kernels are what one function
written out would give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BIG = tl.constexpr(1 << 30)  # "no position" sentinel for min/max over masked lanes
NEIGHBOR, GROUPED, BOUNDARY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # tile classes
DECODE_MAX_QUERIES = 16  # at most this many queries per sequence: split the keys instead of the queries

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


max_fn = getattr(tl.standard, "_elementwise_max", _max_fallback)
min_fn = getattr(tl.standard, "_elementwise_min", _min_fallback)
add_fn = getattr(tl.standard, "_sum_combine", _add_fallback)

INTERPRET = type(_add_fallback).__name__ == "InterpretedFunction"  # built under TRITON_INTERPRET=1
_INTERPRETED = tl.constexpr(INTERPRET)  # the same, readable inside kernels


@triton.jit
def program_ids(HKV: tl.constexpr):
    """(row tile, sequence, KV head, split) of this program; grid ``(row tiles, sequences * HKV, splits)``."""
    pid_m = tl.program_id(0)
    pid_sh = tl.program_id(1)
    return pid_m, pid_sh // HKV, pid_sh % HKV, tl.program_id(2)


@triton.jit
def packed_rows(pid_m, hk, n_queries, REP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's GQA rows: ``rows``, ``row_ok`` (a real query), query index ``qi`` and query head ``hq`` per
    row, and the first and last query index the tile touches."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries * REP
    qi = rows // REP
    hq = hk * REP + rows % REP
    i_lo = (pid_m * BLOCK_M) // REP
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // REP, n_queries - 1)
    return rows, row_ok, qi, hq, i_lo, i_hi


@triton.jit
def split_range(lo, hi, pid_s, n_splits, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys ``[start, end)`` this program visits: all of ``[lo, hi)``, or its ``pid_s``-th part in whole
    tiles under split-KV (possibly empty)."""
    if SPLIT:
        n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
        per = (n_tiles + n_splits - 1) // n_splits
        start = lo + pid_s * per * BLOCK_N
        end = tl.minimum(hi, start + per * BLOCK_N)
    else:
        start = lo
        end = hi
    end = tl.maximum(end, start)
    return start, end


@triton.jit
def class_bounds(qmin, qmax, first, p0, start, end, WINDOW, BLOCK_N: tl.constexpr):
    """Where the tile classes change in ``[start, end)``: tiles before ``g_hi`` are grouped-only, those from
    ``n_lo`` neighbor-only, boundary tiles in between (both products, chosen per element).

    A sequence's real keys start at index ``first`` and count positions up by one from ``p0``, so key ``j``
    is grouped for every row of the tile iff ``j <= first + qmin - W - p0`` and a neighbor for every row iff
    ``j > first + qmax - W - p0``: no positions are read."""
    g_idx = tl.minimum(tl.maximum(first + (qmin - WINDOW - p0) + 1, start), end)
    g_hi = tl.where(g_idx >= end, end, start + ((g_idx - start) // BLOCK_N) * BLOCK_N)
    n_idx = first + (qmax - WINDOW - p0) + 1
    n_idx = tl.where(n_idx <= first, start, n_idx)  # every real key is a neighbor: padding needs no q_g
    n_idx = tl.minimum(tl.maximum(n_idx, g_hi), end)
    n_lo = tl.minimum(g_hi + ((n_idx - g_hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, end)
    return g_hi, n_lo


@triton.jit
def tile_loop(tile: tl.constexpr, lo, hi, acc, m_i, l_i, args, BLOCK_N: tl.constexpr):
    """``acc, m_i, l_i = tile(acc, m_i, l_i, start_n, *args)`` for the key tiles ``start_n = lo, lo + BLOCK_N,
    ... < hi`` of one class, in order.

    Compiled, a ``range`` loop (Triton software-pipelines ``for`` loops only, not ``while``). Interpreted
    (``TRITON_INTERPRET=1``), a ``while`` loop over the same tiles: Triton 3.6's interpreter turns a tensor
    ``range`` bound into a Python int with ``int()`` of a 1-element array, which recent numpy refuses
    (2.4.6: "only 0-dimensional arrays can be converted to Python scalars"; deprecated since numpy 1.25);
    3.9's interpreter squeezes the array first."""
    if _INTERPRETED:
        start_n = lo
        while start_n < hi:
            acc, m_i, l_i = tile(acc, m_i, l_i, start_n, *args)
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = tile(acc, m_i, l_i, start_n, *args)
    return acc, m_i, l_i


@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """Running output, max and sum of the online softmax, before any key."""
    acc = tl.full([BLOCK_M, HEAD_DIM_V], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    return acc, m_i, l_i


@triton.jit
def softmax_step(acc, m_i, l_i, qk, qk_scale, masked, k_ok, offs_n, k_last, v_ptrs):
    """Fold one key tile's raw scores ``qk`` (BLOCK_M, BLOCK_N) into the online softmax, then its values.

    ``qk_scale`` carries ``log2(e)`` (exp2 is the fast exponential). Only a tile that crosses a row's last
    key (``k_last``: causality by key index), the end of the keys or padding (``masked``) pays for the mask;
    ``k_ok`` marks real keys, ``v_ptrs`` (BLOCK_N, Dv) their value rows."""
    qk = qk * qk_scale
    if masked:
        qk = tl.where(k_ok[None, :] & (offs_n[None, :] <= k_last[:, None]), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, max_fn))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no inf - inf
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, add_fn)
    v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalized output (zeros for a row that saw no key) and its natural-log LSE (``-inf`` there)."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def store_partials(OUT, LSE, part, out, lse, row_ok, HEAD_DIM_V: tl.constexpr):
    """Split-KV: fp32 partial output rows ``part`` of (S * rows, Dv) and their LSE, merged by ``combine``."""
    offs_dv = tl.arange(0, HEAD_DIM_V)
    tl.store(OUT + part[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=row_ok[:, None])
    tl.store(LSE + part, lse, mask=row_ok)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, enough to exercise the combine


def combine(part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partials by log-sum-exp: (S, ..., R, DV), (S, ..., R) -> (..., R, DV), (..., R)."""
    lse = torch.logsumexp(part_lse, dim=0)
    weight = torch.exp(part_lse - lse).nan_to_num(0.0)  # splits with no key (lse = -inf) weigh 0
    return (part * weight[..., None]).sum(dim=0), lse


class Launch(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    row_tiles: int  # programs along the rows of one (sequence, KV head)
    num_splits: int


@dataclass(frozen=True)
class TileConfigs:
    """One kernel's tile sizes per head dim, and the rule that picks a launch from them.

    With at most ``DECODE_MAX_QUERIES`` queries per sequence the rows are few, so ``BLOCK_M`` follows them and
    the keys are split over programs until the GPU has about two programs per SM."""

    prefill: dict[int, tuple[int, int, int, int]]  # head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
    decode: dict[int, tuple[int, int, int]]  # head dim -> (BLOCK_N, num_warps, num_stages)
    prefill_default: tuple[int, int, int, int] = (16, 16, 4, 2)  # other head dims (tests): small tiles
    decode_default: tuple[int, int, int] = (16, 4, 2)

    def plan(self, dim: int, q_len: int, rep: int, kv_len: int, groups: int, device: torch.device, *,
             block_m: int | None = None, block_n: int | None = None, num_splits: int | None = None,
             num_warps: int | None = None, num_stages: int | None = None) -> Launch:
        """``q_len``, ``kv_len``: the longest sequence's; ``groups``: sequences x KV heads; the keyword
        arguments override the heuristics (tests use small tiles)."""
        rows = q_len * rep
        decode = q_len <= DECODE_MAX_QUERIES
        if decode:
            cfg_m = min(64, max(16, next_pow2(rows)))
            cfg_n, warps, stages = self.decode.get(dim, self.decode_default)
        else:
            cfg_m, cfg_n, warps, stages = self.prefill.get(dim, self.prefill_default)
        bm, bn = block_m or cfg_m, block_n or cfg_n
        row_tiles = triton.cdiv(rows, bm)
        if num_splits is None:
            num_splits = 1
            if decode:
                num_splits = max(1, min(64, triton.cdiv(2 * num_sms(device), row_tiles * groups),
                                        triton.cdiv(kv_len, 4 * bn)))
        return Launch(bm, bn, num_warps or warps, num_stages or stages, row_tiles, num_splits)
