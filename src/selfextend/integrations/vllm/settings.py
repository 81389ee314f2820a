"""What the plugin reads from vLLM's config: the method asked for, validated as ``apply`` validates it, and
the refusals for what the paged path cannot compute exactly. Nothing here imports vLLM.

Users ask through ``hf_overrides``: ``{"selfextend": {"group_size": G, "window": W}}`` or
``{"selfextend": {"target_length": N}}``, or ``{"dca": {...}}``, plus ``"max_position_embeddings": reach`` so
that vLLM sizes its RoPE cache and its ``max_model_len`` for the longer inputs (``overrides`` builds both).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from typing import Any

import torch

from ...config import ATTENTION_SPECS, AttentionSpec, DCAConfig, SelfExtendConfig
from ...params import check_params

KEYS = {spec.override_key: spec.name for spec in ATTENTION_SPECS.values()}  # hf_overrides key -> method
PURE_ROTATIONS = ("default", "linear", "llama3")  # rope types whose cos/sin are a rotation and nothing else
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # rotate-half RoPE, full rotary, no soft-capping


@dataclass(frozen=True)
class Settings:
    method: str  # "self-extend" or "dca"
    config: SelfExtendConfig | DCAConfig
    inv_freq: torch.Tensor  # fp32, the model's own after its rope type's adjustments
    reach: int  # the longest input the settings are for

    @property
    def spec(self) -> AttentionSpec:
        return ATTENTION_SPECS[self.method]

    def describe(self) -> str:
        return f"{self.method}: {self.config.describe()}"


def requested(hf_config) -> tuple[str, str, dict[str, Any]] | None:
    """``(override key, method, params)`` when the config asks for a method, else None."""
    found = [(key, method) for key, method in KEYS.items() if getattr(hf_config, key, None) is not None]
    if not found:
        return None
    if len(found) > 1:
        asked = " and ".join(repr(key) for key, _ in found)
        raise ValueError(f"hf_overrides asks for {asked}; keep one of them.")
    key, method = found[0]
    params = getattr(hf_config, key)
    if not isinstance(params, dict):
        raise TypeError(f"hf_overrides[{key!r}] must be a dict of settings, e.g. "
                        f'{{"{key}": {{"target_length": 32768}}}}, got {params!r}')
    return key, method, dict(params)


def original_length(model: str, revision: str | None = None) -> int | None:
    """``max_position_embeddings`` of the checkpoint's own config.json (before any override), if readable."""
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(model, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        return None
    text = raw.get("text_config", raw)
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def resolve(hf_config, *, trained_length: int | None = None) -> Settings | None:
    """The validated settings ``hf_config`` asks for (None: leave vLLM untouched).

    ``trained_length``: the checkpoint's own ``max_position_embeddings`` when the overrides raised it."""
    asked = requested(hf_config)
    if asked is None:
        return None
    key, name, params = asked
    spec = ATTENTION_SPECS[name]
    target_length = params.pop("target_length", None)
    check_params(name, spec.params, params)  # unknown keys: the message `apply` gives
    base = copy.copy(hf_config)  # the model as trained: its own length (tuned settings are keyed by it)
    length = params.get("trained_length") or trained_length  # (a Qwen DCA config names its own)
    if length is not None:
        base.max_position_embeddings = length
    config = spec.resolve(base, target_length, params)
    return Settings(name, config, inverse_frequencies(base, config.trained_length), config.reach)


def inverse_frequencies(hf_config, trained_length: int) -> torch.Tensor:
    """The model's ``inv_freq`` as transformers computes it (fp32), for its rope type."""
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        dim = head_dim(hf_config)
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    conf = copy.copy(hf_config)
    conf.max_position_embeddings = trained_length
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](conf, "cpu")
    return inv_freq.to(torch.float32)


def rope_parameters(hf_config) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    params = dict(params)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def refusal(hf_config, settings: Settings, *, max_model_len: int, raised: bool, cache_dtype: str,
            context_parallel: int, sliding_window: int | None, attn_type: str,
            softcap: float | None) -> str | None:
    """Why the paged path cannot run these settings exactly on this engine, or None."""
    what = settings.method
    model_type = getattr(hf_config, "model_type", "?")
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if model_type not in FAMILIES:
        return (f"{what} in vLLM supports model types {', '.join(FAMILIES)}; got {model_type!r}. Use the "
                "transformers path (selfextend.apply) for other families.")
    if "mrope_section" in params or rope_type == "mrope":
        return f"{what} cannot remap M-RoPE (multimodal rotary) positions; serve a text-only RoPE model."
    if rope_type not in PURE_ROTATIONS:
        return (f"rope_type {rope_type!r} is not a pure rotation (it scales or changes with length); {what} "
                f"in vLLM supports rope types {', '.join(PURE_ROTATIONS)}.")
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (1, 1.0):
        return f"{what} in vLLM needs full rotary embeddings (partial_rotary_factor=1)."
    if sliding_window is not None and sliding_window > 0:
        return (f"layers with a sliding window ({sliding_window}) hide the far keys {what} reads; serve a "
                "model without sliding-window attention, or drop it with hf_overrides "
                "{\"sliding_window\": null}.")
    if softcap:
        return f"{what} in vLLM does not support attention logit soft-capping."
    if attn_type != "decoder":
        return f"{what} applies to decoder self-attention only (got {attn_type!r} attention)."
    if cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
        return f"{what} reads keys back from the KV cache to rotate them; kv_cache_dtype={cache_dtype!r} " \
               "(quantized) is not supported: use kv_cache_dtype='auto'."
    if context_parallel > 1:
        return (f"{what} cannot run with decode/prefill context parallelism (DCP/PCP shard keys by token, "
                "and the method needs every key of a request); use tensor_parallel_size instead.")
    if settings.spec.reach_is_limit and not raised:
        return (f"{what} reaches {settings.reach} tokens but vLLM still caps inputs at the model's "
                f"max_position_embeddings: add \"max_position_embeddings\": {settings.reach} to hf_overrides "
                f"(selfextend.integrations.vllm.overrides(...) builds them), e.g. --hf-overrides "
                f"'{json.dumps(overrides_for(settings))}'")
    if (settings.spec.reach_is_limit and max_model_len > settings.reach
            and not getattr(settings.config, "allow_overflow", False)):
        return (f"max_model_len={max_model_len} exceeds {what}'s reach {settings.reach} "
                f"({settings.config.describe()}): lower max_model_len to {settings.reach} or extend the "
                "reach (a larger group_size).")
    return None


def overrides_for(settings: Settings) -> dict[str, Any]:
    """The complete ``hf_overrides`` for resolved settings (explicit values: nothing left to re-derive).

    Every setting that differs from its default travels (``grouped_scale``, ``backend``, ...): dropping one
    would make vLLM run another method than the one resolved, silently."""
    spec = settings.spec
    return {spec.override_key: _explicit(settings.config, spec.always_explicit),
            "max_position_embeddings": settings.reach, **dict.fromkeys(spec.clears)}


def _explicit(cfg: SelfExtendConfig | DCAConfig, always: tuple[str, ...]) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)
            if f.name in always or getattr(cfg, f.name) != f.default}
