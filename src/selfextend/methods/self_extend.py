"""SelfExtend (arXiv 2401.01325): neighbor attention below ``window``, grouped positions beyond it.

The attention itself lives in ``integrations/hf.py`` and ``backends/``; this module validates settings and
installs or removes the per-layer state."""

from __future__ import annotations

import logging

from ..cache import GroupedCache
from ..config import SelfExtendConfig, resolve_config
from ..integrations.hf import ATTN_NAME, LayerState, ModelState, register, vanilla_attention_function
from ..integrations.model_info import check_model, disable_global_sliding_window, inv_freq_getter
from .base import ActiveMethod, Method, Param

logger = logging.getLogger("selfextend")


class SelfExtend(Method):
    name = "self-extend"
    summary = "SelfExtend: exact RoPE for keys closer than window, positions // group_size beyond"
    params = (
        Param("group_size", int, None, "G: grouped positions are floor(pos / G) (default: from target_length)"),
        Param("window", int, None, "W: keys closer than W keep exact distances (default 1024 for L >= 4096)"),
        Param("trained_length", int, None, "override the trained context L"),
        Param("backend", str, "auto", "attention backend: auto, cpu, reference, flex, triton (see available_backends())"),
        Param("allow_overflow", bool, False, "past the reach (L - W) * G + W: warn instead of raising"),
        Param("temperature", bool, False, "logits x (0.1 ln s + 1)^2 past L, s = (pos + 1) / L (as DCA/YaRN; not in the paper)"),
    )

    def resolve(self, model, target_length, params):
        self.check_params(params)
        cfg = resolve_config(
            model.config,
            params.get("group_size"),
            params.get("window"),
            target_length=target_length,
            trained_length=params.get("trained_length"),
            backend=params.get("backend", "auto"),
            allow_overflow=params.get("allow_overflow", False),
            temperature=params.get("temperature", False),
        )
        return {"group_size": cfg.group_size, "window": cfg.window, "trained_length": cfg.trained_length,
                "backend": cfg.backend, "allow_overflow": cfg.allow_overflow, "temperature": cfg.temperature}

    def reach(self, model, params):
        return _config(params).max_length

    def attach(self, model, params, previous):
        cfg = _config(params)
        rotary, layers, layout = check_model(model, "SelfExtend")
        if previous is not None:  # settings change: keep the layer state, drop stale grouped keys
            state: ModelState = previous.data["state"]
            state.config = cfg
            disable_global_sliding_window(model, state, cfg.group_size > 1)  # grouped keys kept in caches
            logger.info("selfextend: settings changed: %s", cfg.describe())
            return ActiveMethod(self.name, params, previous.data)

        register()
        original = model.config._attn_implementation or "eager"
        state = ModelState(config=cfg, original_implementation=original, grouped_cache=GroupedCache(model.base_model))
        for layer in layers:
            layer.selfextend_layer = LayerState(
                model_state=state,
                inv_freq=inv_freq_getter(rotary, layer),
                vanilla=vanilla_attention_function(layer, original),
                layout=layout,
                layer_idx=getattr(layer, "layer_idx", None),
            )
            state.layer_modules.append(layer)
        disable_global_sliding_window(model, state, cfg.group_size > 1)
        model.set_attn_implementation(ATTN_NAME)
        logger.info("selfextend: applied: %s", cfg.describe())
        return ActiveMethod(self.name, params, {"state": state})

    def detach(self, model, active):
        state: ModelState = active.data["state"]
        model.set_attn_implementation(state.original_implementation)
        disable_global_sliding_window(model, state, False)
        state.grouped_cache.close()  # caches filled meanwhile go back to true positions
        for layer in state.layer_modules:
            del layer.selfextend_layer


def _config(params) -> SelfExtendConfig:
    return SelfExtendConfig(params["group_size"], params["window"], params["trained_length"], params["backend"],
                            params["allow_overflow"], params["temperature"])
