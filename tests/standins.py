"""CPU stand-ins of the CUDA aten attention ops the composed backend calls, with their signatures and layouts.

The GPU kernels cannot run here, so the code that calls them (layouts, causal alignment, windows, GQA, LSE
shapes and FlashAttention's ``+inf`` LSE for rows without keys) is run against these: same argument lists as
torch's schemas (``torch.ops.aten.<name>.default._schema``), same output layouts, plain fp32 math inside,
rounded to the input dtype like a kernel's output. Each op counts its calls, so tests can see which ran.
"""

from __future__ import annotations

from collections import Counter

import torch


def _attend(q, k, v, scale, allowed):
    """q (B, H, Tq, D), k/v (B, Hk, Tk, D), allowed (Tq, Tk): fp32 out (B, H, Tq, D) and lse (B, H, Tq),
    +inf lse and zero output where a row has no key (FlashAttention's convention)."""
    rep = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, 1) for x in (k, v))
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)
    empty = ~allowed.any(-1)  # (Tq,)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = p @ vf
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse


class AtenStandins:
    """The subset of ``torch.ops.aten`` that ``lse_ops.CudaOps`` uses, on CPU."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _flash_attention_forward(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                 is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                                 window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
                                 num_splits=None):
        assert cum_seq_q is None and cum_seq_k is None and block_table is None  # dense (B, T, H, D) only
        assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "FlashAttention: stride(-1) 1"
        assert query.shape[2] % key.shape[2] == 0 and dropout_p == 0.0
        assert max_q == query.shape[1] and max_k == key.shape[1]
        self.calls["flash" + ("-window" if window_size_left is not None else "")] += 1
        b, tq, h, d = query.shape
        tk = key.shape[1]
        scale = d**-0.5 if scale is None else scale
        r = torch.arange(tq)[:, None] + (tk - tq)  # bottom-right: query r is key r + tk - tq
        j = torch.arange(tk)[None, :]
        allowed = torch.ones(tq, tk, dtype=torch.bool)
        left = -1 if window_size_left is None else window_size_left
        right = -1 if window_size_right is None else window_size_right
        if is_causal:
            right = 0
        if right >= 0:
            allowed &= j <= r + right
        if left >= 0:
            allowed &= j >= r - left
        out, lse = _attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, allowed)
        out = out.transpose(1, 2).contiguous().to(query.dtype)  # (B, Tq, H, D)
        return out, lse, torch.empty(2), torch.empty(0), torch.empty(0)

    def _scaled_dot_product_cudnn_attention(self, query, key, value, attn_bias, compute_log_sumexp,
                                            dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
                                            scale=None):
        assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
        self.calls["cudnn"] += 1
        b, h, tq, d = query.shape
        tk = key.shape[2]
        scale = d**-0.5 if scale is None else scale
        allowed = torch.ones(tq, tk, dtype=torch.bool)
        if is_causal:  # SDPA's convention: top-left
            allowed = torch.arange(tq)[:, None] >= torch.arange(tk)[None, :]
        out, lse = _attend(query, key, value, scale, allowed)
        # stored (B, T, H, D) like SDPA's fused kernels' outputs
        out = out.transpose(1, 2).contiguous().to(query.dtype).transpose(1, 2)
        return out, lse[..., None], None, None, tq, tk, torch.empty(1), torch.empty(1), torch.empty(0)


class Broken(AtenStandins):
    """Stand-ins whose ops fail the probe: one raises, the other answers wrongly."""

    def _scaled_dot_product_cudnn_attention(self, *args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.")

    def _flash_attention_forward(self, *args, **kwargs):
        out, lse, *rest = super()._flash_attention_forward(*args, **kwargs)
        return out * 1.5, lse, *rest
