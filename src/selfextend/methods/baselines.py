"""The two baselines every method is shown against: ``vanilla`` (extrapolate) and ``truncate`` (drop the
start)."""

from __future__ import annotations

import torch

from ..config import truncate_keep
from . import METHODS
from .base import STATE_ATTR, TRAINED_LENGTH, ActiveMethod, Method, Param, trained_length


@METHODS.register("vanilla")
class Vanilla(Method):
    summary = "the model as trained: RoPE positions past the trained length extrapolate"

    def resolve(self, model, target_length, params):
        self.check_params(params)
        return {}

    def attach(self, model, params, previous):
        return ActiveMethod(self.name, {})

    def detach(self, model, active):
        pass


@METHODS.register("truncate")
class Truncate(Method):
    summary = "keep only the last `keep` prompt tokens (what users fall back to); the model stays vanilla"
    params = (
        Param("keep", int, None, "prompt tokens kept (default: trained length - headroom)"),
        Param("headroom", int, None, "tokens left for the answer when `keep` is derived "
              "(default min(64, L // 8))"),
        TRAINED_LENGTH,
    )

    def resolve(self, model, target_length, params):
        self.check_params(params)
        return {"keep": truncate_keep(params.get("keep"), params.get("headroom"),
                                      trained_length(model, params))}

    def attach(self, model, params, previous):
        return ActiveMethod(self.name, params)

    def detach(self, model, active):
        pass

    def reach(self, model, params):
        return None  # any input: the start is dropped


def truncate_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``input_ids`` (and mask) cut to the last ``keep`` tokens when ``truncate`` is active, else unchanged.

    Truncation acts on the prompt, not inside attention, so selfextend's own entry points (generation helpers,
    the evaluation harness) call this; ``model.generate`` on a raw long prompt does not truncate."""
    active: ActiveMethod | None = getattr(model, STATE_ATTR, None)
    if active is None or active.name != "truncate" or input_ids.shape[-1] <= active.params["keep"]:
        return input_ids, attention_mask
    keep = active.params["keep"]
    return input_ids[..., -keep:], None if attention_mask is None else attention_mask[..., -keep:]


__all__ = ["Truncate", "Vanilla", "truncate_ids"]
