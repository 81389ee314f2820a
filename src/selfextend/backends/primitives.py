"""One attention pass that also returns its log-sum-exp: the building block of every LSE merge.

On CPU we build on ``aten::_scaled_dot_product_flash_attention_for_cpu``: the same flash kernel that
``F.scaled_dot_product_attention`` dispatches to for causal CPU attention, so the neighbor and grouped
passes run at vanilla speed, and it returns the LSE, handles GQA natively and accepts non-contiguous
(B, H, T, D) views. It is a private op, so it is probed once and a blockwise matmul path (exact, fp32,
memory bounded by ``_BLOCK_ELEMENTS``) takes over where it is missing, on other devices, or for
logit soft-capping (Gemma 2), which the op cannot do.
"""

from __future__ import annotations

import functools

import torch

from .merge import merge_lse

_BLOCK_ELEMENTS = 1 << 24  # fp32 score elements per block in the matmul path (64 MiB)


@functools.cache
def _cpu_flash_op():
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    try:  # probe: signature and (out, lse) return may change between torch versions
        q = torch.zeros(1, 1, 2, 8)
        out, lse = op(q, q, q, 0.0, True, attn_mask=None, scale=1.0)
        if out.shape != q.shape or lse.shape != (1, 1, 2):
            return None
    except Exception:  # noqa: BLE001 - any failure means "do not use it"
        return None
    return op


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, returning ``(out, lse)``.

    Args:
        q: (B, H, Tq, D). k, v: (B, Hkv, Tk, D) with ``H % Hkv == 0`` (GQA: head h reads kv head
            h // (H/Hkv)).
        scale: multiplies q.k before the softmax.
        causal: top-left aligned causal mask (query i sees keys 0..i); callers use it with Tq == Tk.
        mask: optional (Tq, Tk) or broadcastable bool mask, True = attend. Every row must keep a key.
        softcap: Gemma-2 style ``cap * tanh(s / cap)`` on the scaled scores.

    Returns:
        ``out`` (B, H, Tq, Dv) in q's dtype and ``lse`` (B, H, Tq) in fp32.
    """
    op = _cpu_flash_op()
    if (op is not None and q.device.type == "cpu" and softcap is None
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        float_mask = None
        if mask is not None:
            float_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask, float("-inf"))
        return op(q, k, v, 0.0, causal, attn_mask=float_mask, scale=scale)
    return _attention_with_lse_matmul(q, k, v, scale, causal, mask, softcap)


def bottom_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _attention_with_lse_matmul(q, k, v, scale, causal, mask, softcap):
    bsz, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    qf = q.reshape(bsz, kv_heads, rep, tq, dim)
    kf = k.to(torch.float32)[:, :, None]  # (B, Hkv, 1, Tk, D)
    vf = v.to(torch.float32)[:, :, None]
    out = torch.empty(bsz, heads, tq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, heads, tq, dtype=torch.float32, device=q.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, tk * heads * bsz))
    for s in range(0, tq, block):
        e = min(tq, s + block)
        scores = torch.matmul(qf[:, :, :, s:e].to(torch.float32), kf.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = None
        if causal:
            allowed = (torch.arange(s, e, device=q.device)[:, None]
                       >= torch.arange(tk, device=q.device)[None, :])
        if mask is not None:
            m = mask[..., s:e, :]
            allowed = m if allowed is None else allowed & m
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        blk_lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, rep, t)
        probs = torch.exp(scores - blk_lse[..., None]).nan_to_num(0.0)
        out[:, :, s:e] = torch.matmul(probs, vf).reshape(bsz, heads, e - s, -1).to(q.dtype)
        lse[:, :, s:e] = blk_lse.reshape(bsz, heads, e - s)
    return out, lse
