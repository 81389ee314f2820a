"""The dense backend, deliberately plain: any method, any padding layout, exact.

Per chunk of queries it builds one fp32 score matrix per (query, key) variant of the method
(``inputs.pairs()``), picks one per (i, j) from the *positions* (``inputs.part()``), masks causality and
padding, and runs one softmax. Memory is O(chunk x kv_len), never L x L; time is one QK^T per variant.
It is the fallback for inputs the fast backends refuse (padding with holes). The test oracle is
``tests/reference.py``, which shares no code with this library.
"""

from __future__ import annotations

import torch

from . import BACKENDS
from .base import Backend, Inputs

_CHUNK_ELEMENTS = 1 << 23


@BACKENDS.register()
class ReferenceBackend(Backend):
    name = "reference"
    methods = ("self-extend", "dca")

    def forward(self, inp: Inputs) -> torch.Tensor:
        q, v = inp.query, inp.value
        bsz, heads, q_len, dim = q.shape
        kv_heads, kv_len = inp.key.shape[1], inp.key.shape[2]
        rep = heads // kv_heads
        pairs = [(qv.reshape(bsz, kv_heads, rep, q_len, dim), kv.to(torch.float32)[:, :, None])  # GQA groups
                 for qv, kv in inp.pairs()]
        vf = v.to(torch.float32)[:, :, None]  # (B, Hkv, 1, Tk, Dv)
        key_idx = torch.arange(kv_len, device=q.device)
        out = torch.empty(bsz, heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, kv_len * heads * bsz))
        for s in range(0, q_len, chunk):
            e = min(q_len, s + chunk)
            part = inp.part(inp.query_pos[:, s:e], inp.key_pos)[:, None, None]  # (B, 1, 1, t, Tk)
            scores = None
            for index, (qv, kv) in enumerate(pairs):
                product = torch.matmul(qv[:, :, :, s:e].to(torch.float32), kv.transpose(-1, -2))
                scores = product if scores is None else torch.where(part == index, product, scores)
            scores = scores * inp.scaling
            if inp.softcap is not None:
                scores = torch.tanh(scores / inp.softcap) * inp.softcap
            q_idx = inp.q_start + torch.arange(s, e, device=q.device)
            allowed = (key_idx[None, :] <= q_idx[:, None])[None]  # (1, t, Tk)
            if inp.key_valid is not None:
                allowed = allowed & inp.key_valid[:, None, :] & inp.key_valid[:, q_idx, None]
            scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> zeros
            out[:, :, s:e] = torch.matmul(probs, vf).reshape(bsz, heads, e - s, -1).to(q.dtype)
        return out
