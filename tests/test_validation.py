"""Issue 29, items 2-4: one validation for every way in (``apply``, the CLI's method specs, tuned-settings
files, vLLM's ``hf_overrides``), the eval grid's flags checked before a model loads, and balanced shards."""

from __future__ import annotations

import json
import random
import time
import warnings

import pytest
import torch
from conftest import TRAINED, build_model, save_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import selfextend
from selfextend import cli
from selfextend.eval.runner import EvalConfig, parse_method, plan, run_eval, shard_owners
from selfextend.methods import METHODS

NAN, INF = float("nan"), float("inf")


# --- one type and range per parameter, checked where the value enters -------------------------------------


@pytest.mark.parametrize(("params", "message"), [
    ({"attention_factor": NAN}, "attention_factor must be a finite number, got nan"),
    ({"attention_factor": INF}, "attention_factor must be a finite number, got inf"),
    ({"attention_factor": -1.0}, "attention_factor must be > 0, got -1.0"),
    ({"attention_factor": 0.0}, "attention_factor must be > 0, got 0.0"),
    ({"beta_fast": NAN}, "beta_fast must be a finite number, got nan"),
    ({"beta_slow": NAN}, "beta_slow must be a finite number, got nan"),
    ({"beta_fast": -2.0}, "beta_fast must be > 0, got -2.0"),
    ({"beta_slow": -1.0}, "beta_slow must be > 0, got -1.0"),
    ({"beta_slow": 0}, "beta_slow must be > 0, got 0"),
    ({"beta_fast": "x"}, "beta_fast must be a number, got 'x'"),
    ({"beta_fast": 2.0, "beta_slow": 4.0}, r"beta_fast=2.0 is below beta_slow=4.0"),
    ({"beta_slow": 40.0}, r"beta_fast=32 \(the default\) is below beta_slow=40.0"),
])
def test_yarn_values_are_refused_naming_the_parameter(params, message):
    """Before: NaN/inf attention factors gave NaN logits, -1 the logits of +1, 0 all-equal logits; NaN or
    negative betas ended in 'cannot convert float NaN to integer' / 'math domain error'."""
    model = build_model("llama")
    with pytest.raises((TypeError, ValueError), match=message):
        selfextend.apply(model, method="yarn", factor=2.0, **params)
    assert selfextend.active(model) is None  # refused before the model was touched


@pytest.mark.parametrize(("method", "params", "message"), [
    ("yarn", {"target_length": NAN}, "target_length must be an integer, got nan"),
    ("yarn", {"target_length": "300"}, "target_length must be an integer"),
    ("linear", {"target_length": 0}, "target_length must be >= 1"),
    ("yarn", {"trained_length": "64"}, "trained_length must be an integer"),
    ("linear", {"trained_length": 2.5, "factor": 2.0}, "trained_length must be an integer"),
    ("self-extend", {"group_size": 4, "window": 16, "grouped_scale": NAN}, "grouped_scale must be a finite"),
    ("self-extend", {"group_size": 4, "window": 16, "scale_base": -1}, "scale_base must be >= 0"),
    ("self-extend", {"group_size": 4, "window": 16, "backend": 3}, "backend must be a str"),
    ("dca", {"chunk_size": NAN}, "chunk_size must be an integer"),
    ("dca", {"local_window": 0}, "local_window must be >= 1"),
    ("dca", {"chunk_size": 40, "local_window": 40}, "local_window=40 must be smaller than chunk_size=40"),
    ("truncate", {"keep": 0}, "keep must be >= 1"),
    ("truncate", {"headroom": -1}, "headroom must be >= 0"),
    ("truncate", {"drop": "end"}, "drop='end' is not one of middle, start"),
])
def test_every_method_checks_its_parameters_in_apply(method, params, message):
    model = build_model("llama")
    with pytest.raises((TypeError, ValueError), match=message):
        selfextend.apply(model, method=method, **params)
    assert selfextend.active(model) is None


def _bad_values(param):
    if param.type is bool:
        return ["yes", 1]
    if param.type is int:
        return [NAN, 2.5, "4", True]
    if param.type is float:
        return [NAN, INF, -INF, "x"]
    return [3]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_parameter_has_a_type_and_a_range(name):
    """The shared check refuses what no method can use (non-finite, wrong type, below the range), naming the
    parameter, for every parameter of every method."""
    method = METHODS[name]
    for param in method.params:
        for value in _bad_values(param):
            with pytest.raises((TypeError, ValueError), match=param.name):
                method.check_params({param.name: value})
        if param.type in (int, float) and param.minimum is not None:
            below = param.minimum if param.strict else param.minimum - 1
            with pytest.raises(ValueError, match=f"{param.name} must be >"):
                method.check_params({param.name: below})


