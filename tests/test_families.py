"""The invariants of design.md §2 on a tiny random model of every supported family."""

import pytest
import torch
from conftest import TRAINED, build_model, logit_tolerance

import selfextend

W, G = 16, 3
N = 150  # > TRAINED: past the trained context, inside the reach (64 - 16) * 3 + 16 = 160


def ids(n=N, seed=1, bsz=1):
    return torch.randint(3, 128, (bsz, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x, **kw):
    return model(x, **kw).logits


def test_group_size_one_is_exactly_vanilla(family):
    model = build_model(family)
    x = ids()
    selfextend.apply(model, group_size=1, window=W, allow_overflow=True)
    se = logits(model, x)
    selfextend.remove(model)
    assert torch.equal(se, logits(model, x))


def test_within_window_is_exactly_vanilla(family):
    model = build_model(family)
    x = ids(n=W)
    vanilla = logits(model, x)
    selfextend.apply(model, group_size=G, window=W)
    assert torch.equal(logits(model, x), vanilla)


def test_extends_differs_from_vanilla_and_remove_restores(family):
    model = build_model(family)
    x = ids()
    vanilla = logits(model, x)
    selfextend.apply(model, group_size=G, window=W)
    se = logits(model, x)
    assert (se - vanilla).abs().max() > 1e-3  # it does something past the window
    assert torch.equal(se[:, :W], vanilla[:, :W]) or (se[:, :W] - vanilla[:, :W]).abs().max() < 1e-5
    original = model.config._attn_implementation
    selfextend.remove(model)
    assert torch.equal(logits(model, x), vanilla)
    # no state left behind: no active method, the original attention, no per-layer state
    assert selfextend.active(model) is None and not hasattr(model, "selfextend_method")
    assert original == "selfextend" and model.config._attn_implementation in ("sdpa", "eager")
    assert not any(hasattr(m, "selfextend_layer") for m in model.modules())


def test_blockwise_equals_reference(family):
    model = build_model(family)
    x = ids()
    selfextend.apply(model, group_size=G, window=W, backend="cpu")
    fast = logits(model, x)
    selfextend.apply(model, group_size=G, window=W, backend="reference")
    assert (fast - logits(model, x)).abs().max() < logit_tolerance(fast)


def test_decode_and_chunked_prefill_equal_full_pass(family):
    model = build_model(family)
    x = ids()
    selfextend.apply(model, group_size=G, window=W)
    full = logits(model, x)
    # chunked prefill with uneven chunks, then token-by-token decoding past the trained length
    pieces, cache, start = [], None, 0
    for size in (40, 23, 37):
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
    selfextend.apply(model, group_size=G, window=W)
    long, short = ids(N, seed=2)[0], ids(N - 41, seed=3)[0]
    pad = N - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, batch, attention_mask=mask, position_ids=pos)
    assert (out[0] - logits(model, long[None])[0]).abs().max() < logit_tolerance(out[0])
    assert (out[1, pad:] - logits(model, short[None])[0]).abs().max() < logit_tolerance(out[1, pad:])
    # generate() with left padding, greedy, past the trained length: each row as if alone
    gen = model.generate(batch[:, :-8], attention_mask=mask[:, :-8], max_new_tokens=6, do_sample=False)
    alone = model.generate(short[None, :-8], max_new_tokens=6, do_sample=False)
    new = alone.shape[1] - (short.numel() - 8)  # may stop early at eos
    assert torch.equal(gen[1, N - 8 : N - 8 + new], alone[0, -new:])


def test_generate_greedy_matches_argmax_and_sampling_runs(family):
    model = build_model(family)
    selfextend.apply(model, group_size=G, window=W)
    prompt = ids(TRAINED + 20)
    gen = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq[:, : gen.shape[1]])  # generate may stop early at eos
    torch.manual_seed(0)
    s1 = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(0)
    s2 = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(s1, s2) and s1.shape[1] > prompt.shape[1]


@pytest.mark.parametrize("family_name", ["gemma2", "gemma3_text"])
def test_hybrid_models_extend_only_global_layers(family_name):
    model = build_model(family_name)
    selfextend.apply(model, group_size=G, window=W)
    calls = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, k, o, calls=calls: calls.append(m.layer_type),
                                              with_kwargs=True)
        for layer in model.model.layers
    ]
    logits(model, ids())
    for h in hooks:
        h.remove()
    assert set(calls) == {"sliding_attention", "full_attention"}
    # a local layer is untouched: the same model with only local layers stays exactly vanilla
    local = build_model(family_name, layer_types=["sliding_attention", "sliding_attention"])
    x = ids()
    vanilla = logits(local, x)
    selfextend.apply(local, group_size=G, window=W)
    assert torch.equal(logits(local, x), vanilla)


def test_mistral_sliding_window_disabled_and_restored():
    model = build_model("mistral")
    assert model.config.sliding_window == 16
    selfextend.apply(model, group_size=G, window=W)
    assert model.config.sliding_window is None
    selfextend.remove(model)
    assert model.config.sliding_window == 16
