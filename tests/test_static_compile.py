"""A static KV cache and a ``torch.compile``d decode step with SelfExtend (issue 26, item 3).

``generate(..., cache_implementation="static")`` hands the attention the whole preallocated cache (keys past
the written ones are empty), builds the mask ahead of each step (``create_masks_for_generate``) and, with a
``compile_config``, runs every decode step through ``torch.compile(model.__call__)``: the road to CUDA graphs.
Each must give what the eager ``DynamicCache`` path gives, and ``remove`` must leave a static cache at true
positions. The tiny model is trained on 64 tokens; W = 8 and G = 4 put most keys in the grouped part.
"""

import pytest
import torch
from conftest import TRAINED, build_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache
from selfextend.integrations.hf.grouped_cache import RECORD_ATTR

G, W = 4, 8  # reach (64 - 8) * 4 + 8 = 232 tokens
PROMPT, NEW = 50, 24  # 74 tokens: past the window and the trained length
TOL = 1e-5  # float32 rounding; a position error moves logits by 1e-2 or more


def prompts(bsz: int, length: int = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; with two rows the second is left-padded by 7."""
    x = torch.randint(3, 128, (bsz, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    if bsz > 1:
        mask[1, :7] = 0
        x[1, :7] = 0
    return x, mask


def generate(model, x, mask, new=NEW, **kwargs):
    return model.generate(x, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, **kwargs)


def logit_diff(a, b) -> float:
    return max(float((s - t).abs().max()) for s, t in zip(a.logits, b.logits, strict=True))


@pytest.mark.parametrize("bsz,length", [(1, PROMPT), (2, PROMPT), (1, 6)])
def test_static_cache_generate_equals_dynamic(bsz, length):
    """Greedy tokens equal and logits within rounding; (1, 6) starts inside the window (vanilla calls on a
    static cache) and crosses into grouped decoding."""
    model = build_model("llama")
    x, mask = prompts(bsz, length)
    new = NEW if length == PROMPT else TRAINED + 2 - length
    vanilla = generate(model, x, mask, new)
    selfextend.apply(model, group_size=G, window=W)
    dynamic = generate(model, x, mask, new)
    static = generate(model, x, mask, new, cache_implementation="static")
    cache = output_cache(static)
    assert isinstance(cache, StaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert logit_diff(static, dynamic) < TOL
    assert logit_diff(dynamic, vanilla) > 1e-2  # the grouped path ran
    # the static cache's own storage holds the grouped keys, those before written - W (the next call rotates
    # the key that leaves the window, in place, first)
    written = length + new - 1
    assert cache.layers[0].keys.shape[2] >= written
    assert getattr(cache, RECORD_ATTR).layers == {i: (written - W, G) for i in range(2)}


class CopyingStaticCache(StaticCache):
    """A static cache that hands attention copies of its storage: SelfExtend never writes into it, so its keys
    stay at their true positions (the reference for ``remove``)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return keys.clone(), values.clone()


@pytest.mark.parametrize("bsz", [1, 2])
def test_remove_after_static_generate_gives_back_true_keys(bsz):
    model = build_model("llama")
    x, mask = prompts(bsz)
    selfextend.apply(model, group_size=G, window=W)
    size = PROMPT + NEW
    grouped = StaticCache(config=model.config, max_cache_len=size)
    untouched = CopyingStaticCache(config=model.config, max_cache_len=size)
    out = generate(model, x, mask, **{cache_kwarg(model): grouped})
    ref = generate(model, x, mask, **{cache_kwarg(model): untouched})
    assert torch.equal(out.sequences, ref.sequences) and logit_diff(out, ref) < TOL
    assert not hasattr(untouched, RECORD_ATTR)
    written = size - 1
    count = getattr(grouped, RECORD_ATTR).layers[0][0]
    assert count == written - W
    for layer in range(2):
        keys, true_keys = grouped.layers[layer].keys, untouched.layers[layer].keys
        assert float((keys[:, :, :count] - true_keys[:, :, :count]).abs().max()) > 1e-2  # grouped in place
    selfextend.remove(model)
    assert not hasattr(grouped, RECORD_ATTR)
    for layer in range(2):  # true positions again (rotations round: not bit-exact); the empty tail untouched
        keys, true_keys = grouped.layers[layer].keys, untouched.layers[layer].keys
        assert float((keys[:, :, :written] - true_keys[:, :, :written]).abs().max()) < TOL
        assert not keys[:, :, written:].any()
    # the restored cache continues like the reference under the vanilla model (its last free slot)
    step = dict(input_ids=out.sequences[:, -1:], attention_mask=torch.cat([mask, torch.ones(bsz, NEW)], 1),
                position_ids=(torch.cat([mask, torch.ones(bsz, NEW)], 1).cumsum(-1) - 1)[:, -1:].long(),
                use_cache=True)
    with torch.no_grad():
        a = model(**step, **{cache_kwarg(model): grouped}).logits
        b = model(**step, **{cache_kwarg(model): untouched}).logits
    assert float((a - b).abs().max()) < 1e-4


def test_compiled_decode_equals_eager():
    """``generate`` with a ``compile_config`` prefills eagerly and runs each decode step through
    ``torch.compile(model.__call__)``. SelfExtend's host reads (``int``/``bool``/``.item()`` of tensors, data
    pointer checks) are graph breaks: correct, not yet one graph (see the issue). ``aot_eager`` traces what
    inductor would get (functionalized in-place cache writes included) without the C++ compile."""
    model = build_model("llama")
    x, mask = prompts(2)
    selfextend.apply(model, group_size=G, window=W)
    eager = generate(model, x, mask, 5, cache_implementation="static")
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers' flag for compiling on CPU (meant for tests)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = generate(model, x, mask, 5, cache_implementation="static", compile_config=config)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0  # the decode steps really went through dynamo
    assert torch.equal(compiled.sequences, eager.sequences)
    assert logit_diff(compiled, eager) < TOL
    eager_cache, compiled_cache = output_cache(eager), output_cache(compiled)
    assert getattr(compiled_cache, RECORD_ATTR).layers == getattr(eager_cache, RECORD_ATTR).layers
    for layer in range(2):
        assert float((compiled_cache.layers[layer].keys - eager_cache.layers[layer].keys).abs().max()) < TOL
