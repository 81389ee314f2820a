"""What every attention-remapping method shares in transformers: registration, masks, per-call plumbing.

transformers >= 5 lets a model run any attention function registered in ``AttentionInterface`` under a name,
with a mask function of the same name in ``AttentionMaskInterface`` (without one the mask silently becomes
None). A method (``selfextend.py``, ``dca.py``) is an ``AttentionIntegration``: ``install`` registers its
attention function and the shared mask function, keeps per-model and per-layer state on the modules, and
switches the model with ``set_attn_implementation``; ``uninstall`` undoes all of it. No modeling file is
copied and no class is patched. The model still projects q/k/v, applies its RoPE, updates its KV cache and
calls us with q and k *already rotated*; the method moves them to its positions and calls a backend.

Masks: the registered mask function does not build an L x L mask. It returns a ``MaskSpec``: the 2D
padding mask plus the arguments transformers would have used, so that

* a method reads padding from a (B, kv_len) tensor (memory-linear);
* layers or calls that must stay vanilla (sliding-window layers, ``group_size=1``, inputs no longer than
  the window or the trained length) call the model's original attention function with exactly the mask it
  would have built, which makes them bit-identical to vanilla.

Positions come from the ``position_ids`` that transformers passes to the attention function (the ones
RoPE used); key positions are rebuilt from them and the padding mask (``positions.key_positions_unchecked``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...attention_inputs import Rotator
from ...backends import Backend, select_backend
from ...positions import POSITION_IDS_ERROR, key_positions_unchecked
from ...rope import rotate_by
from .model_info import check_model, disable_global_sliding_window, inv_freq_getter

logger = logging.getLogger("selfextend")

LAYER_ATTR = "selfextend_layer"  # set on every attention module while a remapping method is installed


@dataclass
class PositionFacts:
    """Per forward and device: what every layer needs to know about positions (``MaskSpec.facts``)."""

    key_valid: torch.Tensor | None  # (B, kv_len) bool, None when no written key is padding
    key_pos: torch.Tensor  # (B, kv_len) long
    max_pos: int  # the largest query position
    consistent: bool  # position_ids count the non-padding tokens


@dataclass
class MaskSpec:
    """What transformers' mask creation was asked for, kept lazy (see module docstring)."""

    kwargs: dict[str, Any]
    _materialized: dict[Any, Any] = field(default_factory=dict)  # per forward: masks, positions, rotations
    # generate() builds the mask ahead for a static cache and the model passes it back to its mask creation:
    # not 2D there (left as is), and ``lazy_mask`` unwraps it
    ndim: ClassVar[int] = 4

    @property
    def is_plain_causal(self) -> bool:
        return self.kwargs.get("mask_function") is causal_mask_function

    @property
    def q_start(self) -> int:
        """Index in the key tensor of the first query."""
        return int(self.kwargs.get("q_offset", 0)) - int(self.kwargs.get("kv_offset", 0))

    def padding_mask(self, kv_len: int, device: torch.device | None = None) -> torch.Tensor | None:
        """(B, kv_len) bool mask on ``device`` (False: padding, or a static cache's empty slot), or None when
        the model passed no mask. Nothing is read back to the host."""
        mask = self.kwargs.get("attention_mask")
        if mask is None:
            return None
        start = int(self.kwargs.get("kv_offset", 0))
        mask = mask[:, start : start + kv_len].to(device=device, dtype=torch.bool)
        if mask.shape[1] < kv_len:  # static cache: slots past the mask are empty
            mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)
        return mask

    def facts(self, query_pos: torch.Tensor, q_start: int, kv_len: int, written: int) -> PositionFacts:
        """This forward's positions on ``query_pos``'s device, computed once for every layer, with a single
        read back to the host for all that the host must decide on (is anything padded among the written
        keys, are the ``position_ids`` consistent, the largest position): a decode step on a GPU then
        waits for the device once, as vanilla's own padding check does, not once per question."""

        def compute():
            mask = self.padding_mask(kv_len, query_pos.device)
            key_pos, _, consistent = key_positions_unchecked(query_pos, mask, q_start, kv_len)
            flags = [consistent.long(), query_pos.max()]
            if mask is not None:
                flags.append(mask[:, :written].all().long())
            host = torch.stack(flags).tolist()  # the forward's one device-to-host read
            key_valid = mask if mask is not None and not host[2] else None
            return PositionFacts(key_valid, key_pos, int(host[1]), bool(host[0]))

        return self.memo(("facts", q_start, kv_len, written, query_pos.device), compute)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per forward: every layer of a forward shares its positions and deltas, and a
        decode step is cheap enough that recomputing them per layer would show."""
        if key not in self._materialized:
            self._materialized[key] = compute()
        return self._materialized[key]

    def materialize(self, implementation: str, device: torch.device | None = None):
        """The mask the original ``implementation`` would have received (once per forward and device)."""
        mask_fn = (ALL_MASK_ATTENTION_FUNCTIONS[implementation]
                   if implementation in ALL_MASK_ATTENTION_FUNCTIONS else None)

        def build():
            mask = mask_fn(**self.kwargs) if mask_fn is not None else self.kwargs.get("attention_mask")
            return mask.to(device) if isinstance(mask, torch.Tensor) and device is not None else mask

        return self.memo((implementation, device), build)


def lazy_mask(**kwargs) -> MaskSpec:
    """The mask function every remapping method registers: defer the mask, keep what it was asked for."""
    if isinstance(kwargs.get("attention_mask"), MaskSpec):  # built ahead by generate(): its 2D mask
        kwargs["attention_mask"] = kwargs["attention_mask"].kwargs.get("attention_mask")
    if isinstance(kwargs.get("q_offset"), torch.Tensor):  # a static cache's length: layer 0 adds to it
        kwargs["q_offset"] = kwargs["q_offset"].clone()
    return MaskSpec(kwargs)


@dataclass
class ModelState:
    """Per-model settings shared by all its layers; ``apply`` with new settings updates ``config`` in
    place."""

    config: Any  # the method's frozen config (``config.py``)
    original_implementation: str
    original_sliding_window: Any = None
    changed_sliding_window: bool = False
    layer_modules: list = field(default_factory=list)
    extra: Any = None  # the method's per-model helper (SelfExtend: its GroupedCache)
    warned: set[int] = field(default_factory=set)  # input lengths (in 1k) past the reach already warned of


@dataclass
class LayerState:
    integration: AttentionIntegration
    model_state: ModelState
    inv_freq: Callable[[], torch.Tensor]
    vanilla: Callable
    layout: str = "rotate_half"
    layer_idx: int | None = None  # the layer's index in the KV cache
    extra: Any = None  # the method's per-layer helper (DCA: its RotatedKeyStore)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        """``x`` rotated by ``delta`` positions with this layer's frequencies. What outlives a call (a cache's
        record of how to rotate its keys back) keeps this, never a call's bound method: that would keep the
        call's query, key and value alive with it."""
        return rotate_by(x, delta, self.inv_freq(), self.layout, memo)


