"""KV caches kept between requests, found by the longest common token prefix, bounded in bytes (LRU).

The typical use is many questions about one long document: the document's keys and values (SelfExtend's
grouped keys included: the cache carries its own record of them) are computed once. A request *takes* the
entry sharing the longest prefix with its prompt (the entry leaves the store: one request owns a cache at a
time, so nothing is copied), crops it to that prefix, prefills only the rest, and *puts* the grown cache back
under every token it now holds. At least one prompt token is always left to prefill, since the next token's
logits come from it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a transformers cache's keys and values."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _croppable(entry: Entry, keep: int) -> bool:
    """Whether ``entry``'s cache can be cut back to ``keep`` tokens: every layer still holds all its keys
    (a sliding-window layer past its window has dropped the oldest and cannot be cropped)."""
    if keep >= len(entry.tokens):
        return True
    for layer in getattr(entry.cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() >= 3 and keys.shape[-2] < len(entry.tokens):
            return False
    return True


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    tokens: tuple[int, ...]  # the tokens whose keys and values ``cache`` holds, in order
    cache: Any
    nbytes: int


class PrefixCache:
    """LRU store of KV caches keyed by the token sequence they hold. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, tokens: list[int]) -> tuple[Any, int]:
        """``(cache, reused)``: the stored cache sharing the longest prefix with ``tokens``, cropped to
        ``reused`` tokens (at most ``len(tokens) - 1``), or ``(None, 0)``.

        An entry is taken only when the shared prefix is at least half of what it holds: a short match (a
        chat template's header, a BOS) would crop away a long document that the next question about it needs.
        Caches whose sliding-window layers have dropped old keys cannot be cropped: they are reused only
        when nothing needs cropping."""
        with self._lock:
            best, best_len = self._best(tokens)
            if best is None:
                return None, 0
            entry = self._entries.pop(best)
        extra = len(entry.tokens) - best_len
        if extra > 0:
            try:
                entry.cache.crop(-extra)  # negative: remove that many tokens (every transformers 5.x)
            except (RuntimeError, ValueError):  # a cache layer that cannot go back: no reuse, no failure
                return None, 0
        return entry.cache, best_len

    def reusable(self, tokens: list[int]) -> int:
        """How many of ``tokens`` ``take`` would reuse now (nothing is taken or cropped)."""
        with self._lock:
            return self._best(tokens)[1]

    def _best(self, tokens: list[int]) -> tuple[int | None, int]:
        best, best_len = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, tokens)
            reused = min(n, len(tokens) - 1)
            if reused > best_len and 2 * reused >= len(entry.tokens) and _croppable(entry, reused):
                best, best_len = key, reused
        return best, best_len

    def put(self, tokens: list[int], cache: Any) -> None:
        """Keep ``cache`` (holding ``tokens``); least recently used entries leave to stay within the bound."""
        nbytes = cache_nbytes(cache)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            while self._entries and sum(e.nbytes for e in self._entries.values()) + nbytes > self.max_bytes:
                self._entries.popitem(last=False)
            self._entries[self._next_key] = Entry(tuple(tokens), cache, nbytes)
            self._next_key += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
