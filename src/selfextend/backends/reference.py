"""Exact SelfExtend attention, deliberately plain: the testing oracle.

Per chunk of queries it builds both score matrices in fp32, picks neighbor or grouped per (i, j) from the
*positions* (``i - j < W``), masks causality and padding, and runs one softmax. Memory is
O(chunk x kv_len), never L x L; time is twice vanilla's QK^T. Handles every position layout that
``positions.key_positions`` accepts, including padding in the middle of a row.
"""

from __future__ import annotations

import torch

from .base import Backend, SelfExtendInputs

_CHUNK_ELEMENTS = 1 << 23


class ReferenceBackend(Backend):
    name = "reference"

    def forward(self, inp: SelfExtendInputs) -> torch.Tensor:
        q, k, v = inp.query, inp.key, inp.value
        bsz, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        rep = heads // kv_heads
        kf, vf, kgf = (t.to(torch.float32)[:, :, None] for t in (k, v, inp.grouped_key))  # (B, Hkv, 1, Tk, D)
        qf = q.reshape(bsz, kv_heads, rep, q_len, dim)
        qgf = inp.grouped_query.reshape(bsz, kv_heads, rep, q_len, dim)
        key_idx = torch.arange(kv_len, device=q.device)
        out = torch.empty(bsz, heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, kv_len * heads * bsz))
        for s in range(0, q_len, chunk):
            e = min(q_len, s + chunk)
            neighbor = torch.matmul(qf[:, :, :, s:e].to(torch.float32), kf.transpose(-1, -2))
            grouped = torch.matmul(qgf[:, :, :, s:e].to(torch.float32), kgf.transpose(-1, -2))
            distance = inp.query_pos[:, s:e, None] - inp.key_pos[:, None, :]  # (B, t, Tk)
            is_neighbor = (distance < inp.window)[:, None, None]
            scores = torch.where(is_neighbor, neighbor, grouped) * inp.scaling
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
