"""Every method's settings: its parameters declared once, its validator, its frozen config.

As in transformers' ``modeling_rope_utils``: one validator per method turns what the user passed (plus the
model *config* and an optional ``target_length``) into a frozen, complete config, or raises an error that
names the parameter, the value and the fix. Nothing here touches a model, so a bad parameter leaves the
model as it was, and the vLLM plugin resolves settings from vLLM's config alone.

The attention methods (SelfExtend, DCA) are described whole by an ``AttentionSpec`` (``ATTENTION_SPECS``):
parameters, validator, reach, ``hf_overrides`` key and the function that builds backend inputs
(``attention_inputs.py``). ``methods/`` binds each to its transformers integration, ``integrations/vllm``
reads the same spec; neither branches on a method's name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import attention_inputs
from .backends import available_backends, check_backend_name
from .params import (
    TRAINED_LENGTH,
    Param,
    check_bool,
    check_number,
    check_params,
    check_target_length,
    defaults,
    trained_length_of,
)
from .positions import (
    DCA_REACH_FACTOR,
    chunk_len,
    dca_exact_below,
    default_chunk_size,
    default_local_window,
    max_reach,
    reach_formula,
    recommended_group_size,
    recommended_window,
    smallest_group_size,
)

logger = logging.getLogger("selfextend")


# --- shared pieces -------------------------------------------------------------------------------------


def backend_param(method: str) -> Param:
    """The ``backend`` parameter of an attention method, listing the backends that run it."""
    return Param("backend", str, "auto", f"attention backend: {', '.join(available_backends(method))}")


# --- SelfExtend -----------------------------------------------------------------------------------------


# The largest group size published SelfExtend results use: the authors' examples run G=32 (Llama-2 to 32k+),
# the LCEG study (arXiv 2409.12181) G=64. Larger G is refused unless asked for: nobody has shown it works.
MAX_GROUP_SIZE = 64


SCALE_BASE = Param(
    "scale_base", int, 0, "> 0: queries x max(1, ln(pos + 1) / ln(scale_base)), the log scaling of the "
    "LongLM code (its longest passkey runs; use L); 0: off", minimum=0,
    fix="0 is off (the paper); the authors' code uses the trained length",
    refused=((1, "divides by ln 1 = 0; use 0 (off) or the trained length"),))

SELFEXTEND_PARAMS = (
    Param("group_size", int, None, "G: grouped positions are floor(pos / G) (default: from target_length)",
          minimum=1, fix="group_size=1 is vanilla attention, use group_size >= 2 to extend the context"),
    Param("window", int, None, "W: keys closer than W keep exact distances (default 1024 for L >= 4096)",
          minimum=1, fix="the authors use 512..2048, below the trained length"),
    TRAINED_LENGTH,
    backend_param("self-extend"),
    Param("allow_overflow", bool, False, "past the reach (L - W) * G + W: warn instead of raising"),
    Param("temperature", bool, False, "logits x (0.1 ln s + 1)^2 past L, s = (pos + 1) / L "
          "(as DCA/YaRN; not in the paper)"),
    Param("allow_large_group_size", bool, False,
          f"group_size past {MAX_GROUP_SIZE} (no published result uses more)"),
    Param("grouped_scale", float, 1.0, "logits of grouped pairs (distance >= W) x this: > 1 sharpens "
          "the grouped part only (not in the paper)", minimum=0, strict=True,
          fix="1 is the paper's SelfExtend; values above 1 sharpen the grouped part"),
    SCALE_BASE,
)
_SE = defaults(SELFEXTEND_PARAMS)


@dataclass(frozen=True)
class SelfExtendConfig:
    group_size: int  # G: grouped positions are floor(pos / G)
    window: int  # W: keys closer than W keep their exact RoPE distance
    trained_length: int  # L: the context the model was trained on
    backend: str = _SE["backend"]
    allow_overflow: bool = _SE["allow_overflow"]
    temperature: bool = _SE["temperature"]
    allow_large_group_size: bool = _SE["allow_large_group_size"]
    grouped_scale: float = _SE["grouped_scale"]
    scale_base: int = _SE["scale_base"]

    @property
    def reach(self) -> int:
        return max_reach(self.trained_length, self.window, self.group_size)

    max_length = reach

    def exact(self, max_pos: int) -> bool:
        """Whether a call whose largest query position is ``max_pos`` sees every key at its true distance."""
        return max_pos < self.window or self.group_size == 1

    def scales_queries(self, max_pos: int) -> bool:
        """Whether some query row up to ``max_pos`` is scaled (temperature, log scaling)."""
        return bool((self.temperature and max_pos >= self.trained_length)
                    or (self.scale_base and max_pos + 1 > self.scale_base))

    def describe(self) -> str:
        return (
            f"group_size={self.group_size}, window={self.window}, trained_length={self.trained_length}, "
            f"reach={self.reach} tokens, backend={self.backend}"
            + (", temperature" if self.temperature else "")
            + (f", grouped_scale={self.grouped_scale}" if self.grouped_scale != 1 else "")
            + (f", scale_base={self.scale_base}" if self.scale_base else "")
        )


def selfextend_config(model_config, params: Mapping[str, Any],
                      target_length: int | None = None) -> SelfExtendConfig:
    """Validate explicit settings, or derive them from ``target_length`` with the authors' rule."""
    p = check_params("self-extend", SELFEXTEND_PARAMS, params)
    group_size, window = p["group_size"], p["window"]
    L = p["trained_length"] if p["trained_length"] is not None else trained_length_of(model_config)
    check_number("trained_length", L, minimum=2, integer=True)
    check_backend_name(p["backend"], "self-extend")
    check_target_length(target_length)
    if group_size is None and target_length is None:
        raise ValueError(
            "pass group_size and window (e.g. group_size=4, window=1024), or target_length=<tokens to read> "
            "to choose them by the authors' rule."
        )
    if window is None:
        window = recommended_window(L)
    elif window >= L:
        raise ValueError(
            f"window={window} must be smaller than the trained length {L}: neighbor distances must stay in "
            f"the trained range; use window <= {L // 2} (the authors use 512..2048), e.g. "
            f"window={recommended_window(L)}."
        )
    if group_size is None:
        group_size = recommended_group_size(target_length, L, window)
        logger.warning(
            "selfextend: target_length=%d -> group_size=%d, window=%d "
            "(smallest G with W + (N - W) / G <= 2/3 L, L=%d; reach %d tokens)",
            target_length, group_size, window, L, max_reach(L, window, group_size),
        )
    if group_size > MAX_GROUP_SIZE and not p["allow_large_group_size"]:
        why = f"target_length={target_length} needs" if p["group_size"] is None else "you asked for"
        raise ValueError(
            f"{why} group_size={group_size}, past {MAX_GROUP_SIZE}, the largest group size published "
            "SelfExtend results use; lower target_length (or raise window), or pass "
            "allow_large_group_size=True to try it."
        )
    cfg = SelfExtendConfig(**{**p, "group_size": group_size, "window": window, "trained_length": L,
                              "grouped_scale": float(p["grouped_scale"]), "scale_base": int(p["scale_base"])})
    if target_length is not None and target_length > cfg.reach:
        raise ValueError(
            f"target_length={target_length} exceeds the reach {reach_formula(L, window, group_size)} "
            f"of window={window}, group_size={group_size}; set group_size >= "
            f"{smallest_group_size(target_length, L, window)}."
        )
    return cfg


