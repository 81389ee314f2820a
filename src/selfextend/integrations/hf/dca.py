"""Dual Chunk Attention's attention in transformers: three rotated queries, chunk-rotated keys, a backend.

q and k arrive rotated at their true positions; keys move to ``j mod chunk_len`` (once: kept across decode
steps by a ``RotatedKeyStore`` beside the cache) and queries to the three DCA positions (the inputs built as
every host builds them, ``attention_inputs``), then a backend
computes one softmax over the intra-, successive- and inter-chunk scores. Calls whose every query lies below
``exact_below`` (the trained length by default) run the model's own attention: bit-identical to vanilla.
"""

from __future__ import annotations

import torch

from ...config import ATTENTION_SPECS, DCAConfig
from ...positions import DCA_REACH_FACTOR
from .attention import LAYER_ATTR, AttentionCall, AttentionIntegration, ModelState, warn_per_1k
from .grouped_cache import RotatedKeyStore

SPEC = ATTENTION_SPECS["dca"]


class DCAAttention(AttentionIntegration):
    attn_name = "dca"
    label = "DCA"

    def new_layer(self) -> RotatedKeyStore:
        return RotatedKeyStore()  # keys rotated at j mod chunk_len

    def settings_changed(self, state: ModelState) -> None:
        for module in state.layer_modules:
            getattr(module, LAYER_ATTR).extra.clear()

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        cfg: DCAConfig = call.config
        if cfg.exact(call.max_pos):
            return None  # every query attends with its true distances: exactly vanilla
        if call.max_pos >= cfg.reach:  # positions stay in range, so a warning, not SelfExtend's refusal
            warn_per_1k(call.layer.model_state.warned, call.max_pos + 1, (
                f"{call.max_pos + 1} tokens are past DCA's reach {cfg.reach} = {DCA_REACH_FACTOR}x the "
                f"trained length {cfg.trained_length}, the longest published training-free use: positions "
                "stay in range, quality is untested there."))

        key_valid, key_pos = call.key_positions()
        rotate = call.rotator(SPEC.maps(cfg))
        store: RotatedKeyStore = call.layer.extra

        def chunk_keys() -> torch.Tensor:  # only keys not yet in the store are rotated
            def at(keys: torch.Tensor, start: int) -> torch.Tensor:
                return rotate(keys, key_pos[:, start : start + keys.shape[2]], "key")

            return store.rotated_keys(call.key, call.written, keep=call.q_start > 0, rotate=at)

        inputs = SPEC.inputs(cfg, call.query, call.max_pos, rotate, chunk_keys,
                             **call.backend_inputs(key_valid, key_pos))
        return call.backend(inputs).forward(inputs)  # (B, H, q_len, D)


DCA = DCAAttention()
