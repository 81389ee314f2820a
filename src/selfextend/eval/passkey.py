"""Passkey retrieval with the Landmark-attention template (Mohtashami & Jaggi 2023), sized in tokens.

The haystack is the repeated garbage sentence; the information line sits at ``depth`` (0 = start, 1 = end)
of the garbage, measured in characters as in the original generator. ``n_garbage`` is searched so the
prompt has ``target_tokens`` tokens (within 1%) under the evaluated model's tokenizer. Scored by the first
integer of the answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: str
    passkey: int
    depth: float
    n_tokens: int
    seed: int


def _build(n_garbage: int, depth: float, passkey: int) -> str:
    reps = n_garbage // len(GARBAGE) + 2
    garbage_inf = " ".join([GARBAGE] * reps)
    n_prefix = int(round(depth * n_garbage))
    prefix, suffix = garbage_inf[:n_prefix], garbage_inf[: n_garbage - n_prefix]
    info = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return "\n".join([TASK, prefix, info, suffix, QUESTION])


def make_passkey(tokenizer, target_tokens: int, depth: float, seed: int = 0) -> PasskeySample:
    """One prompt of about ``target_tokens`` tokens (within 1%) with the key at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = random.Random(seed).randint(10000, 99999)

    def count(n: int) -> int:
        return len(tokenizer(_build(n, depth, passkey)).input_ids)

    lo, hi = 0, max(64, target_tokens * 8)
    if count(0) > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is shorter than the template itself ({count(0)} tokens)")
    while lo < hi:  # largest n_garbage with count <= target
        mid = (lo + hi + 1) // 2
        if count(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    prompt = _build(lo, depth, passkey)
    return PasskeySample(prompt, passkey, depth, count(lo), seed)


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score_passkey(answer: str, passkey: int) -> float:
    return float(first_integer(answer) == passkey)
