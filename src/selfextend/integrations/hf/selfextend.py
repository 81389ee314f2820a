"""SelfExtend's attention in transformers: grouped q/k from the rotated ones, the grouped KV cache, a backend.

q and k arrive rotated at their true positions; the query moves to ``i // G + W - W // G`` by one delta
rotation, keys to ``j // G`` (once per key, in the KV cache itself: ``grouped_cache.GroupedCache``), and a
backend computes one softmax over neighbor and grouped scores. Calls whose every key is a neighbor (the
largest query position below W) and ``group_size=1`` run the model's own attention: bit-identical to vanilla.
"""

from __future__ import annotations

import warnings

import torch

from ...backends import SelfExtendInputs, select_backend
from ...config import SelfExtendConfig
from ...positions import (
    grouped_query_positions,
    padding_spans,
    query_scale,
    reach_formula,
    smallest_group_size,
)
from .attention import AttentionCall, AttentionIntegration, ModelState
from .grouped_cache import GroupedCache

_overflow_warned: set[int] = set()


class SelfExtendAttention(AttentionIntegration):
    attn_name = "selfextend"
    label = "SelfExtend"

    def remaps(self, config: SelfExtendConfig) -> bool:
        return config.group_size > 1

    def new_state(self, model: torch.nn.Module) -> GroupedCache:
        return GroupedCache(model.base_model)  # keeps old keys grouped in the KV cache between calls

    def closing(self, state: ModelState) -> None:
        state.extra.close()  # caches filled meanwhile go back to true positions

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        cfg: SelfExtendConfig = call.config
        keeper: GroupedCache = call.layer.model_state.extra
        layer_idx, key = call.layer.layer_idx, call.key
        # every key a neighbor, or G = 1: vanilla, unless a query row must be scaled (temperature, log scale)
        scaled = bool((cfg.temperature and call.max_pos >= cfg.trained_length)
                      or (cfg.scale_base and call.max_pos + 1 > cfg.scale_base))
        if (call.max_pos < cfg.window or cfg.group_size == 1) and not scaled:
            if keeper.holds(layer_idx, key):  # a cache grouped earlier (then cropped, or G changed)
                keeper.ungroup(layer_idx, key, call.key_positions()[1], call.q_start, 0, call.rotate)
            return None
        if call.max_pos >= cfg.max_length:
            _overflow(cfg, call.max_pos + 1)

        key_valid, key_pos = call.key_positions()
        G, W = cfg.group_size, cfg.window
        query, query_pos, written = call.query, call.query_pos, call.written
        factor = query_scale(query_pos, cfg.trained_length, query.dtype, temperature=cfg.temperature,
                             scale_base=cfg.scale_base)
        if factor is not None:  # per query row, so neighbor and grouped logits of that row grow alike
            query = query * factor
        query_delta = call.per_forward(("query_delta", *query_pos.shape, call.kv_len, query.device, G, W),
                                       lambda: grouped_query_positions(query_pos, G, W) - query_pos)
        grouped_query = call.rotate(query, query_delta)
        if cfg.grouped_scale != 1:  # grouped scores are q_g . k_g alone: scaling q_g scales only them
            grouped_query = grouped_query * cfg.grouped_scale
        contiguous = ends_contiguous(key_valid, written)
        grouped_key = keeper.grouped_keys(layer_idx, key, key_pos, written, call.q_start, W, G, contiguous,
                                          call.rotate)
        inputs = SelfExtendInputs(query=query, grouped_query=grouped_query, grouped_key=grouped_key, window=W,
                                  ends_contiguous=contiguous or None,
                                  **call.backend_inputs(key_valid, key_pos))
        out = select_backend(cfg.backend, inputs).forward(inputs)  # (B, H, q_len, D)
        keeper.commit(layer_idx, key, grouped_key, key_pos, written, W, G, contiguous, call.rotate,
                      restore_with=call.layer.rotate)
        return out


def ends_contiguous(key_valid: torch.Tensor | None, written: int) -> bool:
    """Do each row's real keys run without a gap up to the last key (no padding, or left padding)?"""
    if key_valid is None:
        return True
    first, _, count = padding_spans(key_valid, written)
    return bool(((count == 0) | (first + count == written)).all())


def _overflow(cfg: SelfExtendConfig, length: int) -> None:
    msg = (
        f"{length} tokens exceed the reach {reach_formula(cfg.trained_length, cfg.window, cfg.group_size)}"
        f" of window={cfg.window}, group_size={cfg.group_size}: grouped positions leave "
        f"the trained range. Set group_size >= {smallest_group_size(length, cfg.trained_length, cfg.window)}"
    )
    if not cfg.allow_overflow:
        raise ValueError(msg + ", or pass allow_overflow=True to continue with a warning.")
    if length // 1024 not in _overflow_warned:  # once per 1k tokens, not once per layer
        _overflow_warned.add(length // 1024)
        warnings.warn(msg + ".", RuntimeWarning, stacklevel=3)


SELFEXTEND = SelfExtendAttention()
