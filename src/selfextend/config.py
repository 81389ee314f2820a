"""SelfExtend settings: one frozen dataclass, validated once, with errors that name the fix."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .backends import check_backend_name
from .positions import max_reach, recommended_group_size, recommended_window, smallest_group_size

logger = logging.getLogger("selfextend")


@dataclass(frozen=True)
class SelfExtendConfig:
    group_size: int  # G: grouped positions are floor(pos / G)
    window: int  # W: keys closer than W keep their exact RoPE distance
    trained_length: int  # L: the context the model was trained on
    backend: str = "auto"
    allow_overflow: bool = False  # past the reach: warn (positions leave the trained range) instead of raising
    temperature: bool = False  # logits x (0.1 ln s + 1)^2 for queries past L, s = (pos + 1) / L

    @property
    def max_length(self) -> int:
        return max_reach(self.trained_length, self.window, self.group_size)

    def describe(self) -> str:
        return (
            f"group_size={self.group_size}, window={self.window}, trained_length={self.trained_length}, "
            f"reach={self.max_length} tokens, backend={self.backend}" + (", temperature" if self.temperature else "")
        )


def trained_length_of(model_config) -> int:
    """The context the model was trained on: ``max_position_embeddings`` (already includes llama3/yarn scaling)."""
    length = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 1:
        raise ValueError(
            "the model config has no usable max_position_embeddings; pass trained_length=<the context the model "
            "was trained on>."
        )
    return length


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def resolve_config(
    model_config,
    group_size: int | None = None,
    window: int | None = None,
    *,
    target_length: int | None = None,
    trained_length: int | None = None,
    backend: str = "auto",
    allow_overflow: bool = False,
    temperature: bool = False,
) -> SelfExtendConfig:
    """Validate explicit settings, or derive them from ``target_length`` with the authors' rule."""
    L = trained_length if trained_length is not None else trained_length_of(model_config)
    _check_int("trained_length", L, 2)
    check_backend_name(backend)
    if target_length is not None:
        _check_int("target_length", target_length, 1)
    if group_size is None and window is None and target_length is None:
        raise ValueError(
            "pass group_size and window (e.g. group_size=4, window=1024), or target_length=<tokens to read> "
            "to choose them by the authors' rule."
        )

    if window is None:
        window = recommended_window(L)
    elif isinstance(window, int) and not isinstance(window, bool) and window >= L:
        raise ValueError(
            f"window={window} must be smaller than the trained length {L}: neighbor distances must stay in "
            f"the trained range; use window <= {L // 2} (the authors use 512..2048), e.g. window={recommended_window(L)}."
        )
    _check_int("window", window, 1)

    if group_size is None:
        group_size = recommended_group_size(target_length, L, window)
        logger.warning(
            "selfextend: target_length=%d -> group_size=%d, window=%d (smallest G with W + (N - W) / G <= 2/3 L, "
            "L=%d; reach %d tokens)",
            target_length, group_size, window, L, max_reach(L, window, group_size),
        )
    elif isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 1:
        raise ValueError(
            f"group_size must be >= 1, got {group_size}; group_size=1 is vanilla attention, "
            f"use group_size >= 2 to extend the context."
        )
    _check_int("group_size", group_size, 1)

    if not isinstance(temperature, bool):
        raise TypeError(f"temperature must be True or False, got {temperature!r}")
    cfg = SelfExtendConfig(group_size, window, L, backend, allow_overflow, temperature)
    if target_length is not None and target_length > cfg.max_length:
        raise ValueError(
            f"target_length={target_length} exceeds the reach ({L}-{window})*{group_size}+{window} = {cfg.max_length} "
            f"of window={window}, group_size={group_size}; set group_size >= "
            f"{smallest_group_size(target_length, L, window)}."
        )
    return cfg
