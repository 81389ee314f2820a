"""What the methods need to know about a transformers model: its RoPE module, attention layers and family."""

from __future__ import annotations

import logging
import weakref

import torch

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


def rotary_embedding(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | tuple[None, None]:
    """``(qualified name, module)`` of the model's rotary embedding (the module holding ``inv_freq``)."""
    for name, module in model.named_modules():
        if any(buf.endswith("inv_freq") for buf, _ in module.named_buffers(recurse=False)):
            return name, module
    return None, None


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]


def model_type_of(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def check_model(model: torch.nn.Module, method: str) -> tuple[torch.nn.Module, list[torch.nn.Module], str]:
    """``(rotary, attention layers, rope layout)``, or a ValueError saying why ``method`` cannot run on it."""
    model_type = model_type_of(model)
    _, rotary = rotary_embedding(model)
    if rotary is None:
        raise ValueError(
            f"model_type {model_type!r} has no rotary position embedding (RoPE): {method} remaps RoPE "
            "positions and cannot extend models with learned or ALiBi positions. Use a RoPE model (Llama, "
            "Mistral, Qwen, Gemma, Phi)."
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' attention registry "
            f"(_supports_attention_backend is False), so {method} cannot plug in without patching its code. "
            f"Supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}."
        )
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported yet. Supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}."
        )
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"found no attention layers (modules named '*self_attn') in {type(model).__name__}")
    return rotary, layers, SUPPORTED_FAMILIES[model_type]


_FP32_FREQS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rotary -> {name: (buf, version, fp32)}


def inv_freq_getter(rotary: torch.nn.Module, layer: torch.nn.Module):
    """Per-layer-type frequencies (Gemma 3 keeps ``full_attention_inv_freq``), else the shared
    ``inv_freq``, in fp32. A low-precision buffer's fp32 copy is made once and shared by every layer (until
    the buffer is replaced or changed in place), so the frequencies of a forward are one tensor: rotations
    memoised per forward are keyed by its identity."""
    name = f"{getattr(layer, 'layer_type', None)}_inv_freq"
    if not hasattr(rotary, name):
        name = "inv_freq"

    def get() -> torch.Tensor:
        buffer = getattr(rotary, name)
        if buffer.dtype == torch.float32:
            return buffer
        copies = _FP32_FREQS.setdefault(rotary, {})
        hit = copies.get(name)
        if hit is None or hit[0] is not buffer or hit[1] != buffer._version:
            hit = copies[name] = (buffer, buffer._version, buffer.to(torch.float32))
        return hit[2]

    return get


def disable_global_sliding_window(model: torch.nn.Module, state, enable_remap: bool) -> None:
    """A sliding window on *every* layer (Mistral v0.1, Phi-3 mini) hides the far keys that a remapping method
    exists to read, so it is switched off while remapping, as the SelfExtend paper does for Mistral. Hybrid
    models (Gemma 2/3, Qwen with ``layer_types``) keep their local layers vanilla instead.

    ``state`` needs ``original_sliding_window`` and ``changed_sliding_window`` attributes."""
    if getattr(model.config, "layer_types", None):
        return
    if enable_remap and getattr(model.config, "sliding_window", None) is not None:
        state.original_sliding_window = model.config.sliding_window
        state.changed_sliding_window = True
        logger.warning(
            "selfextend: disabling sliding_window=%s (it applies to every layer and would hide the far keys "
            "the method reads); remove() restores it.",
            model.config.sliding_window,
        )
        model.config.sliding_window = None
    elif not enable_remap and state.changed_sliding_window:
        model.config.sliding_window = state.original_sliding_window
        state.changed_sliding_window = False
