"""SelfExtend and DCA inside vLLM: a ``vllm.general_plugins`` entry point and the overrides users pass.

    from vllm import LLM
    from selfextend.integrations.vllm import overrides
    llm = LLM(model=DIR, hf_overrides=overrides(DIR, target_length=32768))

or ``vllm serve DIR --hf-overrides '{"selfextend": {"group_size": 4, "window": 1024,
"trained_length": 8192}, "max_position_embeddings": 29696}'`` (``selfextend serve --engine vllm`` prints
and runs that). vLLM applies dict overrides after it has fixed ``max_model_len`` from the config, so the reach
must arrive as ``max_position_embeddings``; the plugin checks it at engine start and names the value when
missing.

``register`` runs in every vLLM process, possibly several times: on CPU it points vLLM's ``CPU_ATTN`` name at
``cpu.SelfExtendCPUAttentionBackend``; on GPUs it adds ``--attention-backend SELFEXTEND``
(``cuda.SelfExtendTritonAttentionBackend``). Both are vLLM's own backends unless the model config asks for a
method.
This package imports vLLM only inside ``register`` and the backend modules (extra ``selfextend-llm[vllm]``).
"""

from __future__ import annotations

from typing import Any

from .settings import KEYS, Settings, original_length, overrides_for, resolve

CPU_BACKEND = "selfextend.integrations.vllm.cpu.SelfExtendCPUAttentionBackend"
CUDA_BACKEND = "selfextend.integrations.vllm.cuda.SelfExtendTritonAttentionBackend"
CUDA_NAME = "SELFEXTEND"  # --attention-backend SELFEXTEND


def register() -> None:
    """The ``vllm.general_plugins`` entry point; idempotent (overriding a member twice is one override)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    elif current_platform.is_cuda_alike() and CUDA_NAME not in AttentionBackendEnum.__members__:
        register_backend(CUDA_NAME, CUDA_BACKEND)  # a second registration of a new name raises


def overrides(model: str, method: str = "selfextend", *, target_length: int | None = None,
              **params: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that make vLLM run ``method`` (``"selfextend"`` or ``"dca"``) on ``model`` (a
    local dir or a cached hub id), settings resolved as ``selfextend.apply`` resolves them (same rule, same
    tuned settings), ``max_position_embeddings`` raised to the reach. For a Qwen2.5-1M checkpoint, ``"dca"``
    takes its ``dual_chunk_attention_config``."""
    return overrides_for(settings_for(model, method, target_length=target_length, **params))


def settings_for(model: str, method: str = "selfextend", *, target_length: int | None = None,
                 **params: Any) -> Settings:
    from transformers import AutoConfig

    if method not in KEYS:
        raise ValueError(f"method must be one of {', '.join(map(repr, KEYS))}, got {method!r}")
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    config = getattr(config, "text_config", None) or config
    body = dict(params)
    if target_length is not None:
        body["target_length"] = target_length
    setattr(config, method, body)
    settings = resolve(config, trained_length=original_length(model))
    assert settings is not None
    return settings