def leading(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The first ``n`` entries of ``t`` along ``dim``: ``t`` itself when that is all of it (a slice would be
    one more op in every layer of a decode step)."""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)


def warn_per_1k(seen: set[int], length: int, message: str) -> None:
    """A RuntimeWarning once per 1k tokens of input length: not once per layer, nor per decode step."""
    if length // 1024 not in seen:
        seen.add(length // 1024)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def reach_guard(reach: int, message: Callable[[int], str]) -> Callable:
    """A forward pre-hook for the rotary module: ``warn_per_1k`` with ``message(tokens)`` when positions pass
    ``reach``. On the rotary module, not in attention, so it runs once per forward and for any method."""
    warned: set[int] = set()

    def guard(module, args, kwargs):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if not isinstance(positions, torch.Tensor) or positions.numel() == 0 or torch.compiler.is_compiling():
            return None
        needed = int(positions.max()) + 1
        if needed > reach:
            warn_per_1k(warned, needed, message(needed))
        return None

    return guard


def vanilla_attention_function(module: torch.nn.Module, implementation: str) -> Callable:
    """The attention function the model used before ``apply``."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"cannot find the eager attention of {type(module).__name__}; load the model with "
            "attn_implementation='sdpa' before selfextend.apply."
        )
    return eager


class AttentionCall:
    """One layer's attention call: what the model passed, the positions it implies, the vanilla fallback.

    Positions and rotation deltas are memoised on the ``MaskSpec``, which lives for one forward, so every
    layer of a forward shares them."""

    def __init__(self, module: torch.nn.Module, layer: LayerState, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: Any, dropout: float, scaling: float | None,
                 kwargs: dict):
        if key.device != query.device or value.device != query.device:
            raise ValueError(
                f"{layer.integration.label}: layer {layer.layer_idx} got queries on {query.device} but keys "
                f"on {key.device} and values on {value.device}; keep each decoder layer and its KV cache on "
                "one device (device_map places whole layers; an offloaded cache must come back first)"
            )
        self.module, self.layer, self.kwargs = module, layer, kwargs
        self.query, self.key, self.value = query, key, value
        self.attention_mask, self.dropout = attention_mask, dropout
        self.spec = attention_mask if isinstance(attention_mask, MaskSpec) else None
        self.config = layer.model_state.config
        self.scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.given_scaling = scaling
        self.kv_len = key.shape[2]
        bsz, q_len = query.shape[0], query.shape[2]
        self.q_start, self.query_pos = self.per_forward(
            ("query", bsz, q_len, self.kv_len, query.device), self._query_positions)
        self.written = self.q_start + q_len  # keys [0, written) hold real tokens (a static cache has more)
        self.facts = self._facts()
        self.max_pos = self.facts.max_pos

    def per_forward(self, key: Any, compute: Callable[[], Any]) -> Any:
        return self.spec.memo(key, compute) if self.spec is not None else compute()

    def _query_positions(self) -> tuple[int, torch.Tensor]:
        """``(q_start, query_pos)``: where the queries sit in the key tensor, and their (B, q_len) RoPE
        positions (the ``position_ids`` RoPE used, or consecutive positions when the model passed none)."""
        bsz, _, q_len, _ = self.query.shape
        q_start = self.spec.q_start if self.spec is not None else self.kv_len - q_len
        position_ids = self.kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (q_start + torch.arange(q_len, device=self.query.device))[None]
        query_pos = position_ids.to(self.query.device).expand(bsz, q_len).long()
        return q_start, query_pos

    def _facts(self) -> PositionFacts:
        if self.spec is not None:
            return self.spec.facts(self.query_pos, self.q_start, self.kv_len, self.written)
        key_pos, _, consistent = key_positions_unchecked(self.query_pos, None, self.q_start, self.kv_len)
        host = torch.stack([consistent.long(), self.query_pos.max()]).tolist()
        return PositionFacts(None, key_pos, int(host[1]), bool(host[0]))

    def vanilla(self) -> tuple[torch.Tensor, Any]:
        """The model's original attention with exactly the mask it would have built."""
        if self.spec is not None:
            mask = self.spec.materialize(self.layer.model_state.original_implementation, self.query.device)
        else:
            mask = self.attention_mask
        return self.layer.vanilla(self.module, self.query, self.key, self.value, mask, dropout=self.dropout,
                                  scaling=self.given_scaling, **self.kwargs)

    def key_positions(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(key_valid, key_pos)`` of every key, refusing masks a remapping method cannot honor."""
        label = self.layer.integration.label
        if self.spec is not None and not self.spec.is_plain_causal:
            raise ValueError(
                f"{label} supports causal attention with padding; this call has a custom mask pattern "
                "(packed sequences, bidirectional or block overlays). "
                "Pass an attention_mask and unpacked inputs."
            )
        if self.spec is None and self.attention_mask is not None:
            raise ValueError(
                f"{label} needs the 2D attention_mask (batch, length); got a prepared 4D mask. "
                "Pass attention_mask as returned by the tokenizer."
            )
        if not self.facts.consistent:
            raise ValueError(POSITION_IDS_ERROR)
        return self.facts.key_valid, self.facts.key_pos

    def backend_inputs(self, key_valid: torch.Tensor | None, key_pos: torch.Tensor) -> dict[str, Any]:
        """The fields every method's backend inputs share (``backends/base.py``): keys cut to the written
        ones."""
        w = self.written
        return dict(key=leading(self.key, w, 2), value=leading(self.value, w, 2), query_pos=self.query_pos,
                    key_pos=leading(key_pos, w, 1),
                    key_valid=None if key_valid is None else leading(key_valid, w, 1),
                    q_start=self.q_start, scaling=self.scaling, softcap=self.kwargs.get("softcap"))

    def backend(self, inputs: Any) -> Backend:
        """``select_backend``'s choice for ``inputs``, made once per forward when nothing is padded: every
        layer then passes tensors of the same kinds (what a backend's ``supports`` reads), so it would choose
        the same, and a decode step would pay for the choice in every layer."""
        name = self.config.backend
        if inputs.key_valid is not None or self.spec is None:
            return select_backend(name, inputs)
        q, v = inputs.query, inputs.value
        return self.spec.memo(("backend", name, inputs.method, q.dtype, q.device, q.shape[-1], v.shape[-1],
                               inputs.softcap, inputs.ends_contiguous, q.shape[2] == 1),
                              lambda: select_backend(name, inputs))

    def rotate(self, x: torch.Tensor, delta: torch.Tensor, shared: bool = True) -> torch.Tensor:
        """``x`` rotated by ``delta`` positions with this layer's frequencies. ``shared``: small rotations (a
        decode step) reuse one matrix per forward across layers (``rope.rotate_by``'s memo)."""
        memo = self.spec._materialized if shared and self.spec is not None else None
        return self.layer.rotate(x, delta, memo)

    def rotator(self, maps: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Rotator:
        """The method's rotator (``attention_inputs``): ``x`` at ``pos`` moved to ``maps[name](pos)``. The
        deltas of this call's query positions are computed once per forward and shared by every layer (with
        the small-rotation matrices built from them); any other positions are rotated afresh."""

        def rotate(x: torch.Tensor, pos: torch.Tensor, name: str) -> torch.Tensor:
            if pos is not self.query_pos:
                return self.rotate(x, maps[name](pos) - pos, shared=False)
            delta = self.per_forward((name, self.config, *pos.shape, self.kv_len, pos.device),
                                     lambda: maps[name](pos) - pos)
            return self.rotate(x, delta)

        return rotate


class AttentionIntegration:
    """A method's attention in transformers: subclasses set the names and implement ``attend``."""

    attn_name: ClassVar[str]  # the name in transformers' attention and mask registries
    label: ClassVar[str]  # the method's name in messages

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """The attention output (B, H, q_len, Dv), or None when this call is exactly vanilla."""
        raise NotImplementedError

    def remaps(self, config: Any) -> bool:
        """Whether these settings read keys past a global sliding window (then it is switched off)."""
        return True

    def new_state(self, model: torch.nn.Module) -> Any:
        """The per-model helper kept in ``ModelState.extra``."""
        return None

    def new_layer(self) -> Any:
        """The per-layer helper kept in ``LayerState.extra``."""
        return None

    def settings_changed(self, state: ModelState) -> None:
        """Drop what the old settings left behind."""

    def closing(self, state: ModelState) -> None:
        """Undo what the method left in the model's caches."""

    # --- shared plumbing ---

    def forward(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, Any]:
        """The function registered in ``AttentionInterface`` (transformers' attention contract)."""
        layer: LayerState | None = getattr(module, LAYER_ATTR, None)
        if layer is None or layer.integration is not self:
            raise RuntimeError(
                f"{type(module).__name__} runs attn_implementation='{self.attn_name}' but was not prepared; "
                f"call selfextend.apply(model, ...) instead of setting the implementation by hand."
            )
        call = AttentionCall(module, layer, query, key, value, attention_mask, dropout, scaling, kwargs)
        if kwargs.get("sliding_window") is not None:
            return call.vanilla()  # local layers never see past their window
        if dropout:
            raise ValueError(f"{self.label} is an inference method; call model.eval() "
                             "(attention dropout must be 0).")
        out = self.attend(call)
        if out is None:
            return call.vanilla()
        return out.transpose(1, 2).contiguous(), None

    def register(self) -> None:
        """Register the attention function and the lazy mask function (idempotent)."""
        AttentionInterface.register(self.attn_name, self.forward)
        AttentionMaskInterface.register(self.attn_name, lazy_mask)

    def install(self, model: torch.nn.Module, config: Any) -> ModelState:
        """Prepare every attention layer and switch the model to this method's attention."""
        rotary, layers, layout = check_model(model, self.label)
        self.register()
        original = model.config._attn_implementation or "eager"
        state = ModelState(config=config, original_implementation=original, extra=self.new_state(model))
        for layer in layers:
            setattr(layer, LAYER_ATTR, LayerState(
                integration=self,
                model_state=state,
                inv_freq=inv_freq_getter(rotary, layer),
                vanilla=vanilla_attention_function(layer, original),
                layout=layout,
                layer_idx=getattr(layer, "layer_idx", None),
                extra=self.new_layer(),
            ))
            state.layer_modules.append(layer)
        disable_global_sliding_window(model, state, self.remaps(config))
        model.set_attn_implementation(self.attn_name)
        logger.info("selfextend: %s applied: %s", self.label, config.describe())
        return state

    def update(self, model: torch.nn.Module, state: ModelState, config: Any) -> None:
        """New settings on an installed model: keep the layer state, drop what the old settings left."""
        check_model(model, self.label)
        state.config = config
        state.warned.clear()  # new settings, a new reach: warn again
        disable_global_sliding_window(model, state, self.remaps(config))
        self.settings_changed(state)
        logger.info("selfextend: %s settings changed: %s", self.label, config.describe())

    def uninstall(self, model: torch.nn.Module, state: ModelState) -> None:
        """The original attention and sliding window, the caches back at true positions, no leftover state."""
        model.set_attn_implementation(state.original_implementation)
        disable_global_sliding_window(model, state, False)
        self.closing(state)
        for layer in state.layer_modules:
            delattr(layer, LAYER_ATTR)
