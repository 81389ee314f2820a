"""Dual Chunk Attention through transformers: the invariants of design.md §2 on a tiny random model of every
supported family, and its parameters. Its position maps are in test_positions.py, its backends in
test_backends.py."""

import logging

import pytest
import torch
from conftest import TRAINED, build_model, logit_tolerance

import selfextend
from selfextend.positions import (
    DCA_REACH_FACTOR,
    dca_exact_below,
)

CS, LW = 24, 6  # chunk_len 18: N = 150 spans chunks 0..8, and every query past L = 64 meets all three parts
N = 150

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
    assert (params["chunk_size"], params["local_window"], params["trained_length"],
            params["temperature"]) == (32, 4, 32, True)
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
        ({"chunk_size": 24, "local_window": 24}, ValueError,
         "local_window=24 must be smaller than chunk_size=24"),
        ({"chunk_size": 24.5}, TypeError, "chunk_size must be an integer"),
        ({"local_window": "8"}, TypeError, "local_window must be an integer"),
        ({"local_window": 0}, ValueError, "local_window must be >= 1"),
        ({"temperature": "yes"}, TypeError, "temperature must be True or False"),
        ({"window": 16}, ValueError, "group_size/window are SelfExtend parameters"),
        ({"group": 4}, ValueError, "method 'dca' has no parameter 'group'"),
        ({"backend": "cuda"}, ValueError,
         "Unknown backend 'cuda'. Available: auto, composed, reference, cpu."),
    ],
)
def test_bad_parameters_name_the_fix_and_leave_the_model_alone(kwargs, error, message):
    model = build_model("llama")
    with pytest.raises(error, match=message):
        selfextend.apply(model, method="dca", **kwargs)
    assert selfextend.active(model) is None and model.config._attn_implementation == "sdpa"


def test_scale_base_scales_the_remapped_rows_only():
    """The log scaling (``scale_base``, as SelfExtend's) acts on the queries DCA remaps, from exact_below on:
    the model stays exactly vanilla within the trained length."""
    model = build_model("llama")
    x = ids()
    dca(model, backend="cpu")
    plain = logits(model, x)
    dca(model, backend="cpu", scale_base=TRAINED // 2)
    scaled = logits(model, x)
    assert torch.equal(scaled[:, :TRAINED], plain[:, :TRAINED]) and (scaled - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="scale_base=1 divides by ln 1"):
        dca(model, scale_base=1)


def test_a_forward_past_the_reach_warns_once_per_1k_tokens():
    """As the RoPE-scaling methods do (SelfExtend refuses: its positions would leave the trained range)."""
    model = build_model("llama")
    dca(model, backend="cpu")
    past = DCA_REACH_FACTOR * TRAINED + 1
    with pytest.warns(RuntimeWarning, match=f"{past} tokens are past DCA's reach {past - 1}") as seen:
        out = model(ids(past), use_cache=True)
        model(ids(1, seed=5), past_key_values=out.past_key_values, use_cache=True)  # same 1k: no new warning
    assert sum("past DCA's reach" in str(w.message) for w in seen) == 1
