"""Pure math of Dual Chunk Attention (DCA, An et al. 2024, arXiv 2402.17463; ChunkLlama, Qwen2.5-1M).

Notation: query at absolute position i, key at j <= i, trained context L, ``chunk_size`` cs, ``local_window`` w,
``chunk_len`` cl = cs - w. Positions are split into chunks of cl tokens; chunk index c(p) = p // cl.

We follow the formulation ChunkLlama ships and Qwen/vLLM deploy (not the paper's c - 1 constant):

* every key sits at ``j mod cl``, so a key is rotated once and never again (it can be cached);
* intra-chunk (c(j) == c(i)): the query sits at ``i mod cl``; distance i - j, exact;
* successive-chunk (c(j) == c(i) - 1): the query sits at ``min(i mod cl + cl, cs)``; distance exact
  (= i - j) while ``i mod cl <= w``, clamped beyond, so the nearest keys of the previous chunk keep their
  true distances;
* inter-chunk (c(j) <= c(i) - 2): the query sits at ``cs``; distances lie in (w, cs].

Every distance is at most cs, whatever the length: positions never leave the trained range when cs < L.
The three score sets are disjoint per (i, j) and share one softmax (log-sum-exp merge).

Gate (``exact_below``): queries at positions below it use ordinary RoPE (distance i - j). With
``vanilla_within_trained`` (the default, as Qwen describes DCA) the gate is L, so the model is unchanged
within its trained length; otherwise it is the first position where DCA's distances differ from i - j,
which changes nothing and only lets those rows take the vanilla path.

Temperature (optional, YaRN/Qwen2.5-1M): a query at position i with i + 1 > L has its logits multiplied by
``(0.1 ln s + 1) ** 2``, s = (i + 1) / L. It depends on the query's own position, not on the length of the
call, so decoding token by token gives the same result as one full pass (HF's YaRN and vLLM fold the factor
into both q and k, hence the square).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# DCA keeps every distance inside [0, chunk_size], so no length breaks it; this is only the longest input
# it is meant for: Qwen2.5-1M reports > 80 % passkey at 1M tokens from 32k-trained models (32x).
REACH_FACTOR = 32


def chunk_len(chunk_size: int, local_window: int) -> int:
    """Tokens per chunk: ``chunk_size - local_window`` (ChunkLlama's ``chunk_len``)."""
    return chunk_size - local_window


def key_positions(pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Where every key sits: ``j mod cl``. Fixed once written, so keys are rotated once."""
    return torch.remainder(pos, chunk_len)


def intra_query_positions(pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Query position against keys of its own chunk: ``i mod cl``."""
    return torch.remainder(pos, chunk_len)


def successive_query_positions(pos: torch.Tensor, chunk_size: int, chunk_len: int) -> torch.Tensor:
    """Query position against keys of the previous chunk: ``min(i mod cl + cl, cs)``."""
    return (torch.remainder(pos, chunk_len) + chunk_len).clamp(max=chunk_size)


def inter_query_positions(pos: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Query position against keys two or more chunks back: the constant ``cs``."""
    return torch.full_like(pos, chunk_size)


def exact_below(chunk_size: int, local_window: int, trained_length: int, vanilla_within_trained: bool) -> int:
    """First query position whose attention differs from vanilla (see the module docstring)."""
    if vanilla_within_trained:
        return trained_length
    # chunk 0 is intra only; in chunk 1 the successive position min(i, cs) is exact while i <= cs
    return min(chunk_size + 1, 2 * chunk_len(chunk_size, local_window))


def relative_positions(
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
        intra_query_positions(i, cl),
        torch.where(kc == qc - 1, successive_query_positions(i, chunk_size, cl), inter_query_positions(i, chunk_size)),
    )
    dca = query_at - key_positions(j, cl)
    return torch.where(i < exact_below, i - j, dca)


def default_chunk_size(trained_length: int) -> int:
    """ChunkLlama's default: 3/4 of the trained length."""
    return 3 * trained_length // 4


def default_local_window(trained_length: int) -> int:
    """1/16 of the trained length (the issue's choice and ChunkLlama's first release; its current code uses L/8)."""
    return max(1, trained_length // 16)


@dataclass(frozen=True)
class DCAConfig:
    chunk_size: int  # cs: largest query position, hence largest distance
    local_window: int  # w: the nearest keys of the previous chunk keep exact distances up to i mod cl <= w
    trained_length: int  # L
    temperature: bool = False
    vanilla_within_trained: bool = True
    backend: str = "auto"

    @property
    def chunk_len(self) -> int:
        return chunk_len(self.chunk_size, self.local_window)

    @property
    def exact_below(self) -> int:
        return exact_below(self.chunk_size, self.local_window, self.trained_length, self.vanilla_within_trained)

    @property
    def reach(self) -> int:
        return REACH_FACTOR * self.trained_length

    def describe(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, local_window={self.local_window} (chunk_len={self.chunk_len}), "
            f"trained_length={self.trained_length}, temperature={self.temperature}, "
            f"vanilla_within_trained={self.vanilla_within_trained}, backend={self.backend}"
        )

