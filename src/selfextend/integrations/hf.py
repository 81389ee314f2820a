"""transformers >= 5 integration through its attention-function registry (no class patching).

``apply`` registers one attention function and one mask function under the name ``"selfextend"`` and
switches the model to it with ``set_attn_implementation``. The model's own code still projects q/k/v,
applies its RoPE, updates its KV cache and calls us with q and k *already rotated*; we move them to the
grouped positions by delta rotations (``rope.py``) and hand them to a backend.

Masks: the registered mask function does not build an L x L mask. It returns a ``MaskSpec``: the 2D
padding mask plus the arguments transformers would have used, so that

* SelfExtend reads padding from a (B, kv_len) tensor (memory-linear);
* layers or calls that must stay vanilla (sliding-window layers, ``group_size=1``, sequences no longer than
  the window) call the model's original attention function with exactly the mask it would have built,
  which makes them bit-identical to vanilla.

Positions come from the ``position_ids`` that transformers passes to the attention function (the ones
RoPE used); key positions are rebuilt from them and the padding mask (``positions.key_positions``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..backends import SelfExtendInputs, select_backend
from ..cache import GroupedCache
from ..config import SelfExtendConfig
from ..positions import grouped_query_positions, key_positions, query_temperature
from ..rope import rotate_by

logger = logging.getLogger("selfextend")

ATTN_NAME = "selfextend"


@dataclass
class MaskSpec:
    """What transformers' mask creation was asked for, kept lazy (see module docstring)."""

    kwargs: dict[str, Any]
    _materialized: dict[Any, Any] = field(default_factory=dict)  # per forward: masks, positions, rotations

    @property
    def is_plain_causal(self) -> bool:
        return self.kwargs.get("mask_function") is causal_mask_function

    @property
    def q_start(self) -> int:
        """Index in the key tensor of the first query."""
        return int(self.kwargs.get("q_offset", 0)) - int(self.kwargs.get("kv_offset", 0))

    def key_valid(self, kv_len: int) -> torch.Tensor | None:
        """(B, kv_len) bool padding mask, or None when nothing is padded."""
        mask = self.kwargs.get("attention_mask")
        if mask is None:
            return None
        start = int(self.kwargs.get("kv_offset", 0))
        mask = mask[:, start : start + kv_len].to(torch.bool)
        if mask.shape[1] < kv_len:  # static cache: slots past the mask are empty
            mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)
        return None if bool(mask.all()) else mask

    def positions(self, query_pos: torch.Tensor, q_start: int, kv_len: int):
        """``(key_valid, key_pos)`` for this forward, cached: every layer of a forward shares them."""

        def compute():
            key_valid = self.key_valid(kv_len)
            return key_valid, key_positions(query_pos, key_valid, q_start, kv_len)[0]

        return self.memo((q_start, kv_len), compute)  # one spec per forward, so one set of position_ids

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per forward: every layer of a forward shares its positions and deltas, and a
        decode step is cheap enough that recomputing them per layer would show."""
        if key not in self._materialized:
            self._materialized[key] = compute()
        return self._materialized[key]

    def materialize(self, implementation: str):
        """The mask the original ``implementation`` would have received (built once per forward)."""
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[implementation] if implementation in ALL_MASK_ATTENTION_FUNCTIONS else None
        return self.memo(implementation, lambda: mask_fn(**self.kwargs) if mask_fn is not None else self.kwargs.get("attention_mask"))


def selfextend_mask(**kwargs) -> MaskSpec:
    return MaskSpec(kwargs)


@dataclass
class ModelState:
    """Per-model settings shared by all its layers; ``apply`` may update ``config`` in place."""

    config: SelfExtendConfig
    original_implementation: str
    original_sliding_window: Any = None
    changed_sliding_window: bool = False
    layer_modules: list = field(default_factory=list)
    grouped_cache: GroupedCache | None = None  # keeps old keys grouped in the KV cache between calls


@dataclass
class LayerState:
    model_state: ModelState
    inv_freq: Callable[[], torch.Tensor]
    vanilla: Callable
    layout: str = "rotate_half"
    layer_idx: int | None = None  # the layer's index in the KV cache


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


def query_positions(query: torch.Tensor, kv_len: int, spec: MaskSpec | None, kwargs: dict) -> tuple[int, torch.Tensor]:
    """``(q_start, query_pos)``: where the queries sit in the key tensor, and their (B, q_len) RoPE positions
    (the ``position_ids`` RoPE used, or consecutive positions when the model passed none)."""
    bsz, _, q_len, _ = query.shape
    q_start = spec.q_start if spec is not None else kv_len - q_len
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = (q_start + torch.arange(q_len, device=query.device))[None]
    return q_start, position_ids.to(query.device).expand(bsz, q_len).long()


def _query(query: torch.Tensor, kv_len: int, spec: MaskSpec | None, kwargs: dict) -> tuple[int, torch.Tensor, int]:
    q_start, query_pos = query_positions(query, kv_len, spec, kwargs)
    return q_start, query_pos, int(query_pos.max())


def call_key_positions(method: str, spec: MaskSpec | None, attention_mask: Any, query_pos: torch.Tensor,
                       q_start: int, kv_len: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(key_valid, key_pos)`` for a remapping method's call, refusing masks it cannot honor."""
    if spec is not None and not spec.is_plain_causal:
        raise ValueError(
            f"{method} supports causal attention with padding; this call has a custom mask pattern "
            "(packed sequences, bidirectional or block overlays). Pass an attention_mask and unpacked inputs."
        )
    if spec is None and attention_mask is not None:
        raise ValueError(
            f"{method} needs the 2D attention_mask (batch, length); got a prepared 4D mask. "
            "Pass attention_mask as returned by the tokenizer."
        )
    if spec is not None:  # the same for every layer of this forward: computed once
        return spec.positions(query_pos, q_start, kv_len)
    return None, key_positions(query_pos, None, q_start, kv_len)[0]


