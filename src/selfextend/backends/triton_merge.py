"""The composed backend's CUDA merge: two partial attentions and their LSE, one pass, written in place.

``merge_into(out_a, lse_a, out_b, lse_b)`` sets ``out_a = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a +
e^lse_b)`` row by row: it reads each partial output once, computes in fp32 in registers and writes
``out_a`` in its own dtype and layout (any strides over batch, head and row; the feature dim contiguous),
so the merge costs one read of both outputs and one write, with no fp32 copy of either. A row whose pass had
no keys (``lse`` of ``-inf``, or FlashAttention's ``+inf``) takes the other pass alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import next_pow2


@triton.jit
def _merge_kernel(
    OA, LA, OB, LB,
    s_oab, s_oah, s_oat, s_lab, s_lah, s_lat,
    s_obb, s_obh, s_obt, s_lbb, s_lbh, s_lbt,
    HEADS, ROWS, DIM,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < ROWS
    la = tl.load(LA + b * s_lab + h * s_lah + t * s_lat, mask=t_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(LB + b * s_lbb + h * s_lbh + t * s_lbt, mask=t_ok, other=float("-inf")).to(tl.float32)
    la = tl.where(la == float("inf"), float("-inf"), la)  # FlashAttention: +inf = no keys
    lb = tl.where(lb == float("inf"), float("-inf"), lb)
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    total = wa + wb
    total = tl.where(total > 0, total, 1.0)
    wa = wa / total
    wb = wb / total
    mask = t_ok[:, None] & (d < DIM)[None, :]
    pa = OA + b * s_oab + h * s_oah + t[:, None] * s_oat + d[None, :]
    oa = tl.load(pa, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OB + b * s_obb + h * s_obh + t[:, None] * s_obt + d[None, :], mask=mask, other=0.0)
    ob = ob.to(tl.float32)
    out = tl.where(wa[:, None] > 0, oa * wa[:, None], 0.0) + tl.where(wb[:, None] > 0, ob * wb[:, None], 0.0)
    tl.store(pa, out.to(OA.dtype.element_ty), mask=mask)


INTERPRET = type(_merge_kernel).__name__ == "InterpretedFunction"


def merge_into(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
               block_t: int = 32) -> None:
    """Merge ``(out_b, lse_b)`` into ``out_a`` in place (see the module docstring).

    Args:
        out_a, out_b: (B, H, T, D) with ``stride(-1) == 1`` (any other strides, e.g. a (B, T, H, D) buffer
            seen as (B, H, T, D)); out_b may be another dtype.
        lse_a, lse_b: (B, H, T) log-sum-exp of each pass's scaled scores.
    """
    if out_a.shape != out_b.shape or lse_a.shape != out_a.shape[:3] or lse_b.shape != out_a.shape[:3]:
        raise ValueError(f"merge_into: shapes {tuple(out_a.shape)}, {tuple(lse_a.shape)}, "
                         f"{tuple(out_b.shape)}, {tuple(lse_b.shape)} do not match")
    if out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError("merge_into: the feature dim of both outputs must be contiguous")
    bsz, heads, rows, dim = out_a.shape
    if out_a.numel() == 0:
        return
    grid = (triton.cdiv(rows, block_t), bsz * heads)
    _merge_kernel[grid](
        out_a, lse_a, out_b, lse_b,
        *out_a.stride()[:3], *lse_a.stride(),
        *out_b.stride()[:3], *lse_b.stride(),
        heads, rows, dim,
        BLOCK_T=block_t, BLOCK_D=next_pow2(dim),
    )