def test_method_specs_are_checked_with_the_same_ranges():
    with pytest.raises(ValueError, match="attention_factor must be > 0"):
        parse_method("yarn:attention_factor=-1")
    with pytest.raises(ValueError, match="beta_fast=1.0 is below beta_slow=4.0"):
        parse_method("yarn:beta_fast=1:beta_slow=4")
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        parse_method("self-extend:G=0:W=16")
    assert parse_method("yarn:attention_factor=1.2:beta_fast=16:beta_slow=2").params == {
        "attention_factor": 1.2, "beta_fast": 16.0, "beta_slow": 2.0}


def test_vllm_overrides_parser_uses_the_same_validation():
    """``hf_overrides`` settings go through ``Method.check_params``: bad types and ranges name the
    parameter, no vLLM needed."""
    from selfextend.integrations.vllm.settings import resolve

    def config(**settings):
        cfg = build_model("llama").config
        cfg.selfextend = settings
        return cfg

    with pytest.raises(TypeError, match="group_size must be an integer, got nan"):
        resolve(config(group_size=NAN, window=16))
    with pytest.raises(TypeError, match="window must be an integer, got '16'"):
        resolve(config(group_size=4, window="16"))
    with pytest.raises(ValueError, match="grouped_scale must be > 0"):
        resolve(config(group_size=4, window=16, grouped_scale=0))
    with pytest.raises(TypeError, match="target_length must be an integer, got nan"):
        resolve(config(target_length=NAN))
    assert resolve(config(group_size=4, window=16)).config.group_size == 4


# --- a forward past a RoPE scaling's reach warns ----------------------------------------------------------


def _reach_warnings(model, n_tokens: int) -> list[str]:
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randint(3, 100, (1, n_tokens)))
    return [str(w.message) for w in caught if "exceed the reach" in str(w.message)]


def test_rope_scaling_forward_past_the_reach_warns():
    """Before: yarn at target_length=300 read 500 tokens silently."""
    model = build_model("llama")
    selfextend.apply(model, method="yarn", target_length=300)
    assert selfextend.max_length(model) == 300
    assert _reach_warnings(model, 300) == []  # within the reach: nothing
    (message,) = _reach_warnings(model, 500)
    assert "500 tokens exceed the reach 300 of yarn" in message and "target_length >= 500" in message
    selfextend.apply(model, method="linear", factor=2.0)  # reach 128
    assert "exceed the reach 128 of linear" in _reach_warnings(model, 130)[0]
    selfextend.apply(model, method="dynamic-ntk", factor=2.0)  # no reach: it rescales itself
    assert _reach_warnings(model, 300) == []
    selfextend.apply(model, method="yarn", target_length=300)
    selfextend.remove(model)
    assert _reach_warnings(model, 500) == []  # removed: the hook went with the rebuilt rotary module


# --- tuned-settings files, validated as a whole ------------------------------------------------------------


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setenv("SELFEXTEND_TUNED", str(path))
    return path


def _key(model):
    from selfextend.tuned import model_key

    return model_key(model.config)


@pytest.mark.parametrize(("content", "message"), [
    ("[]", "holds a JSON list, not an object"),
    ('"x"', "holds a JSON str"),
    ('{"k": 1}', r"entry \['k'\] is 1, not an object of target lengths"),
    ("{KEY: {\"abc\": {\"group_size\": 4, \"window\": 16}}}", r"\['abc'\] is not keyed by a target length"),
    ("{KEY: {\"300\": [4, 16]}}", r"\['300'\] is \[4, 16\], not an object"),
    ("{KEY: {\"300\": {\"window\": 16}}}", r"\['300'\] has no 'group_size'"),
    ("{KEY: {\"300\": {\"group_size\": \"x\", \"window\": 16}}}",
     r"\['300'\]: group_size must be an integer, got 'x'"),
    ("{KEY: {\"300\": {\"group_size\": 4, \"window\": 0}}}", r"\['300'\]: window must be >= 1"),
])
def test_a_bad_tuned_file_names_itself_and_the_field(tuned_file, content, message):
    """Before: ``[]`` ended in "'list' object has no attribute 'get'", a string group size in "invalid
    literal for int()" naming neither the file nor the field."""
    model = build_model("llama")
    tuned_file.write_text(content.replace("KEY", json.dumps(_key(model))))
    with pytest.raises(ValueError, match=message) as err:
        selfextend.apply(model, target_length=300, window=16)
    assert str(tuned_file) in str(err.value)
    assert selfextend.active(model) is None