def resolve_selfextend(model_config, target_length: int | None,
                       params: Mapping[str, Any]) -> SelfExtendConfig:
    """``selfextend_config``, except that settings ``selfextend tune`` measured for this model win over the
    authors' ``target_length`` rule."""
    from .tuned import tuned_path, tuned_settings

    check_params("self-extend", SELFEXTEND_PARAMS, params)
    check_target_length(target_length)
    params = dict(params)
    tuned = None
    if target_length is not None and params.get("group_size") is None:
        tuned = tuned_settings(model_config, target_length)
        if tuned is not None and params.get("window") in (None, tuned["window"]):
            logger.warning("selfextend: target_length=%d -> tuned settings %s", target_length, tuned)
            params.update(group_size=tuned["group_size"], window=tuned["window"])
        else:
            tuned = None
    try:
        return selfextend_config(model_config, params, target_length)
    except ValueError as err:
        if tuned is None:
            raise
        raise ValueError(f"the tuned settings {tuned} in {tuned_path()} for this model at target_length="
                         f"{target_length}: {err}") from None


# --- Dual Chunk Attention -------------------------------------------------------------------------------

QWEN_DCA_KEY = "dual_chunk_attention_config"  # what Qwen2.5-1M configs carry


DCA_PARAMS = (
    Param("chunk_size", int, None, "cs < L: largest query position (default 3L/4, or Qwen's config)",
          minimum=2, fix="the default is 3L/4"),
    Param("local_window", int, None, "w < cs: chunk_len = cs - w; exact distances to the previous chunk "
          "while i mod chunk_len <= w (default L/16)", minimum=1, fix="the default is L/16"),
    TRAINED_LENGTH,
    Param("temperature", bool, None, "logits x (0.1 ln s + 1)^2 past L, s = (pos + 1) / L "
          "(default: on for models with Qwen's dual_chunk_attention_config, else off)"),
    Param("vanilla_within_trained", bool, True, "queries before the trained length keep plain RoPE: "
          "the model is exactly vanilla within L"),
    backend_param("dca"),
    SCALE_BASE,  # on the queries DCA rotates (from exact_below on), as SelfExtend's on its grouped ones
)
_DCA = defaults(DCA_PARAMS)


