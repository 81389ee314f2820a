"""The ``"flex"`` backend: SelfExtend as two block-sparse FlexAttention passes merged by log-sum-exp.

``torch.nn.attention.flex_attention`` runs attention over a ``BlockMask``: per (query block, key block)
either skipped, *full* (no mask evaluated) or *partial* (``mask_mod`` evaluated per element). SelfExtend's
neighbor keys (``q_pos - k_pos < W``) and grouped keys (``>= W``) are disjoint, so it is two passes,

* neighbor: (query, key) over the causal band, which touches about ``L * W / block^2`` blocks;
* grouped: (grouped_query, grouped_key) over the rest of the causal triangle,

each returning its LSE (``AuxRequest(lse=True)``), merged by ``merge.merge_lse``. This is the
flash-attention formulation of the official code (window pass + shifted causal pass) without its
per-batch LSE realignment: positions come per row from ``query_pos``/``key_pos``/``key_valid``.

Block masks are built from per-tile position ranges (min/max position and validity of each query and
key block), not by evaluating ``mask_mod`` on all L x L pairs as ``create_block_mask`` does: O((L/128)^2)
work and memory however long the sequence. Only blocks that straddle the boundary, the diagonal or
padding are partial.

On CUDA the passes run through ``torch.compile(flex_attention)`` (the fused Triton kernel). On CPU,
flex_attention runs uncompiled by default, which materialises each pass's score matrix: fine for tests
and small inputs, not for long ones (``backend="auto"`` never picks flex on CPU; ``compile=True`` uses
inductor's CPU kernel).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .base import Backend, SelfExtendInputs
from .merge import merge_lse

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIG = 1 << 30


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:  # torch < 2.5
        return None
    return flex


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention)


def _tile_ranges(pos: torch.Tensor, valid: torch.Tensor, size: int, n_tiles: int, pad_valid: bool):
    """Per (row, tile): min and max position over valid entries, any valid, all valid (padded with
    pad_valid)."""
    pad = n_tiles * size - pos.shape[1]
    pos = F.pad(pos, (0, pad)).view(pos.shape[0], n_tiles, size)
    ok = F.pad(valid, (0, pad), value=False).view(pos.shape)
    lo = torch.where(ok, pos, _BIG).amin(-1)
    hi = torch.where(ok, pos, -_BIG).amax(-1)
    every = F.pad(valid, (0, pad), value=pad_valid).view(pos.shape).all(-1)
    return lo, hi, ok.any(-1), every


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, nQ, nK) bool -> (num_blocks, indices) in BlockMask's format, selected blocks first."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


class FlexBackend(Backend):
    """Two block-sparse FlexAttention passes (neighbor band, grouped rest) merged by LSE."""

    name = "flex"
    methods = ("self-extend",)
    fallback_when_unsupported = True  # explicit backend="flex" logs the reason and falls back

    def __init__(self, block_size: int = 128, compile: bool | None = None):
        self.block_size = block_size
        self.compile = compile  # None: compile on CUDA only

    def validate(self, inp: SelfExtendInputs) -> None:
        if inp.query.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"backend='flex' does not support dtype {inp.query.dtype}; supported dtypes: "
                f"{', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)}. Use backend='auto'."
            )

    def supports(self, inp: SelfExtendInputs) -> str | None:
        if _flex_module() is None:
            return "torch.nn.attention.flex_attention is not available (torch >= 2.5)"
        if inp.query.dtype not in SUPPORTED_DTYPES:
            return f"dtype {inp.query.dtype} is not one of fp16, bf16, fp32"
        dim = inp.query.shape[-1]
        if inp.query.is_cuda and (dim < 16 or dim & (dim - 1) or inp.value.shape[-1] != dim):
            return (f"head dim {dim} (value {inp.value.shape[-1]}): "
                    "the compiled kernel wants equal powers of two >= 16")
        return None

    def block_masks(self, inp: SelfExtendInputs):
        """The (neighbor, grouped) BlockMasks of ``inp``, from per-tile position ranges."""
        flex = _flex_module()
        bs = self.block_size
        bsz, m, n = inp.query.shape[0], inp.q_len, inp.kv_len
        dev = inp.query.device
        n_q, n_k = -(-m // bs), -(-n // bs)
        qpos = inp.query_pos.to(dev).expand(bsz, m)
        kpos = inp.key_pos.to(dev).expand(bsz, n)
        if inp.key_valid is None:
            kvalid = torch.ones(bsz, n, dtype=torch.bool, device=dev)
        else:
            kvalid = inp.key_valid.to(dev)
        qvalid = kvalid[:, inp.q_start : inp.q_start + m]
        q_lo, q_hi, q_any, q_all = _tile_ranges(qpos, qvalid, bs, n_q, pad_valid=True)
        k_lo, k_hi, k_any, k_all = _tile_ranges(kpos, kvalid, bs, n_k, pad_valid=False)

        qt = torch.arange(n_q, device=dev)[:, None]
        kt = torch.arange(n_k, device=dev)[None, :]
        last_q = inp.q_start + torch.clamp((qt + 1) * bs, max=m) - 1
        causal_some = kt * bs <= last_q  # (nQ, nK): the first key is visible to the last query
        causal_all = ((kt + 1) * bs - 1 <= inp.q_start + qt * bs) & ((kt + 1) * bs <= n)
        some = causal_some & q_any[:, :, None] & k_any[:, None, :]  # (B, nQ, nK)
        full = causal_all & q_all[:, :, None] & k_all[:, None, :]
        dist_lo = q_lo[:, :, None] - k_hi[:, None, :]  # smallest q_pos - k_pos in the block pair
        dist_hi = q_hi[:, :, None] - k_lo[:, None, :]
        w = inp.window
        full_n = full & (dist_hi < w)
        part_n = some & (dist_lo < w) & ~full_n
        full_g = full & (dist_lo >= w)
        part_g = some & (dist_hi >= w) & ~full_g

        # mask_mod sees indices up to the padded block grid: pad what it reads
        qpos_p = F.pad(qpos, (0, n_q * bs - m))
        kpos_p = F.pad(kpos, (0, n_k * bs - n))
        qval_p = F.pad(qvalid, (0, n_q * bs - m), value=False)
        kval_p = F.pad(kvalid, (0, n_k * bs - n), value=False)
        q_start = inp.q_start

        def allowed(b, q_idx, kv_idx):
            return (kv_idx <= q_idx + q_start) & qval_p[b, q_idx] & kval_p[b, kv_idx]

        def neighbor_mod(b, h, q_idx, kv_idx):
            return allowed(b, q_idx, kv_idx) & (qpos_p[b, q_idx] - kpos_p[b, kv_idx] < w)

        def grouped_mod(b, h, q_idx, kv_idx):
            return allowed(b, q_idx, kv_idx) & (qpos_p[b, q_idx] - kpos_p[b, kv_idx] >= w)

        masks = []
        for part, whole, mod in ((part_n, full_n, neighbor_mod), (part_g, full_g, grouped_mod)):
            num, idx = _ordered(part[:, None])
            full_num, full_idx = _ordered(whole[:, None])
            masks.append(flex.BlockMask.from_kv_blocks(
                num, idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mod, seq_lengths=(m, n)
            ))
        return masks[0], masks[1]

    def forward(self, inp: SelfExtendInputs) -> torch.Tensor:
        flex = _flex_module()
        compiled = self.compile if self.compile is not None else inp.query.is_cuda
        attend = _compiled_flex() if compiled else flex.flex_attention
        score_mod = None
        if inp.softcap is not None:
            cap = inp.softcap

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.tanh(score / cap) * cap

        neighbor, grouped = self.block_masks(inp)
        gqa = inp.query.shape[1] != inp.key.shape[1]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            o_n, aux_n = attend(
                inp.query, inp.key, inp.value, score_mod=score_mod, block_mask=neighbor, scale=inp.scaling,
                enable_gqa=gqa, return_aux=flex.AuxRequest(lse=True),
            )
            o_g, aux_g = attend(
                inp.grouped_query, inp.grouped_key, inp.value, score_mod=score_mod, block_mask=grouped,
                scale=inp.scaling, enable_gqa=gqa, return_aux=flex.AuxRequest(lse=True),
            )
        out, _ = merge_lse(o_n, aux_n.lse.float(), o_g, aux_g.lse.float())
        return out.to(inp.query.dtype)  # padding queries: both passes empty -> zeros
