"""Dual Chunk Attention: position maps, backends against an independent oracle, and the invariants of
design.md §2 on a tiny random model of every supported family."""

import logging

import pytest
import torch
from conftest import TRAINED, build_model, logit_tolerance
from reference import dca_attention_ref, dca_distance_table

import selfextend
from selfextend.backends import BACKENDS, DCAInputs
from selfextend.positions import (
    absolute_key_positions,
    chunk_key_positions,
    dca_exact_below,
    dca_relative_positions,
    inter_chunk_query_positions,
    intra_chunk_query_positions,
    successive_chunk_query_positions,
    temperature_factor,
)
from selfextend.rope import apply_rope

CS, LW = 24, 6  # chunk_len 18: N = 150 spans chunks 0..8, and every query past L = 64 meets all three parts
N = 150

# chunk_size 6, local_window 2 (chunk_len 4), 16 tokens, worked out by hand from the maps:
# keys at j mod 4; queries at i mod 4 (own chunk), min(i mod 4 + 4, 6) (previous chunk), 6 (older chunks)
HAND_TABLE = """
0
1 0
2 1 0
3 2 1 0
4 3 2 1 0
5 4 3 2 1 0
6 5 4 3 2 1 0
6 5 4 3 3 2 1 0
6 5 4 3 4 3 2 1 0
6 5 4 3 5 4 3 2 1 0
6 5 4 3 6 5 4 3 2 1 0
6 5 4 3 6 5 4 3 3 2 1 0
6 5 4 3 6 5 4 3 4 3 2 1 0
6 5 4 3 6 5 4 3 5 4 3 2 1 0
6 5 4 3 6 5 4 3 6 5 4 3 2 1 0
6 5 4 3 6 5 4 3 6 5 4 3 3 2 1 0
"""


def test_position_maps_match_the_hand_computed_table():
    pos = torch.arange(16)
    table = dca_relative_positions(pos, pos, chunk_size=6, local_window=2)
    for i, line in enumerate(HAND_TABLE.strip().splitlines()):
        assert table[i, : i + 1].tolist() == [int(t) for t in line.split()], f"row {i}"
    assert chunk_key_positions(pos, 4).tolist() == [0, 1, 2, 3] * 4
    assert intra_chunk_query_positions(pos, 4).tolist() == [0, 1, 2, 3] * 4
    assert successive_chunk_query_positions(pos, 6, 4).tolist() == [4, 5, 6, 6] * 4
    assert inter_chunk_query_positions(pos, 6).tolist() == [6] * 16
    # no distance exceeds chunk_size at any length
    long = torch.arange(2000)
    assert int(dca_relative_positions(long, long, 6, 2).tril().max()) == 6
    # the gate: rows below it keep i - j; without it, rows up to min(cs + 1, 2 cl) are exact anyway
    gated = dca_relative_positions(pos, pos, 6, 2, exact_below=10)
    assert torch.equal(gated[:10], (pos[:10, None] - pos[None, :]))
    assert torch.equal(gated[10:], table[10:])
    assert dca_exact_below(6, 2, 64, False) == 7 and torch.equal(table[:7].tril(), (pos[:7, None] - pos).tril())
    assert dca_exact_below(6, 2, 64, True) == 64


def test_temperature_is_yarn_past_the_trained_length_only():
    f = temperature_factor(torch.tensor([0, 63, 64, 127, 1023]), 64)
    assert f[:2].tolist() == [1.0, 1.0]
    expected = 0.1 * torch.log(torch.tensor([65 / 64, 2.0, 16.0])) + 1
    assert torch.allclose(f[2:], expected)


def make_inputs(bsz=1, heads=4, kv_heads=2, kv_len=90, q_len=None, dim=16, cs=CS, lw=LW, gate=0, key_valid=None,
                dtype=torch.float32, softcap=None, seed=0) -> tuple[DCAInputs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DCAInputs from un-rotated q/k, each version rotated from scratch at its DCA position (``apply_rope``)."""
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


def real_rows(out, inp):
    return out if inp.key_valid is None else out * inp.key_valid[:, inp.q_start :][:, None, :, None]


def oracle(inp: DCAInputs, q, k, inv_freq):
    """``tests/reference.py``'s fp64 DCA from the un-rotated q/k: shares no code with the library."""
    return dca_attention_ref(q, k, inp.value, inp.query_pos, inp.key_pos, inp.chunk_size, inp.local_window,
                             inp.exact_below, inv_freq, inp.scaling, key_valid=inp.key_valid, q_start=inp.q_start,
                             softcap=inp.softcap).double()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("gate", "q_len", "pads"), [(0, None, None), (64, None, None), (0, 17, None), (0, 1, None),
                                                     (64, None, (0, 23)), (0, 9, (31, 0))])
