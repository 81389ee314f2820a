"""InfiniteBench ``kv_retrieval``: find the value of one uuid key in a JSON object of uuid -> uuid pairs.

Prompt as InfiniteBench's ``kv_retrieval`` template, except that the final ``"is: "`` loses its trailing space
(a byte-level BPE puts the space in the answer's first token). The asked pair sits at ``depth`` of the
object's pairs. Scored as InfiniteBench does: the value must be one of the answer's words once quotes and
punctuation are turned into spaces (case-insensitive).

Whole pairs (~75 tokens each with per-digit tokenizers) can be more than 1% of a short target, so the object
ends with one shorter pair, a distractor whose key and value are cut uuids, sized to hit the target length.
The JSON stays valid.
"""

from __future__ import annotations

import random

from . import TASKS
from .base import Sample, Task, fit_length
from .ruler import char_depths, check_depth, fit, lazy_list, unit_tokens, uuid4

TEMPLATE = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    "JSON data:\n{context}\n\nKey: \"{key}\"\nThe value associated with the specified key is:"
)
PUNCTUATION = "\n:\"'.,?!{}"


def pair(key: str, value: str) -> str:
    return f'"{key}": "{value}"'


@TASKS.register()
class KvRetrieval(Task):
    name = "kv_retrieval"
    description = "InfiniteBench kv_retrieval: a uuid key's uuid value in a JSON object of uuid pairs"
    max_new_tokens = 44  # ' "<uuid>"' is 34-38 tokens when every hex digit is one token

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        depth = check_depth(depth)
        rng = random.Random(f"{self.name}:{seed}")
        key, value = uuid4(rng), uuid4(rng)
        distractors = lazy_list(lambda i: (uuid4(rng), uuid4(rng)))
        gold = pair(key, value)
        head, tail = TEMPLATE.split("{context}")
        tail = tail.format(key=key)

        def build(n: int, cut: int = 0) -> str:
            pairs = [pair(k, v) for k, v in distractors(n + 1)]
            last = pairs.pop()
            pairs.insert(round(depth * n), gold)
            if cut:  # a shorter last pair: the first `cut` characters of a key, then of its value
                k, v = last.split('": "')
                k, v = k[1:], v[:-1]
                pairs.append(pair(k[:cut], v[: max(cut - len(k), 0)]))
            return head + "{" + ", ".join(pairs) + "}" + tail

        n, _, _ = fit(tokenizer, build, target_length, unit_tokens(tokenizer, ", " + gold))
        _, prompt, n_tokens = fit_length(tokenizer, lambda c: build(n, c), target_length, upper=72)
        span = (len(head), len(prompt) - len(tail))
        meta = {"needle": gold, "context_span": span, "n_pairs": n + 1,
                "needle_depth": char_depths(prompt, span, [gold])[0]}
        return Sample(self.name, prompt, [value], target_length, depth, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        text = prediction.lower()
        for c in PUNCTUATION:
            text = text.replace(c, " ")
        return float(sample.expected[0].lower() in text.split())
