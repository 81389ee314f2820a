"""The plugin's GPU backend, ``--attention-backend SELFEXTEND``: vLLM's Triton backend unless the model
config asks for SelfExtend/DCA.

vLLM writes K/V with its own kernel (the Triton layout ``(num_blocks, heads, block_size, 2 * D)``, K then V
in the last dim), so only the read side changes. SelfExtend: the whole batch in one launch of the paged
kernel (``backends/triton_paged.py``: K/V read in place through the block table, grouped key tiles rotated
in the kernel) for decode requests; prefill and chunks gathered per request and run on the composed backend
(FlashAttention-2 band + cuDNN grouped pass, ``engine.attend_gpu_batch``). DCA, and head dims or dtypes that
kernel lacks: each request's K/V gathered through its block table, then ``selfextend.backends``.

CUDA graphs (``engine.cuda_graph_support``): without a method, vLLM's Triton backend's own support. With
SelfExtend and ``SELFEXTEND_CUDA_GRAPHS=1``: uniform single-token decode batches, which run one launch of the
paged kernel that reads nothing back to the host and takes every length from the device (tables built for
``max_model_len`` at start, so never reallocated under a captured graph); prefill and mixed batches run
eagerly between the captured pieces. Opt-in until a GPU checks that replays equal eager runs
(``benchmarks/gpu_paged.py`` checks the kernel's capture and replay). DCA: none (it gathers every request).
"""

from __future__ import annotations

import logging

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from . import CUDA_NAME
from .engine import MethodLayer, attend_gpu_batch, cuda_graph_support, layer_method
from .paged import PagedSelfExtend

logger = logging.getLogger("selfextend")


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

    def attend(self, query, key_cache, value_cache, metadata, output):
        method = self.method
        if not isinstance(method, PagedSelfExtend):
            return super().attend(query, key_cache, value_cache, metadata, output)
        reason = method.paged_reason(query, value_cache.shape[-1])
        if reason is not None:
            if not getattr(self, "_said_why", False):
                logger.warning("selfextend: paged kernel off (%s): gathering each request's K/V", reason)
                self._said_why = True
            return super().attend(query, key_cache, value_cache, metadata, output)
        return attend_gpu_batch(method, query, key_cache, value_cache, metadata, output, self.num_heads,
                                self.head_size, self.scale)


class SelfExtendTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        support, why = cuda_graph_support(vllm_config)
        if support == "vllm":
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        logger.info("selfextend: CUDA graphs: %s (%s)", support, why)
        if support == "decode":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER


class SelfExtendTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return CUDA_NAME

    @staticmethod
    def get_impl_cls() -> type[SelfExtendTritonAttentionImpl]:
        return SelfExtendTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SelfExtendTritonMetadataBuilder]:
        return SelfExtendTritonMetadataBuilder
