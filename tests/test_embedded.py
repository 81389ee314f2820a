"""The invariants on the embedded SmolLM2-135M-Instruct at short lengths (W=128 so 400 tokens cross it)."""

import pydoc_data.topics

import pytest
import torch

import selfextend

pytestmark = pytest.mark.slow

W, G, N = 128, 4, 400


@pytest.fixture(scope="module")
def model_and_tokens():
    model, tokenizer = selfextend.load_model()
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text[:20000], return_tensors="pt").input_ids[:, :N]
    return model, ids


@torch.no_grad()
def logits(model, x, **kw):
    return model(x, **kw).logits


def test_embedded_invariants(model_and_tokens):
    model, x = model_and_tokens
    assert model.config.max_position_embeddings == 8192
    vanilla = logits(model, x)
    # a shorter pass is not bitwise a prefix of a longer one (the kernel blocks differ): compare like
    # with like
    vanilla_window = logits(model, x[:, :W])
    try:
        selfextend.apply(model, group_size=1, window=W)
        assert torch.equal(logits(model, x), vanilla)
        selfextend.apply(model, group_size=G, window=W)
        assert torch.equal(logits(model, x[:, :W]), vanilla_window)
        se = logits(model, x)
        assert (se - vanilla).abs().max() > 1e-2
        # decode token by token after a chunked prefill equals one full pass
        out = model(x[:, :150], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        out = model(x[:, 150:333], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.past_key_values
        for t in range(333, N):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
        assert (torch.cat(pieces, 1) - se).abs().max() < 1e-3
        # left-padded batch rows equal the rows alone
        short = x[0, 77:]
        pad = N - short.numel()
        batch = torch.stack([x[0], torch.cat([torch.zeros(pad, dtype=torch.long), short])])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = logits(model, batch, attention_mask=mask, position_ids=pos)
        assert (out[0] - se[0]).abs().max() < 1e-3
        assert (out[1, pad:] - logits(model, short[None])[0]).abs().max() < 1e-3
        # the default backend equals the reference backend
        selfextend.apply(model, group_size=G, window=W, backend="reference")
        assert (logits(model, x) - se).abs().max() < 1e-3
    finally:
        selfextend.remove(model)
    assert torch.equal(logits(model, x), vanilla)


def test_embedded_passkey_at_2k_vanilla_and_self_extend(tmp_path):
    """The harness on the real model at a CI-sized length: both answer (SelfExtend with W=512 so it is
    active)."""
    from selfextend.eval.report import write_results
    from selfextend.eval.runner import EvalConfig, parse_method, run_eval

    model, tokenizer = selfextend.load_model()
    methods = [parse_method("vanilla"), parse_method("self-extend:group_size=4:window=512")]
    config = EvalConfig("passkey", methods, [2048], [0.5], 1, 0)
    rows = run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert [r["score"] for r in rows] == [1.0, 1.0], [r["prediction"] for r in rows]
    assert (write_results(tmp_path, "passkey")["results"]["self-extend:group_size=4:window=512"]["2048"]
            ["accuracy"] == 1.0)
