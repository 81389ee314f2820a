"""Plumbing shared by the plugin's backends: each layer reads and checks the settings (cheap), refuses what
cannot be exact, and gets the engine's one ``PagedMethod`` (rotation tables per engine, not per layer).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .paged import PagedMethod, PagedSelfExtend, gather, method_for
from .settings import Settings, original_length, refusal, resolve

logger = logging.getLogger("selfextend")

_methods: dict[tuple, PagedMethod] = {}

CUDA_GRAPHS_ENV = "SELFEXTEND_CUDA_GRAPHS"  # "1": let vLLM capture SelfExtend's decode steps


def engine_settings(vllm_config) -> Settings | None:
    """The settings the engine's model config asks for, validated (None: vanilla)."""
    model_config = vllm_config.model_config
    hf_config = model_config.hf_text_config
    if not any(getattr(hf_config, key, None) is not None for key in ("selfextend", "dca")):
        return None
    trained = original_length(model_config.hf_config_path or model_config.model, model_config.revision)
    return resolve(hf_config, trained_length=trained)


def layer_method(vllm_config, *, sliding_window: int | None, attn_type: str, softcap: float | None,
                 extra: dict[str, Any]) -> PagedMethod | None:
    """The method one attention layer runs, or None to leave the layer to vLLM; raises (at engine start) what
    the paged path cannot compute exactly."""
    if extra.get("dual_chunk_attention_config"):  # vLLM's own layer would reject the argument outright
        raise ValueError(
            "selfextend vLLM plugin: the model config carries dual_chunk_attention_config, which makes vLLM "
            "rotate q/k for its removed DCA backend; serve it through the plugin's DCA instead: "
            "selfextend.integrations.vllm.overrides(model, 'dca') (or `selfextend serve --engine vllm "
            "--method dca`) sets dual_chunk_attention_config to null and the dca settings from it.")
    settings = engine_settings(vllm_config)
    if settings is None:
        return None
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    hf_config = model_config.hf_text_config
    trained = settings.config.trained_length
    reason = refusal(
        hf_config, settings, max_model_len=model_config.max_model_len,
        raised=getattr(hf_config, "max_position_embeddings", trained) > trained,
        cache_dtype=str(vllm_config.cache_config.cache_dtype),
        context_parallel=max(getattr(parallel, "decode_context_parallel_size", 1),
                             getattr(parallel, "prefill_context_parallel_size", 1)),
        sliding_window=sliding_window, attn_type=str(getattr(attn_type, "value", attn_type)),
        softcap=softcap)
    if reason is not None:
        raise ValueError(f"selfextend vLLM plugin: {reason}")
    support, _ = cuda_graph_support(vllm_config, settings)
    max_len = model_config.max_model_len if support == "decode" else 0  # tables a graph can keep
    key = (settings.method, settings.config, tuple(settings.inv_freq.tolist()), max_len)
    if key not in _methods:
        logger.info("selfextend: vLLM attention runs %s (reach %d tokens)", settings.describe(),
                    settings.reach)
        _methods[key] = method_for(settings.config, settings.inv_freq, max_len=max_len)
    return _methods[key]


def cuda_graphs_requested() -> bool:
    """Whether ``SELFEXTEND_CUDA_GRAPHS=1`` asks for captured decode steps (unset or ``0``: not)."""
    value = os.environ.get(CUDA_GRAPHS_ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{CUDA_GRAPHS_ENV}={value!r}: use 1 to let vLLM capture SelfExtend's decode steps "
                         "in CUDA graphs, or 0 (the default) to run its attention eagerly")
    return value == "1"


def cuda_graph_support(vllm_config, settings: Settings | None = None) -> tuple[str, str]:
    """What a GPU engine may capture in CUDA graphs, and why: ``"vllm"`` (no method: vLLM's own backend
    decides), ``"decode"`` (uniform single-token decode batches: the paged kernel's launch, which reads
    nothing back and takes every length from the device, ``PagedSelfExtend.attend_paged``) or ``"none"``.

    Decode capture is opt-in (``SELFEXTEND_CUDA_GRAPHS=1``) until replays are checked against eager runs
    on a GPU; prefill and mixed batches always run eagerly (their gather path reads lengths on the host),
    and so does DCA (it gathers every request). ``settings``: the engine's, when the caller has them."""
    settings = settings if settings is not None else engine_settings(vllm_config)
    if settings is None:
        return "vllm", "no method asked for"
    if not isinstance(settings.config, PagedSelfExtend.spec.config_class):
        return "none", f"{settings.method} gathers each request's keys through lengths read on the host"
    model_config = vllm_config.model_config
    head = model_config.get_head_size()
    method = PagedSelfExtend(settings.config, settings.inv_freq)  # tables are built lazily: nothing here
    reason = method.kernel_reason(head, head, model_config.dtype, "cuda")
    if reason is not None:
        return "none", f"the paged kernel cannot run this model ({reason}), so every step gathers"
    if not cuda_graphs_requested():
        return "none", (f"decode capture is not yet checked on a GPU; set {CUDA_GRAPHS_ENV}=1 to let vLLM "
                        "capture decode steps")
    return "decode", "uniform single-token decode batches run the paged kernel, which graphs can replay"


