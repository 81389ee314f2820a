"""SelfExtend's attention in transformers: grouped q/k from the rotated ones, the grouped KV cache, a backend.

q and k arrive rotated at their true positions; the query moves to ``i // G + W - W // G`` by one delta
rotation, keys to ``j // G`` (once per key, in the KV cache itself: ``grouped_cache.GroupedCache``), the
inputs are built as every host builds them (``attention_inputs``), and a backend computes one softmax over
neighbor and grouped scores. Calls whose every key is a neighbor (the
largest query position below W) and ``group_size=1`` run the model's own attention: bit-identical to vanilla.
"""

from __future__ import annotations

import torch

from ...config import ATTENTION_SPECS, SelfExtendConfig
from ...positions import padding_spans, reach_formula, smallest_group_size
from .attention import AttentionCall, AttentionIntegration, ModelState, warn_per_1k
from .grouped_cache import GroupedCache

SPEC = ATTENTION_SPECS["self-extend"]


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
        exact = cfg.exact(call.max_pos)  # every key a neighbor, or G = 1
        if exact and keeper.holds(layer_idx, key):  # a cache grouped earlier (then cropped, or G changed)
            keeper.ungroup(layer_idx, key, call.key_positions()[1], call.q_start, 0, call.rotate)
        if exact and not cfg.scales_queries(call.max_pos):
            return None  # vanilla, unless a query row must be scaled (temperature, log scale)
        if call.max_pos >= cfg.reach:
            _overflow(cfg, call.max_pos + 1, call.layer.model_state.warned)

        key_valid, key_pos = call.key_positions()
        G, W, written = cfg.group_size, cfg.window, call.written
        contiguous = ends_contiguous(key_valid, written)
        grouped: list[torch.Tensor] = []

        def grouped_keys() -> torch.Tensor:  # kept grouped in the KV cache: only new keys are rotated
            grouped.append(keeper.grouped_keys(layer_idx, key, key_pos, written, call.q_start, W, G,
                                               contiguous, call.rotate, restore_with=call.layer.rotate))
            return grouped[0]

        inputs = SPEC.inputs(cfg, call.query, call.max_pos, call.rotator(SPEC.maps(cfg)),
                             grouped_keys, ends_contiguous=contiguous or None,
                             **call.backend_inputs(key_valid, key_pos))
        out = call.backend(inputs).forward(inputs)  # (B, H, q_len, D)
        if grouped:
            keeper.commit(layer_idx, key, grouped[0], key_pos, written, W, G, contiguous,
                          restore_with=call.layer.rotate)
        return out


def ends_contiguous(key_valid: torch.Tensor | None, written: int) -> bool:
    """Do each row's real keys run without a gap up to the last key (no padding, or left padding)?"""
    if key_valid is None:
        return True
    first, _, count = padding_spans(key_valid, written)
    return bool(((count == 0) | (first + count == written)).all())


def _overflow(cfg: SelfExtendConfig, length: int, warned: set[int]) -> None:
    msg = (
        f"{length} tokens exceed the reach {reach_formula(cfg.trained_length, cfg.window, cfg.group_size)}"
        f" of window={cfg.window}, group_size={cfg.group_size}: grouped positions leave "
        f"the trained range. Set group_size >= {smallest_group_size(length, cfg.trained_length, cfg.window)}"
    )
    if not cfg.allow_overflow:
        raise ValueError(msg + ", or pass allow_overflow=True to continue with a warning.")
    warn_per_1k(warned, length, msg + ".")


SELFEXTEND = SelfExtendAttention()
