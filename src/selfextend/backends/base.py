"""The one contract every attention backend implements, for every method.

A backend receives one method's inputs: q and k already rotated at their true positions (``query``/``key``),
the same q and k also rotated to the method's remapped positions, and the absolute positions of both. It
returns the attention output ``(B, H, q_len, Dv)``: one softmax over all keys of a row, each (query, key)
pair scored by the q/k variant the method assigns it from their *positions*, causal by index (key
``j <= q_start + i``), padding keys excluded, padding queries zero. Backends differ only in how they compute
this (dense loop, blockwise log-sum-exp merge, kernels).

* ``SelfExtendInputs``: neighbor pairs (``q_pos - k_pos < window``) score ``query . key``, the others
  ``grouped_query . grouped_key``.
* ``DCAInputs``: queries below ``exact_below`` score ``query . key``; otherwise keys of the query's own chunk
  ``query_intra . chunk_key``, of the previous chunk ``query_succ . chunk_key``, older
  ``query_inter . chunk_key``.

``pairs()`` and ``part()`` state that assignment once per method, so the dense ``reference`` backend is one
loop for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..positions import padding_spans


@dataclass(kw_only=True)
class AttentionInputs:
    """What every method's backend receives (keyword-only: a dozen tensors and ints are easy to misplace)."""

    method: ClassVar[str]

    query: torch.Tensor  # (B, H, q_len, D) rotated at query_pos
    key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at key_pos
    value: torch.Tensor  # (B, Hkv, kv_len, Dv)
    query_pos: torch.Tensor  # (B, q_len) long
    key_pos: torch.Tensor  # (B, kv_len) long (0 at padding)
    key_valid: torch.Tensor | None  # (B, kv_len) bool, None = no padding
    q_start: int  # index in the key tensor of query 0 (causality is by index: key j <= q_start + i)
    scaling: float
    softcap: float | None = None  # Gemma 2: cap * tanh(score / cap)
    # True: each row's real keys are one run ending at the last key (no padding, or left padding), as the
    # caller already knows; None: the backend checks (a host read). Lets a decode step run without one.
    ends_contiguous: bool | None = None

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[2]


@dataclass(kw_only=True)
class SelfExtendInputs(AttentionInputs):
    method: ClassVar[str] = "self-extend"

    grouped_query: torch.Tensor  # (B, H, q_len, D) rotated at i // G + W - W // G
    grouped_key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at j // G
    window: int

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (query, key) variants, indexed by ``part``: 0 neighbor, 1 grouped."""
        return [(self.query, self.key), (self.grouped_query, self.grouped_key)]

    def part(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(B, t, Tk) index into ``pairs()`` for queries at ``query_pos`` (B, t) and keys at ``key_pos``
        (B, Tk)."""
        distance = query_pos[:, :, None] - key_pos[:, None, :]
        return (distance >= self.window).long()


@dataclass(kw_only=True)
class DCAInputs(AttentionInputs):
    method: ClassVar[str] = "dca"

    chunk_key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at key_pos mod chunk_len
    query_intra: torch.Tensor  # (B, H, q_len, D) rotated at i mod cl (times the temperature)
    query_succ: torch.Tensor  # rotated at min(i mod cl + cl, cs)
    query_inter: torch.Tensor  # rotated at cs
    chunk_size: int
    local_window: int
    exact_below: int  # queries at positions below it attend with plain RoPE

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (query, key) variants, indexed by ``part``: 0 plain, 1 intra, 2 successive, 3 inter-chunk."""
        return [(self.query, self.key), (self.query_intra, self.chunk_key), (self.query_succ, self.chunk_key),
                (self.query_inter, self.chunk_key)]

    def part(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        cl = self.chunk_len
        key_chunk = torch.div(key_pos, cl, rounding_mode="floor")[:, None, :]  # (B, 1, Tk)
        qp = query_pos[:, :, None]  # (B, t, 1)
        qc = torch.div(qp, cl, rounding_mode="floor")
        part = torch.where(key_chunk == qc, 1, torch.where(key_chunk == qc - 1, 2, 3))
        return torch.where(qp < self.exact_below, 0, part)


Inputs = AttentionInputs  # SelfExtendInputs or DCAInputs


class Backend:
    """Base class: a name, the methods it computes, a capability check, and ``forward``."""

    name: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()  # the ``Inputs.method`` values it accepts
    # True: when named explicitly but unable to run an input (limits that depend on the hardware or the
    # layer: head dim, device, soft-capping), log the reason once and fall back to ``auto`` instead of raising
    fallback_when_unsupported: ClassVar[bool] = False

    def validate(self, inputs: Inputs) -> None:
        """Raise for inputs this backend refuses outright when named (errors a fallback would hide)."""

    def supports(self, inputs: Inputs) -> str | None:
        """None if this backend can run ``inputs`` exactly, else the reason it cannot."""
        return None

    def forward(self, inputs: Inputs) -> torch.Tensor:  # (B, H, q_len, Dv)
        raise NotImplementedError


def real_key_ranges(inp: Inputs) -> list[tuple[int, int]] | None:
    """Per row, the [first, last] key index of its real tokens up to the last query, or None when some row's
    real tokens are not one contiguous block (right padding followed by new tokens)."""
    last_query_key = inp.q_start + inp.q_len - 1
    if inp.key_valid is None:
        return [(0, last_query_key)] * inp.query.shape[0]
    first, last, count = padding_spans(inp.key_valid, last_query_key + 1)
    if bool(((count > 0) & (last - first + 1 != count)).any()):
        return None
    return [(int(f), int(la)) for f, la in zip(first.tolist(), last.tolist(), strict=True)]


def contiguous_padding(inp: Inputs) -> bool:
    """True when each row's real keys form one block, as every fast backend assumes."""
    return real_key_ranges(inp) is not None


def query_range(inp: Inputs, first: int, last: int) -> tuple[int, int]:
    """Query indices [q_first, q_last] whose own token lies in the real key range [first, last]."""
    return max(first, inp.q_start) - inp.q_start, last - inp.q_start
