"""Dual Chunk Attention's attention in transformers: three rotated queries, chunk-rotated keys, a backend.

q and k arrive rotated at their true positions; keys move to ``j mod chunk_len`` (once: kept across decode
steps by a ``GroupedKeyStore`` beside the cache) and queries to the three DCA positions, then a backend
computes one softmax over the intra-, successive- and inter-chunk scores. Calls whose every query lies below
``exact_below`` (the trained length by default) run the model's own attention: bit-identical to vanilla.
"""

from __future__ import annotations

import torch

from ...backends import DCAInputs, select_backend
from ...config import DCAConfig
from ...positions import (
    chunk_key_positions,
    inter_chunk_query_positions,
    intra_chunk_query_positions,
    query_scale,
    successive_chunk_query_positions,
)
from .attention import LAYER_ATTR, AttentionCall, AttentionIntegration, ModelState
from .grouped_cache import GroupedKeyStore


class DCAAttention(AttentionIntegration):
    attn_name = "dca"
    label = "DCA"

    def new_layer(self) -> GroupedKeyStore:
        return GroupedKeyStore()  # keys rotated at j mod chunk_len

    def settings_changed(self, state: ModelState) -> None:
        for module in state.layer_modules:
            getattr(module, LAYER_ATTR).extra.clear()

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        cfg: DCAConfig = call.config
        if call.max_pos < cfg.exact_below:
            return None  # every query attends with its true distances: exactly vanilla

        key_valid, key_pos = call.key_positions()
        cs, cl = cfg.chunk_size, cfg.chunk_len
        query, query_pos = call.query, call.query_pos
        factor = query_scale(query_pos, cfg.trained_length, query.dtype, temperature=cfg.temperature)

        def to(positions: torch.Tensor) -> torch.Tensor:  # logits x t^2
            rotated = call.rotate(query, positions - query_pos, shared=False)
            return rotated if factor is None else rotated * factor

        def rotate(keys: torch.Tensor, start: int) -> torch.Tensor:  # only keys not yet in the store
            pos = key_pos[:, start : start + keys.shape[2]]
            return call.rotate(keys, chunk_key_positions(pos, cl) - pos, shared=False)

        store: GroupedKeyStore = call.layer.extra
        inputs = DCAInputs(
            query=query,
            chunk_key=store.grouped_keys(call.key, call.written, keep=call.q_start > 0, rotate=rotate),
            query_intra=to(intra_chunk_query_positions(query_pos, cl)),
            query_succ=to(successive_chunk_query_positions(query_pos, cs, cl)),
            query_inter=to(inter_chunk_query_positions(query_pos, cs)),
            chunk_size=cs,
            local_window=cfg.local_window,
            exact_below=cfg.exact_below,
            **call.backend_inputs(key_valid, key_pos),
        )
        return select_backend(cfg.backend, inputs).forward(inputs)  # (B, H, q_len, D)


DCA = DCAAttention()
