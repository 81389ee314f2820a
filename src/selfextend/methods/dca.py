"""Dual Chunk Attention (DCA; ChunkLlama, arXiv 2402.17463; Qwen2.5-1M) as a method.

Keys sit at ``j mod (chunk_size - local_window)``; queries at three positions (own chunk, previous chunk,
older chunks), so every distance stays within ``chunk_size < L`` at any length. The attention lives in
``integrations/hf_dca.py`` and ``backends/dca.py``, the position maps in ``dca_positions.py``; this module
validates settings and installs or removes the per-layer state.

Defaults: ``chunk_size = 3L/4`` (ChunkLlama), ``local_window = L/16`` (ChunkLlama's first release; its current code
uses L/8; we take the smaller window the issue asks for). A model whose config carries Qwen's ``dual_chunk_attention_config``
(``chunk_size``, ``local_size``, ``original_max_position_embeddings``) uses it when neither size is given, and
turns the temperature on by default, as Qwen always pairs DCA with it.

Reach: DCA has no position limit (distances never exceed ``chunk_size``), so ``reach`` is a soft bound,
``REACH_FACTOR * L`` (32x, the longest published training-free use); a ``target_length`` past it warns.
Nothing else depends on ``target_length``: the chunk sizes follow L, not the input length.
"""

from __future__ import annotations

import logging
from typing import Any

from ..backends.dca import check_dca_backend
from ..dca_positions import DCAConfig, default_chunk_size, default_local_window
from ..integrations.hf import vanilla_attention_function
from ..integrations.hf_dca import DCA_ATTN_NAME, DCALayerState, DCAModelState, register
from ..integrations.model_info import check_model, disable_global_sliding_window, inv_freq_getter
from .base import ActiveMethod, Method, Param, check_number, trained_length

logger = logging.getLogger("selfextend")

QWEN_KEY = "dual_chunk_attention_config"


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _qwen_config(model) -> dict | None:
    cfg = getattr(model.config, QWEN_KEY, None)
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or "chunk_size" not in cfg or "local_size" not in cfg:
        raise ValueError(
            f"model config {QWEN_KEY}={cfg!r} needs 'chunk_size' and 'local_size'; pass chunk_size= and "
            "local_window= to override it."
        )
    return cfg


class DualChunkAttention(Method):
    name = "dca"
    summary = "Dual Chunk Attention (ChunkLlama): keys at j mod chunk_len; intra/successive/inter-chunk queries"
    params = (
        Param("chunk_size", int, None, "cs < L: largest query position (default 3L/4, or Qwen's config)"),
        Param("local_window", int, None, "w < cs: chunk_len = cs - w; exact distances to the previous chunk "
              "while i mod chunk_len <= w (default L/16)"),
        Param("temperature", bool, None, "logits x (0.1 ln s + 1)^2 past L, s = (pos + 1) / L (default: on for "
              "models with Qwen's dual_chunk_attention_config, else off)"),
        Param("vanilla_within_trained", bool, True, "queries before the trained length keep plain RoPE: the model "
              "is exactly vanilla within L"),
        Param("trained_length", int, None, "override the trained context L"),
        Param("backend", str, "auto", "attention backend: auto, cpu, reference"),
    )

    def resolve(self, model, target_length, params):
        self.check_params(params)
        qwen = _qwen_config(model)
        cs, w = params.get("chunk_size"), params.get("local_window")
        from_qwen = qwen is not None and cs is None and w is None
        if qwen is not None and params.get("trained_length") is None and "original_max_position_embeddings" in qwen:
            L = qwen["original_max_position_embeddings"]  # max_position_embeddings is the extended length there
        else:
            L = trained_length(model, params)
        check_number("trained_length", L, minimum=4, integer=True)
        if from_qwen:
            cs, w = qwen["chunk_size"], qwen["local_size"]
        cs = default_chunk_size(L) if cs is None else cs
        w = default_local_window(L) if w is None else w
        check_number("chunk_size", cs, minimum=2, integer=True, fix=f"the default is 3L/4 = {default_chunk_size(L)}")
        # every DCA distance is at most chunk_size; Qwen's own configs use chunk_size == L (one past the
        # trained range), which we accept as shipped, but not as an explicit setting
        limit = L if from_qwen else L - 1
        if cs > limit:
            raise ValueError(
                f"chunk_size={cs} must be smaller than the trained length L={L}: DCA's distances reach chunk_size, "
                f"which must stay inside the trained range; use chunk_size <= {L - 1}, e.g. 3L/4 = "
                f"{default_chunk_size(L)}."
            )
        check_number("local_window", w, minimum=1, integer=True, fix=f"the default is L/16 = {default_local_window(L)}")
        if w >= cs:
            raise ValueError(
                f"local_window={w} must be smaller than chunk_size={cs} (chunk_len = chunk_size - local_window "
                f"must be >= 1); use local_window <= {cs // 4}, e.g. L/16 = {default_local_window(L)}."
            )
        temperature = params.get("temperature")
        temperature = _check_bool("temperature", qwen is not None if temperature is None else temperature)
        gate = _check_bool("vanilla_within_trained", params.get("vanilla_within_trained", True))
        backend = check_dca_backend(params.get("backend", "auto"))
        resolved = {"chunk_size": cs, "local_window": w, "trained_length": L, "temperature": temperature,
                    "vanilla_within_trained": gate, "backend": backend}
        if target_length is not None:
            check_number("target_length", target_length, minimum=1, integer=True)
            reach = _config(resolved).reach
            if target_length <= L and gate:
                logger.info("selfextend: DCA target_length=%d fits the trained length %d: the model stays vanilla.",
                            target_length, L)
            if target_length > reach:
                logger.warning(
                    "selfextend: DCA target_length=%d is past %d = %dx the trained length, the longest published "
                    "training-free use; positions stay in range, quality is untested there.",
                    target_length, reach, reach // L,
                )
        if from_qwen:
            logger.info("selfextend: DCA settings from the model's %s: %s", QWEN_KEY, qwen)
        return resolved

    def reach(self, model, params):
        return _config(params).reach

    def attach(self, model, params, previous):
        cfg = _config(params)
        rotary, layers, layout = check_model(model, "DCA")
        if previous is not None:  # settings change: keep the layer state, drop stale chunk keys
            state: DCAModelState = previous.data["state"]
            state.config = cfg
            for layer in state.layer_modules:
                layer.dca_layer.store.clear()
            logger.info("selfextend: DCA settings changed: %s", cfg.describe())
            return ActiveMethod(self.name, params, previous.data)

        register()
        original = model.config._attn_implementation or "eager"
        state = DCAModelState(config=cfg, original_implementation=original)
        for layer in layers:
            layer.dca_layer = DCALayerState(
                model_state=state,
                inv_freq=inv_freq_getter(rotary, layer),
                vanilla=vanilla_attention_function(layer, original),
                layout=layout,
            )
            state.layer_modules.append(layer)
        disable_global_sliding_window(model, state, True)
        model.set_attn_implementation(DCA_ATTN_NAME)
        logger.info("selfextend: DCA applied: %s", cfg.describe())
        return ActiveMethod(self.name, params, {"state": state})

    def detach(self, model, active):
        state: DCAModelState = active.data["state"]
        model.set_attn_implementation(state.original_implementation)
        disable_global_sliding_window(model, state, False)
        for layer in state.layer_modules:
            del layer.dca_layer


def _config(params: dict[str, Any]) -> DCAConfig:
    return DCAConfig(params["chunk_size"], params["local_window"], params["trained_length"], params["temperature"],
                     params["vanilla_within_trained"], params["backend"])
