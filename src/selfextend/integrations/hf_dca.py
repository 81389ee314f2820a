"""Dual Chunk Attention through transformers' attention registry (the SelfExtend integration's twin).

Registered under the name ``"dca"``: one attention function plus the same lazy ``MaskSpec`` mask function
SelfExtend uses (``hf.py``), so padding is read from a (B, kv_len) mask and vanilla delegation gets exactly
the mask the original implementation would have built. q and k arrive rotated at their true positions; we
rotate keys to ``j mod cl`` (once: kept across decode steps by a ``GroupedKeyStore``) and queries to the three
DCA positions, then hand everything to a DCA backend.

Delegation to the model's original attention (bit-identical to vanilla) happens for local sliding-window
layers and whenever every query of the call lies below ``exact_below`` (the trained length by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..backends.dca import DCAInputs, select_dca_backend
from ..cache import GroupedKeyStore
from ..dca_positions import (
    DCAConfig,
    intra_query_positions,
    key_positions,
    successive_query_positions,
)
from ..positions import query_temperature
from ..rope import rotate_by
from .hf import MaskSpec, call_key_positions, query_positions, selfextend_mask

DCA_ATTN_NAME = "dca"


@dataclass
class DCAModelState:
    """Per-model settings shared by all its layers; ``apply`` may update ``config`` in place."""

    config: DCAConfig
    original_implementation: str
    original_sliding_window: Any = None
    changed_sliding_window: bool = False
    layer_modules: list = field(default_factory=list)


@dataclass
class DCALayerState:
    model_state: DCAModelState
    inv_freq: Callable[[], torch.Tensor]
    vanilla: Callable
    layout: str = "rotate_half"
    store: GroupedKeyStore = field(default_factory=GroupedKeyStore)  # keys rotated at j mod chunk_len


def dca_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer: DCALayerState | None = getattr(module, "dca_layer", None)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation='{DCA_ATTN_NAME}' but was not prepared; "
            "call selfextend.apply(model, method='dca', ...) instead of setting the implementation by hand."
        )
    state = layer.model_state
    cfg = state.config
    spec = attention_mask if isinstance(attention_mask, MaskSpec) else None

    def vanilla():
        mask = spec.materialize(state.original_implementation) if spec is not None else attention_mask
        return layer.vanilla(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    if kwargs.get("sliding_window") is not None:
        return vanilla()  # local layers never see past their window
    if dropout:
        raise ValueError("DCA is an inference method; call model.eval() (attention dropout must be 0).")

    bsz, _, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    q_start, query_pos = query_positions(query, kv_len, spec, kwargs)
    if int(query_pos.max()) < cfg.exact_below:
        return vanilla()  # every query attends with its true distances: exactly vanilla

    key_valid, key_pos = call_key_positions("DCA", spec, attention_mask, query_pos, q_start, kv_len)

    cs, cl = cfg.chunk_size, cfg.chunk_len
    inv_freq = layer.inv_freq()

    factor = query_temperature(query_pos, cfg.trained_length, query.dtype) if cfg.temperature else None  # logits x t^2

    def to(positions: torch.Tensor) -> torch.Tensor:
        rotated = rotate_by(query, positions - query_pos, inv_freq, layer.layout)
        return rotated if factor is None else rotated * factor

    query_intra = to(intra_query_positions(query_pos, cl))
    query_succ = to(successive_query_positions(query_pos, cs, cl))
    query_inter = to(torch.full_like(query_pos, cs))

    written = q_start + q_len

    def rotate(keys: torch.Tensor, start: int) -> torch.Tensor:  # only keys not yet in the store
        pos = key_pos[:, start : start + keys.shape[2]]
        return rotate_by(keys, key_positions(pos, cl) - pos, inv_freq, layer.layout)

    chunk_key = layer.store.grouped_keys(key, written, keep=q_start > 0, rotate=rotate)
    inputs = DCAInputs(
        query=query,
        key=key[:, :, :written],
        value=value[:, :, :written],
        chunk_key=chunk_key,
        query_intra=query_intra,
        query_succ=query_succ,
        query_inter=query_inter,
        query_pos=query_pos,
        key_pos=key_pos[:, :written],
        key_valid=None if key_valid is None else key_valid[:, :written],
        q_start=q_start,
        chunk_size=cs,
        local_window=cfg.local_window,
        exact_below=cfg.exact_below,
        scaling=scaling if scaling is not None else head_dim**-0.5,
        softcap=kwargs.get("softcap"),
    )
    out = select_dca_backend(cfg.backend, inputs).forward(inputs)  # (B, H, q_len, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the DCA attention function and the shared lazy mask function (idempotent)."""
    AttentionInterface.register(DCA_ATTN_NAME, dca_attention_forward)
    AttentionMaskInterface.register(DCA_ATTN_NAME, selfextend_mask)