@dataclass(frozen=True)
class DCAConfig:
    chunk_size: int  # cs: largest query position, hence largest distance
    local_window: int  # w: the nearest keys of the previous chunk keep exact distances up to i mod cl <= w
    trained_length: int  # L
    temperature: bool = False  # its default depends on the model (Qwen's config): resolved, never None here
    vanilla_within_trained: bool = _DCA["vanilla_within_trained"]
    backend: str = _DCA["backend"]
    scale_base: int = _DCA["scale_base"]

    @property
    def chunk_len(self) -> int:
        return chunk_len(self.chunk_size, self.local_window)

    @property
    def exact_below(self) -> int:
        return dca_exact_below(self.chunk_size, self.local_window, self.trained_length,
                               self.vanilla_within_trained)

    @property
    def reach(self) -> int:
        return DCA_REACH_FACTOR * self.trained_length

    def exact(self, max_pos: int) -> bool:
        """Whether a call whose largest query position is ``max_pos`` sees every key at its true distance."""
        return max_pos < self.exact_below

    def scales_queries(self, max_pos: int) -> bool:
        return False  # the temperature applies past exact_below only, where DCA's queries are rotated anyway

    def describe(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, local_window={self.local_window} (chunk_len={self.chunk_len}), "
            f"trained_length={self.trained_length}, temperature={self.temperature}, "
            f"vanilla_within_trained={self.vanilla_within_trained}, backend={self.backend}"
            + (f", scale_base={self.scale_base}" if self.scale_base else "")
        )


def qwen_dca_config(model_config) -> dict | None:
    """The model's own ``dual_chunk_attention_config`` (Qwen2.5-1M), checked, or None."""
    cfg = getattr(model_config, QWEN_DCA_KEY, None)
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or "chunk_size" not in cfg or "local_size" not in cfg:
        raise ValueError(
            f"model config {QWEN_DCA_KEY}={cfg!r} needs 'chunk_size' and 'local_size'; pass chunk_size= and "
            "local_window= to override it."
        )
    return cfg


def dca_config(model_config, params: Mapping[str, Any], target_length: int | None = None) -> DCAConfig:
    """Validate DCA settings; defaults from Qwen's config when the model ships one, else 3L/4 and L/16 (and
    the temperature on with Qwen's config, as Qwen always pairs DCA with it)."""
    p = check_params("dca", DCA_PARAMS, params)
    chunk_size, local_window = p["chunk_size"], p["local_window"]
    trained_length, temperature = p["trained_length"], p["temperature"]
    vanilla_within_trained, backend = p["vanilla_within_trained"], p["backend"]
    qwen = qwen_dca_config(model_config)
    from_qwen = qwen is not None and chunk_size is None and local_window is None
    if qwen is not None and trained_length is None and "original_max_position_embeddings" in qwen:
        L = qwen["original_max_position_embeddings"]  # max_position_embeddings is the extended length there
    else:
        L = trained_length if trained_length is not None else trained_length_of(model_config)
    check_number("trained_length", L, minimum=4, integer=True)
    cs, w = (qwen["chunk_size"], qwen["local_size"]) if from_qwen else (chunk_size, local_window)
    cs = default_chunk_size(L) if cs is None else cs
    w = default_local_window(L) if w is None else w
    check_number("chunk_size", cs, minimum=2, integer=True,
                 fix=f"the default is 3L/4 = {default_chunk_size(L)}")
    # every DCA distance is at most chunk_size; Qwen's own configs use chunk_size == L (one past the
    # trained range), which we accept as shipped, but not as an explicit setting
    limit = L if from_qwen else L - 1
    if cs > limit:
        raise ValueError(
            f"chunk_size={cs} must be smaller than the trained length L={L}: DCA's distances reach "
            f"chunk_size, which must stay inside the trained range; use chunk_size <= {L - 1}, "
            f"e.g. 3L/4 = {default_chunk_size(L)}."
        )
    check_number("local_window", w, minimum=1, integer=True,
                 fix=f"the default is L/16 = {default_local_window(L)}")
    if w >= cs:
        raise ValueError(
            f"local_window={w} must be smaller than chunk_size={cs} (chunk_len = chunk_size - local_window "
            f"must be >= 1); use local_window <= {cs // 4}, e.g. L/16 = {default_local_window(L)}."
        )
    temperature = check_bool("temperature", qwen is not None if temperature is None else temperature)
    check_bool("vanilla_within_trained", vanilla_within_trained)
    check_backend_name(backend, "dca")
    cfg = DCAConfig(cs, w, L, temperature, vanilla_within_trained, backend, p["scale_base"])
    if target_length is not None:
        check_number("target_length", target_length, minimum=1, integer=True)
        if target_length <= L and vanilla_within_trained:
            logger.info("selfextend: DCA target_length=%d fits the trained length %d: "
                        "the model stays vanilla.", target_length, L)
        if target_length > cfg.reach:
            logger.warning(
                "selfextend: DCA target_length=%d is past %d = %dx the trained length, the longest published "
                "training-free use; positions stay in range, quality is untested there.",
                target_length, cfg.reach, DCA_REACH_FACTOR,
            )
    if from_qwen:
        logger.info("selfextend: DCA settings from the model's %s: %s", QWEN_DCA_KEY, qwen)
    return cfg


