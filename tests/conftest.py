"""Tiny random-weight models, one per supported family, built from config (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

TRAINED = 64  # tiny trained context: long inputs are cheap and the reach is (64 - W) * G + W

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=TRAINED,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": {},
    "llama3": {"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {
        "head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "phi": {"partial_rotary_factor": 0.5, "num_key_value_heads": 4},
}


# How far two exact formulations of a tiny model's logits may differ: the rounding noise of summing in
# another order (fp32 logits of size ~1-10 carry ~1e-6 relative noise per layer), keyed like flash-attention's
# tests by (device, dtype). A position error moves logits by 1e-2 or more (tests check that too).
LOGIT_TOLERANCE = {
    ("cpu", torch.float32): 1e-4,
    ("cuda", torch.float32): 1e-3,  # TF32 matmuls
    ("cpu", torch.bfloat16): 5e-2,
    ("cuda", torch.bfloat16): 5e-2,
}


def logit_tolerance(logits: torch.Tensor) -> float:
    return LOGIT_TOLERANCE[(logits.device.type, logits.dtype)]


def build_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type", family)
    kwargs = {**COMMON, **spec, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    attn = "eager" if model_type == "gemma2" else "sdpa"  # gemma2 soft-caps logits: no sdpa
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    # random init is too tame to tell positions apart; sharpen attention so position errors show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


# `make test-fast` deselects `slow`: tests that read the embedded GGUF (its weights or its tokenizer) or start
# processes. A test using one of these fixtures, directly or through another fixture, is slow by that alone.
SLOW_FIXTURES = {"tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test without the ``slow`` mark that reaches the embedded model fails naming the mark to add, so an
    unmarked model load cannot quietly slow `make test-fast` (covers its fixtures' setup too)."""
    import selfextend.models as models

    original = models.default_model_path
    if item.get_closest_marker("slow") is None:
        def refuse():
            pytest.fail(f"{item.nodeid} reads the embedded model; mark it @pytest.mark.slow", pytrace=False)

        models.default_model_path = refuse
    try:
        yield
    finally:
        models.default_model_path = original


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (49152 tokens): tiny random models share it to read real text."""
    from transformers import AutoTokenizer

    from selfextend.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def save_tiny_llama(path, tokenizer):
    """A tiny random Llama with the embedded tokenizer saved beside it, as a model directory that a
    subprocess or ``load_model`` can read (its tokenizer.json loads fast)."""
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
