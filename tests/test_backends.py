"""Every backend matches the dense reference (the flash-attention-style 2x rounding rule in low precision)."""

import pytest
import torch
from helpers import make_dca_inputs, make_inputs, real_rows
from reference import dca_attention_ref

from selfextend.backends import BACKENDS, DCAInputs, select_backend
from selfextend.backends.composed import ComposedBackend
from selfextend.backends.merge import merge_lse
from selfextend.backends.primitives import _attention_with_lse_matmul, attention_with_lse
from selfextend.positions import dca_exact_below

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
    out = ComposedBackend(block).forward(inp)
    assert (out - ref).abs().max() < 2e-5


@pytest.mark.parametrize("q_len", [None, 1, 25])
@pytest.mark.parametrize("block", [4, 16])  # prefill blocks batched (block <= W) and one by one
def test_blockwise_left_padding(q_len, block):
    valid = torch.ones(3, 120, dtype=torch.bool)
    valid[0, :17] = False
    valid[1, :60] = False
    inp = make_inputs(3, 4, 2, 120, 16, 8, 4, q_len=q_len, key_valid=valid)
    ref = real_rows(BACKENDS["reference"].forward(inp), inp)
    out = real_rows(ComposedBackend(block).forward(inp), inp)
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
    assert (ComposedBackend(16).forward(inp) - ref).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_rounding_of_reference(dtype):
    inp32 = make_inputs(1, 4, 2, 200, 32, 32, 4)
    exact = BACKENDS["reference"].forward(inp32)
    inp = make_inputs(1, 4, 2, 200, 32, 32, 4, dtype=dtype)
    ref_low = BACKENDS["reference"].forward(inp).float()  # reference run on the same rounded inputs
    out = ComposedBackend(16).forward(inp).float()
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
    with pytest.raises(ValueError,
                       match="Unknown backend 'flash'. Available: auto, composed, reference, cpu"):
        select_backend("flash", inp)


# ---- Dual Chunk Attention ------------------------------------------------------------------------------

def dca_oracle(inp: DCAInputs, q, k, inv_freq):
    """``tests/reference.py``'s fp64 DCA from the un-rotated q/k: shares no code with the library."""
    return dca_attention_ref(q, k, inp.value, inp.query_pos, inp.key_pos, inp.chunk_size, inp.local_window,
                             inp.exact_below, inv_freq, inp.scaling, key_valid=inp.key_valid,
                             q_start=inp.q_start, softcap=inp.softcap).double()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("gate", "q_len", "pads"), [(0, None, None), (64, None, None), (0, 17, None),
                                                     (0, 1, None), (64, None, (0, 23)), (0, 9, (31, 0))])
def test_dca_backends_equal_the_oracle(backend, gate, q_len, pads):
    key_valid = None if pads is None else _left_pad(len(pads), 100, pads)
    inp, q, k, inv_freq = make_dca_inputs(bsz=1 if pads is None else len(pads), kv_len=100, q_len=q_len,
                                          gate=gate, key_valid=key_valid)
    out = BACKENDS[backend].forward(inp).double()
    assert (real_rows(out, inp) - real_rows(dca_oracle(inp, q, k, inv_freq), inp)).abs().max() < 1e-5


def _left_pad(bsz, kv_len, pads):
    valid = torch.ones(bsz, kv_len, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return valid


DCA_SHAPES = [  # kv_len, q_len, cs, lw, gate, bsz, heads, kv_heads, dim, pads
    (100, None, 24, 6, 0, 1, 4, 2, 16, None),  # prefill, GQA
    (100, None, 24, 6, 64, 2, 4, 1, 8, None),  # gated at L, MQA, batch
    (137, None, 37, 5, 0, 1, 3, 3, 12, None),  # chunk_len 32, nothing a multiple of anything
    (137, 1, 37, 5, 0, 1, 4, 2, 16, None),  # decode
    (137, 29, 20, 3, 50, 1, 4, 2, 16, None),  # chunked prefill, gate inside the chunk
    (90, 17, 10, 9, 0, 1, 2, 1, 16, None),  # chunk_len 1 corner
    (120, None, 30, 8, 0, 3, 4, 2, 16, (0, 13, 47)),  # left padding: chunks follow positions, not indices
    (120, 7, 30, 8, 40, 2, 4, 2, 16, (0, 29)),  # padded batch continuing a cache
    (200, None, 64, 16, 0, 1, 2, 2, 32, None),  # several long chunks
]


@pytest.mark.parametrize("shape", DCA_SHAPES)
def test_dca_blockwise_equals_reference(shape):
    kv_len, q_len, cs, lw, gate, bsz, heads, kv_heads, dim, pads = shape
    valid = _left_pad(bsz, kv_len, pads) if pads else None
    inp, *_ = make_dca_inputs(bsz, heads, kv_heads, kv_len, q_len, dim, cs, lw, gate, valid)
    ref = real_rows(BACKENDS["reference"].forward(inp), inp)
    assert (real_rows(BACKENDS["cpu"].forward(inp), inp) - ref).abs().max() < 2e-5


def test_dca_blockwise_equals_reference_bf16_and_softcap():
    inp, *_ = make_dca_inputs(kv_len=120, dtype=torch.bfloat16)
    ref = BACKENDS["reference"].forward(inp).float()
    assert (BACKENDS["cpu"].forward(inp).float() - ref).abs().max() < 3e-2
    inp, *_ = make_dca_inputs(kv_len=120, softcap=5.0, gate=30)
    assert (BACKENDS["cpu"].forward(inp) - BACKENDS["reference"].forward(inp)).abs().max() < 2e-5


def test_within_one_chunk_dca_math_equals_vanilla_attention():
    # no gate: every row goes through the DCA parts, yet up to min(cs + 1, 2 cl) tokens all distances
    # are exact
    inp, *_ = make_dca_inputs(kv_len=dca_exact_below(24, 6, 64, False), gate=0)
    vanilla = torch.nn.functional.scaled_dot_product_attention(
        inp.query, inp.key, inp.value, is_causal=True, enable_gqa=True)
    for backend in ("reference", "cpu"):
        assert (BACKENDS[backend].forward(inp) - vanilla).abs().max() < 1e-5
