"""Keeping keys at remapped positions across forward calls, without rotating the whole cache per step.

transformers' KV cache stores keys rotated at their true position ``j``. SelfExtend's grouped attention
needs a key at ``j // G`` once it is ``W`` or more tokens behind every query, and from then on forever;
DCA needs keys at ``j mod chunk_len``. Rotating the whole cache again at every decode step (what the
official patches do) costs O(L * D) work and a K-sized temporary per step. Two policies avoid it:

* ``GroupedCache`` (SelfExtend): rotate a key *in place in the transformers cache* once it leaves the
  neighbor window. Decode then costs what vanilla's does (one key rotated per step) and needs no memory
  beyond vanilla's. The cache itself carries a ``GroupedRecord`` (how many leading keys of each layer are
  grouped, for which G, at which positions), so copies, reordered beams and cropped caches stay right;
  keys a later call needs as neighbors again (a crop, a larger W) are rotated back first. Only caches
  that hand the attention their own storage qualify (``DynamicCache``, ``StaticCache``); with any other
  cache, or without one, grouped keys are rotated per call and nothing is kept. ``remove`` rotates every
  cache it saw back to true positions (float rounding aside: rotations are not bit-exact inverses).
* ``RotatedKeyStore`` (DCA): a per-layer side store of keys rotated to the method's key positions, checked
  against the keys it is given. It costs one extra K while decoding, but never touches the user's cache.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...positions import grouped_key_positions
from .attention import leading
from .compat import CACHE_NAMES, output_cache


class RotatedKeyStore:
    """Rotated keys kept beside the cache: a prefill from an empty cache keeps nothing (its peak memory is
    unchanged); the first call that continues a cache rotates the cached keys once, later calls only the new
    ones. It checks that it still describes the keys it is given (batch shape, dtype, first and last stored
    rows) and otherwise rebuilds (a new conversation, a reordered beam, a cropped cache)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._keys: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self._len = 0
        self._first: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._keys is None else self._keys.numel() * self._keys.element_size()

    def _matches(self, key: torch.Tensor, written: int) -> bool:
        k = self._keys
        if k is None or self._len == 0 or self._len > written:
            return False
        if (k.shape[:2] != key.shape[:2] or k.shape[-1] != key.shape[-1] or k.dtype != key.dtype
                or k.device != key.device):
            return False
        return torch.equal(key[:, :, 0], self._first) and torch.equal(key[:, :, self._len - 1], self._last)

    def rotated_keys(
        self, key: torch.Tensor, written: int, keep: bool, rotate: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Keys ``[0, written)`` rotated to the method's key positions.

        Args:
            key: (B, Hkv, kv_len, D) keys rotated at their true positions (kv_len >= written).
            written: number of keys that hold real tokens (the rest of a static cache is empty).
            keep: store the result for the next call (False for a prefill from an empty cache).
            rotate: ``rotate(keys, start)`` rotates ``keys`` whose first index is ``start``.
        """
        if not keep:
            self.clear()
            return rotate(key[:, :, :written], 0)
        if not self._matches(key, written):
            self.clear()
        start = self._len
        if start < written:
            new = rotate(key[:, :, start:written], start)
            self._append(new, written)
            self._first = key[:, :, 0].clone()
            self._last = key[:, :, written - 1].clone()
        return self._keys[:, :, :written]

    def _append(self, new: torch.Tensor, written: int) -> None:
        if self._keys is None or written > self._keys.shape[2]:
            capacity = written + max(256, written // 16)  # amortised growth, at most ~6% unused
            grown = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
            if self._keys is not None:
                grown[:, :, : self._len] = self._keys[:, :, : self._len]
            self._keys = grown
        self._keys[:, :, self._len : written] = new
        self._len = written


RECORD_ATTR = "selfextend_grouped"
Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (keys, delta positions) -> rotated keys


@dataclass
class GroupedRecord:
    """Carried by a transformers cache object: which of its keys hold SelfExtend's grouped rotation."""

    layers: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (leading keys grouped, G)
    key_pos: torch.Tensor | None = None  # (B, n) positions of the cached keys, to rotate them back


class GroupedCache:
    """Per model: finds the cache of the running forward and keeps its old keys at grouped positions.

    The attention registry does not pass the cache to attention functions, so hooks on the base model
    (public ``nn.Module`` hooks, nothing patched) note the cache (``cache``, formerly ``past_key_values``)
    of each forward call.
    """

    def __init__(self, base_model: torch.nn.Module) -> None:
        self.cache: Any = None
        self.use_cache = False
        # layer -> (count, G, key data_ptr, rotate)
        self._pending: dict[int, tuple[int, int, int, Rotate]] = {}
        self._pending_pos: torch.Tensor | None = None
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._rotate: dict[int, Rotate] = {}
        self._deltas: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per forward: shared key deltas
        self._signature = inspect.signature(base_model.forward)
        self._hooks = [
            base_model.register_forward_pre_hook(self._before, with_kwargs=True),
            base_model.register_forward_hook(self._after, always_call=True),
        ]

    def _before(self, module, args, kwargs) -> None:
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
        self.cache = next((c for n in CACHE_NAMES for c in (bound.get(n), extra.get(n)) if c is not None),
                          None)
        use_cache = bound.get("use_cache")
        self.use_cache = bool(getattr(module.config, "use_cache", True) if use_cache is None else use_cache)
        self._pending, self._pending_pos, self._deltas = {}, None, {}

    def _after(self, module, args, output) -> None:
        """A cache the model created inside this call (a prefill with none passed in) becomes visible now:
        adopt the keys written during the call if they are its storage."""
        cache = output_cache(output)
        if self._pending and cache is not None and getattr(cache, RECORD_ATTR, None) is None:
            self.cache = cache
            for layer_idx, (count, group_size, ptr, rotate) in self._pending.items():
                stored = self._stored(layer_idx)
                if stored is not None and stored.data_ptr() == ptr:
                    self._record(layer_idx, count, group_size, self._pending_pos, rotate)
        self.cache, self.use_cache, self._pending, self._pending_pos, self._deltas = None, False, {}, None, {}

    def _stored(self, layer_idx: int | None) -> torch.Tensor | None:
        layers = getattr(self.cache, "layers", None)
        if layer_idx is None or not layers or layer_idx >= len(layers):
            return None
        stored = getattr(layers[layer_idx], "keys", None)
        return stored if isinstance(stored, torch.Tensor) else None

    def _record(self, layer_idx: int, count: int, group_size: int, key_pos: torch.Tensor,
                rotate: Rotate) -> None:
        record = getattr(self.cache, RECORD_ATTR, None)
        if record is None:
            record = GroupedRecord()
            setattr(self.cache, RECORD_ATTR, record)
            self._seen.add(self.cache)
        record.layers[layer_idx] = (count, group_size)
        record.key_pos = key_pos
        self._rotate[layer_idx] = rotate

    def _owns(self, layer_idx: int | None, key: torch.Tensor) -> bool:
        """Is ``key`` the cache's own storage for this layer (so that writing into it persists)?"""
        stored = self._stored(layer_idx)
        return stored is not None and stored.data_ptr() == key.data_ptr() and stored.shape == key.shape

    def grouped_keys(self, layer_idx: int | None, key: torch.Tensor, key_pos: torch.Tensor, written: int,
                     q_start: int, window: int, group_size: int, contiguous: bool, rotate: Rotate,
                     restore_with: Rotate) -> torch.Tensor:
        """Keys ``[0, written)`` of one attention call, with ``[0, written - window)`` at grouped positions.

        Keys that every query of the call sees grouped are rotated in the cache itself, before the attention
        reads anything, when the cache keeps them: in a decode step the one key that left the window, in the
        first step on a cache filled without SelfExtend all of them, with no copy of the cache. Returns the
        cache's own tensor when its grouped prefix then covers the call (every decode step), else a copy with
        the missing keys rotated (a prefill, a chunk), which ``commit`` writes into the cache after the call.
        ``contiguous``: each row's real keys end at the last key with no gap, so key-index distances are
        position distances (left padding qualifies).
        ``rotate`` serves this call (it may share the forward's small-rotation memo); ``restore_with`` is kept
        to rotate the keys back later, so it must hold nothing of the call (no query, key or value).
        """
        keep = max(0, q_start - window + 1) if contiguous else 0  # keys every query of this call sees grouped
        owned = self._owns(layer_idx, key)
        count = self._ungroup(layer_idx, key, key_pos, q_start, keep, rotate, group_size) if owned else 0
        if count < keep and owned and self.use_cache and contiguous:
            rows = key.narrow(2, count, keep - count)  # rotated in place: one view, read and written
            rows.copy_(rotate(rows, self._shared_delta(key_pos, count, keep, group_size)))
            count = keep
            self._record(layer_idx, count, group_size, key_pos, restore_with)
        need = max(0, written - window)
        if need <= count:
            return leading(key, written, 2)
        if count == 0:  # a prefill: rotate them all (the last ``window`` are never read as grouped keys)
            return rotate(key[:, :, :written], _delta(key_pos[:, :written], group_size))
        grouped = key[:, :, :written].clone()
        grouped[:, :, count:need] = rotate(key[:, :, count:need], _delta(key_pos[:, count:need], group_size))
        return grouped

    def holds(self, layer_idx: int | None, key: torch.Tensor) -> bool:
        """Does this call's cache hold grouped keys for this layer?"""
        record = getattr(self.cache, RECORD_ATTR, None)
        return (record is not None and record.layers.get(layer_idx, (0, 0))[0] > 0
                and self._owns(layer_idx, key))

    def ungroup(self, layer_idx: int | None, key: torch.Tensor, key_pos: torch.Tensor, q_start: int,
                keep: int, rotate: Rotate, group_size: int = 0) -> int:
        """Rotate the cache's grouped keys from ``keep`` on (all of them if they used another G) back to true
        positions: a cropped cache, a larger W or a vanilla call needs them as neighbors again. Keys from
        ``q_start`` on were written by this call (after a crop they replace grouped ones). Returns how many
        leading keys stay grouped."""
        if not self._owns(layer_idx, key):
            return 0
        return self._ungroup(layer_idx, key, key_pos, q_start, keep, rotate, group_size)

    def _ungroup(self, layer_idx: int, key: torch.Tensor, key_pos: torch.Tensor, q_start: int, keep: int,
                 rotate: Rotate, group_size: int) -> int:
        """``ungroup`` of keys that the cache owns."""
        record: GroupedRecord | None = getattr(self.cache, RECORD_ATTR, None)
        if record is None or layer_idx not in record.layers:
            return 0
        count, grouped_g = record.layers[layer_idx]
        count = min(count, q_start)
        if grouped_g != group_size:
            keep = 0
        if count > keep:
            key[:, :, keep:count] = rotate(key[:, :, keep:count], -_delta(key_pos[:, keep:count], grouped_g))
            count = keep
        record.layers[layer_idx] = (count, grouped_g)
        return count

    def commit(self, layer_idx: int | None, key: torch.Tensor, grouped: torch.Tensor, key_pos: torch.Tensor,
               written: int, window: int, group_size: int, contiguous: bool, restore_with: Rotate) -> None:
        """After the call: write into the cache the keys that ``grouped_keys`` rotated in a copy and that no
        later query sees as neighbors (``[.., written - window)``; the key leaving the window next is rotated
        by the next call, in place).

        Without a visible cache (the model creates one inside a prefill) the keys are written anyway and
        adopted by ``_after`` only if they turn out to be the new cache's storage; otherwise they were the
        layer's temporaries and nothing reads them again."""
        if grouped.data_ptr() == key.data_ptr():
            return  # the cache's own keys: already recorded by ``grouped_keys``
        if not (self.use_cache and contiguous and layer_idx is not None):
            return
        visible = self.cache is not None
        if visible and not self._owns(layer_idx, key):
            return
        record: GroupedRecord | None = getattr(self.cache, RECORD_ATTR, None) if visible else None
        count = record.layers.get(layer_idx, (0, group_size))[0] if record is not None else 0
        target = max(0, written - window)
        if target > count:
            key[:, :, count:target] = grouped[:, :, count:target]
            count = target
        if visible:
            self._record(layer_idx, count, group_size, key_pos, restore_with)
        else:
            self._pending[layer_idx] = (count, group_size, key.data_ptr(), restore_with)
            self._pending_pos = key_pos

    def _shared_delta(self, key_pos: torch.Tensor, start: int, end: int, group_size: int) -> torch.Tensor:
        """``_delta`` of keys ``[start, end)``, one tensor for every layer of a forward (they share
        ``key_pos``), so the rotation memo that a decode step uses is built once, not once per layer."""
        if torch.compiler.is_compiling():  # an eager saving: under dynamo an id() guard recompiles every step
            return _delta(key_pos[:, start:end], group_size)
        key = (id(key_pos), start, end, group_size)
        entry = self._deltas.get(key)
        if entry is None or entry[0] is not key_pos:
            entry = self._deltas[key] = (key_pos, _delta(key_pos[:, start:end], group_size))
        return entry[1]

    def close(self) -> None:
        """Remove the hooks and rotate every cache this model grouped back to true positions."""
        for hook in self._hooks:
            hook.remove()
        for cache in list(self._seen):
            restore(cache, self._rotate)
        self._seen.clear()


def restore(cache: Any, rotate: dict[int, Rotate]) -> None:
    """Rotate a cache's grouped keys back to their true positions and drop its record."""
    record: GroupedRecord | None = getattr(cache, RECORD_ATTR, None)
    if record is None:
        return
    for layer_idx, (count, group_size) in record.layers.items():
        if count:
            keys = cache.layers[layer_idx].keys
            delta = -_delta(record.key_pos[:, :count].to(keys.device), group_size)
            keys[:, :, :count] = rotate[layer_idx](keys[:, :, :count], delta)
    delattr(cache, RECORD_ATTR)


def _delta(pos: torch.Tensor, group_size: int) -> torch.Tensor:
    """Grouped minus true position of keys at ``pos``."""
    return grouped_key_positions(pos, group_size) - pos
