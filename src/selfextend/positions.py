"""Pure integer math of SelfExtend positions (Jin et al. 2024, arXiv 2401.01325, Eq. 1-4).

Notation: a query at absolute position i attends a key at position j <= i; L is the trained context,
W the neighbor window, G the group size.

* neighbor pair (i - j < W): ordinary RoPE, relative distance i - j.
* grouped pair (i - j >= W): the query sits at ``i // G + W - W // G`` and the key at ``j // G``.
  The shift ``W - W // G`` keeps distances continuous at the boundary (distance W maps to ~W).
  The floor applies to absolute positions, never to the distance, and is integer everywhere: the
  official code's ``W - W / G`` float shift made prefill and decode disagree when ``W % G != 0``.
"""

from __future__ import annotations

import math

import torch


def grouped_query_positions(pos: torch.Tensor, group_size: int, window: int) -> torch.Tensor:
    """Query positions used in grouped attention: ``i // G + (W - W // G)``."""
    return torch.div(pos, group_size, rounding_mode="floor") + (window - window // group_size)


def grouped_key_positions(pos: torch.Tensor, group_size: int) -> torch.Tensor:
    """Key positions used in grouped attention: ``j // G``. They never change once a key is written."""
    return torch.div(pos, group_size, rounding_mode="floor")


def max_reach(trained_length: int, window: int, group_size: int) -> int:
    """Longest sequence whose grouped query positions stay inside the trained range (paper Eq. 4)."""
    return (trained_length - window) * group_size + window


def smallest_group_size(target_length: int, trained_length: int, window: int) -> int:
    """Smallest G with ``max_reach(L, W, G) >= target_length``."""
    if target_length <= trained_length:
        return 1
    return math.ceil((target_length - window) / (trained_length - window))


def recommended_window(trained_length: int) -> int:
    """Neighbor window from the authors' range (512..2048 for 4k-8k models): 1024, or L/4 for short models."""
    if trained_length >= 4096:
        return 1024
    return max(1, 2 ** int(math.log2(max(1, trained_length // 4))))


def recommended_group_size(
    target_length: int, trained_length: int, window: int, fraction: float = 2 / 3
) -> int:
    """The authors' rule of thumb (LongLM README §3): the smallest G with ``W + (N - W) / G <= fraction * L``.

    Only about 1/2 .. 2/3 of the pretrained positions are well trained, so the grouped positions should
    stay inside that part. Falls back to the hard bound when ``fraction * L <= W``.
    """
    if target_length <= trained_length:
        return 1
    budget = fraction * trained_length - window
    if budget <= 0:
        return smallest_group_size(target_length, trained_length, window)
    g = max(1, math.ceil((target_length - window) / budget))
    return max(g, smallest_group_size(target_length, trained_length, window))


def key_positions(
    query_pos: torch.Tensor, key_valid: torch.Tensor | None, q_start: int, kv_len: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absolute position of every key, from the query positions the model actually rotated with.

    The KV cache does not store positions, so they are rebuilt the way transformers assigns them:
    non-padding tokens count up by one (``position_ids = cumsum(mask) - 1`` in ``generate``), padding
    does not count. Query ``i`` is the key at index ``q_start + i``; its position anchors the row.

    Args:
        query_pos: (B, q_len) positions of the queries (``position_ids``).
        key_valid: (B, kv_len) bool, False for padding keys, or None when there is no padding.
        q_start: index in the key tensor of the first query.
        kv_len: number of keys.

    Returns:
        ``(key_pos, query_valid)``: (B, kv_len) long positions (0 at padding) and (B, q_len) bool,
        False for queries that are padding (None when there is no padding).

    Raises:
        ValueError: when ``position_ids`` do not count the non-padding tokens (packed sequences,
            custom position ids): SelfExtend would silently group the wrong keys.
    """
    bsz, q_len = query_pos.shape
    device = query_pos.device
    idx = torch.arange(kv_len, device=device)
    q_idx = q_start + torch.arange(q_len, device=device)
    if key_valid is None:
        key_pos = idx[None, :] + (query_pos[:, -1:] - (q_start + q_len - 1))
        query_valid = None
        consistent = torch.equal(key_pos[:, q_start : q_start + q_len], query_pos)
    else:
        count = torch.cumsum(key_valid.to(torch.long), dim=1)  # (B, kv_len)
        query_valid = key_valid[:, q_start : q_start + q_len]
        # anchor each row at its last non-padding query
        last = torch.where(query_valid, torch.arange(q_len, device=device), -1).amax(dim=1)  # (B,)
        has_query = last >= 0
        last = last.clamp(min=0)
        anchor_pos = query_pos.gather(1, last[:, None])  # (B, 1)
        anchor_count = count.gather(1, (q_start + last)[:, None])  # (B, 1)
        key_pos = torch.where(key_valid, count - anchor_count + anchor_pos, 0)
        key_pos = torch.where(has_query[:, None], key_pos, 0)
        got = key_pos[:, q_idx]
        consistent = bool(((got == query_pos) | ~query_valid).all())
    if not consistent:
        raise ValueError(
            "position_ids must count the non-padding tokens (as transformers' generate() computes them); "
            "got positions that skip or restart (packed sequences or custom position_ids). SelfExtend "
            "cannot tell which keys are neighbors then; pass position_ids=attention_mask.cumsum(-1) - 1."
        )
    return key_pos, query_valid


def temperature_factor(pos: torch.Tensor, trained_length: int) -> torch.Tensor:
    """``0.1 ln s + 1`` with ``s = (pos + 1) / L`` past the trained length, 1 within it (fp32).

    YaRN's attention temperature as Qwen applies it per query position with DCA: logits grow by its square so
    that attention over more keys than trained stays as sharp as within ``L``. DCA and SelfExtend share it."""
    s = (pos.to(torch.float64) + 1) / trained_length
    return torch.where(s > 1, 0.1 * torch.log(s) + 1, torch.ones_like(s)).to(torch.float32)


def query_temperature(query_pos: torch.Tensor, trained_length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``(B, 1, q_len, 1)`` factor ``t^2`` that multiplies each query row, or None when every ``t`` is 1.

    Scaling the query (not the logits) lets every backend and every attention part of that row share it."""
    t = temperature_factor(query_pos, trained_length)
    return (t * t).to(dtype)[:, None, :, None] if bool((t > 1).any()) else None
