"""RoPE-scaling methods built on transformers' own ``rope_parameters`` types (``modeling_rope_utils``).

Each method writes a ``rope_parameters`` dict into a copy of the model config and rebuilds the model's rotary
embedding module from it, so the frequencies and the attention factor are exactly what transformers computes
for a model shipped with that scaling. ``remove`` puts the original module back. One small function per method
turns ``(factor, params)`` into ``rope_parameters`` (the ``modeling_rope_utils`` style).

Scale factor: ``s = target_length / L`` when derived, never below 1.

Past the reach ``floor(L * s)`` (linear, NTK, YaRN; dynamic NTK has none) a forward warns once per 1k tokens
(``RuntimeWarning``, from a hook on the rebuilt rotary module) instead of running on silently. It warns rather
than refuses: ``target_length`` sizes the reach to exactly the prompt, so generating an answer always passes
it by the answer's tokens; size ``target_length`` to prompt + answer to stay inside.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

from ..config import check_yarn_betas, rope_scaling_factor
from ..integrations.hf.attention import reach_guard
from ..integrations.hf.model_info import check_model, rotary_embedding
from . import METHODS
from .base import TRAINED_LENGTH, ActiveMethod, Method, Param, trained_length


def _linear(base: dict, factor: float, L: int, params: dict) -> tuple[dict, int]:
    """Position interpolation: every frequency divided by ``factor``."""
    return {**base, "rope_type": "linear", "factor": factor}, L


def _ntk(base: dict, factor: float, L: int, params: dict) -> tuple[dict, int]:
    """Static NTK-aware scaling: ``theta' = theta * s ** (D / (D - 2))`` (no built-in type in
    transformers 5)."""
    dim = params["_rotary_dim"]
    theta = base["rope_theta"] * factor ** (dim / (dim - 2))
    return {**base, "rope_type": "default", "rope_theta": theta}, L


def _dynamic(base: dict, factor: float, L: int, params: dict) -> tuple[dict, int]:
    """Dynamic NTK: the base grows with the current length past ``L`` (transformers' ``dynamic``)."""
    return {**base, "rope_type": "dynamic", "factor": factor}, L


def _yarn(base: dict, factor: float, L: int, params: dict) -> tuple[dict, int]:
    """YaRN: per-dimension ramp between interpolation and extrapolation, plus the logit temperature."""
    out = {**base, "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L}
    for key in ("attention_factor", "beta_fast", "beta_slow"):
        if params.get(key) is not None:
            out[key] = params[key]
    return out, int(math.ceil(L * factor))


def _past_reach(method: str, params: dict, reach: int) -> Callable[[int], str]:
    def message(needed: int) -> str:
        L = params["trained_length"]
        return (f"{needed} tokens exceed the reach {reach} of {method} (factor={params['factor']:g}, trained "
                f"length {L}): positions past it are outside what the scaling was set for. Apply it with "
                f"target_length >= {needed} (factor >= {needed / L:.3f}) for inputs this long.")

    return message


class RopeScaling(Method):
    """Shared resolve/attach/detach; subclasses set ``rope_fn`` and their extra parameters."""

    rope_fn: Callable[[dict, float, int, dict], tuple[dict, int]]
    bounded = True  # False for dynamic NTK, which rescales itself with the length
    params = (
        Param("factor", float, None, "scale s >= 1 (default: target_length / trained length)", minimum=1.0,
              fix="factor=1 is vanilla; use factor = target_length / L"),
        TRAINED_LENGTH,
    )

    def resolve(self, model_config, target_length, params):
        self.check_params(params)
        L = trained_length(model_config, params)
        factor = rope_scaling_factor(self.name, params.get("factor"), target_length, L, self.bounded)
        return {**{k: v for k, v in params.items() if v is not None}, "factor": factor, "trained_length": L}

    def reach(self, params):
        return int(math.floor(params["trained_length"] * params["factor"])) if self.bounded else None

    def attach(self, model, params, previous):
        check_model(model, self.name)
        if previous is not None:  # settings change: rebuild from the original module
            self.detach(model, previous)
        name, rotary = rotary_embedding(model)
        config = copy.deepcopy(rotary.config if hasattr(rotary, "config") else model.config)
        base = dict(config.rope_parameters or {})
        if any(isinstance(v, dict) for v in base.values()):
            raise ValueError(
                f"{self.name} supports models with one rope_parameters set; this model has one per layer "
                f"type ({', '.join(base)}). Use method='self-extend' for hybrid models."
            )
        if base.get("rope_type", "default") != "default":
            raise ValueError(
                f"the model already uses rope_type={base['rope_type']!r}; {self.name} rescales plain RoPE "
                "only (stacking two scalings is not what either was tuned for). Use method='self-extend'."
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        extra = {**params, "_rotary_dim": int(head_dim * base.get("partial_rotary_factor", 1.0))}
        rope_parameters, max_positions = type(self).rope_fn(base, params["factor"],
                                                            params["trained_length"], extra)
        config.rope_parameters = rope_parameters
        config.max_position_embeddings = max_positions
        device = next(iter(rotary.buffers())).device
        new = type(rotary)(config).to(device)
        if self.bounded:  # the new module goes with detach, and its hook with it
            reach = self.reach(params)
            new.register_forward_pre_hook(reach_guard(reach, _past_reach(self.name, params, reach)),
                                          with_kwargs=True)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        return ActiveMethod(self.name, params, {"module": (parent, attr, rotary)})

    def detach(self, model, active):
        parent, attr, original = active.data["module"]
        setattr(parent, attr, original)


@METHODS.register("linear")
class Linear(RopeScaling):
    summary = "position interpolation (transformers rope_type 'linear'): frequencies / factor"
    rope_fn = staticmethod(_linear)


@METHODS.register("ntk")
class NTK(RopeScaling):
    summary = "static NTK-aware scaling: rope_theta * factor ** (D / (D - 2))"
    rope_fn = staticmethod(_ntk)


@METHODS.register("dynamic-ntk")
class DynamicNTK(RopeScaling):
    summary = "dynamic NTK (rope_type 'dynamic'): the base grows with the current length past L"
    rope_fn = staticmethod(_dynamic)
    bounded = False


@METHODS.register("yarn")
class YaRN(RopeScaling):
    summary = "YaRN (rope_type 'yarn'): NTK-by-parts frequencies and attention temperature 0.1 ln(s) + 1"
    rope_fn = staticmethod(_yarn)
    params = RopeScaling.params + (
        Param("attention_factor", float, None, "cos/sin multiplier (logits get its square); "
              "default 0.1 ln(s) + 1", minimum=0, strict=True,
              fix="it multiplies cos/sin (the logits by its square); the default is 0.1 ln(factor) + 1"),
        Param("beta_fast", float, None, "ramp boundary for extrapolation (default 32)", minimum=0,
              strict=True, fix="rotations where the ramp starts extrapolating; the default is 32"),
        Param("beta_slow", float, None, "ramp boundary for interpolation (default 1)", minimum=0,
              strict=True, fix="rotations where the ramp is fully interpolated; the default is 1"),
    )

    def check_together(self, params):
        check_yarn_betas(params.get("beta_fast"), params.get("beta_slow"))
