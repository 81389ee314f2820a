"""lm-evaluation-harness integration: ``selfextend lm-eval`` answers what ``selfextend eval`` answers,
vanilla answers what lm-eval's own ``hf`` model answers, loglikelihoods equal the model's forward, and a bad
``--model_args`` is one error before any model loads. A tiny random Llama (L = 256) with the embedded
tokenizer reads 600-token passkey prompts, past its trained length, so the method matters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

import selfextend
from selfextend.cli import main
from selfextend.eval.runner import EvalConfig, parse_method, run_eval
from selfextend.integrations.lm_eval import SelfExtendLM
from selfextend.integrations.lm_eval.tasks import docs, read_yaml, write_tasks
from selfextend.methods import METHODS
from selfextend.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "lm_eval_tasks"
LENGTH, DEPTHS = 600, [0.2, 0.8]
TASK = f"selfextend_passkey_{LENGTH}"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tasks")
    assert write_tasks(folder, tokenizer, ["passkey"], [LENGTH], DEPTHS) == [TASK]
    return folder


def lm_eval_run(out: Path, model: str, model_args: str, include: Path, task: str, *extra: str) -> tuple:
    """``selfextend lm-eval`` in this process: (results JSON, samples by depth)."""
    code = main(["lm-eval", "--model", model, "--model_args", model_args, "--include_path", str(include),
                 "--tasks", task, "--limit", "2", "--output_path", str(out), "--log_samples", *extra])
    assert code == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    return results, {s["doc"]["depth"]: s for s in samples}


def our_run(model_dir, out: Path, spec: str, length: int = LENGTH) -> dict:
    """``selfextend eval passkey`` on the same cells: rows by depth."""
    model, tok = load_model(model_dir)
    config = EvalConfig("passkey", [parse_method(spec)], [length], DEPTHS, model_name=str(model_dir))
    return {r["depth"]: r for r in run_eval(model, tok, config, out, progress=False)}


def test_self_extend_answers_what_selfextend_eval_answers(tiny, tasks, tmp_path):
    results, lm = lm_eval_run(tmp_path / "lm", "selfextend", f"pretrained={tiny},method=self-extend,"
                              f"target_length={LENGTH}", tasks, TASK)
    ours = our_run(tiny, tmp_path / "ours", "self-extend")
    assert sorted(lm) == DEPTHS
    for depth, sample in lm.items():
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert hashlib.sha256(prompt.encode()).hexdigest()[:16] == ours[depth]["prompt_sha"]  # same prompt
        assert sample["resps"][0][0] == ours[depth]["prediction"]  # same greedy tokens
        assert sample["score"] == ours[depth]["score"]
    info = results["config"]["selfextend"]
    assert info["method"] == "self-extend" and info["params"]["group_size"] == ours[DEPTHS[0]]["params"][
        "group_size"]
    assert info["past_reach"] == info["cut"] == 0


def test_vanilla_answers_what_lm_eval_hf_answers(tiny, tasks, tmp_path):
    """Vanilla reads the whole prompt past L (and says so); lm-eval's ``hf`` does when told a longer
    max_length, else it would cut the prompt from the left."""
    results, ours = lm_eval_run(tmp_path / "ours", "selfextend", f"pretrained={tiny},method=vanilla", tasks,
                                TASK)
    _, hf = lm_eval_run(tmp_path / "hf", "hf", f"pretrained={tiny},max_length=4096,dtype=float32", tasks,
                        TASK, "--device", "cpu")
    assert [s["resps"] for s in ours.values()] == [s["resps"] for s in hf.values()]
    assert results["config"]["selfextend"]["past_reach"] == 2  # 600 tokens > L = 256: read whole, counted


def test_loglikelihood_equals_the_model_forward(tiny, tokenizer):
    from lm_eval.api.instance import Instance

    docs_ = docs(tokenizer, "passkey", 500, [0.5], 1, 0)
    context, continuation = docs_[0]["prompt"], " " + docs_[0]["expected"][0]
    lm = SelfExtendLM(pretrained=str(tiny), method="self-extend", target_length=1024)
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)],
                                  disable_tqdm=True)
    model, tok = load_model(tiny)
    selfextend.apply(model, method="self-extend", target_length=1024)
    n_context = len(tok(context).input_ids)
    ids = tok(context + continuation, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
    want = sum(float(logp[i - 1, ids[0, i]]) for i in range(n_context, ids.shape[1]))
    assert got == pytest.approx(want, abs=1e-4)
    selfextend.remove(model)
    with torch.no_grad():
        vanilla = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
    assert (vanilla - logp).abs().max() > 1e-3  # the method is active: past L the positions differ


def test_loglikelihood_past_the_reach_refuses_or_reads_whole(tiny, tokenizer):
    from lm_eval.api.instance import Instance

    doc = docs(tokenizer, "passkey", LENGTH, [0.5], 1, 0)[0]
    request = Instance("loglikelihood", {}, (doc["prompt"], " " + doc["expected"][0]), 0)
    lm = SelfExtendLM(pretrained=str(tiny), method="self-extend", group_size=2, window=32)  # reach 480
    assert lm.max_length == 480
    with pytest.raises(ValueError, match="target_length"):
        lm.loglikelihood([request], disable_tqdm=True)
    lm = SelfExtendLM(pretrained=str(tiny), method="self-extend", group_size=2, window=32, overflow="warn")
    with pytest.warns(RuntimeWarning):
        lm.loglikelihood([request], disable_tqdm=True)
    assert lm.past_reach == 1 and lm.cut == 0


@pytest.mark.parametrize("model_args, names", [
    ("method=nope", "method='nope'"),
    ("method=self-extend,group_size=0", "group_size"),
    ("method=self-extend,target_length=200", "target_length"),  # reach 256, below the task's 600 + 12
    ("method=yarn,window=4", "window"),
    ("method=self-extend,overflow=maybe", "overflow"),
])
def test_bad_model_args_are_one_error_before_any_model_loads(model_args, names, tiny, tasks, capsys,
                                                              monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr("selfextend.models.load_model", no_load)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
    code = main(["lm-eval", "--model", "selfextend", "--model_args", f"pretrained={tiny},{model_args}",
                 "--include_path", str(tasks), "--tasks", TASK, "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], err


def test_shipped_tasks_are_what_the_generator_writes(tokenizer):
    """The committed JSONL are ``selfextend eval``'s prompts for those cells, with this tokenizer."""
    for path in sorted(SHIPPED.glob("*.yaml")):
        meta = read_yaml(path)["metadata"]
        rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
        depths = sorted({r["depth"] for r in rows})
        fresh = docs(tokenizer, meta["selfextend_task"], meta["length"], depths, 1, 0)
        assert [r["prompt_sha"] for r in rows] == [r["prompt_sha"] for r in fresh], path.name
        assert meta["max_prompt_tokens"] == max(r["n_tokens"] for r in rows)


@pytest.mark.slow
def test_embedded_model_through_lm_eval_answers_as_selfextend_eval(tmp_path, monkeypatch):
    """The shipped 2k passkey task, ``target_length=16384`` as in the README command, on the embedded model:
    the same answers as ``selfextend eval`` with the settings that target resolves to."""
    monkeypatch.chdir(ROOT)  # the shipped YAMLs name their data relative to the repo root
    _, lm = lm_eval_run(tmp_path / "lm", "selfextend", "method=self-extend,target_length=16384", SHIPPED,
                        "selfextend_passkey_2k")
    model, tok = load_model()
    p = METHODS.get("self-extend").resolve(model.config, 16384, {})
    spec = f"self-extend:group_size={p['group_size']}:window={p['window']}"
    depths = sorted(lm)
    run = EvalConfig("passkey", [parse_method(spec)], [2048], depths,
                     model_name="embedded:SmolLM2-135M-Instruct")
    ours = {r["depth"]: r for r in run_eval(model, tok, run, tmp_path / "ours", progress=False)}
    for depth, sample in lm.items():
        assert sample["resps"][0][0] == ours[depth]["prediction"]
        assert sample["doc"]["prompt_sha"] == ours[depth]["prompt_sha"]
