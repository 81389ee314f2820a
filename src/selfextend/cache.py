"""Grouped-key cache policy.

transformers' KV cache stores keys rotated at their true position ``j``. Grouped attention needs them at
``j // G``; that rotation never changes once a key is written, so rotating the whole cache again at every
decode step (what the official patches do) wastes O(L * D) work and a K-sized temporary per step.

Policy: prefill (an empty cache) rotates the keys it needs and keeps nothing, so prefill peak memory
is unchanged. The first call that *continues* a cache (decode or chunked prefill) rotates the cached keys
once and keeps them; later calls rotate only the new keys. That costs one extra K (0.5x KV memory) while
decoding and makes a decode step cost what vanilla's does.

The store is tied to a layer, not to a cache object (the attention registry does not pass the cache),
so it checks that it still describes the keys it is given: batch shape, dtype, and the first and last
stored key rows must match exactly; otherwise (a new conversation, a reordered beam, a cropped cache)
it rebuilds from scratch. Exactness never depends on the store being current.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GroupedKeyStore:
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
        if k.shape[:2] != key.shape[:2] or k.shape[-1] != key.shape[-1] or k.dtype != key.dtype or k.device != key.device:
            return False
        return torch.equal(key[:, :, 0], self._first) and torch.equal(key[:, :, self._len - 1], self._last)

    def grouped_keys(
        self, key: torch.Tensor, written: int, keep: bool, rotate: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Keys ``[0, written)`` rotated to grouped positions.

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
