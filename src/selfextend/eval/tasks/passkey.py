"""Passkey retrieval with the Landmark-attention template (Mohtashami & Jaggi 2023), sized in tokens.

The haystack is the repeated garbage sentence; the information line sits at ``depth`` (0 = start, 1 = end)
of the garbage, measured in characters as in the original generator. The amount of garbage is searched so
the prompt has ``target_length`` tokens (within 1%) under the evaluated model's tokenizer. Scored by the
first integer of the answer.
"""

from __future__ import annotations

import random
import re

from . import TASKS
from .base import Sample, Task, fit_length
from .haystack import FILLER

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

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        depth = 0.5 if depth is None else depth
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        passkey = random.Random(seed).randint(10000, 99999)
        _, prompt, n_tokens = fit_length(tokenizer, lambda n: build_prompt(n, depth, passkey), target_length)
        return Sample(self.name, prompt, [str(passkey)], target_length, depth, seed, n_tokens)

    def score(self, prediction: str, sample: Sample) -> float:
        return float(first_integer(prediction) == int(sample.expected[0]))


def make_passkey(tokenizer, target_tokens: int, depth: float, seed: int = 0) -> Sample:
    """One passkey prompt (kept for the CLI demo and the core benchmark)."""
    return Passkey().make(tokenizer, target_tokens, depth, seed)


def score_passkey(answer: str, passkey: int | str) -> float:
    return float(first_integer(answer) == int(passkey))
