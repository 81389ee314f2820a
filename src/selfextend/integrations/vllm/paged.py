"""SelfExtend and DCA over a paged KV cache whose keys stay at their true positions (engine-agnostic torch).

vLLM hands attention q and k rotated at their true positions and keeps keys that way in its paged cache, so
one cache block can serve a request that reads it as neighbors and another that reads it as grouped keys
(prefix caching), and chunked prefill, preemption and recompute stay valid untouched. Each call gathers a
request's keys through its block table (memory linear in its length), moves queries and keys to the method's
positions by delta rotations, and hands them to a backend of ``selfextend.backends`` (one softmax, no
``L x L`` matrix with the composed backend).

A delta depends only on a position, so its cos/sin rows are computed once per engine (``RotationTable``) and
read by every layer, request and decode step: a decode step rotates its keys with a lookup, not trigonometry.

On a GPU, SelfExtend skips the gather: ``PagedSelfExtend.attend_paged`` runs a whole batch in one launch of
``backends/triton_paged.py``, which reads K/V through the block table and rotates grouped key tiles with the
same tables. DCA always gathers.
"""

from __future__ import annotations

import importlib.util
import os
from typing import ClassVar

import torch

from ...backends import select_backend
from ...backends.triton import KERNELS
from ...config import ATTENTION_SPECS, AttentionSpec, DCAConfig, SelfExtendConfig
from ...positions import query_scale
from ...rope import rotate_with, rotation_table

_GROW = 4096  # table rows are added this many at a time (rounded up)


class RotationTable:
    """cos/sin (fp32) of the rotation by ``delta(p)`` for positions ``p < len``, per device: grown on demand,
    or built once for ``rows`` positions (an engine's ``max_model_len``) so that it is never reallocated: a
    captured CUDA graph keeps reading the tensor it was captured with."""

    def __init__(self, delta, inv_freq: torch.Tensor, rows: int = 0) -> None:
        self.delta = delta  # positions (n,) long -> deltas (n,) long
        self.inv_freq = inv_freq.to(torch.float32).cpu()
        self.rows_at_least = rows
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, need: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(cos, sin)``, each ``(P, rd/2)``, ``P >= need``: row ``p`` rotates by ``delta(p)``."""
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or cos.shape[0] < need:
            size = -(-max(need, self.rows_at_least) // _GROW) * _GROW
            p = torch.arange(size, device=device)
            cos, sin = self.tables[device] = rotation_table(self.delta(p), self.inv_freq.to(device))
        return cos, sin

    def rows(self, pos: torch.Tensor, need: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``(n, 1, rd/2)`` for positions ``pos`` (n,); ``need`` (> every position)
        spares reading the largest position back from the device."""
        cos, sin = self.table(int(pos.max()) + 1 if need is None else need, pos.device)
        return cos[pos][:, None], sin[pos][:, None]

    def rotate(self, x: torch.Tensor, pos: torch.Tensor, layout: str,
               need: int | None = None) -> torch.Tensor:
        """``x`` (n, heads, D), token ``t`` rotated at ``pos[t]``, moved to ``pos[t] + delta(pos[t])``."""
        cos, sin = self.rows(pos, need)
        return rotate_with(x, cos, sin, layout)


class PagedRotator:
    """The rotator of ``attention_inputs`` over ``RotationTable``s, one per position map of the method: a
    tensor ``(n, heads, D)`` with positions ``(n,)``, or ``(B, heads, T, D)`` with ``(B, T)``."""

    def __init__(self, maps: dict, inv_freq: torch.Tensor, layout: str, rows: int = 0) -> None:
        self.layout = layout
        self.tables = {name: RotationTable(lambda p, to=to: to(p) - p, inv_freq, rows)
                       for name, to in maps.items()}

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, name: str,
                 need: int | None = None) -> torch.Tensor:
        return self.tables[name].rotate(x, pos, self.layout, need)


class PagedMethod:
    """One method's attention for one request: ``attend(query, key, value, scale)``. The method is its
    ``spec`` (``config.ATTENTION_SPECS``): the position maps and the input builder every host shares.
    ``max_len``: build the rotation tables for that many positions at once (see ``RotationTable``)."""

    spec: ClassVar[AttentionSpec]

    def __init__(self, config, inv_freq: torch.Tensor, layout: str = "rotate_half", max_len: int = 0) -> None:
        self.config = config
        self.inv_freq = inv_freq
        self.layout = layout
        self.rotate = PagedRotator(self.spec.maps(config), inv_freq, layout, max_len)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               softcap: float | None = None) -> torch.Tensor:
        """query (q_len, H, D) for the request's last q_len tokens; key/value (T, Hkv, D) for all its T
        tokens, token t at position t. Returns (q_len, H, Dv)."""
        q_len, kv_len = query.shape[0], key.shape[0]
        query_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[None]
        key_pos = torch.arange(kv_len, device=query.device)[None]
        key = _heads_first(key)
        inputs = self.spec.inputs(
            self.config, _heads_first(query), kv_len - 1, self.rotate,
            lambda: self.rotate(key, key_pos, "key", need=kv_len), key=key, value=_heads_first(value),
            query_pos=query_pos, key_pos=key_pos, key_valid=None, q_start=kv_len - q_len, scaling=scale,
            softcap=softcap)
        out = select_backend(self.config.backend, inputs).forward(inputs)  # (1, H, q_len, Dv)
        return out[0].transpose(0, 1)


