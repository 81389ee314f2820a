"""Public entry points: ``apply``, ``remove``, ``active``, ``settings``, ``max_length``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import SelfExtendConfig
from .integrations.hf import SUPPORTED_FAMILIES
from .methods import METHODS, STATE_ATTR, ActiveMethod
from .params import check_target_length, trained_length_of

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
    parameters (``selfextend methods`` lists them). ``target_length`` derives any parameter left out, or
    checks that the given ones reach it. Calling ``apply`` again replaces the active method; ``remove``
    restores the model exactly.

    SelfExtend keywords: ``trained_length`` (override L), ``backend`` (``"auto"``, ``"cpu"``,
    ``"reference"``, ``"flex"``, ``"triton"``), ``allow_overflow`` (past the reach ``(L - W) * G + W`` warn
    instead of raising).
    """
    impl = METHODS.get(method)
    check_target_length(target_length)
    if group_size is not None or window is not None:
        takes = {p.name for p in impl.params}
        if not {"group_size", "window"} <= takes:
            raise ValueError(f"group_size/window are SelfExtend parameters; method {method!r} takes: "
                             f"{', '.join(sorted(takes)) or '(none)'}")
        params = {"group_size": group_size, "window": window, **params}
    resolved = impl.resolve(model.config, target_length, params)  # validates before touching the model
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
        METHODS.get(active.name).detach(model, active)
        delattr(model, STATE_ATTR)
    return model


def active(model: torch.nn.Module) -> ActiveMethod | None:
    """The method applied to ``model`` (name and resolved parameters), or None."""
    return getattr(model, STATE_ATTR, None)


def settings(model: torch.nn.Module) -> SelfExtendConfig | None:
    """The active SelfExtend settings, or None when SelfExtend is not applied."""
    current = active(model)
    config = None if current is None else METHODS.get(current.name).settings(current)
    return config if isinstance(config, SelfExtendConfig) else None


def max_length(model: torch.nn.Module) -> int:
    """Longest input the model is meant to read with its current method (its trained length when vanilla)."""
    current = active(model)
    if current is None:
        return trained_length_of(model.config)
    reach = METHODS.get(current.name).reach(current.params)
    return trained_length_of(model.config) if reach is None else reach


__all__ = ["SUPPORTED_FAMILIES", "active", "apply", "max_length", "remove", "settings"]
