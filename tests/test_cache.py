"""Grouped keys kept in place in the transformers KV cache (``cache.GroupedCache``).

Decoding rotates each key to its grouped position once, inside the user's cache, instead of keeping a
second copy of the keys. These tests check that every way a cache is reused stays exact: copies,
reordered beams, crops, a new G, a vanilla call, caches that do not hand out their own storage, and
``remove`` (which must give the user back a vanilla cache).
"""

import copy

import torch
from conftest import build_model, logit_tolerance
from transformers import DynamicCache

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache
from selfextend.integrations.hf.grouped_cache import RECORD_ATTR
from selfextend.positions import grouped_key_positions
from selfextend.rope import rotate_by

G, W, N = 4, 16, 120  # reach (64 - 16) * 4 + 16 = 208 tokens
PROMPT = 80


def ids(n=N, seed=1, bsz=1):
    return torch.randint(3, 128, (bsz, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_logits(model, x):
    return model(x, use_cache=False).logits


@torch.no_grad()
def run(model, x, cache, start, end, step=1):
    """Feed x[:, start:end] into ``cache`` ``step`` tokens at a time; logits of every fed token."""
    out = []
    for t in range(start, end, step):
        out.append(model(x[:, t : t + step], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def close(a, b, tol: float | None = None):
    return float((a - b).abs().max()) < (logit_tolerance(a) if tol is None else tol)


def test_decode_keeps_old_keys_grouped_in_the_cache_itself():
    model = build_model("llama")
    x = ids()
    with torch.no_grad():
        vanilla_cache = DynamicCache()
        model(x[:, :PROMPT], past_key_values=vanilla_cache, use_cache=True)
    selfextend.apply(model, group_size=G, window=W)
    full = full_logits(model, x)
    cache = DynamicCache()
    got = torch.cat([run(model, x, cache, 0, PROMPT, PROMPT), run(model, x, cache, PROMPT, N)], 1)
    assert close(got, full)
    record = getattr(cache, RECORD_ATTR)
    # keys < N - W are grouped; the next call rotates the one that leaves the window, in place, first
    assert record.layers == {i: (N - W, G) for i in range(2)}
    # the grouped prefix is exactly the true keys rotated once to j // G
    true_keys = vanilla_cache.layers[0].keys[:, :, : PROMPT - W]
    pos = torch.arange(PROMPT - W)[None]
    inv_freq = model.model.rotary_emb.inv_freq
    expected = rotate_by(true_keys, grouped_key_positions(pos, G) - pos, inv_freq)
    assert torch.equal(cache.layers[0].keys[:, :, : PROMPT - W], expected)


def test_remove_gives_back_a_vanilla_cache():
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=G, window=W)
    cache, untouched = DynamicCache(), CopyingCache()  # the second never has its keys written
    for c in (cache, untouched):
        run(model, x, c, 0, 90, 90)
        run(model, x, c, 90, 100)
    assert hasattr(cache, RECORD_ATTR)
    selfextend.remove(model)
    assert not hasattr(cache, RECORD_ATTR)
    for layer in range(2):  # every key back at its true position (rotations round: not bit-exact)
        assert close(cache.layers[layer].keys, untouched.layers[layer].keys, 1e-5)
    assert close(run(model, x, cache, 100, 104), run(model, x, untouched, 100, 104))


def test_cache_the_model_creates_is_adopted_after_its_prefill():
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=G, window=W)
    with torch.no_grad():
        out = model(x[:, :PROMPT], use_cache=True)  # no cache passed: the model creates it inside the call
        assert getattr(out.past_key_values, RECORD_ATTR).layers[0] == (PROMPT - W, G)
        out2 = model(x[:, PROMPT : PROMPT + 1], past_key_values=out.past_key_values, use_cache=True)
    assert getattr(out.past_key_values, RECORD_ATTR).layers[0] == (PROMPT + 1 - W, G)
    assert close(out2.logits, full_logits(model, x[:, : PROMPT + 1])[:, -1:])
    with torch.no_grad():
        model(x, use_cache=False)  # no cache: nothing to keep, nothing breaks
        copying = model(x[:, :PROMPT], past_key_values=CopyingCache(), use_cache=True).past_key_values
    assert not hasattr(copying, RECORD_ATTR)


def test_copies_reordered_beams_and_crops_stay_exact():
    model = build_model("llama")
    x = ids(bsz=2)
    selfextend.apply(model, group_size=G, window=W)
    full = full_logits(model, x)
    cache = DynamicCache()
    run(model, x, cache, 0, PROMPT, PROMPT)
    run(model, x, cache, PROMPT, 100)
    # a copy continues on its own
    twin = copy.deepcopy(cache)
    assert close(run(model, x, twin, 100, 104), full[:, 100:104])
    # beams reordered: row 0 now continues row 1's sequence
    cache.reorder_cache(torch.tensor([1, 1]))
    swapped = x[[1, 1]]
    assert close(run(model, swapped, cache, 100, 103), full_logits(model, swapped[:, :103])[:, 100:])
    # cropped back behind the grouped prefix: those keys are neighbors again
    cache.crop(70 - 103)
    assert close(run(model, swapped, cache, 70, 90, 7), full_logits(model, swapped[:, :91])[:, 70:91])
    cache.crop(10 - 91)  # below the window: the next calls are vanilla and must see true keys
    assert close(run(model, swapped, cache, 10, 14), full_logits(model, swapped[:, :14])[:, 10:])


def test_new_settings_on_a_grouped_cache():
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=G, window=W)
    cache, untouched = DynamicCache(), CopyingCache()  # the second always holds true keys
    for c in (cache, untouched):
        run(model, x, c, 0, 100, 100)
        run(model, x, c, 100, 104)
    selfextend.apply(model, group_size=3, window=24)  # another G and a larger W, same cache
    assert close(run(model, x, cache, 104, 108), run(model, x, untouched, 104, 108))
    selfextend.apply(model, group_size=1, window=W)  # G = 1 is vanilla: every key back to its true position
    assert close(run(model, x, cache, 108, 110), run(model, x, untouched, 108, 110))
    assert getattr(cache, RECORD_ATTR).layers[0][0] == 0
    selfextend.remove(model)
    assert close(run(model, x, cache, 110, 112), run(model, x, untouched, 110, 112))


class CopyingCache(DynamicCache):
    """A cache that hands attention a copy of its keys (as quantized or offloaded caches do)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return keys.clone(), values.clone()


def test_cache_that_copies_its_keys_is_never_written():
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=G, window=W)
    cache = CopyingCache()
    got = torch.cat([run(model, x, cache, 0, PROMPT, PROMPT), run(model, x, cache, PROMPT, 90)], 1)
    assert close(got, full_logits(model, x[:, :90]))
    assert not hasattr(cache, RECORD_ATTR)


def test_cache_found_under_either_transformers_name():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (argument and output field): the hooks must
    see the cache under the installed name, or decoding would silently re-rotate the whole cache."""
    model = build_model("llama")
    name = cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    selfextend.apply(model, group_size=G, window=W)
    x = ids()
    with torch.no_grad():
        out = model(x[:, :PROMPT], use_cache=True)
        cache = output_cache(out)
        assert cache is not None and getattr(cache, RECORD_ATTR).layers[0][0] == PROMPT - W
        model(x[:, PROMPT : PROMPT + 1], use_cache=True, **{name: cache})
    assert getattr(cache, RECORD_ATTR).layers[0][0] == PROMPT + 1 - W  # one more key grouped, in place
    assert output_cache(object()) is None


def test_no_call_outlives_its_layer():
    """What the cache keeps to rotate its keys back holds nothing of an attention call: a call keeps the
    layer's query, key and value, so keeping it would hold one query per layer for the rest of the forward
    (a prefill's transient memory) and the last one per layer after it."""
    import gc

    from selfextend.integrations.hf.attention import AttentionCall

    model = build_model("llama")
    selfextend.apply(model, group_size=G, window=W)
    with torch.no_grad():
        out = model(ids(PROMPT), use_cache=True)
    cache = output_cache(out)
    assert getattr(cache, RECORD_ATTR).layers  # the cache the model created was adopted, keys grouped
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, AttentionCall)]
    selfextend.remove(model)
