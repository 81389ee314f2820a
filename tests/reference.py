"""An independent, deliberately plain oracle for SelfExtend (arXiv 2401.01325) and DCA (arXiv 2402.17463).

Why it exists: the library's "reference" backend is the oracle its other backends are tested against, but
it shares ``positions.py`` (where keys and queries are grouped), ``rope.py`` (how they are rotated) and the
neighbor/grouped choice with them, so a mistake there is made identically on both sides of every backend
test. This module imports nothing from ``selfextend`` and writes each step out from the paper's formulas:

* the integer relative distance of every (query, key) pair, from absolute positions
  (``selfextend_distance_table``, ``dca_distance_table``);
* its own fp64 rotate-half RoPE (``rope``);
* scores ``rope(q_i, j + d_ij) . rope(k_j, j)``: RoPE is a rotation, so a score depends only on the
  difference of the two rotations, here the pair's SelfExtend distance ``d_ij``; the oracle never computes
  a grouped position, only distances (k sits at its true position ``j`` only so that the low-precision mode
  rounds it where a model would);
* one causal, padding-masked softmax per query row, in fp64.

It starts from *unrotated* q and k, so the library's rotations and delta rotations are under test too.
"""

from __future__ import annotations

import torch

_PAIR_ELEMENTS = 1 << 22  # (query, key, channel) fp64 elements rotated at a time


