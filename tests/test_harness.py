"""The evaluation harness end to end on a tiny random model with the real tokenizer: every task runs, writes
JSONL, a results file and plots; resuming gives the uninterrupted summary; bad input gets clear errors."""

import json
import logging
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from selfextend.eval import report as report_mod
from selfextend.eval.results import SampleWriter
from selfextend.eval.runner import EvalConfig, parse_depths, parse_length, parse_method, run_eval
from selfextend.eval.tasks import TASKS
from selfextend.methods import METHODS

TRAINED = 1024
LENGTHS = [1200, 2400]


@pytest.fixture(scope="module")
def model(tokenizer):
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=TRAINED, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def all_methods():
    return [parse_method(m) for m in METHODS]


def comparable(summary):
    """The summary without timings (which differ between runs)."""
    out = json.loads(json.dumps(summary["results"]))
    for method in out.values():
        for cell in method.values():
            cell.pop("seconds", None)
    return out




@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_end_to_end(task, model, tokenizer, tmp_path):
    config = EvalConfig(task, all_methods(), LENGTHS, [0.5], 1, 0,
                        {"bucket": 256} if TASKS[task].kind == "ppl" else {})
    rows = run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert len(rows) == len(METHODS) * len(LENGTHS)
    result = report_mod.write_results(tmp_path, task)
    assert set(result["results"]) == set(METHODS)
    assert (tmp_path / f"results_{task}.json").exists()
    paths = report_mod.plot(tmp_path, task, result)
    assert paths and all(p.stat().st_size > 1000 for p in paths)
    for row in rows:
        assert row["prompt_tokens"] == pytest.approx(row["length"], rel=0.01)
        if row["method"] == "truncate" and "kept_tokens" in row:
            assert row["kept_tokens"] <= TRAINED
        if "score" in row:
            assert 0.0 <= row["score"] <= 1.0 and {"prediction", "expected", "seconds", "params"} <= set(row)
    table = report_mod.markdown(result, task)
    assert all(m in table for m in METHODS)
    if TASKS[task].kind == "ppl":
        buckets = report_mod.markdown_buckets(result, LENGTHS[-1])
        assert "| vanilla (single-pass) |" in buckets and "| truncate (sliding) |" in buckets
        assert buckets.splitlines()[0].count("|") == LENGTHS[-1] // 256 + 1 + 3  # 256-token buckets + "all"


