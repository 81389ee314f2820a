"""The plugin's GPU backend, ``--attention-backend SELFEXTEND``: vLLM's Triton backend unless the model
config asks for SelfExtend/DCA, then the project's Triton kernel over each request's K/V gathered from the
paged cache.

vLLM writes K/V with its own kernel (the Triton layout ``(num_blocks, heads, block_size, 2 * D)``, K then V
in the last dim), so only the read side changes: gather a request's keys through its block table, rotate the
grouped ones, run ``backends/triton.py``. The per-request loop reads host-side lengths, so the builder
declares no CUDA-graph support (vLLM then runs these layers eagerly). Not yet: a paged kernel that reads K/V
through the block table and rotates grouped key tiles in-kernel (no gather).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .engine import MethodLayer, layer_method

NAME = "SELFEXTEND"


class SelfExtendTritonAttentionImpl(MethodLayer, TritonAttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None,
                 sinks=None, **extra) -> None:
        own = {k: extra.pop(k) for k in ("use_alibi_sqrt", "chunk_lookback") if k in extra}
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
                         **own)
        self.method = layer_method(get_current_vllm_config(), sliding_window=sliding_window,
                                   attn_type=attn_type, softcap=logits_soft_cap, extra=extra)

    def split_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_cache.split(self.head_size, dim=-1)  # (blocks, heads, block_size, D) each


class SelfExtendTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SelfExtendTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[SelfExtendTritonAttentionImpl]:
        return SelfExtendTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SelfExtendTritonMetadataBuilder]:
        return SelfExtendTritonMetadataBuilder