def selfextend_distance_table(
    query_pos: torch.Tensor, key_pos: torch.Tensor, window: int, group_size: int
) -> torch.Tensor:
    """The relative RoPE distance SelfExtend uses for every (query, key) pair.

    Args:
        query_pos: (..., Tq) absolute positions ``i`` of the queries (non-negative integers).
        key_pos: (..., Tk) absolute positions ``j`` of the keys.
        window: W; pairs with ``i - j < W`` are neighbors and keep the distance ``i - j``.
        group_size: G; other pairs use ``(i // G + W - W // G) - j // G``. ``G = 1`` is vanilla RoPE.

    Returns:
        (..., Tq, Tk) long. Entries with ``j > i`` (keys after the query, masked by causality) are -1: they
        are "don't care" and never reach a softmax.
    """
    i = query_pos.long()[..., :, None]
    j = key_pos.long()[..., None, :]
    neighbor = i - j
    grouped = (i // group_size + window - window // group_size) - j // group_size  # floor: positions are >= 0
    distance = torch.where(neighbor < window, neighbor, grouped)
    return torch.where(j > i, torch.full_like(distance, -1), distance)


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of un-rotated ``x`` at integer ``pos``, in fp64.

    Args:
        x: (B, H, T, D).
        pos: (B, T) positions (any integers, negative included).
        inv_freq: (rd/2,) inverse frequencies; channel ``c < rd/2`` pairs with ``c + rd/2`` and turns by
            ``pos * inv_freq[c]``; channels ``rd..D-1`` pass through (partial rotary).

    Returns:
        (B, H, T, D) fp64.
    """
    half = inv_freq.numel()
    x = x.to(torch.float64)
    angle = pos.to(torch.float64)[:, None, :, None] * inv_freq.to(torch.float64)  # (B, 1, T, rd/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_pos: torch.Tensor,
    distance: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    q_start: int | None = None,
    softcap: float | None = None,
    precision: torch.dtype | None = None,
    pair_scale: torch.Tensor | None = None,
    with_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention from un-rotated q, k, v where pair (i, j) is scored at the integer RoPE distance
    ``distance[b, i, j]``, pair by pair, in fp64.

    Args:
        q: (B, H, Tq, D) queries *before* RoPE.
        k: (B, Hkv, Tk, D) keys before RoPE; query head ``h`` reads kv head ``h // (H // Hkv)`` (GQA).
        v: (B, Hkv, Tk, Dv).
        key_pos: (B, Tk) absolute positions of the keys (any value at padding).
        distance: (B, Tq, Tk) the method's distance table (``selfextend_distance_table``, ...).
        inv_freq: (rd/2,) RoPE inverse frequencies (partial rotary when ``rd < D``).
        scaling: multiplies ``q . k`` (usually ``D ** -0.5``).
        key_valid: (B, Tk) bool, False at padding keys; a query whose own key index is padding gets zeros.
        q_start: key index of query 0 (default ``Tk - Tq``); causality is by index, key ``j <= q_start + i``.
        softcap: Gemma-2 logit soft-capping ``cap * tanh(s / cap)`` after scaling.
        pair_scale: (B, Tq, Tk) multiplies each pair's scaled score (SelfExtend's ``grouped_scale``).
        precision: None for the exact fp64 oracle. A low-precision dtype (bf16) rounds every intermediate the
            way a plain attention written in that dtype stores it (rotated q, scores, probabilities, output):
            the error of that computation sets the flash-attention style tolerance of low-precision backends.
        with_lse: also return each row's log-sum-exp of its scaled, masked scores (what split-KV kernels
            merge by).

    Returns:
        (B, H, Tq, Dv) in q's dtype; with ``with_lse`` also (B, H, Tq) fp64, natural log, ``-inf`` for a row
        without keys.
    """
    bsz, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    q_start = kv_len - q_len if q_start is None else q_start

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t if precision is None else t.to(precision).to(torch.float64)

    # Only d_ij matters: k_j is rotated at its own position j (where a model's RoPE puts it, so ``precision``
    # rounds it like a plain attention would) and q_i at j + d_ij, pair by pair.
    k_rot = rounded(rope(k, key_pos, inv_freq)).repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    v64 = v.to(torch.float64).repeat_interleave(rep, dim=1)
    q_at = key_pos.long()[:, None, :] + distance  # (B, Tq, Tk)
    scores = torch.empty(bsz, heads, q_len, kv_len, dtype=torch.float64, device=q.device)
    rows = max(1, _PAIR_ELEMENTS // max(1, bsz * heads * kv_len * dim))
    for s in range(0, q_len, rows):
        e = min(q_len, s + rows)
        # q_i rotated for every pair: (B, H, t * Tk, D) rotated at (B, t * Tk) positions
        q_pairs = q[:, :, s:e, None, :].expand(-1, -1, -1, kv_len, -1).reshape(bsz, heads, -1, dim)
        q_rot = rounded(rope(q_pairs, q_at[:, s:e].reshape(bsz, -1), inv_freq))
        q_rot = q_rot.reshape(bsz, heads, e - s, kv_len, dim)
        scores[:, :, s:e] = (q_rot * k_rot[:, :, None]).sum(-1)
    scores = rounded(scores * scaling)
    if pair_scale is not None:
        scores = rounded(scores * pair_scale[:, None].to(scores))
    if softcap is not None:
        scores = rounded(softcap * torch.tanh(scores / softcap))

    q_idx = q_start + torch.arange(q_len, device=q.device)
    allowed = (torch.arange(kv_len, device=q.device)[None, :] <= q_idx[:, None])[None]  # (1, Tq, Tk)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :] & key_valid[:, q_idx, None]  # padding keys; padding queries
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = rounded(torch.where(allowed[:, None], probs, torch.zeros_like(probs)))  # empty rows: NaN -> 0
    out = rounded(probs @ v64).to(q.dtype)
    return (out, torch.logsumexp(scores, dim=-1)) if with_lse else out


def selfextend_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
                             key_pos: torch.Tensor, window: int, group_size: int, inv_freq: torch.Tensor,
                             scaling: float, grouped_scale: float = 1.0, **kwargs) -> torch.Tensor:
    """SelfExtend attention (``G = 1``: vanilla); ``grouped_scale`` multiplies the scores of pairs at
    ``i - j >= window``; ``kwargs`` as ``attention_ref``."""
    distance = selfextend_distance_table(query_pos, key_pos, window, group_size)
    if grouped_scale != 1:
        far = (query_pos[:, :, None] - key_pos[:, None, :]) >= window
        kwargs["pair_scale"] = torch.where(far, grouped_scale, 1.0).to(torch.float64)
    return attention_ref(q, k, v, key_pos, distance, inv_freq, scaling, **kwargs)


def dca_distance_table(query_pos: torch.Tensor, key_pos: torch.Tensor, chunk_size: int, local_window: int,
                       exact_below: int = 0) -> torch.Tensor:
    """The relative RoPE distance Dual Chunk Attention uses for every (query, key) pair.

    Chunks hold ``cl = chunk_size - local_window`` positions. Queries below ``exact_below`` keep ``i - j``.
    Otherwise the key sits at ``j % cl`` and the query at ``i % cl`` (key in the query's chunk),
    ``min(i % cl + cl, chunk_size)`` (key in the previous chunk) or ``chunk_size`` (older keys). Entries with
    ``j > i`` are -1 ("don't care")."""
    cl = chunk_size - local_window
    i = query_pos.long()[..., :, None]
    j = key_pos.long()[..., None, :]
    same = j // cl == i // cl
    previous = j // cl == i // cl - 1
    query_at = torch.where(same, i % cl,
                           torch.where(previous, (i % cl + cl).clamp(max=chunk_size), chunk_size))
    distance = torch.where(i < exact_below, i - j, query_at - j % cl)
    return torch.where(j > i, torch.full_like(distance, -1), distance)


def dca_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
                      key_pos: torch.Tensor, chunk_size: int, local_window: int, exact_below: int,
                      inv_freq: torch.Tensor, scaling: float, **kwargs) -> torch.Tensor:
    """Dual Chunk Attention; ``kwargs`` as ``attention_ref``."""
    distance = dca_distance_table(query_pos, key_pos, chunk_size, local_window, exact_below)
    return attention_ref(q, k, v, key_pos, distance, inv_freq, scaling, **kwargs)


def fp32_tolerance(expected: torch.Tensor) -> float:
    """How far an fp32 computation may be off the oracle: fp32 rounding noise (rotations, scores of size
    ~10, LSE merges) is at most ~1.5e-6 of the output scale at test sizes; 1e-5 leaves a margin and stays ~1e4
    times below the error of a one-position mistake in the grouped positions (0.6 to 4 seen)."""
    return 1e-5 * max(1.0, float(expected.abs().max()))


def rounding_tolerance(plain: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """The flash-attention 2x rule for a computation in ``dtype`` (bf16, fp16): at most twice the error of the
    same attention written plainly in that dtype (``plain``: the oracle with ``precision=dtype``), plus half
    an ulp of the output scale for the final rounding."""
    scale = max(1.0, float(expected.abs().max()))
    return 2 * float((plain.double() - expected).abs().max()) + torch.finfo(dtype).eps / 2 * scale
