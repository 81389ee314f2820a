"""Public entry points: ``apply``, ``remove``, ``max_length``, ``settings``."""

from __future__ import annotations

import logging

import torch

from .config import SelfExtendConfig, resolve_config, trained_length_of
from .integrations.hf import ATTN_NAME, LayerState, ModelState, register, vanilla_attention_function

logger = logging.getLogger("selfextend")

# Families tested with tiny random models (tests/test_families.py). All use transformers' rotate-half RoPE.
SUPPORTED_FAMILIES = {
    "llama": "rotate_half",
    "mistral": "rotate_half",
    "qwen2": "rotate_half",
    "qwen3": "rotate_half",
    "gemma2": "rotate_half",
    "gemma3_text": "rotate_half",
    "phi3": "rotate_half",
    "phi": "rotate_half",
}
_STATE_ATTR = "selfextend_state"


def _rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    for _, module in model.named_modules():
        if any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)):
            return module
    return None


def _attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]


def _check_model(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module], str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    rotary = _rotary_embedding(model)
    if rotary is None:
        raise ValueError(
            f"model_type {model_type!r} has no rotary position embedding (RoPE): SelfExtend remaps RoPE positions "
            "and cannot extend models with learned or ALiBi positions. Use a RoPE model (Llama, Mistral, Qwen, "
            "Gemma, Phi)."
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' attention registry "
            "(_supports_attention_backend is False), so SelfExtend cannot plug in without patching its code. "
            f"Supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}."
        )
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported yet. Supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}."
        )
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(f"found no attention layers (modules named '*self_attn') in {type(model).__name__}")
    return rotary, layers, SUPPORTED_FAMILIES[model_type]


def _inv_freq_getter(rotary: torch.nn.Module, layer: torch.nn.Module):
    """Per-layer-type frequencies (Gemma 3 keeps ``full_attention_inv_freq``), else the shared ``inv_freq``."""
    name = f"{getattr(layer, 'layer_type', None)}_inv_freq"
    if not hasattr(rotary, name):
        name = "inv_freq"
    return lambda: getattr(rotary, name).to(torch.float32)


def _toggle_sliding_window(model: torch.nn.Module, state: ModelState) -> None:
    """A sliding window on *every* layer (Mistral v0.1, Phi-3 mini) hides the far keys that grouped attention
    exists to read, so it is switched off while ``group_size > 1``, as the paper does for Mistral. Hybrid
    models (Gemma 2/3, Qwen with ``layer_types``) keep their local layers vanilla instead."""
    if getattr(model.config, "layer_types", None):
        return
    if state.config.group_size > 1 and getattr(model.config, "sliding_window", None) is not None:
        state.original_sliding_window = model.config.sliding_window
        state.changed_sliding_window = True
        logger.warning(
            "selfextend: disabling sliding_window=%s (it applies to every layer and would hide the keys grouped "
            "attention reads); remove() restores it.",
            model.config.sliding_window,
        )
        model.config.sliding_window = None
    elif state.config.group_size == 1 and state.changed_sliding_window:
        model.config.sliding_window = state.original_sliding_window
        state.changed_sliding_window = False


def apply(
    model: torch.nn.Module,
    group_size: int | None = None,
    window: int | None = None,
    *,
    target_length: int | None = None,
    trained_length: int | None = None,
    backend: str = "auto",
    allow_overflow: bool = False,
) -> torch.nn.Module:
    """Enable SelfExtend on ``model`` in place and return it.

    Args:
        group_size: G; keys at distance >= ``window`` see positions divided by G.
        window: W; keys closer than W keep exact RoPE distances. Default: 1024 for L >= 4096.
        target_length: tokens to read; picks G (and W if omitted) by the authors' rule and logs the choice,
            or checks that the given G and W reach it.
        trained_length: override the trained context L (default ``config.max_position_embeddings``).
        backend: ``"auto"``, ``"cpu"`` (memory-linear) or ``"reference"`` (dense oracle).
        allow_overflow: past the reach ``(L - W) * G + W`` warn instead of raising.

    Calling ``apply`` again changes the settings; ``remove`` restores vanilla attention exactly.
    """
    rotary, layers, layout = _check_model(model)
    cfg = resolve_config(
        model.config,
        group_size,
        window,
        target_length=target_length,
        trained_length=trained_length,
        backend=backend,
        allow_overflow=allow_overflow,
    )
    state: ModelState | None = getattr(model, _STATE_ATTR, None)
    if state is not None:
        state.config = cfg
        _toggle_sliding_window(model, state)
        for layer in state.layer_modules:
            layer.selfextend_layer.store.clear()
        logger.info("selfextend: settings changed: %s", cfg.describe())
        return model

    register()
    original = model.config._attn_implementation or "eager"
    state = ModelState(config=cfg, original_implementation=original)
    for layer in layers:
        layer.selfextend_layer = LayerState(
            model_state=state,
            inv_freq=_inv_freq_getter(rotary, layer),
            vanilla=vanilla_attention_function(layer, original),
            layout=layout,
        )
        state.layer_modules.append(layer)
    setattr(model, _STATE_ATTR, state)
    _toggle_sliding_window(model, state)
    model.set_attn_implementation(ATTN_NAME)
    logger.info("selfextend: applied: %s", cfg.describe())
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the original attention implementation, sliding window and no leftover state."""
    state: ModelState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    model.set_attn_implementation(state.original_implementation)
    state.config = SelfExtendConfig(1, state.config.window, state.config.trained_length)
    _toggle_sliding_window(model, state)
    for layer in state.layer_modules:
        del layer.selfextend_layer
    delattr(model, _STATE_ATTR)
    return model


def settings(model: torch.nn.Module) -> SelfExtendConfig | None:
    """The active SelfExtend settings, or None when the model is vanilla."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.config


def max_length(model: torch.nn.Module) -> int:
    """Longest input the model reads with its current settings (its trained length when vanilla)."""
    cfg = settings(model)
    return trained_length_of(model.config) if cfg is None else cfg.max_length
