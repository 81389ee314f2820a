"""The methods API: every method applies, derives its parameters, validates them, and ``remove`` restores."""

import math

import pytest
import torch
from conftest import TRAINED, build_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache
from selfextend.integrations.hf.model_info import rotary_embedding
from selfextend.methods import METHODS, truncate_ids
from selfextend.positions import log_scale_factor, temperature_factor

N = 150


def ids(n=N, seed=1):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def current_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The frequencies the model rotates with now."""
    return rotary_embedding(model)[1].inv_freq


@torch.no_grad()
def logits(model, x):
    return model(x).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_remove_restores(method):
    model = build_model("llama")
    x = ids()
    vanilla = logits(model, x)
    selfextend.apply(model, method=method, target_length=N)
    out = logits(model, x)
    assert selfextend.active(model).name == method
    # truncate acts on prompts in selfextend's own helpers, not in forward
    if method in ("vanilla", "truncate"):
        assert torch.equal(out, vanilla)
    else:
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, vanilla)  # past the trained length every extension changes the logits
    selfextend.remove(model)
    assert selfextend.active(model) is None
    assert torch.equal(logits(model, x), vanilla)


def test_switching_methods_removes_the_previous_one():
    model = build_model("llama")
    x = ids()
    vanilla = logits(model, x)
    selfextend.apply(model, group_size=3, window=16)
    selfextend.apply(model, method="yarn", target_length=N)
    yarn = logits(model, x)
    assert model.config._attn_implementation == "sdpa"  # SelfExtend's attention is gone
    fresh = build_model("llama")
    selfextend.apply(fresh, method="yarn", target_length=N)
    assert torch.equal(yarn, logits(fresh, x))
    selfextend.apply(model, method="vanilla")
    assert torch.equal(logits(model, x), vanilla)


def _reference_inv_freq(model, rope_parameters, max_positions):
    import copy

    config = copy.deepcopy(model.config)
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None)


def test_rope_methods_use_transformers_formulas():
    model = build_model("llama")
    theta = model.config.rope_parameters["rope_theta"]
    dim = model.config.hidden_size // model.config.num_attention_heads
    base = current_inv_freq(model).clone()

    selfextend.apply(model, method="linear", factor=2.5)
    assert torch.allclose(current_inv_freq(model), base / 2.5)

    selfextend.apply(model, method="ntk", factor=4.0)
    ntk_theta = theta * 4.0 ** (dim / (dim - 2))
    assert torch.allclose(current_inv_freq(model), 1.0 / ntk_theta ** (torch.arange(0, dim, 2).float() / dim))

    selfextend.apply(model, method="yarn", factor=4.0)
    expected, attention_factor = _reference_inv_freq(
        model, {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0,
                "original_max_position_embeddings": TRAINED},
        4 * TRAINED)
    rotary = selfextend.integrations.hf.model_info.rotary_embedding(model)[1]
    assert torch.allclose(current_inv_freq(model), expected)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert attention_factor == pytest.approx(rotary.attention_scaling)

    selfextend.remove(model)
    assert torch.equal(current_inv_freq(model), base)


def test_dynamic_ntk_is_vanilla_within_the_trained_length():
    model = build_model("llama")
    x = ids(TRAINED)
    vanilla = logits(model, x)
    selfextend.apply(model, method="dynamic-ntk", factor=4.0)
    assert torch.equal(logits(model, x), vanilla)


def test_derived_parameters_follow_target_length():
    model = build_model("llama")
    selfextend.apply(model, method="linear", target_length=4 * TRAINED)
    assert selfextend.active(model).params["factor"] == 4.0
    assert selfextend.max_length(model) == 4 * TRAINED
    selfextend.apply(model, method="self-extend", target_length=4 * TRAINED)
    assert selfextend.max_length(model) >= 4 * TRAINED
    selfextend.apply(model, method="truncate")
    assert selfextend.active(model).params["keep"] == TRAINED - TRAINED // 8


def test_truncate_keeps_the_head_and_the_tail_or_the_last_tokens():
    model = build_model("llama")
    x = ids(100)
    mask = torch.ones_like(x)
    selfextend.apply(model, method="truncate", keep=40)  # LongBench: drop the middle
    cut, cut_mask = truncate_ids(model, x, mask)
    assert torch.equal(cut, torch.cat([x[:, :20], x[:, -20:]], 1)) and cut_mask.shape == (1, 40)
    selfextend.apply(model, method="truncate", keep=41, drop="start")  # the old behaviour, on request
    cut, cut_mask = truncate_ids(model, x, mask)
    assert torch.equal(cut, x[:, -41:]) and cut_mask.shape == (1, 41)
    with pytest.raises(ValueError, match="drop='end' is not one of middle, start"):
        selfextend.apply(model, method="truncate", drop="end")
    selfextend.remove(model)
    assert truncate_ids(model, x)[0] is x


def test_middle_truncation_keeps_the_instruction_and_the_question(tokenizer):
    from selfextend.eval.tasks.passkey import QUESTION, TASK, make_passkey

    sample = make_passkey(tokenizer, 3000, 0.5, seed=1)
    model = build_model("llama", max_position_embeddings=1024)
    selfextend.apply(model, method="truncate")
    full = tokenizer(sample.prompt, return_tensors="pt").input_ids
    kept = tokenizer.decode(truncate_ids(model, full)[0][0])
    assert kept.startswith(TASK[:40]) and kept.rstrip().endswith(QUESTION)
    selfextend.apply(model, method="truncate", drop="start")
    assert TASK[:40] not in tokenizer.decode(truncate_ids(model, full)[0][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "Unknown method 'nope'. Available: "),
        (dict(method="linear"), "needs factor"),
        (dict(method="linear", factor=0.5), "factor must be >= 1.0"),
        (dict(method="yarn", factor="2"), "factor must be a number"),
        (dict(method="linear", factor=2.0, target_length=10 * TRAINED), "set factor >= 10.000"),
        (dict(method="yarn", foo=1), "has no parameter 'foo'"),
        (dict(method="yarn", group_size=4), "group_size/window are SelfExtend parameters"),
        (dict(method="truncate", keep=10 * TRAINED), "exceeds the trained length"),
        (dict(method="self-extend", group_size=2, window=16, target_length=10_000), "exceeds the reach"),
        (dict(method="self-extend", group_size=4, window=16, temperature="yes"),
         "temperature must be True or False"),
        (dict(method="self-extend", group_size=4, window=16, grouped_scale=0),
         "grouped_scale must be > 0, got 0; 1 is the paper's SelfExtend"),
        (dict(method="self-extend", group_size=4, window=16, grouped_scale=float("nan")),
         "grouped_scale must be a finite number"),
        (dict(method="self-extend", group_size=4, window=16, scale_base=1), "scale_base=1 divides by ln 1"),
        (dict(method="self-extend", group_size=4, window=16, scale_base=-64), "scale_base must be >= 0"),
        (dict(method="self-extend", group_size=4, window=16, scale_base=64.5),
         "scale_base must be an integer"),
    ],
)
def test_bad_parameters_are_refused_and_leave_the_model_alone(kwargs, message):
    model = build_model("llama")
    x = ids()
    vanilla = logits(model, x)
    with pytest.raises((ValueError, TypeError), match=message):
        selfextend.apply(model, **kwargs)
    assert selfextend.active(model) is None
    assert torch.equal(logits(model, x), vanilla)


def test_rope_methods_refuse_an_already_scaled_model():
    model = build_model("llama3")
    with pytest.raises(ValueError, match="already uses rope_type='llama3'"):
        selfextend.apply(model, method="yarn", factor=2.0)
    assert selfextend.active(model) is None


def test_tuned_settings_are_reused(tmp_path, monkeypatch):
    from selfextend.tuned import save_tuned

    monkeypatch.setenv("SELFEXTEND_TUNED", str(tmp_path / "tuned.json"))
    model = build_model("llama")
    save_tuned(model.config, 4 * TRAINED, {"group_size": 5, "window": 8}, {"score": 1.0})
    selfextend.apply(model, target_length=N)
    assert (selfextend.settings(model).group_size, selfextend.settings(model).window) == (5, 8)
    selfextend.apply(model, target_length=10 * TRAINED)  # longer than anything tuned: the authors' rule
    assert selfextend.settings(model).window != 8 or selfextend.settings(model).group_size != 5


def test_self_extend_temperature_acts_past_the_trained_length_only():
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=4, window=16)
    cold = logits(model, x)
    selfextend.apply(model, group_size=4, window=16, temperature=True)
    assert selfextend.settings(model).temperature
    warm = logits(model, x)
    assert torch.equal(warm[:, :TRAINED], cold[:, :TRAINED]) and (warm - cold).abs().max() > 1e-3
    cache = output_cache(model(x[:, :-9], use_cache=True))  # prefill, then decode: the same as one pass
    steps = [model(x[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
             for t in range(N - 9, N)]
    assert (torch.cat(steps, 1) - warm[:, -9:]).abs().max() < 1e-4


def test_self_extend_log_scale_acts_past_its_base_and_is_the_softmax_scale_times_the_factor():
    """The authors' code's ``scale_base``: query rows x max(1, ln(pos + 1) / ln(base)); 1 within L when the
    base is L; decode equals one pass; on one layer, the last row's logits are the softmax scale x factor."""
    model = build_model("llama")
    x = ids()
    selfextend.apply(model, group_size=4, window=16)
    plain = logits(model, x)
    selfextend.apply(model, group_size=4, window=16, scale_base=TRAINED)
    assert selfextend.settings(model).scale_base == TRAINED
    scaled = logits(model, x)
    assert torch.equal(scaled[:, :TRAINED], plain[:, :TRAINED]) and (scaled - plain).abs().max() > 1e-3
    cache = output_cache(model(x[:, :-9], use_cache=True))
    steps = [model(x[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
             for t in range(N - 9, N)]
    assert (torch.cat(steps, 1) - scaled[:, -9:]).abs().max() < 1e-4

    one = build_model("llama", num_hidden_layers=1)
    selfextend.apply(one, group_size=4, window=16, scale_base=TRAINED)
    want = logits(one, x)[:, -1]
    f = float(log_scale_factor(torch.tensor([N - 1]), TRAINED))
    assert abs(f - math.log(N) / math.log(TRAINED)) < 1e-6 and f > 1
    selfextend.apply(one, group_size=4, window=16)
    for m in (m for m in one.modules() if hasattr(m, "selfextend_layer")):
        m.scaling *= f
    assert (logits(one, x)[:, -1] - want).abs().max() < 1e-4


@pytest.mark.parametrize("group_size", [4, 1])
def test_log_scale_below_the_window_does_not_depend_on_later_tokens(group_size):
    """A base below the window (or G = 1) scales rows that the all-neighbor (vanilla) shortcut would leave
    alone: a row's output must not depend on how many tokens follow it, and decode equals one pass."""
    model = build_model("llama")
    selfextend.apply(model, group_size=group_size, window=48, scale_base=8, allow_overflow=True)
    x = ids(60)
    full = logits(model, x)
    assert (logits(model, x[:, :40]) - full[:, :40]).abs().max() < 1e-4  # 40 tokens: all within W
    cache = output_cache(model(x[:, :30], use_cache=True))
    steps = [model(x[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
             for t in range(30, 60)]
    assert (torch.cat(steps, 1) - full[:, 30:]).abs().max() < 1e-4
    selfextend.apply(model, group_size=group_size, window=48, allow_overflow=True)
    assert (logits(model, x)[:, 20:] - full[:, 20:]).abs().max() > 1e-3  # the scaling did act


def test_self_extend_temperature_is_the_softmax_scale_times_t_squared():
    model = build_model("llama", num_hidden_layers=1)  # one layer: the keys do not depend on the temperature
    x = ids()
    selfextend.apply(model, group_size=4, window=16, temperature=True)
    warm = logits(model, x)[:, -1]
    t = float(temperature_factor(torch.tensor([N - 1]), TRAINED))
    assert t > 1
    selfextend.apply(model, group_size=4, window=16)
    attn = [m for m in model.modules() if hasattr(m, "selfextend_layer")]
    for m in attn:
        m.scaling *= t * t  # the last query's logits, by hand
    assert (logits(model, x)[:, -1] - warm).abs().max() < 1e-4
    for m in attn:
        m.scaling /= t * t
    assert (logits(model, x)[:, -1] - warm).abs().max() > 1e-3


def test_vanilla_warns_past_the_trained_length_and_remove_drops_the_warning():
    """The API says when an input passes what the active method is for, vanilla included (its reach is the
    trained length), as the CLI and the server do; the logits are vanilla's either way."""
    import warnings

    model = build_model("llama")
    x = torch.randint(3, 100, (1, TRAINED + 1), generator=torch.Generator().manual_seed(0))
    plain = model(x).logits
    selfextend.apply(model, method="vanilla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x[:, :TRAINED])  # within the trained length: silent
    with pytest.warns(RuntimeWarning, match=f"{TRAINED + 1} tokens exceed the trained length {TRAINED}"):
        assert torch.equal(model(x).logits, plain)
    selfextend.remove(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
