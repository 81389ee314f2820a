"""Bad input gets a clear error naming the parameter and the fix."""

import pytest
import torch
from conftest import TRAINED, build_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import selfextend


def test_window_must_be_below_trained_length():
    with pytest.raises(ValueError, match=r"window=64 must be smaller than the trained length 64.*window="):
        selfextend.apply(build_model("llama"), group_size=4, window=TRAINED)


@pytest.mark.parametrize("g", [0, -2])
def test_group_size_below_one(g):
    with pytest.raises(ValueError, match=r"group_size must be >= 1, got .*use group_size >= 2"):
        selfextend.apply(build_model("llama"), group_size=g, window=16)


def test_group_size_type():
    with pytest.raises(TypeError, match="group_size must be an integer"):
        selfextend.apply(build_model("llama"), group_size=2.5, window=16)


def test_target_length_out_of_reach_names_smallest_group_size():
    # reach (64 - 16) * 2 + 16 = 112; 400 tokens need G >= ceil(384 / 48) = 8
    with pytest.raises(ValueError,
                       match=r"target_length=400 exceeds the reach \(64-16\)\*2\+16 = 112.*group_size >= 8"):
        selfextend.apply(build_model("llama"), group_size=2, window=16, target_length=400)


def test_target_length_picks_settings_and_logs(caplog):
    model = build_model("llama")
    with caplog.at_level("WARNING", logger="selfextend"):
        selfextend.apply(model, target_length=400, window=16)
    cfg = selfextend.settings(model)
    assert cfg.max_length >= 400 and 16 + (400 - 16) / cfg.group_size <= 2 / 3 * TRAINED
    assert "target_length=400 -> group_size=" in caplog.text
    assert selfextend.max_length(model) == cfg.max_length


def test_nothing_given():
    with pytest.raises(ValueError, match="pass group_size and window"):
        selfextend.apply(build_model("llama"))


def test_model_without_rope():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2' has no rotary position embedding"):
        selfextend.apply(gpt2, group_size=2, window=16)


def test_model_outside_the_attention_registry():
    class HandWrittenAttentionLlama(LlamaForCausalLM):
        _supports_attention_backend = False

    model = HandWrittenAttentionLlama(build_model("llama").config)
    with pytest.raises(ValueError, match="does not route attention through transformers' attention registry"):
        selfextend.apply(model, group_size=2, window=16)


def test_unsupported_family():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=64, pad_token_id=0)
    with pytest.raises(ValueError,
                       match="model_type 'olmo2' is not supported yet. Supported families: gemma2"):
        selfextend.apply(AutoModelForCausalLM.from_config(cfg), group_size=2, window=16)


def test_unknown_backend():
    with pytest.raises(ValueError,
                       match="Unknown backend 'flash'. Available: auto, composed, reference, cpu"):
        selfextend.apply(build_model("llama"), group_size=2, window=16, backend="flash")


def test_input_longer_than_reach_errors_or_warns_on_opt_in():
    model = build_model("llama")
    selfextend.apply(model, group_size=2, window=16)  # reach 112
    x = torch.randint(3, 100, (1, 130))
    with torch.no_grad():
        with pytest.raises(ValueError,
                           match=r"130 tokens exceed the reach .* = 112 .*group_size >= 3"
                                 r".*allow_overflow=True"):
            model(x)
        model(x[:, :112])  # at the reach: fine
        selfextend.apply(model, group_size=2, window=16, allow_overflow=True)
        with pytest.warns(RuntimeWarning, match="130 tokens exceed the reach"):
            model(x)


def test_attention_set_by_hand_without_apply():
    model = build_model("llama")
    selfextend.apply(model, group_size=2, window=16)
    selfextend.remove(model)
    model.set_attn_implementation("selfextend")
    with pytest.raises(RuntimeError, match="call selfextend.apply"):
        model(torch.randint(3, 100, (1, 40)))


def test_packed_sequences_are_refused():
    model = build_model("llama")
    selfextend.apply(model, group_size=2, window=16)
    pos = torch.cat([torch.arange(30), torch.arange(30)])[None]
    with pytest.raises(ValueError, match="custom mask pattern|position_ids must count"):
        model(torch.randint(3, 100, (1, 60)), position_ids=pos)


def test_window_alone_is_a_clear_error():
    with pytest.raises(ValueError, match="pass group_size and window"):
        selfextend.apply(build_model("llama"), window=16)
