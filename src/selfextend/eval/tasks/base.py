"""What every task is: a seeded generator of prompts sized in the evaluated model's tokens, and a scorer.

Generation and scoring are separate (lm-evaluation-harness habit): ``make`` is a pure function of
``(tokenizer, target_length, depth, seed)``, ``score`` a pure function of ``(prediction, sample)``, so
results files can be re-scored and resumed without the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Sample:
    """One prompt and what a correct answer contains."""

    task: str
    prompt: str
    expected: list[str]  # every item must be found in the prediction (scoring is task-specific)
    target_length: int
    depth: float | None  # where the needle sits (0 = start, 1 = end); None for tasks without one
    seed: int
    n_tokens: int  # prompt tokens under the evaluated model's tokenizer
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set ``name``, ``description`` and implement ``make`` and ``score``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "retrieval"  # "retrieval": generate and score; "ppl": perplexity (no generation)
    uses_depth: ClassVar[bool] = True  # False: the depth axis collapses to one cell (depth=None)
    max_new_tokens: ClassVar[int] = 16

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:
        raise NotImplementedError


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the model reads for ``text`` (special tokens included, as in generation)."""
    return len(tokenizer(text).input_ids)


class TemplateTooLong(ValueError):
    """A target length shorter than the task's prompt with nothing in its haystack (``tokens`` long)."""

    def __init__(self, target_length: int, tokens: int) -> None:
        super().__init__(f"target_length={target_length} is shorter than the task template itself "
                         f"({tokens} tokens)")
        self.target_length, self.tokens = target_length, tokens


def fit_length(tokenizer, build: Callable[[int], str], target_length: int,
               upper: int | None = None) -> tuple[int, str, int]:
    """Largest ``n`` with ``len(tokens(build(n))) <= target_length`` by binary search (``build`` must grow
    monotonically with ``n``). Returns ``(n, text, n_tokens)``; raises when even ``build(0)`` is too long.

    Within 1% of the target whenever one step of ``n`` adds less than 1% of the target in tokens.
    """
    base = count_tokens(tokenizer, build(0))
    if base > target_length:
        raise TemplateTooLong(target_length, base)
    lo, hi = 0, upper if upper is not None else max(64, target_length * 8)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, build(mid)) <= target_length:
            lo = mid
        else:
            hi = mid - 1
    text = build(lo)
    return lo, text, count_tokens(tokenizer, text)
