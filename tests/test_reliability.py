"""A user's mistakes and interruptions: clear errors before any model loads, results that cannot be mixed up,
runs that survive Ctrl-C and SIGKILL, and property tests of the position maps and the option parser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import selfextend
from selfextend import cli
from selfextend.eval.report import write_results
from selfextend.eval.results import lock
from selfextend.eval.runner import EvalConfig, parse_method, parse_value, run_eval
from selfextend.positions import (
    dca_relative_positions,
    grouped_key_positions,
    grouped_query_positions,
    max_reach,
)

# --- bad input through the CLI entry point: exit 2, the flag named, no traceback, no model loaded --------

NOT_UTF8 = "not_utf8.txt"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "doc.txt").write_text("A short document about nothing in particular.")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / NOT_UTF8).write_bytes(b"caf\xe9 \xff\xfe")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notamodel").mkdir()
    return tmp_path


CASES = [  # argv (with {d} for the files folder), what the one error line must contain
    (["ask", "q", "--file", "{d}/missing.txt"], "--file"),
    (["ask", "q", "--file", "{d}"], "not a regular file"),
    (["ask", "q", "--file", "{d}/empty.txt"], "is empty"),
    (["ask", "q", "--file", "{d}/" + NOT_UTF8], "not UTF-8"),
    (["ask", "q", "--file", "{d}/doc.txt", "-G", "0"], "-G/--group-size: 0 is below 1"),
    (["ask", "q", "--file", "{d}/doc.txt", "-W", "0"], "-W/--window: 0 is below 1"),
    (["ask", "q", "--file", "{d}/doc.txt", "-G", "two"], "'two' is not a whole number"),
    (["ask", "q", "--file", "{d}/doc.txt", "--no-extend", "-G", "6"], "--no-extend"),
    (["ask", "q", "--file", "{d}/doc.txt", "--target-length", "-5"], "--target-length"),
    (["ask", "q", "--file", "{d}/doc.txt", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["ask", "q", "--file", "{d}/doc.txt", "--threads", "-2"], "--threads"),
    (["ask", "q", "--file", "{d}/doc.txt", "--model", "{d}/nope"], "--model"),
    (["ask", "q", "--file", "{d}/doc.txt", "--model", "{d}/notamodel"], "not a model directory"),
    (["ask", "q", "--file", "{d}/doc.txt", "--model", "{d}/afile"], "not a .gguf model"),
    (["ask", "q", "--file", "{d}/doc.txt", "--model", "someorg/not-cached-model"], "no hub access"),
    (["eval", "passkey", "--out", "{d}/afile/sub"], "is a file"),
    (["eval", "passkey", "--out", "{d}/o", "--samples", "0"], "--samples"),
    (["eval", "passkey", "--out", "{d}/o", "--lengths", "4q"], "--lengths"),
    (["eval", "passkey", "--out", "{d}/o", "--depths", "1.5"], "--depths"),
    (["eval", "passkey", "--out", "{d}/o", "--methods", "self-extend:temperature=ture"], "not a boolean"),
    (["eval", "passkey", "--out", "{d}/o", "--methods", "yarn:factor=nan"], "not a finite number"),
    (["eval", "passkey", "--out", "{d}/o", "--methods", "warp"], "Unknown method 'warp'"),
    (["eval", "passkee", "--out", "{d}/o"], "Unknown task 'passkee'"),
    (["eval", "ppl", "--out", "{d}/o", "--window", "64"], "--mode sliding"),
    (["eval", "ppl", "--out", "{d}/o", "--mode", "sliding", "--window", "64"], "--stride"),
    (["eval", "passkey", "--out", "{d}/o", "--mode", "sliding", "--window", "8", "--stride", "4"],
     "perplexity options"),
    (["eval", "ppl", "--out", "{d}/o", "--corpus", "{d}/missing.txt"], "neither a built-in corpus"),
    (["demo", "--depth", "2"], "--depth"),
    (["demo", "--length", "0"], "--length"),
    (["tune", "--target-length", "16k"], "--target-length"),
    (["tune", "--target-length", "16384", "--budget-minutes", "inf"], "--budget-minutes"),
    (["report", "{d}/nowhere"], "not a directory of results"),
    (["report", "{d}", "--only", "tabel"], "argument --only: 'tabel': parts are table, buckets"),
    (["report", "{d}", "--only", "compare"], "--only compare needs --compare A,B"),
    (["page", "{d}/nowhere.md"], "nowhere.md: no such file"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--method", "yarn", "-G", "4"], "--method"),
    (["serve", "--cache-mb", "-1"], "--cache-mb"),
    (["info", "--target-length", "0"], "--target-length"),
]


@pytest.mark.parametrize(("argv", "needle"), CASES,
                         ids=[" ".join(c[0][:3]) + f" {i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line_before_the_model_loads(argv, needle, files, capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", no_load)
    t = time.perf_counter()
    code = cli.main([a.replace("{d}", str(files)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - t < 10


def test_file_dash_reads_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("text from a pipe"))
    from selfextend.cli_args import text_file

    assert text_file("-").text == "text from a pipe"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(Exception, match="is empty"):
        text_file("-")


def test_every_command_has_help(capsys):
    for command in ("info", "ask", "demo", "methods", "eval", "report", "page", "tune", "serve"):
        assert cli.main([command, "--help"]) == 0
        assert "usage: selfextend " + command in capsys.readouterr().out


# --- apply: strict values, and no silent extreme group sizes ----------------------------------------------


def test_apply_refuses_non_finite_and_non_boolean_values():
    from conftest import build_model

    model = build_model("llama")
    with pytest.raises(ValueError, match="factor must be a finite number"):
        selfextend.apply(model, method="yarn", factor=float("nan"))
    with pytest.raises(ValueError, match="factor must be a finite number"):
        selfextend.apply(model, method="linear", factor=float("inf"))
    with pytest.raises(TypeError, match="allow_overflow must be True or False"):
        selfextend.apply(model, group_size=4, window=16, allow_overflow="yes")
    assert selfextend.active(model) is None


def test_group_size_past_the_published_range_needs_an_opt_in():
    from conftest import build_model

    model = build_model("llama", max_position_embeddings=8192)
    with pytest.raises(ValueError, match=r"group_size=2254, past 64.*allow_large_group_size=True"):
        selfextend.apply(model, target_length=10_000_000)
    with pytest.raises(ValueError, match="you asked for group_size=100"):
        selfextend.apply(model, group_size=100, window=1024)
    assert selfextend.active(model) is None
    selfextend.apply(model, group_size=100, window=1024, allow_large_group_size=True)
    assert selfextend.settings(model).group_size == 100


def test_ask_decides_from_the_prompt_length_not_the_flag(files, capsys):
    """A 9k-token document with --target-length 10 was once read with vanilla attention past L."""
    from conftest import build_model

    model = build_model("llama")  # trained length 64
    doc = str(files / "doc.txt")
    args = cli.build_parser().parse_args(["ask", "q", "--file", doc, "--target-length", "10"])
    with pytest.raises(ValueError, match="--target-length 10 is shorter than this prompt: 90 tokens"):
        cli._ask_extension(model, args, 90)
    args = cli.build_parser().parse_args(["ask", "q", "--file", doc, "--max-new-tokens", "8"])
    cli._ask_extension(model, args, 90)  # 98 tokens past L = 64: extended, never vanilla
    assert selfextend.active(model).name == "self-extend" and selfextend.max_length(model) >= 98
    selfextend.remove(model)
    cli._ask_extension(model, args, 40)  # fits: vanilla, and says so
    assert selfextend.active(model) is None and "fit the trained context" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["ask", "q", "--file", doc, "--no-extend"])
    cli._ask_extension(model, args, 90)
    assert selfextend.active(model) is None and "warning" in capsys.readouterr().err


# --- results that cannot be mixed up, locks, interruptions -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the embedded tokenizer, saved as a model directory a subprocess can load."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


def test_rerun_with_other_settings_is_refused_never_pooled(tiny_dir, tmp_path):
    model, tokenizer = selfextend.load_model(tiny_dir)
    methods = [parse_method("vanilla")]
    base = EvalConfig("passkey", methods, [300], [0.5], 1, 0, {}, str(tiny_dir), "float32")
    run_eval(model, tokenizer, base, tmp_path, progress=False)
    for change, what in ((dict(seed=1), "seed=0"), (dict(dtype="bfloat16"), "dtype='float32'"),
                         (dict(model_name="other-model"), "model=")):
        other = EvalConfig(**{**base.__dict__, **change})
        with pytest.raises(ValueError, match=f"made with .*{what}.*never pooled"):
            run_eval(model, tokenizer, other, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["seed"] == 0
    # the same settings with more cells resume into the same folder
    more = EvalConfig(**{**base.__dict__, "lengths": [300, 400]})
    assert len(run_eval(model, tokenizer, more, tmp_path, progress=False)) == 2


def test_report_counts_missing_cells(tiny_dir, tmp_path):
    model, tokenizer = selfextend.load_model(tiny_dir)
    config = EvalConfig("passkey", [parse_method("vanilla")], [300, 400], [0.3, 0.7], 1, 0, {}, str(tiny_dir))
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    path = tmp_path / "samples_passkey.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:1]) + "\n")  # as if cut after one sample
    from selfextend.eval.report import markdown

    summary = write_results(tmp_path, "passkey")
    assert summary["missing"] == 3 and summary["expected"] == 4
    table = markdown(summary, "passkey")
    assert "(0/1; 1 missing)" in table or "(1/1; 1 missing)" in table
    assert "- (2 missing)" in table and "3 of 4 samples" in table


def _eval_cmd(tiny_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "selfextend.cli", "eval", "passkey", "--model", str(tiny_dir), "--methods",
            "vanilla,self-extend:G=2:W=64", "--lengths", "300,420", "--depths", "3", "--samples", "3",
            "--out", str(out), "--no-plots"]


def _as_from_a_shell() -> None:
    """SIGINT at its default in the child, as an interactive shell starts a command. A non-interactive shell
    starts background commands with SIGINT ignored (CI, ``pytest ... &``: ``signal.getsignal`` is SIG_IGN
    from the test process's start), and an ignored or blocked SIGINT is inherited across exec."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"eval ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no rows appeared")


def results_table(folder: Path) -> dict:
    """The passkey table ``report`` wrote: (correct, n, missing) per method and length."""
    results = json.loads((folder / "results_passkey.json").read_text())["results"]
    return {m: {n: (c["correct"], c["n"], c.get("missing", 0)) for n, c in cells.items()}
            for m, cells in results.items()}


def _keys(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r["method"], r["length"], r["depth"], r["sample"]) for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_eval_resumes_every_cell_exactly_once(tiny_dir, tmp_path, sig):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    reference = tmp_path / "whole"
    done = subprocess.run(_eval_cmd(tiny_dir, reference), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    for attempt in range(3):  # on a loaded machine the tiny eval can finish before the signal: try again
        out = tmp_path / f"cut{attempt}"
        proc = subprocess.Popen(_eval_cmd(tiny_dir, out), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, env=env, preexec_fn=_as_from_a_shell)
        samples = out / "samples_passkey.jsonl"
        _wait_for_rows(samples, 5, proc)
        # a second writer on the same --out is refused while the first runs (an OS lock, across processes)
        with pytest.raises(ValueError, match=f"another eval \\(pid {proc.pid}\\) is writing passkey results"):
            with lock(out, "passkey"):
                pass
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
        if not (code == 0 and _keys(samples) == _keys(reference / "samples_passkey.jsonl")):
            break
    assert code != 0, "the eval finished before every signal of three attempts"
    if sig == signal.SIGINT:
        assert code == 130 and "samples saved to" in err and "re-run the same command" in err
        last = err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
        assert "Traceback" not in err and last.startswith("interrupted: ") and "samples saved to" in last
    report = subprocess.run([sys.executable, "-m", "selfextend.cli", "report", str(out), "--no-plots"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert "missing" in report.stdout  # an interrupted run says what it lacks
    resumed = subprocess.run(_eval_cmd(tiny_dir, out), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _keys(samples) == _keys(reference / "samples_passkey.jsonl")  # every cell exactly once
    assert len(_keys(samples)) == 36

    assert results_table(out) == results_table(reference)


# --- property tests ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(trained=st.integers(8, 4096), window=st.integers(1, 4095), group=st.integers(1, 64),
       data=st.data())
def test_grouped_positions_stay_inside_the_trained_length_up_to_the_reach(trained, window, group, data):
    window = 1 + window % (trained - 1)  # 1 <= W < L
    reach = max_reach(trained, window, group)
    i = data.draw(st.integers(0, reach - 1))
    assert int(grouped_query_positions(torch.tensor(i), group, window)) < trained
    j = data.draw(st.integers(0, i))
    neighbor = i - j < window
    distance = i - j if neighbor else int(grouped_query_positions(torch.tensor(i), group, window)
                                          - grouped_key_positions(torch.tensor(j), group))
    assert 0 <= distance <= i - j + 1  # grouping never lengthens a distance (by more than the floor's 1)
    assert distance < trained
    if not neighbor:  # continuity at the window: far keys are never closer than the window's edge
        assert distance >= window - group


@settings(max_examples=200, deadline=None)
@given(chunk=st.integers(2, 512), local=st.integers(1, 511), n=st.integers(1, 300), data=st.data())
def test_dca_distances_never_exceed_the_chunk_size(chunk, local, n, data):
    local = 1 + local % (chunk - 1)  # 1 <= w < cs
    pos = torch.arange(n)
    table = dca_relative_positions(pos, pos, chunk, local).tril()
    assert int(table.max()) <= chunk and int(table.min()) >= 0
    cl = chunk - local
    i = data.draw(st.integers(0, n - 1))
    same_chunk = pos[: i + 1] // cl == i // cl
    assert torch.equal(table[i, : i + 1][same_chunk], (i - pos[: i + 1])[same_chunk])  # exact within a chunk


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=8))
def test_option_parser_accepts_exactly_the_boolean_vocabulary(text):
    vocabulary = {"true", "false", "1", "0", "yes", "no", "on", "off"}
    if text.lower() in vocabulary:
        assert parse_value(bool, text) is (text.lower() in {"true", "1", "yes", "on"})
    else:
        with pytest.raises(ValueError, match="not a boolean"):
            parse_value(bool, text)


@settings(max_examples=300, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_option_parser_takes_finite_numbers_only(value):
    text = repr(value)
    if value != value or value in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            parse_value(float, text)
    else:
        assert parse_value(float, text) == value
    spec = parse_method(f"yarn:factor={2.5}")
    assert spec.params == {"factor": 2.5}


def test_two_shards_one_killed_and_rerun_report_like_one_run(tiny_dir, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    whole = tmp_path / "whole"
    done = subprocess.run(_eval_cmd(tiny_dir, whole), capture_output=True, env=env, timeout=600)
    assert done.returncode == 0
    out = tmp_path / "sharded"
    first = subprocess.run(_eval_cmd(tiny_dir, out) + ["--shard", "1/2"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "missing" in first.stdout  # the merged table so far: shard 2 has not run
    second = subprocess.Popen(_eval_cmd(tiny_dir, out) + ["--shard", "2/2"], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True, env=env)
    _wait_for_rows(out / "samples_passkey.shard-2-of-2.jsonl", 3, second)
    second.kill()
    second.wait(timeout=60)
    rerun = subprocess.run(_eval_cmd(tiny_dir, out) + ["--shard", "2/2"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    one, two = (_keys(out / f"samples_passkey.shard-{k}-of-2.jsonl") for k in (1, 2))
    assert one and two and not set(one) & set(two)  # disjoint, both non-empty
    assert sorted(one + two) == _keys(whole / "samples_passkey.jsonl")  # every cell exactly once
    report = subprocess.run([sys.executable, "-m", "selfextend.cli", "report", str(out), "--no-plots"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0 and "missing" not in report.stdout, report.stdout

    assert results_table(out) == results_table(whole)
    other_seed = subprocess.run(_eval_cmd(tiny_dir, out) + ["--shard", "1/2", "--seed", "5"],
                                capture_output=True, text=True, env=env, timeout=600)
    assert other_seed.returncode == 2 and "seed=0" in other_seed.stderr


def test_a_sharded_rerun_skips_samples_another_file_holds(tiny_dir, tmp_path):
    """Samples finished by an unsharded run are done for a later ``--shard`` run too (and the other way):
    re-running them into the shard's file would count a cell twice, with whichever file is read last
    winning."""
    model, tokenizer = selfextend.load_model(tiny_dir)

    def config(shard=None):
        return EvalConfig("passkey", [parse_method("vanilla")], [300], [0.1, 0.5, 0.9], 2, 0, {},
                          str(tiny_dir), shard=shard)

    run_eval(model, tokenizer, config(), tmp_path, progress=False)
    whole = _keys(tmp_path / "samples_passkey.jsonl")
    for k in (1, 2):
        run_eval(model, tokenizer, config((k, 2)), tmp_path, progress=False)
        shard = tmp_path / f"samples_passkey.shard-{k}-of-2.jsonl"
        assert not shard.exists() or not shard.read_text().strip()  # nothing re-run
    summary = write_results(tmp_path, "passkey")
    assert summary["missing"] == 0 and summary["results"]["vanilla"]["300"]["n"] == len(whole) == 6


def test_missing_samples_are_counted_sample_by_sample(tiny_dir, tmp_path):
    """A second run that adds depths to a finished cell and stops before its first sample: its samples are
    missing even though the cell already holds as many rows as the second run asked for."""
    from selfextend.eval.runner import record_run

    model, tokenizer = selfextend.load_model(tiny_dir)
    first = EvalConfig("passkey", [parse_method("vanilla")], [300], [0.1, 0.5], 1, 0, {}, str(tiny_dir))
    run_eval(model, tokenizer, first, tmp_path, progress=False)
    assert write_results(tmp_path, "passkey")["missing"] == 0
    second = EvalConfig("passkey", [parse_method("vanilla")], [300], [0.3, 0.7], 1, 0, {}, str(tiny_dir))
    record_run(tmp_path, second)  # what run_eval does before its first sample
    summary = write_results(tmp_path, "passkey")
    assert summary["missing"] == 2 and summary["expected"] == 4
    assert summary["results"]["vanilla"]["300"]["missing"] == 2