def test_tuned_settings_out_of_range_for_the_model_name_the_file(tuned_file):
    model = build_model("llama")
    tuned_file.write_text(json.dumps({_key(model): {"300": {"group_size": 4, "window": TRAINED}}}))
    with pytest.raises(ValueError, match=f"tuned settings .* in {tuned_file}.*window={TRAINED} must be"):
        selfextend.apply(model, target_length=300)
    tuned_file.write_text(json.dumps({_key(model): {"300": {"group_size": 8, "window": 16}}}))
    selfextend.apply(model, target_length=300)  # a good file is used as before
    assert (selfextend.settings(model).group_size, selfextend.settings(model).window) == (8, 16)


# --- the CLI: refused before any model loads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the embedded tokenizer saved beside it (its tokenizer.json loads fast)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture
def no_load(monkeypatch):
    def refuse(args, tokenizer=None):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", refuse)


CLI_CASES = [  # argv after `eval passkey --out OUT --model TINY`, what the one error line must contain
    (["--methods", "yarn:attention_factor=-1"], "attention_factor must be > 0"),
    (["--methods", "yarn:attention_factor=nan"], "not a finite number"),
    (["--methods", "yarn:beta_fast=1:beta_slow=4"], "beta_fast=1.0 is below beta_slow=4.0"),
    (["--methods", "dca:chunk_size=10:local_window=20"], "local_window=20 must be smaller"),
    (["--methods", "truncate:drop=end"], "drop='end' is not one of middle, start"),
    (["--lengths", "256,50"], "--lengths 50: shorter than the passkey prompt template itself"),
    (["--depths", "abc"], "'abc' is not a number; use a comma list of fractions in [0, 1]"),
    (["--depths", "0.5,x"], "'x' is not a number"),
    (["--depths", "0"], "a lone whole number is a count of depths"),
    (["--depths", "0.2,1.5"], "1.5 is outside [0, 1]"),
    (["--depths", "nan"], "nan is outside [0, 1]"),
]


