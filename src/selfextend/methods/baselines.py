"""The two baselines every method is shown against: ``vanilla`` (extrapolate) and ``truncate`` (drop the
start)."""

from __future__ import annotations

import torch

from ..config import truncate_keep
from ..integrations.hf.attention import reach_guard
from ..integrations.hf.model_info import rotary_embedding
from ..params import trained_length_of
from . import METHODS
from .base import STATE_ATTR, TRAINED_LENGTH, ActiveMethod, Method, Param, trained_length


@METHODS.register("vanilla")
class Vanilla(Method):
    summary = "the model as trained: RoPE positions past the trained length extrapolate"

    def resolve(self, model_config, target_length, params):
        self.check_params(params)
        return {}

    def attach(self, model, params, previous):
        """Nothing changes; a forward past the trained length warns, as every method does past its reach."""
        if previous is not None:
            self.detach(model, previous)
        _, rotary = rotary_embedding(model)
        if rotary is None:
            return ActiveMethod(self.name, {})
        L = trained_length_of(model.config)

        def message(needed: int) -> str:
            return (f"{needed} tokens exceed the trained length {L} and the model is vanilla: positions past "
                    f"it extrapolate (what the baseline measures). Apply a method with target_length >= "
                    f"{needed} to read inputs this long.")

        hook = rotary.register_forward_pre_hook(reach_guard(L, message), with_kwargs=True)
        return ActiveMethod(self.name, {}, {"hook": hook})

    def detach(self, model, active):
        if "hook" in active.data:
            active.data["hook"].remove()


DROPS = ("middle", "start")


@METHODS.register("truncate")
class Truncate(Method):
    summary = ("keep `keep` prompt tokens, the head and the tail (LongBench), or the last ones; the model "
               "stays vanilla")
    params = (
        Param("keep", int, None, "prompt tokens kept (default: trained length - headroom)", minimum=1),
        Param("drop", str, "middle", "which part of a long prompt goes: middle (keep the head with the "
              "instruction and the tail with the question, as LongBench) or start (keep the last tokens)",
              choices=DROPS,
              fix="middle keeps the head and the tail of the prompt, start keeps its last tokens"),
        Param("headroom", int, None, "tokens left for the answer when `keep` is derived "
              "(default min(64, L // 8))", minimum=0),
        TRAINED_LENGTH,
    )

    def resolve(self, model_config, target_length, params):
        self.check_params(params)
        keep = truncate_keep(params.get("keep"), params.get("headroom"), trained_length(model_config, params))
        return {"keep": keep, "drop": params.get("drop") or "middle"}

    def attach(self, model, params, previous):
        return ActiveMethod(self.name, params)

    def detach(self, model, active):
        pass

    def reach(self, params):
        return None  # any input: the start is dropped


def truncate_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``input_ids`` (and mask) cut to ``keep`` tokens when ``truncate`` is active, else unchanged: the first
    ``keep // 2`` and the last ``keep - keep // 2`` (``drop="middle"``, LongBench's truncation, which keeps a
    task's instruction and its question), or the last ``keep`` (``drop="start"``).

    Truncation acts on the prompt, not inside attention, so selfextend's own entry points (generation helpers,
    the evaluation harness, the server) call this; ``model.generate`` on a raw long prompt does not
    truncate."""
    active: ActiveMethod | None = getattr(model, STATE_ATTR, None)
    if active is None or active.name != "truncate" or input_ids.shape[-1] <= active.params["keep"]:
        return input_ids, attention_mask
    keep = active.params["keep"]
    if active.params.get("drop", "middle") == "start":
        index = torch.arange(input_ids.shape[-1] - keep, input_ids.shape[-1])
    else:
        head = keep // 2
        n = input_ids.shape[-1]
        index = torch.cat([torch.arange(head), torch.arange(n - (keep - head), n)])
    index = index.to(input_ids.device)
    cut = input_ids.index_select(-1, index)
    return cut, None if attention_mask is None else attention_mask.index_select(-1, index)


__all__ = ["Truncate", "Vanilla", "truncate_ids"]
