"""Context-extension methods behind one ``apply(model, method=...)`` / ``remove(model)``.

Each method is a small class (``base.Method``) registered by name in ``METHODS``: it validates or derives its
parameters (``config.py``) without touching the model, then attaches itself in place.

* ``baselines.py``: ``vanilla`` and ``truncate``;
* ``selfextend.py``: ``self-extend``; ``dca.py``: ``dca`` (their own attention, ``integrations/hf``);
* ``rope_scaling.py``: ``linear``, ``ntk``, ``dynamic-ntk``, ``yarn`` (transformers' rope types);
* ``tuned.py``: the settings ``selfextend tune`` saved, which SelfExtend's ``target_length`` rule reads.
"""

from __future__ import annotations

from ..registry import Registry
from .base import STATE_ATTR, ActiveMethod, Method, Param

METHODS: Registry[Method] = Registry("method")

from . import baselines, dca, rope_scaling, selfextend  # noqa: E402,F401  (each registers its methods)
from .baselines import truncate_ids  # noqa: E402

__all__ = ["METHODS", "STATE_ATTR", "ActiveMethod", "Method", "Param", "truncate_ids"]