@pytest.mark.parametrize(("argv", "needle"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_eval_flags_refused_before_the_model_loads(argv, needle, tiny_dir, tmp_path, capsys, no_load):
    t = time.perf_counter()
    code = cli.main(["eval", "passkey", "--out", str(tmp_path / "o"), "--model", str(tiny_dir)] + argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "samples_passkey.jsonl").exists()
    assert time.perf_counter() - t < 10


def test_depths_help_says_a_lone_integer_is_a_count(capsys):
    assert cli.main(["eval", "--help"]) == 0
    assert "lone whole number" in " ".join(capsys.readouterr().out.split())


def test_lengths_below_the_template_refused_before_any_sample(tiny_dir, tmp_path):
    """Before: every 256-token sample ran, then the 50-token one failed naming target_length."""
    model, tokenizer = selfextend.load_model(tiny_dir)
    config = EvalConfig("passkey", [parse_method("vanilla")], [256, 50, 20], [0.5])
    with pytest.raises(ValueError, match=r"--lengths 50,20: shorter than the passkey prompt template itself "
                                         r"\((\d+) tokens"):
        run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert not (tmp_path / "samples_passkey.jsonl").exists()


def test_duplicated_methods_lengths_depths_run_once_with_a_warning(tiny_dir, tmp_path, caplog):
    """Before: a repeated method, length or depth was computed again (4 rows for one key)."""
    with caplog.at_level("WARNING", logger="selfextend"):
        config = EvalConfig("passkey", [parse_method("vanilla"), parse_method("vanilla")], [300, 300],
                            [0.5, 0.5000000001])
    assert [m.label for m in config.methods] == ["vanilla"] and config.lengths == [300]
    assert config.depths == [0.5] and len(plan(config)) == 1
    for what in ("--methods lists the label vanilla", "--lengths lists the length 300",
                 "--depths lists the depth 0.5"):
        assert what in caplog.text
    model, tokenizer = selfextend.load_model(tiny_dir)
    assert len(run_eval(model, tokenizer, config, tmp_path, progress=False)) == 1


def _write_rows(folder, methods, task="passkey"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"task": task, "method": m, "length": 300, "depth": 0.5, "sample": 0, "score": 1.0,
             "prompt_tokens": 300, "seconds": 0.1} for m in methods]
    (folder / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_with_unknown_labels_lists_the_labels_and_fails(tmp_path, capsys):
    """Before: exit 0 with '(passkey: no foo or bar rows to compare)'."""
    _write_rows(tmp_path, ["vanilla", "self-extend"])
    assert cli.main(["report", str(tmp_path), "--no-plots", "--compare", "foo,bar"]) == 2
    err = capsys.readouterr().err
    assert "--compare foo,bar" in err and "passkey: vanilla, self-extend" in err
    assert cli.main(["report", str(tmp_path), "--no-plots", "--compare", "vanilla,self-extend"]) == 0


def test_info_says_when_a_group_size_is_past_what_apply_accepts(monkeypatch, capsys):
    """Before: ``info --target-length 10000000`` recommended G=2254 that ``apply`` refuses, without a word."""
    monkeypatch.setattr(cli, "_load", lambda args, tokenizer=None: (
        build_model("llama", max_position_embeddings=8192), None))
    assert cli.main(["info", "--target-length", "10000000", "--target-length", "32768"]) == 0
    lines = capsys.readouterr().out.splitlines()
    big = next(line for line in lines if "target 10000000" in line)
    assert "group_size=2254" in big and "allow_large_group_size=True" in big
    assert "allow_large_group_size" not in next(line for line in lines if "target   32768" in line)


# --- shards: balanced, an empty one is not a failure, report lists what is missing -------------------------


@settings(max_examples=100, deadline=None)
@given(cells=st.integers(0, 60), n=st.integers(1, 9), seed=st.integers(0, 1000))
def test_shards_are_balanced_disjoint_and_order_free(cells, n, seed):
    keys = [("passkey", f"m{i % 3}", 100 * (1 + i % 4), round(i / 64, 4), i // 12) for i in range(cells)]
    owners = shard_owners(keys, n)
    shuffled = list(keys)
    random.Random(seed).shuffle(shuffled)
    assert shard_owners(shuffled, n) == owners  # the flags' order does not move a cell
    sizes = [sum(1 for k in keys if owners[k] == shard) for shard in range(1, n + 1)]
    assert sum(sizes) == cells and all(size in (cells // n, -(-cells // n)) for size in sizes)


def test_two_cells_over_two_shards_give_one_each():
    """Before (a hash of the cell): ``--lengths 1k --depths 2 --shard 1/2`` gave shard 1 nothing."""
    def config(k):
        return EvalConfig("passkey", [parse_method("vanilla")], [1024], [0.05, 0.95], shard=(k, 2))

    one, two = plan(config(1)), plan(config(2))
    assert len(one) == len(two) == 1 and one != two


def test_an_empty_shard_exits_0_and_report_lists_what_is_missing(tiny_dir, tmp_path, capsys, monkeypatch):
    """Before: the shard without cells exited 2 with "no results for task 'passkey'"; so did report."""
    out = str(tmp_path / "out")
    argv = ["eval", "passkey", "--model", str(tiny_dir), "--methods", "vanilla", "--lengths", "300",
            "--depths", "0.5", "--out", out, "--no-plots"]
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda args, tokenizer=None: pytest.fail("an empty shard loaded"))
    assert cli.main(argv + ["--shard", "2/2"]) == 0  # 1 cell over 2 shards: shard 1 has it
    assert "shard 2/2: nothing to do" in capsys.readouterr().err
    assert cli.main(["report", out, "--no-plots"]) == 0
    table = capsys.readouterr().out
    assert "| vanilla | - (1 missing) |" in table and "1 of 1 samples" in table
    monkeypatch.setattr(cli, "_load", real_load)
    assert cli.main(argv + ["--shard", "1/2"]) == 0
    capsys.readouterr()
    assert cli.main(["report", out, "--no-plots"]) == 0
    assert "missing" not in capsys.readouterr().out


def test_report_on_a_run_without_rows_yet(tiny_dir, tmp_path, capsys):
    from selfextend.eval.runner import record_run

    config = EvalConfig("passkey", [parse_method("vanilla")], [300, 400], [0.5], model_name=str(tiny_dir))
    record_run(tmp_path, config)  # what an eval does before its first sample
    assert cli.main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("- (1 missing)") == 2 and "2 of 2 samples" in table
    assert not list(tmp_path.glob("*.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--no-plots"]) == 2
    assert "no eval has written there yet" in capsys.readouterr().err
