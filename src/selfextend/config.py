"""Every method's settings and their validators, kept apart from the code that uses them.

As in transformers' ``modeling_rope_utils``: one validator per method turns what the user passed (plus the
model config and an optional ``target_length``) into a frozen, complete config, or raises an error that
names the parameter, the value and the fix. Nothing here touches a model, so a bad parameter leaves the
model as it was. The methods (``methods/``) call these; the attention code reads the frozen configs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .backends import check_backend_name
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


# --- shared checks --------------------------------------------------------------------------------------


def trained_length_of(model_config) -> int:
    """The context the model was trained on: ``max_position_embeddings`` (already includes llama3/yarn
    scaling)."""
    length = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 1:
        raise ValueError(
            "the model config has no usable max_position_embeddings; pass trained_length=<the context the "
            "model was trained on>."
        )
    return length


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False,
                 fix: str = "") -> Any:
    """``value`` if it is a number (an int when ``integer``) at least ``minimum``, else an error naming
    ``name``."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}{'; ' + fix if fix else ''}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, "
                         f"got {value}{'; ' + fix if fix else ''}")
    return value


def check_target_length(target_length: Any) -> int | None:
    """``target_length`` as every method takes it: None (not given) or a whole number of tokens >= 1."""
    if target_length is None:
        return None
    return check_number("target_length", target_length, minimum=1, integer=True,
                        fix="give the number of tokens to read")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# --- SelfExtend -----------------------------------------------------------------------------------------


# The largest group size published SelfExtend results use: the authors' examples run G=32 (Llama-2 to 32k+),
# the LCEG study (arXiv 2409.12181) G=64. Larger G is refused unless asked for: nobody has shown it works.
MAX_GROUP_SIZE = 64


@dataclass(frozen=True)
class SelfExtendConfig:
    group_size: int  # G: grouped positions are floor(pos / G)
    window: int  # W: keys closer than W keep their exact RoPE distance
    trained_length: int  # L: the context the model was trained on
    backend: str = "auto"
    # past the reach: warn (positions leave the trained range) instead of raising
    allow_overflow: bool = False
    temperature: bool = False  # logits x (0.1 ln s + 1)^2 for queries past L, s = (pos + 1) / L
    allow_large_group_size: bool = False  # group_size past MAX_GROUP_SIZE: untested territory, opt-in
    grouped_scale: float = 1.0  # logits of grouped pairs x this (> 1 sharpens them); not in the paper
    scale_base: int = 0  # > 0: queries x max(1, ln(pos + 1) / ln(scale_base)), the LongLM code's option

    @property
    def max_length(self) -> int:
        return max_reach(self.trained_length, self.window, self.group_size)

    def describe(self) -> str:
        return (
            f"group_size={self.group_size}, window={self.window}, trained_length={self.trained_length}, "
            f"reach={self.max_length} tokens, backend={self.backend}"
            + (", temperature" if self.temperature else "")
            + (f", grouped_scale={self.grouped_scale}" if self.grouped_scale != 1 else "")
            + (f", scale_base={self.scale_base}" if self.scale_base else "")
        )


