"""Shims for the transformers versions we support (5.x), each citing the change it bridges."""

from __future__ import annotations

import inspect
from typing import Any

import torch

# transformers 5.24 renamed the forward argument and output field ``past_key_values`` to ``cache`` (the
# old name is deprecated, removed in 5.40); these two helpers work with either.
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes the KV cache on the installed transformers."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward call returned, or None."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
