"""Random backend inputs: SelfExtend's through the builder every host uses (``attention_inputs``), DCA's
rotated from scratch at each DCA position (``apply_rope``), independent of the hosts' delta rotations."""

from __future__ import annotations

import torch

from selfextend.attention_inputs import selfextend_inputs, selfextend_maps
from selfextend.backends import DCAInputs, SelfExtendInputs
from selfextend.config import SelfExtendConfig
from selfextend.positions import (
    absolute_key_positions,
    chunk_key_positions,
    inter_chunk_query_positions,
    intra_chunk_query_positions,
    successive_chunk_query_positions,
)
from selfextend.rope import apply_rope, rotate_by


def make_inputs(
    bsz=1, heads=4, kv_heads=2, kv_len=100, dim=16, window=8, group=2, q_len=None, key_valid=None,
    dtype=torch.float32, softcap=None, seed=0,
) -> SelfExtendInputs:
    g = torch.Generator().manual_seed(seed)
    q_len = q_len or kv_len
    q_start = kv_len - q_len
    # odd dims: last channel passes
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim - dim % 2, 2).float() / dim))
    q = (torch.randn(bsz, heads, q_len, dim, generator=g) * 2).to(dtype)
    k = (torch.randn(bsz, kv_heads, kv_len, dim, generator=g) * 2).to(dtype)
    v = torch.randn(bsz, kv_heads, kv_len, dim, generator=g).to(dtype)
    if key_valid is None:
        q_pos = (q_start + torch.arange(q_len))[None].expand(bsz, -1)
    else:
        q_pos = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
    k_pos, _ = absolute_key_positions(q_pos, key_valid, q_start, kv_len)
    cfg = SelfExtendConfig(group, window, trained_length=1 << 20)
    maps = selfextend_maps(cfg)

    def rotate(x, pos, name):
        return rotate_by(x, maps[name](pos) - pos, inv_freq)

    # every call builds the grouped tensors (max_pos past the window), as a long prompt would
    return selfextend_inputs(cfg, q, max(window, kv_len), rotate, lambda: rotate(k, k_pos, "key"),
                             key=k, value=v, query_pos=q_pos, key_pos=k_pos, key_valid=key_valid,
                             q_start=q_start, scaling=dim**-0.5, softcap=softcap)


def real_rows(out: torch.Tensor, inp: SelfExtendInputs) -> torch.Tensor:
    """Zero the rows of padding queries (their value is a convention, not a result)."""
    if inp.key_valid is None:
        return out
    qv = inp.key_valid[:, inp.q_start :]
    return out * qv[:, None, :, None]


def make_dca_inputs(bsz=1, heads=4, kv_heads=2, kv_len=90, q_len=None, dim=16, cs=24, lw=6, gate=0,
                    key_valid=None, dtype=torch.float32, softcap=None,
                    seed=0) -> tuple[DCAInputs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DCAInputs from un-rotated q/k, each version rotated from scratch at its DCA position
    (``apply_rope``)."""
    g = torch.Generator().manual_seed(seed)
    q_len = q_len or kv_len
    q_start = kv_len - q_len
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    q = (torch.randn(bsz, heads, q_len, dim, generator=g) * 2).to(dtype)
    k = (torch.randn(bsz, kv_heads, kv_len, dim, generator=g) * 2).to(dtype)
    v = torch.randn(bsz, kv_heads, kv_len, dim, generator=g).to(dtype)
    if key_valid is None:
        qp = (q_start + torch.arange(q_len))[None].expand(bsz, -1)
    else:
        qp = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
    kp, _ = absolute_key_positions(qp, key_valid, q_start, kv_len)
    cl = cs - lw
    inp = DCAInputs(
        query=apply_rope(q, qp, inv_freq), key=apply_rope(k, kp, inv_freq), value=v,
        chunk_key=apply_rope(k, chunk_key_positions(kp, cl), inv_freq),
        query_intra=apply_rope(q, intra_chunk_query_positions(qp, cl), inv_freq),
        query_succ=apply_rope(q, successive_chunk_query_positions(qp, cs, cl), inv_freq),
        query_inter=apply_rope(q, inter_chunk_query_positions(qp, cs), inv_freq),
        query_pos=qp, key_pos=kp, key_valid=key_valid, q_start=q_start, chunk_size=cs, local_window=lw,
        exact_below=gate, scaling=dim**-0.5, softcap=softcap,
    )
    return inp, q, k, inv_freq


def interpreted_triton_kernel(name: str = "triton_kernel"):
    """A Triton kernel module of ``selfextend.backends`` built for the interpreter (a private copy when the
    process imported it compiled first: ``interpreted.py``), or None without triton. Backends reach a private
    copy only inside ``interpreted.installed()``."""
    from interpreted import modules

    try:
        built = modules()
    except ImportError:  # a triton that does not import
        return None
    return None if built is None else built[name]
