"""The backend inputs of SelfExtend and DCA, built one way for every host.

A host (transformers' attention call, the vLLM paged path, the tests) holds q and k rotated at their true
positions. It hands the builder a *rotator*, ``rotate(x, pos, name)``: ``x`` (B, H, T, D) at positions ``pos``
(B, T) moved to the method's position map ``name`` (``maps(config)[name]``), and a *key source*: a function
returning the keys at the map ``"key"`` (the transformers integration keeps them in its KV cache across calls,
the paged path rotates the keys it gathered). Query scaling, the every-key-is-exact shortcut and the scale of
grouped logits live here only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backends import DCAInputs, SelfExtendInputs
from .positions import (
    chunk_key_positions,
    grouped_key_positions,
    grouped_query_positions,
    inter_chunk_query_positions,
    intra_chunk_query_positions,
    query_scale,
    successive_chunk_query_positions,
)

Rotator = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
KeySource = Callable[[], torch.Tensor]
PositionMap = Callable[[torch.Tensor], torch.Tensor]


def selfextend_maps(cfg) -> dict[str, PositionMap]:
    """Keys at ``j // G``; queries at ``i // G + W - W // G`` (their grouped distances)."""
    G, W = cfg.group_size, cfg.window
    return {"key": lambda p: grouped_key_positions(p, G), "query": lambda p: grouped_query_positions(p, G, W)}


def dca_maps(cfg) -> dict[str, PositionMap]:
    """Keys at ``j mod chunk_len``; one query position per chunk relation (``positions.py``)."""
    cs, cl = cfg.chunk_size, cfg.chunk_len
    return {"key": lambda p: chunk_key_positions(p, cl),
            "intra": lambda p: intra_chunk_query_positions(p, cl),
            "succ": lambda p: successive_chunk_query_positions(p, cs, cl),
            "inter": lambda p: inter_chunk_query_positions(p, cs)}


def selfextend_inputs(cfg, query: torch.Tensor, max_pos: int, rotate: Rotator, method_keys: KeySource,
                      **common: Any) -> SelfExtendInputs:
    """``common``: the fields every method shares (``key``, ``value``, ``query_pos``, ``key_pos``, padding,
    scaling); ``max_pos``: the largest query position, known to the host without reading the device.

    Query rows are scaled before the grouped query is made from them, so neighbor and grouped logits of a row
    grow alike; ``grouped_scale`` then scales the grouped query alone, hence the grouped logits alone."""
    query_pos = common["query_pos"]
    factor = query_scale(query_pos, cfg.trained_length, query.dtype, temperature=cfg.temperature,
                         scale_base=cfg.scale_base)
    if factor is not None:
        query = query * factor
    if cfg.exact(max_pos):  # every pair is a neighbor: the grouped tensors are never read
        grouped_query, grouped_key = query, common["key"]
    else:
        grouped_query = rotate(query, query_pos, "query")
        if cfg.grouped_scale != 1:
            grouped_query = grouped_query * cfg.grouped_scale
        grouped_key = method_keys()
    return SelfExtendInputs(query=query, grouped_query=grouped_query, grouped_key=grouped_key,
                            window=cfg.window, **common)


def dca_inputs(cfg, query: torch.Tensor, max_pos: int, rotate: Rotator, method_keys: KeySource,
               **common: Any) -> DCAInputs:
    """As ``selfextend_inputs``; the temperature and the log scaling scale the three rotated queries (the
    plain one serves queries below ``exact_below``, which keep vanilla's logits)."""
    if cfg.exact(max_pos):  # plain RoPE for every query: the chunk parts are never read
        chunk_key, intra, succ, inter = common["key"], query, query, query
    else:
        query_pos = common["query_pos"]
        factor = query_scale(query_pos, cfg.trained_length, query.dtype, temperature=cfg.temperature,
                             scale_base=cfg.scale_base)

        def to(name: str) -> torch.Tensor:
            rotated = rotate(query, query_pos, name)
            return rotated if factor is None else rotated * factor

        chunk_key, intra, succ, inter = method_keys(), to("intra"), to("succ"), to("inter")
    return DCAInputs(query=query, chunk_key=chunk_key, query_intra=intra, query_succ=succ, query_inter=inter,
                     chunk_size=cfg.chunk_size, local_window=cfg.local_window, exact_below=cfg.exact_below,
                     **common)
