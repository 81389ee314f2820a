"""Pure integer position math of every attention-remapping method: no model, no rotation, no backend.

Three parts, each a handful of small functions:

* shared: where every key sits, rebuilt from the ``position_ids`` the model rotated with and the padding
  mask (``absolute_key_positions``, ``padding_spans``), and the per-row query scaling (the YaRN/Qwen
  temperature, the log scaling of the SelfExtend authors' code);
* SelfExtend (Jin et al. 2024, arXiv 2401.01325, Eq. 1-4), below;
* Dual Chunk Attention (DCA; An et al. 2024, arXiv 2402.17463), in the last section.

SelfExtend. A query at absolute position i attends a key at position j <= i; L is the trained context,
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
    """Longest sequence whose grouped query positions ``i // G + W - W // G`` all stay below L.

    That is ``G * (L - W + W // G)``: the paper's ``(L - W) * G + W`` (Eq. 4, written for a float shift
    ``W - W / G``) when G divides W, up to ``W % G`` tokens less otherwise; past it the last queries would
    sit at position L, outside the trained range."""
    return group_size * (trained_length - window + window // group_size)


def reach_formula(trained_length: int, window: int, group_size: int) -> str:
    """``max_reach`` written out for error messages."""
    L, W, G = trained_length, window, group_size
    if W % G == 0:
        return f"({L}-{W})*{G}+{W} = {max_reach(L, W, G)}"
    return f"{G}*({L}-{W}+{W}//{G}) = {max_reach(L, W, G)}"


def smallest_group_size(target_length: int, trained_length: int, window: int) -> int:
    """Smallest G with ``max_reach(L, W, G) >= target_length``."""
    if target_length <= trained_length:
        return 1
    g = max(1, math.ceil((target_length - window) / (trained_length - window)))  # the paper's bound
    while max_reach(trained_length, window, g) < target_length:  # W % G != 0 costs up to W % G tokens
        g += 1
    return g


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


POSITION_IDS_ERROR = (
    "position_ids must count the non-padding tokens (as transformers' generate() computes them); "
    "got positions that skip or restart (packed sequences or custom position_ids). SelfExtend "
    "cannot tell which keys are neighbors then; pass position_ids=attention_mask.cumsum(-1) - 1."
)


def absolute_key_positions(
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
    key_pos, query_valid, consistent = key_positions_unchecked(query_pos, key_valid, q_start, kv_len)
    if not bool(consistent):
        raise ValueError(POSITION_IDS_ERROR)
    return key_pos, query_valid


def key_positions_unchecked(
    query_pos: torch.Tensor, key_valid: torch.Tensor | None, q_start: int, kv_len: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``absolute_key_positions`` without reading anything back to the host: the consistency of the
    ``position_ids`` comes back as a 0-d bool tensor, for a caller that reads it together with its other
    per-forward facts (one device-to-host transfer per forward, not one per check)."""
    bsz, q_len = query_pos.shape
    device = query_pos.device
    idx = torch.arange(kv_len, device=device)
    q_idx = q_start + torch.arange(q_len, device=device)
    if key_valid is None:
        key_pos = idx[None, :] + (query_pos[:, -1:] - (q_start + q_len - 1))
        return key_pos, None, (key_pos[:, q_start : q_start + q_len] == query_pos).all()
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
    return key_pos, query_valid, ((got == query_pos) | ~query_valid).all()


