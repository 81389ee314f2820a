"""Every backend matches the dense reference (the flash-attention-style 2x rounding rule in low precision)."""

import pytest
import torch
from helpers import make_inputs, real_rows

from selfextend.backends import BACKENDS, select_backend
from selfextend.backends.blockwise import BlockwiseBackend
from selfextend.backends.merge import merge_lse
from selfextend.backends.primitives import _attention_with_lse_matmul, attention_with_lse

SHAPES = [  # (bsz, heads, kv_heads, kv_len, dim, window, group)
    (2, 4, 2, 100, 16, 8, 2),
    (1, 6, 3, 257, 32, 64, 4),
    (1, 6, 3, 257, 32, 30, 4),  # W not a multiple of G
    (1, 4, 4, 113, 59, 16, 3),  # odd head dim, MHA
    (1, 8, 1, 300, 16, 50, 7),  # MQA
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_len", [None, 1, 37])  # prefill, decode, chunked prefill
@pytest.mark.parametrize("block", [7, 16, 512])  # blocks smaller than, around and larger than W
def test_blockwise_matches_reference(shape, q_len, block):
    b, h, hk, n, d, w, g = shape
    inp = make_inputs(b, h, hk, n, d, w, g, q_len=q_len)
    ref = BACKENDS["reference"].forward(inp)
    out = BlockwiseBackend(block).forward(inp)
    assert (out - ref).abs().max() < 2e-5


@pytest.mark.parametrize("q_len", [None, 1, 25])
@pytest.mark.parametrize("block", [4, 16])  # prefill blocks batched (block <= W) and one by one
def test_blockwise_left_padding(q_len, block):
    valid = torch.ones(3, 120, dtype=torch.bool)
    valid[0, :17] = False
    valid[1, :60] = False
    inp = make_inputs(3, 4, 2, 120, 16, 8, 4, q_len=q_len, key_valid=valid)
    ref = real_rows(BACKENDS["reference"].forward(inp), inp)
    out = real_rows(BlockwiseBackend(block).forward(inp), inp)
    assert (out - ref).abs().max() < 2e-5


def test_padding_gap_goes_to_reference_under_auto():
    valid = torch.ones(1, 40, dtype=torch.bool)
    valid[0, 10:15] = False  # right padding then more tokens: not one contiguous block
    inp = make_inputs(1, 4, 2, 40, 16, 8, 2, q_len=1, key_valid=valid)
    assert select_backend("auto", inp).name == "reference"
    with pytest.raises(ValueError, match="backend='cpu' cannot run this input"):
        select_backend("cpu", inp)


def test_softcap_matches_reference():
    inp = make_inputs(1, 4, 2, 90, 16, 8, 3, softcap=5.0)
    ref = BACKENDS["reference"].forward(inp)
    assert (BlockwiseBackend(16).forward(inp) - ref).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_rounding_of_reference(dtype):
    inp32 = make_inputs(1, 4, 2, 200, 32, 32, 4)
    exact = BACKENDS["reference"].forward(inp32)
    inp = make_inputs(1, 4, 2, 200, 32, 32, 4, dtype=dtype)
    ref_low = BACKENDS["reference"].forward(inp).float()  # reference run on the same rounded inputs
    out = BlockwiseBackend(16).forward(inp).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # rounding noise sets the bar: at most 2x the error the rounded reference itself has, plus one ulp
    eps = torch.finfo(dtype).eps
    assert (out - exact).abs().max() <= 2 * (ref_low - exact).abs().max() + 4 * eps


def test_merge_lse_equals_one_softmax():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, 12)
    v = torch.randn(2, 3, 12, 4)
    full = torch.softmax(s, -1) @ v
    a, b = s[..., :7], s[..., 7:]
    oa, ob = torch.softmax(a, -1) @ v[:, :, :7], torch.softmax(b, -1) @ v[:, :, 7:]
    out, lse = merge_lse(oa, a.logsumexp(-1), ob, b.logsumexp(-1))
    assert torch.allclose(out, full, atol=1e-6) and torch.allclose(lse, s.logsumexp(-1), atol=1e-6)
    # a pass with no keys (lse = -inf) contributes nothing and creates no NaN
    out2, _ = merge_lse(oa, a.logsumexp(-1), torch.zeros_like(ob), torch.full_like(lse, float("-inf")))
    assert torch.allclose(out2, oa)


def test_matmul_primitive_matches_cpu_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 50, 16), torch.randn(1, 3, 50, 16), torch.randn(1, 3, 50, 16)
    for causal in (False, True):
        o1, l1 = attention_with_lse(q, k, v, 0.25, causal=causal)
        o2, l2 = _attention_with_lse_matmul(q, k, v, 0.25, causal, None, None)
        assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(l1, l2, atol=1e-5)


def test_unknown_backend_lists_choices():
    inp = make_inputs()
    with pytest.raises(ValueError, match="Unknown backend 'flash'. Available: auto, cpu, reference"):
        select_backend("flash", inp)