# --- the attention methods, described whole -----------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """What every host needs of an attention method, so none branches on its name."""

    name: str
    override_key: str  # its key in vLLM's ``hf_overrides``
    params: tuple[Param, ...]
    config_class: type
    resolve: Callable[[Any, int | None, Mapping[str, Any]], Any]  # (model config, target_length, params)
    maps: Callable[[Any], dict[str, Callable]]  # config -> position maps; "key": where keys are read
    inputs: Callable[..., Any]  # the backend inputs (``attention_inputs``)
    reach_is_limit: bool  # past the reach positions leave the trained range, else only quality is untested
    always_explicit: tuple[str, ...]  # fields hf_overrides always carries: their defaults depend on the model
    clears: tuple[str, ...] = ()  # model config keys the overrides set to None (the model's own settings)


ATTENTION_SPECS = {spec.name: spec for spec in (
    AttentionSpec("self-extend", "selfextend", SELFEXTEND_PARAMS, SelfExtendConfig, resolve_selfextend,
                  attention_inputs.selfextend_maps, attention_inputs.selfextend_inputs, reach_is_limit=True,
                  always_explicit=("group_size", "window", "trained_length")),
    AttentionSpec("dca", "dca", DCA_PARAMS, DCAConfig,
                  lambda model_config, n, params: dca_config(model_config, params, n),
                  attention_inputs.dca_maps, attention_inputs.dca_inputs, reach_is_limit=False,
                  always_explicit=("chunk_size", "local_window", "trained_length", "temperature",
                                   "vanilla_within_trained"), clears=(QWEN_DCA_KEY,)),
)}


# --- RoPE scaling and baselines -------------------------------------------------------------------------


def rope_scaling_factor(method: str, factor: float | None, target_length: int | None, trained_length: int,
                        bounded: bool) -> float:
    """The scale ``s``: given, or ``target_length / L`` (never below 1); checked to reach
    ``target_length``."""
    check_target_length(target_length)
    if factor is None:
        if target_length is None:
            raise ValueError(f"method {method!r} needs factor=<scale >= 1> "
                             "or target_length=<tokens to read>.")
        factor = max(1.0, target_length / trained_length)
    reach = math.floor(trained_length * factor)
    if target_length is not None and bounded and target_length > reach:
        raise ValueError(
            f"target_length={target_length} exceeds the reach {reach} of {method} with factor={factor} "
            f"(L={trained_length}); set factor >= {target_length / trained_length:.3f}."
        )
    return float(factor)


YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1  # transformers' (and the YaRN paper's) defaults


def check_yarn_betas(beta_fast: float | None, beta_slow: float | None) -> None:
    """YaRN's ramp runs from ``beta_fast`` rotations (extrapolated) down to ``beta_slow`` (interpolated):
    ``beta_fast`` must not be below ``beta_slow`` (each is already a finite number > 0)."""
    fast = YARN_BETA_FAST if beta_fast is None else beta_fast
    slow = YARN_BETA_SLOW if beta_slow is None else beta_slow
    if fast < slow:
        raise ValueError(
            f"beta_fast={fast}{' (the default)' if beta_fast is None else ''} is below "
            f"beta_slow={slow}{' (the default)' if beta_slow is None else ''}: YaRN's ramp runs from "
            f"beta_fast rotations (extrapolated) down to beta_slow (interpolated); use beta_fast >= "
            f"beta_slow (the defaults are {YARN_BETA_FAST} and {YARN_BETA_SLOW})."
        )


def truncate_keep(keep: int | None, headroom: int | None, trained_length: int) -> int:
    """Prompt tokens ``truncate`` keeps: given, or ``L - headroom`` (headroom default ``min(64, L // 8)``)."""
    headroom = min(64, trained_length // 8) if headroom is None else headroom
    if keep is None:
        keep = trained_length - headroom
        if keep < 1:
            raise ValueError(f"headroom={headroom} leaves no prompt token of the trained length "
                             f"{trained_length}; use headroom < {trained_length}.")
    if keep > trained_length:
        raise ValueError(f"keep={keep} exceeds the trained length {trained_length}; use keep <= "
                         f"{trained_length - headroom}.")
    return keep
