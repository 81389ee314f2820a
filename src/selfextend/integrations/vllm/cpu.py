"""vLLM's CPU attention backend with SelfExtend/DCA: the same backend unless the model config asks for one.

vLLM gives every CPU attention layer the backend registered as ``CPU_ATTN`` and refuses other names there, so
the plugin registers this subclass under that name (``get_name()`` stays ``"CPU_ATTN"``). A layer whose model
config carries no ``selfextend``/``dca`` settings runs the parent's code untouched: vanilla vLLM, bit for bit.
Otherwise the layer writes K/V to the paged cache in plain ``(block, head, slot, D)`` order (the C++ kernels'
layout depends on the ISA, and the method must read keys back to rotate them) and attends with ``paged.py``.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .engine import MethodLayer, layer_method
from .paged import write


class SelfExtendCPUAttentionImpl(MethodLayer, CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None,
                 sinks=None, **extra) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.method = layer_method(get_current_vllm_config(), sliding_window=sliding_window,
                                   attn_type=attn_type, softcap=logits_soft_cap, extra=extra)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.method is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        key_cache, value_cache = self.split_cache(kv_cache)
        n = slot_mapping.shape[0]
        write(key_cache, key[:n], slot_mapping)
        write(value_cache, value[:n], slot_mapping)

    def split_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split(kv_cache)


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves of a CPU cache block ``(num_blocks, heads, block_size, 2 * D)`` as vLLM's CPU
    backend views them: ``(num_blocks, heads, block_size, D)`` each."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


class SelfExtendCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM's CPU platform accepts this name only; Attention looks the enum up by it

    @staticmethod
    def get_impl_cls() -> type[SelfExtendCPUAttentionImpl]:
        return SelfExtendCPUAttentionImpl
