"""Passkey retrieval with the Landmark-attention template (Mohtashami & Jaggi 2023), sized in tokens.

The haystack is the repeated garbage sentence; the information line sits at ``depth`` (0 = start, 1 = end)
of the garbage, measured in characters as in the original generator. The amount of garbage is searched so
the prompt has ``target_length`` tokens (within 1%) under the evaluated model's tokenizer. Scored by the
first integer of the answer.

Variants, because one repeated sentence is the easiest haystack there is (every far key looks alike) and one
wording can suit a model by chance: ``passkey_essays`` and ``passkey_pydoc`` hide the same line in real prose
(Paul Graham's essays; the pydoc topics), the key after the last sentence end before the depth point, and
``passkey_alt`` / ``passkey_essays_alt`` ask in other words ("secret number" instead of "pass key").
"""

from __future__ import annotations

import random
import re

from . import TASKS
from .base import Sample, Task, fit_length
from .haystack import FILLER, corpus_text

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
QUESTION = "What is the pass key? The pass key is"


def build_prompt(n_garbage: int, depth: float, passkey: int) -> str:
    reps = n_garbage // len(FILLER) + 2
    garbage_inf = " ".join([FILLER] * reps)
    n_prefix = int(round(depth * n_garbage))
    prefix, suffix = garbage_inf[:n_prefix], garbage_inf[: n_garbage - n_prefix]
    info = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return "\n".join([TASK, prefix, info, suffix, QUESTION])


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@TASKS.register()
class Passkey(Task):
    name = "passkey"
    description = "Landmark passkey: a 5-digit key in repeated filler; first integer of the answer"
    max_new_tokens = 12
    corpus: str | None = None  # None: the Landmark filler; else a corpus of haystack.corpus_text
    phrasing: str = "landmark"

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        depth = 0.5 if depth is None else depth
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        passkey = random.Random(seed).randint(10000, 99999)
        if self.corpus is None and self.phrasing == "landmark":
            build = lambda n: build_prompt(n, depth, passkey)  # noqa: E731  (the original generator)
        else:
            text = prose(self.corpus, seed) if self.corpus else None
            build = lambda n: build_variant(n, depth, passkey, text, PHRASINGS[self.phrasing])  # noqa: E731
        _, prompt, n_tokens = fit_length(tokenizer, build, target_length)
        return Sample(self.name, prompt, [str(passkey)], target_length, depth, seed, n_tokens,
                      {"corpus": self.corpus or "filler", "phrasing": self.phrasing})

    def score(self, prediction: str, sample: Sample) -> float:
        return float(first_integer(prediction) == int(sample.expected[0]))


# (instruction, information line, question); {k} is the key
PHRASINGS = {
    "landmark": (TASK, "The pass key is {k}. Remember it. {k} is the pass key.", QUESTION),
    "alt": ("Below is a long document. Somewhere inside it is a secret number. Read everything carefully: "
            "at the end you will be asked for that number.",
            "The secret number is {k}. Keep the number {k} in mind.",
            "Which secret number was hidden in the document? The secret number is"),
}


def prose(corpus: str, seed: int) -> str:
    """A corpus as haystack, starting at a seeded sentence (so seeds differ in text, not only in key)."""
    text = corpus_text(corpus)
    if seed == 0:
        return text
    start = text.find(". ", random.Random(f"passkey:{corpus}:{seed}").randrange(len(text) // 2)) + 2
    return text[start:] + "\n\n" + text[:start]


def build_variant(n_chars: int, depth: float, passkey: int, text: str | None,
                  phrasing: tuple[str, str, str]) -> str:
    """``n_chars`` of haystack (the filler, or ``text`` repeated as needed) with the information line after
    the last sentence or line end before ``depth`` of it (at a sentence start, as NIAH places its needle)."""
    task, info, question = phrasing
    if text is None:
        text = " ".join([FILLER] * (n_chars // len(FILLER) + 2))
    hay = (text * (n_chars // max(1, len(text)) + 1))[:n_chars]
    point = int(depth * len(hay))
    cut = len(hay) if depth >= 1.0 else max(hay.rfind(". ", 0, point) + 1, hay.rfind("\n", 0, point) + 1)
    return "\n".join([task, hay[:cut], info.format(k=passkey), hay[cut:], question])


def _variant(name: str, corpus: str | None, phrasing: str, description: str) -> None:
    TASKS.register()(type(name, (Passkey,), {"name": name, "corpus": corpus, "phrasing": phrasing,
                                            "description": description}))


_variant("passkey_essays", "essays", "landmark", "passkey in Paul Graham's essays (real prose)")
_variant("passkey_pydoc", "pydoc", "landmark", "passkey in the pydoc topics (real technical prose)")
_variant("passkey_alt", None, "alt", "passkey in the filler, other wording (a 'secret number')")
_variant("passkey_essays_alt", "essays", "alt", "passkey in the essays, other wording")


def make_passkey(tokenizer, target_tokens: int, depth: float, seed: int = 0) -> Sample:
    """One ``passkey`` prompt without a ``TASKS`` lookup (the CLI demo and the core benchmark)."""
    return Passkey().make(tokenizer, target_tokens, depth, seed)


def score_passkey(answer: str, passkey: int | str) -> float:
    return float(first_integer(answer) == int(passkey))