def padding_spans(key_valid: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, last, count)`` per row of the real (non-padding) keys among the first ``length``.

    Every fast path needs each row's real tokens to be one run (left padding, or none): then key-index
    distances are position distances and a row is a slice. ``first = length`` and ``last = -1`` for rows
    without a real key."""
    valid = key_valid[:, :length]
    idx = torch.arange(valid.shape[1], device=valid.device)
    first = torch.where(valid, idx, valid.shape[1]).amin(dim=1)
    last = torch.where(valid, idx, -1).amax(dim=1)
    return first, last, valid.sum(dim=1)


def temperature_factor(pos: torch.Tensor, trained_length: int) -> torch.Tensor:
    """``0.1 ln s + 1`` with ``s = (pos + 1) / L`` past the trained length, 1 within it (fp32).

    YaRN's attention temperature as Qwen applies it per query position with DCA: logits grow by its square so
    that attention over more keys than trained stays as sharp as within ``L``. DCA and SelfExtend share it."""
    s = (pos.to(torch.float64) + 1) / trained_length
    return torch.where(s > 1, 0.1 * torch.log(s) + 1, torch.ones_like(s)).to(torch.float32)


def log_scale_factor(pos: torch.Tensor, scale_base: int) -> torch.Tensor:
    """``max(1, ln(pos + 1) / ln(scale_base))`` (fp32): the LongLM code's optional query scaling
    (``scale_base``), which the authors used only for their longest passkey runs.

    Logits grow with the log of the position, as attention over ever more keys flattens; with
    ``scale_base = L`` it is 1 within the trained length."""
    f = torch.log(pos.to(torch.float64) + 1) / math.log(scale_base)
    return f.clamp(min=1).to(torch.float32)


def query_scale(query_pos: torch.Tensor, trained_length: int, dtype: torch.dtype, *,
                temperature: bool = False, scale_base: int = 0,
                skip_ones: bool = True) -> torch.Tensor | None:
    """The ``(B, 1, q_len, 1)`` factor that multiplies each query row: YaRN's ``t^2`` (``temperature``) times
    the log scaling (``scale_base``), or None when it is 1 for every row: found on the host, so
    ``skip_ones=False`` returns the factor whenever an option is set, without reading the device.

    Scaling the query (not the logits) lets every backend and every attention part of that row share it."""
    if not temperature and not scale_base:
        return None
    f = torch.ones(query_pos.shape, dtype=torch.float32, device=query_pos.device)
    if temperature:
        f = f * temperature_factor(query_pos, trained_length) ** 2
    if scale_base:
        f = f * log_scale_factor(query_pos, scale_base)
    if skip_ones and not bool((f > 1).any()):
        return None
    return f.to(dtype)[:, None, :, None]


# ----------------------------------------------------------------------------------------------------------
# Pure math of Dual Chunk Attention (DCA, An et al. 2024, arXiv 2402.17463; ChunkLlama, Qwen2.5-1M).
#
# Notation: query at absolute position i, key at j <= i, trained context L, ``chunk_size`` cs,
# ``local_window`` w, ``chunk_len`` cl = cs - w. Positions are split into chunks of cl tokens; chunk index
# c(p) = p // cl.
#
# We follow the formulation ChunkLlama ships and Qwen/vLLM deploy (not the paper's c - 1 constant):
#
# * every key sits at ``j mod cl``, so a key is rotated once and never again (it can be cached);
# * intra-chunk (c(j) == c(i)): the query sits at ``i mod cl``; distance i - j, exact;
# * successive-chunk (c(j) == c(i) - 1): the query sits at ``min(i mod cl + cl, cs)``; distance exact
#   (= i - j) while ``i mod cl <= w``, clamped beyond, so the nearest keys of the previous chunk keep their
#   true distances;
# * inter-chunk (c(j) <= c(i) - 2): the query sits at ``cs``; distances lie in (w, cs].
#
# Every distance is at most cs, whatever the length: positions never leave the trained range when cs < L.
# The three score sets are disjoint per (i, j) and share one softmax (log-sum-exp merge).
#
# Gate (``exact_below``): queries at positions below it use ordinary RoPE (distance i - j). With
# ``vanilla_within_trained`` (the default, as Qwen describes DCA) the gate is L, so the model is unchanged
# within its trained length; otherwise it is the first position where DCA's distances differ from i - j,
# which changes nothing and only lets those rows take the vanilla path.
#
# Temperature (optional, YaRN/Qwen2.5-1M): a query at position i with i + 1 > L has its logits multiplied by
# ``(0.1 ln s + 1) ** 2``, s = (i + 1) / L. It depends on the query's own position, not on the length of the
# call, so decoding token by token gives the same result as one full pass (HF's YaRN and vLLM fold the factor
# into both q and k, hence the square).

# DCA keeps every distance inside [0, chunk_size], so no length breaks it; this is only the longest input
# it is meant for: Qwen2.5-1M reports > 80 % passkey at 1M tokens from 32k-trained models (32x).
DCA_REACH_FACTOR = 32


def chunk_len(chunk_size: int, local_window: int) -> int:
    """Tokens per chunk: ``chunk_size - local_window`` (ChunkLlama's ``chunk_len``)."""
    return chunk_size - local_window


def chunk_key_positions(pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Where every key sits: ``j mod cl``. Fixed once written, so keys are rotated once."""
    return torch.remainder(pos, chunk_len)


def intra_chunk_query_positions(pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Query position against keys of its own chunk: ``i mod cl``."""
    return torch.remainder(pos, chunk_len)


def successive_chunk_query_positions(pos: torch.Tensor, chunk_size: int, chunk_len: int) -> torch.Tensor:
    """Query position against keys of the previous chunk: ``min(i mod cl + cl, cs)``."""
    return (torch.remainder(pos, chunk_len) + chunk_len).clamp(max=chunk_size)


def inter_chunk_query_positions(pos: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Query position against keys two or more chunks back: the constant ``cs``."""
    return torch.full_like(pos, chunk_size)


def dca_exact_below(chunk_size: int, local_window: int, trained_length: int,
                    vanilla_within_trained: bool) -> int:
    """First query position whose attention differs from vanilla (see the module docstring)."""
    if vanilla_within_trained:
        return trained_length
    # chunk 0 is intra only; in chunk 1 the successive position min(i, cs) is exact while i <= cs
    return min(chunk_size + 1, 2 * chunk_len(chunk_size, local_window))


def dca_relative_positions(
    query_pos: torch.Tensor, key_pos: torch.Tensor, chunk_size: int, local_window: int, exact_below: int = 0
) -> torch.Tensor:
    """Relative distance (query position minus key position) that DCA gives every (query, key) pair.

    Args:
        query_pos: (..., Tq) absolute query positions. key_pos: (..., Tk) absolute key positions.
        exact_below: queries at positions below it keep ``i - j``.

    Returns:
        (..., Tq, Tk) long; entries with j > i are meaningless (causally masked).
    """
    cl = chunk_len(chunk_size, local_window)
    i, j = query_pos[..., :, None], key_pos[..., None, :]
    qc, kc = torch.div(i, cl, rounding_mode="floor"), torch.div(j, cl, rounding_mode="floor")
    query_at = torch.where(
        kc == qc,
        intra_chunk_query_positions(i, cl),
        torch.where(kc == qc - 1, successive_chunk_query_positions(i, chunk_size, cl),
                    inter_chunk_query_positions(i, chunk_size)),
    )
    dca = query_at - chunk_key_positions(j, cl)
    return torch.where(i < exact_below, i - j, dca)


def default_chunk_size(trained_length: int) -> int:
    """ChunkLlama's default: 3/4 of the trained length."""
    return 3 * trained_length // 4


def default_local_window(trained_length: int) -> int:
    """1/16 of the trained length, the value of ChunkLlama's first release (its current code uses L/8)."""
    return max(1, trained_length // 16)