_overflow_warned: set[int] = set()


def selfextend_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer: LayerState | None = getattr(module, "selfextend_layer", None)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation='{ATTN_NAME}' but was not prepared; "
            "call selfextend.apply(model, ...) instead of setting the implementation by hand."
        )
    state = layer.model_state
    cfg = state.config
    spec = attention_mask if isinstance(attention_mask, MaskSpec) else None

    def vanilla():
        mask = spec.materialize(state.original_implementation) if spec is not None else attention_mask
        return layer.vanilla(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    if kwargs.get("sliding_window") is not None:
        return vanilla()  # local layers never see past their window
    if dropout:
        raise ValueError("SelfExtend is an inference method; call model.eval() (attention dropout must be 0).")

    bsz, _, q_len, head_dim = query.shape
    kv_len = key.shape[2]

    def per_forward(key: Any, compute: Callable[[], Any]) -> Any:
        return spec.memo(key, compute) if spec is not None else compute()

    q_start, query_pos, max_pos = per_forward(("query", bsz, q_len, kv_len, query.device), lambda: _query(query, kv_len, spec, kwargs))
    inv_freq = layer.inv_freq()
    keeper = state.grouped_cache
    memo = spec._materialized if spec is not None else None  # every layer of this forward rotates by the same deltas

    def rotate(keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rotate_by(keys, delta, inv_freq, layer.layout, memo)

    if max_pos < cfg.window or cfg.group_size == 1:  # every key is a neighbor / G = 1: vanilla by definition
        if keeper.holds(layer.layer_idx, key):  # a cache grouped earlier (then cropped, or G changed)
            key_pos = call_key_positions("SelfExtend", spec, attention_mask, query_pos, q_start, kv_len)[1]
            keeper.ungroup(layer.layer_idx, key, key_pos, q_start, 0, rotate)
        return vanilla()
    if max_pos >= cfg.max_length:
        _overflow(cfg, max_pos + 1)

    key_valid, key_pos = call_key_positions("SelfExtend", spec, attention_mask, query_pos, q_start, kv_len)

    G, W = cfg.group_size, cfg.window
    factor = query_temperature(query_pos, cfg.trained_length, query.dtype) if cfg.temperature else None
    if factor is not None:  # per query row, so neighbor and grouped logits of that row grow alike
        query = query * factor
    query_delta = per_forward(("query_delta", bsz, q_len, kv_len, query.device, G, W), lambda: grouped_query_positions(query_pos, G, W) - query_pos)
    grouped_query = rotate(query, query_delta)
    written = q_start + q_len
    contiguous = ends_contiguous(key_valid, written)
    grouped_key = keeper.grouped_keys(layer.layer_idx, key, key_pos, written, q_start, W, G, contiguous, rotate)
    inputs = SelfExtendInputs(
        query=query,
        key=key[:, :, :written],
        value=value[:, :, :written],
        grouped_query=grouped_query,
        grouped_key=grouped_key,
        query_pos=query_pos,
        key_pos=key_pos[:, :written],
        key_valid=None if key_valid is None else key_valid[:, :written],
        q_start=q_start,
        window=W,
        scaling=scaling if scaling is not None else head_dim**-0.5,
        softcap=kwargs.get("softcap"),
    )
    out = select_backend(cfg.backend, inputs).forward(inputs)  # (B, H, q_len, D)
    keeper.commit(layer.layer_idx, key, grouped_key, key_pos, written, W, G, contiguous, rotate)
    return out.transpose(1, 2).contiguous(), None


def ends_contiguous(key_valid: torch.Tensor | None, written: int) -> bool:
    """Do each row's real keys run without a gap up to the last key (no padding, or left padding)?"""
    if key_valid is None:
        return True
    valid = key_valid[:, :written]
    count = valid.sum(dim=1)
    first = torch.where(valid, torch.arange(written, device=valid.device), written).amin(dim=1)
    return bool(((count == 0) | (first + count == written)).all())


def _overflow(cfg: SelfExtendConfig, length: int) -> None:
    msg = (
        f"{length} tokens exceed the reach ({cfg.trained_length}-{cfg.window})*{cfg.group_size}+{cfg.window} = "
        f"{cfg.max_length} of window={cfg.window}, group_size={cfg.group_size}: grouped positions leave the trained "
        f"range. Set group_size >= {-(-(length - cfg.window) // (cfg.trained_length - cfg.window))}"
    )
    if not cfg.allow_overflow:
        raise ValueError(msg + ", or pass allow_overflow=True to continue with a warning.")
    if length // 1024 not in _overflow_warned:  # once per 1k tokens, not once per layer
        _overflow_warned.add(length // 1024)
        warnings.warn(msg + ".", RuntimeWarning, stacklevel=3)


def register() -> None:
    """Register the attention and mask functions (idempotent)."""
    AttentionInterface.register(ATTN_NAME, selfextend_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, selfextend_mask)
