"""Public entry points: ``apply``, ``remove``, ``active``, ``settings``, ``max_length``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import SelfExtendConfig, trained_length_of
from .integrations.model_info import SUPPORTED_FAMILIES
from .methods import STATE_ATTR, ActiveMethod, get_method

logger = logging.getLogger("selfextend")


def apply(
    model: torch.nn.Module,
    group_size: int | None = None,
    window: int | None = None,
    *,
    method: str = "self-extend",
    target_length: int | None = None,
    **params: Any,
) -> torch.nn.Module:
    """Extend ``model``'s context in place with ``method`` and return it.

    ``method="self-extend"`` (default) takes ``group_size`` (G) and ``window`` (W); keys closer than W keep
    exact RoPE distances, farther keys see positions divided by G. Other methods take their own keyword
    parameters (``selfextend methods`` lists them). ``target_length`` derives any parameter left out, or checks
    that the given ones reach it. Calling ``apply`` again replaces the active method; ``remove`` restores the
    model exactly.

    SelfExtend keywords: ``trained_length`` (override L), ``backend`` (``"auto"``, ``"cpu"``, ``"reference"``, ``"flex"``, ``"triton"``),
    ``allow_overflow`` (past the reach ``(L - W) * G + W`` warn instead of raising).
    """
    impl = get_method(method)
    if group_size is not None or window is not None:
        if method != "self-extend":
            raise ValueError(f"group_size/window are SelfExtend parameters; method {method!r} takes: "
                             f"{', '.join(p.name for p in impl.params) or '(none)'}")
        params = {"group_size": group_size, "window": window, **params}
    if method == "self-extend" and group_size is None and window is None and target_length is None:
        raise ValueError(
            "pass group_size and window (e.g. group_size=4, window=1024), or target_length=<tokens to read> "
            "to choose them for that length."
        )
    if target_length is not None and method == "self-extend" and params.get("group_size") is None:
        from .tuning import tuned_settings

        tuned = tuned_settings(model, target_length)
        if tuned is not None and params.get("window") in (None, tuned["window"]):
            logger.warning("selfextend: target_length=%d -> tuned settings %s", target_length, tuned)
            params = {**params, "group_size": tuned["group_size"], "window": tuned["window"]}
    resolved = impl.resolve(model, target_length, params)  # validates before touching the model
    previous: ActiveMethod | None = getattr(model, STATE_ATTR, None)
    if previous is not None and previous.name != method:
        remove(model)
        previous = None
    setattr(model, STATE_ATTR, impl.attach(model, resolved, previous))
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the original attention, rotary embedding and sliding window, no leftover state."""
    active: ActiveMethod | None = getattr(model, STATE_ATTR, None)
    if active is not None:
        get_method(active.name).detach(model, active)
        delattr(model, STATE_ATTR)
    return model


def active(model: torch.nn.Module) -> ActiveMethod | None:
    """The method applied to ``model`` (name and resolved parameters), or None."""
    return getattr(model, STATE_ATTR, None)


def settings(model: torch.nn.Module) -> SelfExtendConfig | None:
    """The active SelfExtend settings, or None when SelfExtend is not applied."""
    current = active(model)
    if current is None or current.name != "self-extend":
        return None
    return current.data["state"].config


def max_length(model: torch.nn.Module) -> int:
    """Longest input the model is meant to read with its current method (its trained length when vanilla)."""
    current = active(model)
    if current is None:
        return trained_length_of(model.config)
    reach = get_method(current.name).reach(model, current.params)
    return trained_length_of(model.config) if reach is None else reach


__all__ = ["SUPPORTED_FAMILIES", "active", "apply", "max_length", "remove", "settings"]