def attend_requests(method: PagedMethod, query: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, metadata, output: torch.Tensor, num_heads: int, head_size: int,
                    scale: float, requests: list[int] | None = None) -> torch.Tensor:
    """Every request of a batch (or those listed in ``requests``), one at a time: its queries against all its
    keys, gathered from the paged caches ``(num_blocks, kv_heads, block_size, D)`` through its row of the
    block table, then a backend of ``selfextend.backends`` (on CUDA the composed backend: FlashAttention-2
    and cuDNN). ``metadata`` needs ``num_actual_tokens``, ``query_start_loc``, ``seq_lens`` and
    ``block_table`` (vLLM's CPU and Triton metadata both have them). The gathered K/V and grouped keys are
    one request's, one layer's: freed when the request is done."""
    n = metadata.num_actual_tokens
    out = output[:n].view(n, num_heads, head_size)
    starts = metadata.query_start_loc.tolist()
    lengths = metadata.seq_lens.tolist()
    block_size = key_cache.shape[2]
    for r in range(len(starts) - 1) if requests is None else requests:
        q0, q1, seq_len = starts[r], starts[r + 1], lengths[r]
        if q1 == q0:
            continue
        blocks = metadata.block_table[r, : -(-seq_len // block_size)]
        out[q0:q1] = method.attend(query[q0:q1], gather(key_cache, blocks, seq_len),
                                   gather(value_cache, blocks, seq_len), scale).to(out.dtype)
    return output


def attend_gpu_batch(method: PagedSelfExtend, query: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, metadata, output: torch.Tensor, num_heads: int,
                     head_size: int, scale: float) -> torch.Tensor:
    """SelfExtend on a GPU batch: decode requests (one query token) in one launch of the paged kernel, which
    reads keys in place and rotates grouped tiles itself (memory-bound, no gather); requests with more query
    tokens (prefill, chunks) gathered and run on the composed backend, whose two passes run at the speed of
    the GPU's own attention kernels where the paged kernel (a hand-written attention) is several times slower
    on a long prefill. A decode-only batch reads nothing back to the host."""
    n, shape = metadata.num_actual_tokens, (-1, num_heads, head_size)
    if metadata.max_query_len <= 1:
        method.attend_paged(query[:n].view(shape), key_cache, value_cache, metadata.block_table,
                            metadata.seq_lens, metadata.query_start_loc, scale,
                            max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len,
                            out=output[:n].view(shape))
        return output
    starts = metadata.query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    decode = [r for r, q in enumerate(q_lens) if q == 1]
    if decode:  # the decode requests as one packed sub-batch
        device = query.device
        rows = torch.tensor(decode, device=device)
        tokens = torch.tensor([starts[r] for r in decode], device=device)
        seq_lens = metadata.seq_lens[rows]
        sub = method.attend_paged(query.view(shape)[tokens], key_cache, value_cache,
                                  metadata.block_table[rows], seq_lens,
                                  torch.arange(len(decode) + 1, device=device, dtype=torch.int32), scale,
                                  max_query_len=1, max_seq_len=metadata.max_seq_len)
        output.view(shape)[tokens] = sub.to(output.dtype)
    return attend_requests(method, query, key_cache, value_cache, metadata, output, num_heads, head_size,
                           scale, requests=[r for r, q in enumerate(q_lens) if q > 1])


class MethodLayer:
    """The ``forward`` both backends share, mixed in before vLLM's impl class: vLLM's own attention when the
    layer has no method (``self.method is None``), else every request through ``attend_requests``. A backend
    says only how its cache splits into K and V (``split_cache``)."""

    method: PagedMethod | None

    def split_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, metadata,
               output: torch.Tensor) -> torch.Tensor:
        """The method over the batch; a backend with a faster way for some batches overrides this."""
        return attend_requests(self.method, query, key_cache, value_cache, metadata, output, self.num_heads,
                               self.head_size, self.scale)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if self.method is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with SelfExtend/DCA")
        key_cache, value_cache = self.split_cache(kv_cache)
        return self.attend(query, key_cache, value_cache, attn_metadata, output)
