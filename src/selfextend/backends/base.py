"""The one contract every SelfExtend attention backend implements.

A backend receives q and k already rotated at their true positions (``query``/``key``) and also
moved to their grouped positions (``grouped_query``/``grouped_key``), plus the absolute positions of
both. It returns the attention output ``(B, H, q_len, D)``: one softmax over the union of neighbor
scores (``q_pos - k_pos < window``, from ``query . key``) and grouped scores (otherwise, from
``grouped_query . grouped_key``), causal, with padding keys excluded. Queries that are padding get
zeros. Backends differ only in how they compute this (dense oracle, blockwise LSE merge, kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SelfExtendInputs:
    query: torch.Tensor  # (B, H, q_len, D) rotated at query_pos
    key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at key_pos
    value: torch.Tensor  # (B, Hkv, kv_len, Dv)
    grouped_query: torch.Tensor  # (B, H, q_len, D) rotated at i // G + W - W // G
    grouped_key: torch.Tensor  # (B, Hkv, kv_len, D) rotated at j // G
    query_pos: torch.Tensor  # (B, q_len) long
    key_pos: torch.Tensor  # (B, kv_len) long (0 at padding)
    key_valid: torch.Tensor | None  # (B, kv_len) bool, None = no padding
    q_start: int  # index in the key tensor of query 0 (causality is by index: key j <= q_start + i)
    window: int
    scaling: float
    softcap: float | None = None

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[2]


class Backend:
    """Base class: a name, a capability check, and ``forward``."""

    name: str = ""

    def supports(self, inputs: SelfExtendInputs) -> str | None:
        """None if this backend can run ``inputs`` exactly, else the reason it cannot."""
        return None

    def forward(self, inputs: SelfExtendInputs) -> torch.Tensor:  # (B, H, q_len, Dv)
        raise NotImplementedError