def selfextend_config(model_config, params: Mapping[str, Any],
                      target_length: int | None = None) -> SelfExtendConfig:
    """Validate explicit settings, or derive them from ``target_length`` with the authors' rule.

    Reads ``group_size``, ``window``, ``trained_length`` (default: the model's), ``backend`` (``"auto"``),
    ``allow_overflow`` (False) and ``temperature`` (False) from ``params``."""
    group_size, window, trained_length = (params.get("group_size"), params.get("window"),
                                          params.get("trained_length"))
    backend, allow_overflow = params.get("backend", "auto"), params.get("allow_overflow", False)
    temperature = params.get("temperature", False)
    allow_large = params.get("allow_large_group_size", False)
    grouped_scale = params.get("grouped_scale", 1.0)
    scale_base = params.get("scale_base", 0)
    L = trained_length if trained_length is not None else trained_length_of(model_config)
    check_number("trained_length", L, minimum=2, integer=True)
    check_backend_name(backend, "self-extend")
    if target_length is not None:
        check_number("target_length", target_length, minimum=1, integer=True)
    if group_size is None and target_length is None:
        raise ValueError(
            "pass group_size and window (e.g. group_size=4, window=1024), or target_length=<tokens to read> "
            "to choose them by the authors' rule."
        )

    if window is None:
        window = recommended_window(L)
    elif isinstance(window, int) and not isinstance(window, bool) and window >= L:
        raise ValueError(
            f"window={window} must be smaller than the trained length {L}: neighbor distances must stay in "
            f"the trained range; use window <= {L // 2} (the authors use 512..2048), e.g. "
            f"window={recommended_window(L)}."
        )
    check_number("window", window, minimum=1, integer=True)

    if group_size is None:
        group_size = recommended_group_size(target_length, L, window)
        logger.warning(
            "selfextend: target_length=%d -> group_size=%d, window=%d "
            "(smallest G with W + (N - W) / G <= 2/3 L, L=%d; reach %d tokens)",
            target_length, group_size, window, L, max_reach(L, window, group_size),
        )
    elif isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 1:
        raise ValueError(
            f"group_size must be >= 1, got {group_size}; group_size=1 is vanilla attention, "
            f"use group_size >= 2 to extend the context."
        )
    check_number("group_size", group_size, minimum=1, integer=True)
    check_bool("temperature", temperature)
    check_number("grouped_scale", grouped_scale, minimum=0, strict=True,
                 fix="1 is the paper's SelfExtend; values above 1 sharpen the grouped part")
    check_number("scale_base", scale_base, minimum=0, integer=True,
                 fix=f"0 is off (the paper); the authors' code uses the trained length, scale_base={L}")
    if scale_base == 1:
        raise ValueError(f"scale_base=1 divides by ln 1 = 0; use 0 (off) or the trained length, "
                         f"scale_base={L}")
    check_bool("allow_overflow", allow_overflow)
    check_bool("allow_large_group_size", allow_large)
    if group_size > MAX_GROUP_SIZE and not allow_large:
        why = f"target_length={target_length} needs" if params.get("group_size") is None else "you asked for"
        raise ValueError(
            f"{why} group_size={group_size}, past {MAX_GROUP_SIZE}, the largest group size published "
            "SelfExtend results use; lower target_length (or raise window), or pass "
            "allow_large_group_size=True to try it."
        )

    cfg = SelfExtendConfig(group_size, window, L, backend, allow_overflow, temperature, allow_large,
                           float(grouped_scale), int(scale_base))
    if target_length is not None and target_length > cfg.max_length:
        raise ValueError(
            f"target_length={target_length} exceeds the reach {reach_formula(L, window, group_size)} "
            f"of window={window}, group_size={group_size}; set group_size >= "
            f"{smallest_group_size(target_length, L, window)}."
        )
    return cfg


# --- Dual Chunk Attention -------------------------------------------------------------------------------

QWEN_DCA_KEY = "dual_chunk_attention_config"  # what Qwen2.5-1M configs carry


@dataclass(frozen=True)
class DCAConfig:
    chunk_size: int  # cs: largest query position, hence largest distance
    local_window: int  # w: the nearest keys of the previous chunk keep exact distances up to i mod cl <= w
    trained_length: int  # L
    temperature: bool = False
    vanilla_within_trained: bool = True
    backend: str = "auto"

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

    def describe(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, local_window={self.local_window} (chunk_len={self.chunk_len}), "
            f"trained_length={self.trained_length}, temperature={self.temperature}, "
            f"vanilla_within_trained={self.vanilla_within_trained}, backend={self.backend}"
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
    """Validate DCA settings; defaults from Qwen's config when the model ships one, else 3L/4 and L/16.

    Reads ``chunk_size``, ``local_window``, ``trained_length``, ``temperature`` (default: on with Qwen's
    config), ``vanilla_within_trained`` (True) and ``backend`` (``"auto"``) from ``params``."""
    chunk_size, local_window = params.get("chunk_size"), params.get("local_window")
    trained_length, temperature = params.get("trained_length"), params.get("temperature")
    vanilla_within_trained, backend = (params.get("vanilla_within_trained", True),
                                       params.get("backend", "auto"))
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
    cfg = DCAConfig(cs, w, L, temperature, vanilla_within_trained, backend)
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
    check_number("factor", factor, minimum=1.0, fix="factor=1 is vanilla; use factor = target_length / L")
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
    check_number("headroom", headroom, minimum=0, integer=True)
    keep = trained_length - headroom if keep is None else keep
    check_number("keep", keep, minimum=1, integer=True)
    if keep > trained_length:
        raise ValueError(f"keep={keep} exceeds the trained length {trained_length}; use keep <= "
                         f"{trained_length - headroom}.")
    return keep