def test_backends_equal_the_oracle(backend, gate, q_len, pads):
    key_valid = None if pads is None else _left_pad(len(pads), 100, pads)
    inp, q, k, inv_freq = make_inputs(bsz=1 if pads is None else len(pads), kv_len=100, q_len=q_len, gate=gate,
                                      key_valid=key_valid)
    out = BACKENDS[backend].forward(inp).double()
    assert (real_rows(out, inp) - real_rows(oracle(inp, q, k, inv_freq), inp)).abs().max() < 1e-5


def test_oracle_table_is_the_hand_drawn_one():
    pos = torch.arange(16)
    table = dca_distance_table(pos, pos, chunk_size=6, local_window=2)
    expected = [[int(v) for v in row.split()] for row in HAND_TABLE.strip().splitlines()]
    assert [table[i, : i + 1].tolist() for i in range(16)] == expected


def _left_pad(bsz, kv_len, pads):
    valid = torch.ones(bsz, kv_len, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return valid


SHAPES = [  # kv_len, q_len, cs, lw, gate, bsz, heads, kv_heads, dim, pads
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


@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_equals_reference(shape):
    kv_len, q_len, cs, lw, gate, bsz, heads, kv_heads, dim, pads = shape
    valid = _left_pad(bsz, kv_len, pads) if pads else None
    inp, *_ = make_inputs(bsz, heads, kv_heads, kv_len, q_len, dim, cs, lw, gate, valid)
    ref = real_rows(BACKENDS["reference"].forward(inp), inp)
    assert (real_rows(BACKENDS["cpu"].forward(inp), inp) - ref).abs().max() < 2e-5


def test_blockwise_equals_reference_bf16_and_softcap():
    inp, *_ = make_inputs(kv_len=120, dtype=torch.bfloat16)
    ref = BACKENDS["reference"].forward(inp).float()
    assert (BACKENDS["cpu"].forward(inp).float() - ref).abs().max() < 3e-2
    inp, *_ = make_inputs(kv_len=120, softcap=5.0, gate=30)
    assert (BACKENDS["cpu"].forward(inp) - BACKENDS["reference"].forward(inp)).abs().max() < 2e-5


def test_within_one_chunk_dca_math_equals_vanilla_attention():
    # no gate: every row goes through the DCA parts, yet up to min(cs + 1, 2 cl) tokens all distances are exact
    inp, *_ = make_inputs(kv_len=dca_exact_below(CS, LW, 64, False), gate=0)
    vanilla = torch.nn.functional.scaled_dot_product_attention(
        inp.query, inp.key, inp.value, is_causal=True, enable_gqa=True)
    for backend in ("reference", "cpu"):
        assert (BACKENDS[backend].forward(inp) - vanilla).abs().max() < 1e-5


# ---- the model: every supported family ------------------------------------------------------------------

def ids(n=N, seed=1, bsz=1):
    return torch.randint(3, 128, (bsz, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x, **kw):
    return model(x, **kw).logits


def dca(model, **kw):
    return selfextend.apply(model, method="dca", **{"chunk_size": CS, "local_window": LW, **kw})


def test_exactly_vanilla_within_the_trained_length_and_remove_restores(family):
    model = build_model(family)
    x = ids()
    vanilla = logits(model, x)
    reference = build_model(family)  # vanilla, as DCA runs it: a global sliding window is switched off
    if not getattr(reference.config, "layer_types", None):
        reference.config.sliding_window = None
    dca(model)
    assert torch.equal(logits(model, x[:, :TRAINED]), logits(reference, x[:, :TRAINED]))
    dca(model, vanilla_within_trained=False)  # without the gate: exactly vanilla within one chunk
    short = x[:, : dca_exact_below(CS, LW, TRAINED, False)]
    assert torch.equal(logits(model, short), logits(reference, short))
    out = logits(model, x)
    assert (out - logits(reference, x)).abs().max() > 1e-3  # past the chunk it does something
    selfextend.remove(model)
    assert torch.equal(logits(model, x), vanilla)
    assert not any(hasattr(m, "selfextend_layer") for m in model.modules())


@pytest.mark.parametrize("options", [{}, {"vanilla_within_trained": False, "temperature": True}])
def test_decode_and_chunked_prefill_equal_full_pass(family, options):
    model = build_model(family)
    x = ids()
    dca(model, **options)
    full = logits(model, x)
    pieces, cache, start = [], None, 0
    for size in (40, 23, 37):  # uneven chunks crossing the gate and chunk boundaries, then decode
        out = model(x[:, start : start + size], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache, start = out.past_key_values, start + size
    for t in range(start, N):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.past_key_values
    assert (torch.cat(pieces, 1) - full).abs().max() < logit_tolerance(full)


def test_left_padded_batch_rows_equal_rows_alone(family):
    model = build_model(family)
    dca(model, temperature=True)
    long, short = ids(N, seed=2)[0], ids(N - 41, seed=3)[0]
    pad = N - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, batch, attention_mask=mask, position_ids=pos)
    assert (out[0] - logits(model, long[None])[0]).abs().max() < logit_tolerance(out[0])
    assert (out[1, pad:] - logits(model, short[None])[0]).abs().max() < logit_tolerance(out[1, pad:])
    gen = model.generate(batch[:, :-8], attention_mask=mask[:, :-8], max_new_tokens=6, do_sample=False)
    alone = model.generate(short[None, :-8], max_new_tokens=6, do_sample=False)
    new = alone.shape[1] - (short.numel() - 8)
    assert torch.equal(gen[1, N - 8 : N - 8 + new], alone[0, -new:])


def test_model_blockwise_equals_reference_and_keys_are_kept_for_decode():
    model = build_model("llama")
    x = ids()
    dca(model, backend="cpu", temperature=True)
    fast = logits(model, x)
    dca(model, backend="reference", temperature=True)
    assert (fast - logits(model, x)).abs().max() < logit_tolerance(fast)
    dca(model, backend="cpu")  # the temperature acts past L only
    cold = logits(model, x)
    assert torch.equal(cold[:, :TRAINED], fast[:, :TRAINED]) and (cold - fast).abs().max() > 1e-3
    out = model(x[:, :-1], use_cache=True)
    model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    store = model.model.layers[0].self_attn.selfextend_layer.extra
    assert store.nbytes > 0  # keys rotated once to j mod chunk_len, reused by later steps


def layer_methods(model) -> set[str]:
    """The methods whose per-layer state the attention modules carry."""
    return {m.selfextend_layer.integration.label for m in model.modules() if hasattr(m, "selfextend_layer")}


def test_switching_between_selfextend_and_dca():
    model = build_model("llama")
    x = ids()
    vanilla = logits(model, x)
    selfextend.apply(model, group_size=3, window=16)
    dca(model)
    assert model.config._attn_implementation == "dca"
    assert layer_methods(model) == {"DCA"}  # no SelfExtend layer state left behind
    fresh = build_model("llama")
    dca(fresh)
    assert torch.equal(logits(model, x), logits(fresh, x))
    selfextend.apply(model, group_size=3, window=16)
    assert layer_methods(model) == {"SelfExtend"}
    selfextend.remove(model)
    assert torch.equal(logits(model, x), vanilla)


# ---- parameters ------------------------------------------------------------------------------------------

def test_defaults_reach_and_qwen_config(caplog):
    model = build_model("llama")
    selfextend.apply(model, method="dca")
    params = selfextend.active(model).params
    assert (params["chunk_size"], params["local_window"], params["temperature"]) == (48, 4, False)
    assert selfextend.max_length(model) == 32 * TRAINED
    with caplog.at_level(logging.WARNING, logger="selfextend"):
        selfextend.apply(model, method="dca", target_length=33 * TRAINED)
    assert "past 2048" in caplog.text
    qwen = build_model("qwen2", dual_chunk_attention_config={
        "chunk_size": 32, "local_size": 4, "original_max_position_embeddings": 32})
    selfextend.apply(qwen, method="dca")
    params = selfextend.active(qwen).params
    assert (params["chunk_size"], params["local_window"], params["trained_length"], params["temperature"]) == (
        32, 4, 32, True)
    assert not torch.allclose(logits(qwen, ids()), logits(build_model("qwen2"), ids()))  # it is active
    # a model's own config gives exactly what the same settings give when passed explicitly
    qwen24 = build_model("qwen2", dual_chunk_attention_config={
        "chunk_size": 24, "local_size": 4, "original_max_position_embeddings": 32})
    selfextend.apply(qwen24, method="dca")
    twin = build_model("qwen2")
    selfextend.apply(twin, method="dca", chunk_size=24, local_window=4, trained_length=32, temperature=True)
    assert torch.equal(logits(qwen24, ids()), logits(twin, ids()))
    selfextend.apply(qwen, method="dca", chunk_size=20, local_window=4)  # explicit settings win
    assert selfextend.active(qwen).params["chunk_size"] == 20


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"chunk_size": TRAINED}, ValueError, "chunk_size=64 must be smaller than the trained length"),
        ({"chunk_size": 24, "local_window": 24}, ValueError, "local_window=24 must be smaller than chunk_size=24"),
        ({"chunk_size": 24.5}, TypeError, "chunk_size must be an integer"),
        ({"local_window": "8"}, TypeError, "local_window must be an integer"),
        ({"local_window": 0}, ValueError, "local_window must be >= 1"),
        ({"temperature": "yes"}, TypeError, "temperature must be True or False"),
        ({"window": 16}, ValueError, "group_size/window are SelfExtend parameters"),
        ({"group": 4}, ValueError, "method 'dca' has no parameter 'group'"),
        ({"backend": "cuda"}, ValueError, "Unknown backend 'cuda'. Available: auto, cpu, reference."),
    ],
)
def test_bad_parameters_name_the_fix_and_leave_the_model_alone(kwargs, error, message):
    model = build_model("llama")
    with pytest.raises(error, match=message):
        selfextend.apply(model, method="dca", **kwargs)
    assert selfextend.active(model) is None and model.config._attn_implementation == "sdpa"
