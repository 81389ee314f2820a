"""The FlexAttention backend against the reference, uncompiled on the CPU, and its block masks block by block.

Uncompiled flex_attention may evaluate ``mask_mod`` everywhere, which would hide a wrongly *full* block;
``test_block_masks_exact`` therefore checks the block masks themselves against masks built here from the
positions: every allowed pair lies in a selected block, every full block is allowed everywhere, and
``mask_mod`` equals the definition on every pair.
"""

import pytest
import torch
from helpers import make_inputs, real_rows

from selfextend.backends import BACKENDS, select_backend
from selfextend.backends.flex import FlexBackend, _flex_module

pytestmark = pytest.mark.skipif(_flex_module() is None, reason="torch.nn.attention.flex_attention missing")

SHAPES = [  # (bsz, heads, kv_heads, kv_len, dim, window, group)
    (2, 4, 2, 100, 16, 8, 2),
    (1, 6, 3, 257, 32, 30, 4),  # W % G != 0
    (1, 8, 1, 150, 16, 50, 7),  # MQA
]


def reference(inp):
    return real_rows(BACKENDS["reference"].forward(inp), inp)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_len", [None, 1, 37])  # prefill, decode, chunked prefill
def test_matches_reference(shape, q_len):
    b, h, hk, n, d, w, g = shape
    inp = make_inputs(b, h, hk, n, d, w, g, q_len=q_len)
    assert (FlexBackend(block_size=32).forward(inp) - reference(inp)).abs().max() < 2e-5


@pytest.mark.parametrize("q_len", [None, 1, 25])
def test_left_padding(q_len):
    valid = torch.ones(3, 120, dtype=torch.bool)
    valid[0, :17] = False
    valid[1, :60] = False
    inp = make_inputs(3, 4, 2, 120, 16, 8, 4, q_len=q_len, key_valid=valid)
    out = FlexBackend(block_size=16).forward(inp)
    assert (real_rows(out, inp) - reference(inp)).abs().max() < 2e-5
    assert torch.equal(out, real_rows(out, inp))  # padding queries are zero


def test_padding_holes_and_softcap():
    valid = torch.ones(1, 60, dtype=torch.bool)
    valid[0, 20:26] = False  # right padding followed by more tokens: flex handles it per element
    inp = make_inputs(1, 4, 2, 60, 16, 8, 2, q_len=5, key_valid=valid)
    assert (real_rows(FlexBackend(16).forward(inp), inp) - reference(inp)).abs().max() < 2e-5
    inp = make_inputs(1, 4, 2, 90, 16, 8, 3, softcap=5.0)
    assert (FlexBackend(16).forward(inp) - reference(inp)).abs().max() < 2e-5


def test_bf16_within_rounding_of_reference():
    exact = BACKENDS["reference"].forward(make_inputs(1, 4, 2, 200, 32, 32, 4))
    inp = make_inputs(1, 4, 2, 200, 32, 32, 4, dtype=torch.bfloat16)
    ref_low = BACKENDS["reference"].forward(inp).float()
    out = FlexBackend(32).forward(inp)
    assert out.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    assert (out.float() - exact).abs().max() <= 2 * (ref_low - exact).abs().max() + 4 * eps


def _selected(mask, full: bool) -> torch.Tensor:
    """(B, nQ, nK) bool: the blocks a BlockMask lists as partial (full=False) or full."""
    num = mask.full_kv_num_blocks if full else mask.kv_num_blocks
    idx = mask.full_kv_indices if full else mask.kv_indices
    bsz, _, n_q, n_k = idx.shape
    out = torch.zeros(bsz, n_q, n_k, dtype=torch.bool)
    for b in range(bsz):
        for q in range(n_q):
            out[b, q, idx[b, 0, q, : num[b, 0, q]].long()] = True
    return out


@pytest.mark.parametrize("q_len", [None, 1, 45])
def test_block_masks_exact(q_len):
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :70] = False
    inp = make_inputs(2, 4, 2, 200, 16, 40, 4, q_len=q_len, key_valid=valid)
    bs = 16
    neighbor, grouped = FlexBackend(block_size=bs).block_masks(inp)
    m, n = inp.q_len, inp.kv_len
    q_idx = inp.q_start + torch.arange(m)
    dist = inp.query_pos[:, :, None] - inp.key_pos[:, None, :]
    base = ((torch.arange(n)[None, None, :] <= q_idx[None, :, None]) & valid[:, None, :]
            & valid[:, q_idx, None])
    b_ = torch.arange(2)[:, None, None]
    qi_, kv_ = torch.arange(m)[None, :, None], torch.arange(n)[None, None, :]
    for mask, allowed in ((neighbor, base & (dist < inp.window)), (grouped, base & (dist >= inp.window))):
        assert torch.equal(mask.mask_mod(b_, 0, qi_, kv_), allowed)
        partial, full = _selected(mask, False), _selected(mask, True)
        assert not (partial & full).any()
        pad_m, pad_n = -m % bs, -n % bs
        blocks = torch.nn.functional.pad(allowed, (0, pad_n, 0, pad_m)).view(2, -(-m // bs), bs,
                                                                             -(-n // bs), bs)
        some = blocks.any(4).any(2)
        assert not (some & ~(partial | full)).any(), "an allowed pair lies in a skipped block"
        in_range = torch.nn.functional.pad(torch.ones(m, n, dtype=torch.bool), (0, pad_n, 0, pad_m))
        every = (blocks | ~in_range.view(1, -(-m // bs), bs, -(-n // bs), bs)).all(4).all(2)
        assert not (full & ~every).any(), "a full block holds a masked pair"
        assert not (partial & ~some).any(), "a partial block holds no allowed pair"
    if q_len is None:  # the neighbor pass is a band: O(L * W / bs^2) blocks, not the triangle
        band = _selected(neighbor, False) | _selected(neighbor, True)
        n_blocks = -(-n // bs)
        assert band.sum(-1).max() <= -(-inp.window // bs) + 2 < n_blocks // 2


def test_supports_and_selection(caplog):
    backend = BACKENDS["flex"]
    assert backend.supports(make_inputs()) is None
    with pytest.raises(ValueError, match="does not support dtype torch.float64"):
        select_backend("flex", make_inputs(dtype=torch.float64))
    assert select_backend("flex", make_inputs()).name == "flex"  # explicit: runs uncompiled on CPU
    assert select_backend("auto", make_inputs()).name == "composed"  # auto never picks flex on CPU
