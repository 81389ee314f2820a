"""Context-extension methods behind one ``apply(model, method=...)`` / ``remove(model)``.

Each method is a small class (``base.Method``): it validates or derives its parameters from a
``target_length`` without touching the model, then attaches itself in place. ``METHODS`` is the registry.
"""

from __future__ import annotations

from .base import STATE_ATTR, ActiveMethod, Method, Param
from .baselines import Truncate, Vanilla, truncate_ids
from .dca import DualChunkAttention
from .rope_scaling import NTK, DynamicNTK, Linear, YaRN
from .self_extend import SelfExtend

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


for _cls in (Vanilla, SelfExtend, DualChunkAttention, Linear, NTK, DynamicNTK, YaRN, Truncate):
    register_method(_cls())


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "STATE_ATTR", "ActiveMethod", "Method", "Param", "get_method", "register_method",
           "truncate_ids"]