class PagedDCA(PagedMethod):
    spec = ATTENTION_SPECS["dca"]
    config: DCAConfig


class PagedSelfExtend(PagedMethod):
    """Also a whole varlen batch in one launch of the paged Triton kernel (``attend_paged``)."""

    spec = ATTENTION_SPECS["self-extend"]
    config: SelfExtendConfig

    def __init__(self, config: SelfExtendConfig, inv_freq: torch.Tensor, layout: str = "rotate_half",
                 max_len: int = 0) -> None:
        super().__init__(config, inv_freq, layout, max_len)
        self.keys, self.queries = self.rotate.tables["key"], self.rotate.tables["query"]

    def scaled_queries(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Packed query rows (T, H, D) x the optional temperature and log scaling, applied to every row
        (factor 1 where it does not scale) rather than asking the device whether any row scales."""
        cfg = self.config
        factor = query_scale(query_pos[None], cfg.trained_length, query.dtype, temperature=cfg.temperature,
                             scale_base=cfg.scale_base, skip_ones=False)
        return query if factor is None else query * factor[0, 0, :, :, None]

    def paged_reason(self, query: torch.Tensor, value_dim: int) -> str | None:
        """Why ``attend_paged`` cannot take this batch (None: it can); the caller then gathers."""
        return self.kernel_reason(query.shape[-1], value_dim, query.dtype, query.device.type)

    def kernel_reason(self, dim: int, value_dim: int, dtype: torch.dtype, device_type: str) -> str | None:
        """``paged_reason`` from the shapes alone (an engine asks before any batch exists)."""
        reason = KERNELS.head_dim_reason(dim, value_dim) or KERNELS.dtype_reason(dtype)
        if reason is not None:
            return reason
        if self.layout != "rotate_half" or 2 * self.inv_freq.numel() != dim:
            return "the kernel rotates the whole head, rotate-half layout only"
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return f"tensors are on {device_type}: the paged kernel needs CUDA (or TRITON_INTERPRET=1)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None

    def attend_paged(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     scale: float, *, max_query_len: int, max_seq_len: int,
                     out: torch.Tensor | None = None, **launch) -> torch.Tensor:
        """A whole varlen batch in one launch of the paged Triton kernel, keys read through the block table
        (no gather, no grouped key copy). ``query`` (T, H, D) packed; the caches ``(num_blocks, Hkv, PAGE,
        D)`` with any strides but the last; the rest as vLLM's metadata; ``launch``: tile overrides (tests).

        Safe to capture in a CUDA graph and replay with other lengths and block tables in the same buffers:
        nothing here reads the device, every length the kernel uses is read by the kernel from ``seq_lens``
        and ``query_start_loc`` (each split's key range included), and the host values only size the launch
        (tiles, split count) as upper bounds; ``max_seq_len`` at capture (vLLM passes ``max_model_len``)
        covers every later replay, and tables built for ``max_len`` positions are never reallocated."""
        from ...backends import triton_paged

        seq_lens = seq_lens[: query_start_loc.shape[0] - 1]  # an engine may pad its per-request arrays
        pos = token_positions(query_start_loc, seq_lens, query.shape[0])
        query = self.scaled_queries(query, pos)
        grouped = self.queries.rotate(query, pos, self.layout, need=max_seq_len) * self.config.grouped_scale
        key_cos, key_sin = self.keys.table(max_seq_len, query.device)
        return triton_paged.paged_selfextend_attention(
            query, grouped, key_cache, value_cache, block_table, seq_lens, query_start_loc, key_cos, key_sin,
            self.config.window, scale, max_query_len=max_query_len, max_seq_len=max_seq_len, out=out,
            **launch)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(T, heads, D) -> (1, heads, T, D), the backends' layout."""
    return x.transpose(0, 1)[None]


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The position of each packed query token: request ``r``'s queries are its last tokens (no host sync)."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    request = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=q_lens.device), q_lens,
                                      output_size=num_tokens)
    offset = torch.arange(num_tokens, device=q_lens.device) - query_start_loc[:-1][request]
    return (seq_lens - q_lens)[request] + offset


def gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """A request's first ``length`` tokens from a paged cache ``(num_blocks, heads, block_size, D)`` through
    its block ids: ``(length, heads, D)``."""
    picked = cache.index_select(0, blocks)  # (n, heads, bs, D)
    return picked.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:length]


def write(cache: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> None:
    """Store ``tokens`` (n, heads, D) at ``slots`` (n,) of ``cache`` (num_blocks, heads, block_size, D);
    negative slots (padding) are skipped."""
    keep = slots >= 0
    if not bool(keep.all()):
        tokens, slots = tokens[keep], slots[keep]
    block_size = cache.shape[2]
    cache[torch.div(slots, block_size, rounding_mode="floor"), :, slots % block_size] = tokens.to(cache.dtype)


def method_for(config, inv_freq: torch.Tensor, layout: str = "rotate_half", max_len: int = 0) -> PagedMethod:
    """The paged attention of the method whose config ``config`` is."""
    cls = next(c for c in (PagedSelfExtend, PagedDCA) if isinstance(config, c.spec.config_class))
    return cls(config, inv_freq, layout, max_len)