def test_resume_after_interruption_gives_the_same_summary(model, tokenizer, tmp_path, monkeypatch):
    methods = [parse_method("vanilla"), parse_method("self-extend:G=4:W=64"), parse_method("truncate")]
    config = EvalConfig("passkey", methods, LENGTHS, [0.1, 0.9], 1, 3)
    run_eval(model, tokenizer, config, tmp_path / "full", progress=False)
    full = report_mod.write_results(tmp_path / "full", "passkey")

    original = SampleWriter.write
    calls = {"n": 0}

    def crash_after_five(self, row):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        original(self, row)

    monkeypatch.setattr(SampleWriter, "write", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, tokenizer, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(SampleWriter, "write", original)
    assert len((tmp_path / "cut" / "samples_passkey.jsonl").read_text().splitlines()) == 5
    rows = run_eval(model, tokenizer, config, tmp_path / "cut", progress=False)
    assert len(rows) == 12  # 5 kept + 7 new, none repeated
    resumed = report_mod.write_results(tmp_path / "cut", "passkey")
    assert comparable(resumed) == comparable(full)


def test_corrupt_line_is_skipped_reported_and_rerun(model, tokenizer, tmp_path, caplog):
    config = EvalConfig("passkey", [parse_method("vanilla")], LENGTHS[:1], [0.2, 0.8], 1, 0)
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    path = tmp_path / "samples_passkey.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"task": "passkey", "meth' + "\n")  # second row lost mid-write
    with caplog.at_level(logging.WARNING, logger="selfextend"):
        rows = run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert "skipped 1 corrupt line" in caplog.text and "removed 1 corrupt line" in caplog.text
    assert len(rows) == 2
    # repaired once by the run that re-ran it: no warning forever after
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfextend"):
        assert report_mod.write_results(tmp_path, "passkey")["corrupt_lines"] == []
    assert "corrupt" not in caplog.text


def test_report_rerenders_from_jsonl(model, tokenizer, tmp_path, capsys):
    from selfextend.cli import main

    config = EvalConfig("passkey", [parse_method("vanilla"), parse_method("yarn")], LENGTHS, [0.5], 1, 0)
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "| yarn |" in out
    assert (tmp_path / "heatmap_passkey.png").exists()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: parse_method("rope-magic"), "Unknown method 'rope-magic'. Available: "),
        (lambda: parse_method("self-extend:gruop_size=4"), "has no parameter 'gruop_size'"),
        (lambda: parse_method("yarn:factor=big"), "is not a number"),
        (lambda: parse_method("yarn:factor=nan"), "is not a finite number"),
        (lambda: parse_method("self-extend:temperature=ture"), "is not a boolean; use true/false"),
        (lambda: parse_length("16q"), "bad length"),
        (lambda: parse_depths("1.5"), "bad depths"),
    ],
)
def test_bad_specs(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_task_length_beyond_reach_and_missing_corpus(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'passkee'. Available: .*passkey"):
        TASKS.get("passkee")
    beyond = EvalConfig("passkey", [parse_method("self-extend:G=2:W=64")], [5000], [0.5])
    with pytest.raises(ValueError, match="exceeds the reach"):
        run_eval(model, tokenizer, beyond, tmp_path, progress=False)
    linear = EvalConfig("passkey", [parse_method("linear:factor=2")], [5000], [0.5])
    with pytest.raises(ValueError, match="set factor >= "):
        run_eval(model, tokenizer, linear, tmp_path, progress=False)
    missing = EvalConfig("ppl", [parse_method("vanilla")], [600], None, 1, 0,
                         {"corpus": str(tmp_path / "nope.txt")})
    with pytest.raises(ValueError, match="neither a built-in corpus"):
        run_eval(model, tokenizer, missing, tmp_path, progress=False)
    assert not (tmp_path / "samples_passkey.jsonl").exists()  # refused before any sample ran


def test_cli_errors_are_clear(capsys):
    from selfextend.cli import main

    assert main(["eval", "passkey", "--methods", "warp-drive", "--out", "/tmp/x-never"]) == 2
    assert "Unknown method 'warp-drive'. Available: " in capsys.readouterr().err
    assert main(["eval", "nosuchtask", "--out", "/tmp/x-never"]) == 2
    assert "Unknown task" in capsys.readouterr().err


def test_ppl_modes_agree_where_they_must(model, tokenizer):
    from selfextend.eval.tasks.ppl import document_ids, sliding_nll, token_nll

    ids = document_ids(tokenizer, "pydoc", 400, 0)
    full = token_nll(model, ids)
    assert torch.allclose(sliding_nll(model, ids, 400, 200), full, atol=1e-5)  # one window = single pass
    slid = sliding_nll(model, ids, 200, 100)
    assert torch.allclose(slid[:199], full[:199], atol=1e-5)  # the first window is the same pass
    assert not torch.isnan(slid).any()


def test_tune_ranks_saves_the_winner_and_resumes(model, tokenizer, tmp_path, monkeypatch):
    import io

    import selfextend
    from selfextend.eval.tune import candidates, tune

    monkeypatch.setenv("SELFEXTEND_TUNED", str(tmp_path / "tuned.json"))
    target, out = 2 * TRAINED, tmp_path / "sweep"
    stream = io.StringIO()
    ranked = tune(model, tokenizer, target, budget_minutes=60, max_candidates=3, depths="0.5", out=out,
                  progress=False, stream=stream, model_name="tiny-llama", dtype="float32")
    assert len(ranked) == 3
    assert {(r["group_size"], r["window"]) for r in ranked} == set(candidates(target, TRAINED)[:3])
    assert all(r["reach"] >= target and r["n"] == 1 for r in ranked)
    keys = [(-r["passkey"], r["tail_ppl"]) for r in ranked]
    assert keys == sorted(keys)
    saved = json.loads((out / "results_tune.json").read_text())
    assert saved["ranked"] == json.loads(json.dumps(ranked)) and saved["target_length"] == target
    assert (out / "tune.md").read_text() in stream.getvalue()
    selfextend.apply(model, target_length=target)  # the saved winner, not the authors' rule
    settings = selfextend.settings(model)
    assert (settings.group_size, settings.window) == (ranked[0]["group_size"], ranked[0]["window"])
    selfextend.remove(model)

    n_rows = len((out / "samples_passkey.jsonl").read_text().splitlines())
    again = tune(model, tokenizer, target, budget_minutes=60, max_candidates=3, depths="0.5", out=out,
                 progress=False, stream=io.StringIO(), model_name="tiny-llama", dtype="float32")
    assert again == ranked  # resumed: nothing re-run, same ranking
    assert len((out / "samples_passkey.jsonl").read_text().splitlines()) == n_rows
    rows = [json.loads(line) for line in (out / "samples_passkey.jsonl").read_text().splitlines()]
    assert {(r["model"], r["dtype"]) for r in rows} == {("tiny-llama", "float32")}
    # another model's sweep into the same directory would rank the first model's rows as its own: refused
    with pytest.raises(ValueError, match="model='tiny-llama'"):
        tune(model, tokenizer, target, budget_minutes=60, max_candidates=3, depths="0.5", out=out,
             progress=False, stream=io.StringIO(), model_name="other-model", dtype="float32")


def test_tune_budget_and_bad_input(model, tokenizer, tmp_path):
    import io

    from selfextend.eval.tune import tune

    ranked = tune(model, tokenizer, 2 * TRAINED, budget_minutes=0, depths="0.5", out=tmp_path, save=False,
                  progress=False, stream=io.StringIO())
    assert len(ranked) == 1  # a spent budget still measures the first candidate, then stops
    with pytest.raises(ValueError, match="fits the trained length"):
        tune(model, tokenizer, TRAINED, save=False, progress=False, stream=io.StringIO())
    with pytest.raises(ValueError, match="budget_minutes"):
        tune(model, tokenizer, 2 * TRAINED, budget_minutes=-1, save=False, progress=False,
             stream=io.StringIO())
    with pytest.raises(ValueError, match="max_candidates"):
        tune(model, tokenizer, 2 * TRAINED, max_candidates=0, save=False, progress=False,
             stream=io.StringIO())


# ---- intervals and paired comparisons ---------------------------------------------------------------------


def test_wilson_intervals_known_values():
    from selfextend.eval.report import wilson

    lo, hi = wilson(4, 5)
    assert round(lo, 4) == 0.3755 and round(hi, 4) == 0.9638  # "4/5 spans roughly 0.38-0.96"
    assert [round(v, 4) for v in wilson(5, 5)] == [0.5655, 1.0]
    assert [round(v, 4) for v in wilson(0, 5)] == [0.0, 0.4345]
    lo1, hi1 = wilson(1, 5)
    assert abs(lo1 - (1 - hi)) < 1e-12 and abs(hi1 - (1 - lo)) < 1e-12  # symmetric in successes/failures
    assert wilson(50, 100)[1] - wilson(50, 100)[0] < wilson(5, 10)[1] - wilson(5, 10)[0]  # narrows with n


def test_sign_test_and_paired_comparison():
    from selfextend.eval.report import compare, markdown_compare, sign_test

    assert sign_test(0, 5) == 0.0625 and sign_test(1, 9) == 0.021484375 and sign_test(3, 3) == 1.0
    rows = []
    for i in range(10):  # a right on every sample, b right on the first 2 only; c runs samples 0..4 only
        for method, score in (("a", 1.0), ("b", float(i < 2)), ("c", 1.0)):
            if method == "c" and i >= 5:
                continue
            rows.append({"task": "passkey", "method": method, "length": 4096, "depth": 0.5, "sample": i,
                         "score": score})
    [row] = compare(rows, "a", "b")
    assert (row["pairs"], row["a_only"], row["b_only"]) == (10, 8, 0)
    assert row["p_value"] == sign_test(8, 0) == 2 / 2**8 and row["b_accuracy"] == 0.2
    assert compare(rows, "a", "c")[0]["pairs"] == 5  # only samples both ran
    assert "| 4096 | 10 | 1.00 | 0.20 | 8 | 0 | 0.00781 |" in markdown_compare([row])
    with pytest.raises(ValueError, match="no retrieval rows for method 'd'"):
        compare(rows, "a", "d")


def test_directory_wide_compare_skips_a_task_without_the_pair(tmp_path):
    from selfextend.eval.report import render, report

    for task, methods in (("passkey", ("a", "b")), ("passkey_alt", ("a",))):
        rows = [{"task": task, "method": m, "length": 4096, "depth": 0.5, "sample": i,
                 "score": float(m == "a"), "prompt_tokens": 4000, "seconds": 1.0}
                for m in methods for i in range(3)]
        (tmp_path / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for text in (render(tmp_path, None, ("a", "b"), ["compare"]),
                 report(tmp_path, None, plots=False, pair=("a", "b"), parts=["compare"])):
        assert "| 4096 | 3 | 1.00 | 0.00 | 3 | 0 | 0.25 |" in text
        assert "(passkey_alt: no b rows to compare)" in text
    with pytest.raises(ValueError, match="no retrieval rows for method 'b'"):  # asked for by name: an error
        render(tmp_path, ["passkey_alt"], ("a", "b"), ["compare"])


def test_paired_comparison_partial_credit_and_unpairable_rows():
    from selfextend.eval.report import compare

    def row(method, score, sample, length=4096, depth=0.5, sha=None):
        r = {"task": "niah_multivalue", "method": method, "length": length, "depth": depth, "sample": sample,
             "score": score}
        return r if sha is None else {**r, "prompt_sha": sha}

    # partial credit: a finds every value, b half of them, on all 10 samples: a consistent difference
    [r] = compare([row("a", 1.0, i) for i in range(10)] + [row("b", 0.5, i) for i in range(10)], "a", "b")
    assert (r["a_only"], r["b_only"], r["p_value"]) == (10, 0, 2 / 2**10)
    # nothing in common: a clear error naming both methods' lengths, not an IndexError or a division by zero
    with pytest.raises(ValueError, match=r"share no sample.*\[4096\].*\[8192\]"):
        compare([row("a", 1.0, 0), row("b", 1.0, 0, length=8192)], "a", "b")
    with pytest.raises(ValueError, match="share no sample"):
        compare([row("a", 1.0, 0, depth=0.1), row("b", 1.0, 0, depth=0.9)], "a", "b")
    # the same key made from different prompts (another task version) is not a pair
    with pytest.raises(ValueError, match="different prompts for 1 sample"):
        compare([row("a", 1.0, 0, sha="x1"), row("b", 0.0, 0, sha="x2")], "a", "b")
    old_row = row("b", 0.0, 0)  # made before rows carried a prompt hash: paired on its key alone
    assert compare([row("a", 1.0, 0, sha="x1"), old_row], "a", "b")[0]["a_only"] == 1


def test_tables_carry_intervals():
    from selfextend.eval.report import bootstrap_ppl, markdown, summarize

    rows = [{"task": "passkey", "method": "m", "length": 4096, "depth": d, "sample": 0,
             "score": float(d < 0.8), "prompt_tokens": 4000, "seconds": 1.0}
            for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    summary = summarize(rows)
    cell = summary["results"]["m"]["4096"]
    assert [round(v, 2) for v in cell["ci95"]] == [0.38, 0.96] and cell["n_by_depth"] == {"0.1": 1, "0.3": 1,
                                                                                          "0.5": 1, "0.7": 1,
                                                                                          "0.9": 1}
    assert "0.80 (4/5) [0.38-0.96]" in markdown(summary, "passkey")
    lo, hi = bootstrap_ppl([2.0, 2.1, 2.3, 2.2, 2.05])
    assert lo < torch.tensor([2.0, 2.1, 2.3, 2.2, 2.05]).mean().exp().item() < hi
    assert bootstrap_ppl([2.0, 2.1, 2.3]) == bootstrap_ppl([2.0, 2.1, 2.3])  # seeded


def test_perplexity_interval_weights_buckets_by_their_tokens():
    """A document of 8193 tokens in 2048-token buckets ends with a one-token bucket: the interval must
    resample the token-weighted mean the point estimate is, not let one token weigh as much as 2048."""
    import math

    from selfextend.eval.report import bucket_sizes, summarize
    from selfextend.eval.tasks.ppl import bucket_means

    assert bucket_sizes(8193, 2048) == [2047, 2048, 2048, 2048, 1]
    nll = torch.rand(8192, dtype=torch.float64)  # the counts bucket_means averages over, for any length
    positions = torch.arange(1, 8193)
    assert [int(((positions // 2048) == b).sum()) for b in range(len(bucket_means(nll, 2048)))] == \
        bucket_sizes(8193, 2048)
    rows = []
    for i in range(10):
        buckets = [2.0, 2.0, 2.0, 2.0, 8.0]  # the single last token is hard
        mean = sum(b * n for b, n in zip(buckets, bucket_sizes(8193, 2048), strict=True)) / 8192
        rows.append({"task": "ppl", "method": "m", "length": 8193, "depth": None, "sample": i,
                     "mode": "single-pass", "window": None, "bucket": 2048, "bucket_nll": buckets,
                     "nll": mean, "prompt_tokens": 8193, "seconds": 1.0})
    cell = summarize(rows)["results"]["m"]["8193"]
    lo, hi = cell["ppl_ci95"]
    assert lo <= cell["ppl"] <= hi and hi < math.exp(2.01)  # about e^2; unweighted it was [13.5-50.4]


def test_perplexity_against_the_sliding_baseline_past_its_window():
    """Ratios of known per-bucket values: past the baseline's window only, paired, worst bucket named."""
    import math

    from selfextend.eval.report import markdown_vs_sliding, summarize, vs_sliding

    def row(method, mode, window, ppls):
        nll = [math.log(p) for p in ppls]
        return {"task": "ppl", "method": method, "length": 8192, "depth": None, "sample": 0, "mode": mode,
                "window": window, "bucket": 1024, "bucket_nll": nll, "nll": sum(nll) / len(nll),
                "seconds": 1.0}

    base = [10.0] * 8
    rows = [row("truncate", "sliding", 3000, base),  # window 3000: buckets from 3072 (index 3) on count
            row("a", "single-pass", None, [99.0] * 3 + [11.0, 12.0, 10.0, 10.0, 11.0]),
            row("b", "single-pass", None, [10.0] * 3 + [20.0] * 5)]
    table = {r["method"]: r for r in vs_sliding(summarize(rows), 8192)}
    a = table["a"]
    assert a["from_token"] == 3072 and a["buckets"] == 5 and a["baseline"] == "truncate"
    assert math.isclose(a["ratio"], (1.1 * 1.2 * 1.0 * 1.0 * 1.1) ** (1 / 5))  # buckets 0-2 (99) ignored
    assert a["ci95"][0] <= a["ratio"] <= a["ci95"][1] and a["worst_bucket"] == 4096
    assert all(math.isclose(v, 2.0) for v in (table["b"]["ratio"], *table["b"]["ci95"]))
    text = markdown_vs_sliding(list(table.values()))
    assert "| b | 20.00 | 10.00 | 2.000x [2.000-2.000] | 3k (2.00x) |" in text
    assert vs_sliding(summarize(rows[1:]), 8192) == []  # no sliding row: nothing to compare against
    # a method scored on a second document the baseline never read is not divided by the baseline
    rows.append({**row("b", "single-pass", None, [30.0] * 8), "sample": 1})
    [b] = [r for r in vs_sliding(summarize(rows), 8192) if r["method"] == "b"]
    assert b["unpaired"] and (b["documents"], b["baseline_documents"]) == ([0, 1], [0])
    assert "| b | - | - | not paired: documents [0, 1], the baseline's [0]" in markdown_vs_sliding([b])


def test_rows_carry_hashes_of_their_prompt_and_settings(model, tokenizer, tmp_path):
    config = EvalConfig("passkey", [parse_method("vanilla"), parse_method("self-extend:G=2:W=64")], [1200],
                        [0.5], 1, 0)
    rows = run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert rows[0]["prompt_sha"] == rows[1]["prompt_sha"]  # the same prompt for every method
    assert rows[0]["settings_sha"] != rows[1]["settings_sha"] and len(rows[0]["settings_sha"]) == 16


def test_a_label_that_resolves_differently_now_is_refused_not_pooled(model, tokenizer, tmp_path):
    """``self-extend`` resolves per length (the rule, or tuned settings saved later): rows made with other
    resolved parameters are never pooled with new ones under the same label."""
    config = EvalConfig("passkey", [parse_method("self-extend")], [2400], [0.5], 1, 0)
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    path = tmp_path / "samples_passkey.jsonl"
    [row] = [json.loads(line) for line in path.read_text().splitlines()]
    row["params"]["group_size"] += 1  # as if the rule (or a tuned file) had picked another G for that run
    path.write_text(json.dumps(row) + "\n")
    more = EvalConfig("passkey", [parse_method("self-extend")], [2400], [0.5, 0.9], 1, 0)
    g = row["params"]["group_size"]
    with pytest.raises(ValueError, match=f"group_size={g}; this run resolves group_size={g - 1}.*"
                                         f"self-extend:group_size={g}"):
        run_eval(model, tokenizer, more, tmp_path, progress=False)
    assert path.read_text() == json.dumps(row) + "\n"  # nothing added
    other = EvalConfig("passkey", [parse_method("self-extend")], [1200], [0.5], 1, 0)  # another cell: fine
    assert len(run_eval(model, tokenizer, other, tmp_path, progress=False)) == 2


def test_sample_writer_follows_a_replaced_file(tmp_path):
    """A results file replaced under a running eval (git checkout / stash of the results directory) still
    receives every later row, each on its own line."""
    path = tmp_path / "samples_passkey.jsonl"
    writer = SampleWriter(path)
    writer.write({"sample": 0})
    replacement = tmp_path / "checkout.tmp"
    replacement.write_text('{"sample": -1}')  # what the checkout restores, without a final newline
    os.replace(replacement, path)
    writer.write({"sample": 1})
    writer.close()
    assert [json.loads(line)["sample"] for line in path.read_text().splitlines()] == [-1, 1]


def test_a_finished_cell_that_resolves_differently_now_is_noted_beside_its_table(model, tokenizer, tmp_path):
    """Re-running a finished eval after ``tune`` saved other settings: the rows stay (they are valid for what
    made them) and the table says which settings made them and which the label gives now."""
    config = EvalConfig("passkey", [parse_method("self-extend")], [2400], [0.5], 1, 0)
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    path = tmp_path / "samples_passkey.jsonl"
    [row] = [json.loads(line) for line in path.read_text().splitlines()]
    g = row["params"]["group_size"]
    row["params"]["group_size"] = g + 1  # as if the rows had been made before `tune` saved G
    path.write_text(json.dumps(row) + "\n")
    run_eval(model, tokenizer, config, tmp_path, progress=False)  # finished: nothing to add, no error
    assert path.read_text() == json.dumps(row) + "\n"
    table = report_mod.markdown(report_mod.write_results(tmp_path, "passkey"), "passkey")
    assert (f"Note: self-extend at 2400 tokens: the rows were made with group_size={g + 1}; it resolves to "
            f"group_size={g} now") in table
    row["params"]["group_size"] = g  # the settings agree again: the next run drops the note
    path.write_text(json.dumps(row) + "\n")
    run_eval(model, tokenizer, config, tmp_path, progress=False)
    assert "Note:" not in report_mod.markdown(report_mod.write_results(tmp_path, "passkey"), "passkey")


def test_results_json_describes_every_cell_of_the_folder(model, tokenizer, tmp_path):
    """Two runs into one --out with other lengths and depths: the results JSON's grid is both runs' cells,
    and each run's own settings stay listed."""
    first = EvalConfig("passkey", [parse_method("vanilla")], [1200], [0.5], 1, 0)
    second = EvalConfig("passkey", [parse_method("vanilla")], [2400], [0.25], 1, 0)
    for config in (first, second):
        run_eval(model, tokenizer, config, tmp_path, progress=False)
        result = report_mod.write_results(tmp_path, "passkey", config={
            "lengths": config.lengths, "depths": config.depths, "methods": ["vanilla"]})
    assert result["config"]["lengths"] == [1200, 2400] and result["config"]["depths"] == [0.25, 0.5]
    assert [run["lengths"] for run in result["runs"]] == [[1200], [2400]]
    assert set(result["results"]["vanilla"]) == {"1200", "2400"}
