"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER) rebuilt without downloads.

Templates and answer prefixes follow RULER's ``synthetic.yaml`` / ``constants.py``; the prompt is the task
template followed by the answer prefix (RULER's base-model format), so a completion model answers directly.
Differences from RULER, all to run offline and on the depth grid:

* Keys are adjective-noun pairs from the small word lists below (RULER: wonderwords), values 7-digit numbers
  or uuid4 strings drawn from the seed.
* ``niah_multivalue`` / ``niah_multiquery`` use the noise haystack (RULER: Paul Graham essays).
* Single-needle tasks put the needle at ``depth`` (RULER: a random line); multi-needle tasks, ``vt``, ``cwe``
  and ``fwe`` place their items at seeded random positions and have no depth axis.
* ``cwe`` draws pseudo-words (three consonant-vowel syllables) instead of English words.

Scoring is RULER's ``string_match_all``: the fraction of expected items found in the prediction
(case-insensitive substring).
"""

from __future__ import annotations

import bisect
import random
import uuid
from collections.abc import Callable
from typing import TypeVar

from . import TASKS
from .base import Sample, Task, count_tokens, fit_length
from .haystack import FILLER

T = TypeVar("T")


ADJECTIVES = (
    "able", "active", "adorable", "agile", "amber", "ancient", "angry", "aquatic", "arctic", "bashful",
    "bitter", "black", "bold", "brave", "breezy", "bright", "brisk", "busy", "calm", "careful",
    "cheerful", "chilly", "clever", "cloudy", "cosmic", "cozy", "crimson", "curious", "dark", "dazzling",
    "deep", "delicate", "dusty", "eager", "early", "electric", "elegant", "empty", "fancy", "fierce",
    "fluffy", "foggy", "fragile", "frozen", "gentle", "giant", "glossy", "golden", "graceful", "green",
    "grumpy", "hairy", "happy", "hidden", "hollow", "humble", "icy", "jolly", "kind", "lazy",
    "little", "lively", "lonely", "loud", "lucky", "magic", "mellow", "mighty", "misty", "modern",
    "muddy", "narrow", "noisy", "odd", "orange", "patient", "plain", "polite", "proud", "purple",
    "quick", "quiet", "rapid", "rare", "rough", "royal", "rusty", "salty", "scarlet", "shiny",
    "silent", "silver", "sleepy", "smooth", "snowy", "solid", "spicy", "steady", "stormy", "sunny",
    "swift", "tame", "tender", "tidy", "tiny", "valiant", "velvet", "vivid", "warm", "wild",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banjo", "barn", "beacon", "beetle", "bison", "blossom",
    "bottle", "breeze", "bridge", "bucket", "butter", "cabin", "camel", "candle", "canyon", "castle",
    "cedar", "cherry", "clock", "cloud", "comet", "copper", "cottage", "coyote", "crane", "crystal",
    "dagger", "daisy", "desert", "dolphin", "dragon", "drum", "eagle", "ember", "falcon", "feather",
    "fern", "ferret", "flounder", "forest", "fountain", "fox", "garden", "gecko", "glacier", "goose",
    "granite", "harbor", "hammer", "heron", "hill", "island", "jacket", "jaguar", "kettle", "lantern",
    "lemon", "lizard", "lobster", "maple", "marble", "meadow", "mirror", "mountain", "needle", "otter",
    "owl", "panda", "parrot", "pebble", "pepper", "pillow", "pine", "planet", "pumpkin", "quartz",
    "rabbit", "raven", "river", "robin", "rocket", "saddle", "salmon", "shadow", "spider", "squirrel",
    "stone", "tiger", "timber", "tulip", "turtle", "valley", "violin", "walnut", "whale", "willow",
)

CONSONANTS, VOWELS = "bdfghklmnprstvz", "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]

NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = "The special magic {kind} for {query} mentioned in the provided text are"


# ----------------------------------------------------------------------------- shared helpers


def match_all(prediction: str, expected: list[str]) -> float:
    """RULER's string_match_all: fraction of expected items found (case-insensitive substring)."""
    if not expected:
        return 0.0
    text = prediction.lower()
    return sum(item.lower() in text for item in expected) / len(expected)


def unit_tokens(tokenizer, piece: str) -> float:
    """Tokens one more ``piece`` adds, estimated from eight copies (special tokens cancel out)."""
    return max((count_tokens(tokenizer, piece * 8) - count_tokens(tokenizer, "")) / 8, 0.1)


def fit(tokenizer, build: Callable[[int], str], target_length: int, per_unit: float) -> tuple[int, str, int]:
    """``fit_length`` with its upper bound set from an estimate of tokens per unit of ``n``.

    The default bound (8 x target units) makes the first steps tokenize prompts many times too long; a bound
    of 1.5x the estimate keeps every step near the final size. The bound doubles if the answer reaches it.
    """
    upper = int(1.5 * target_length / per_unit) + 16
    for _ in range(12):
        n, text, n_tokens = fit_length(tokenizer, build, target_length, upper)
        if n < upper:
            return n, text, n_tokens
        upper *= 2
    raise ValueError(f"could not fit {target_length} tokens: the haystack stops growing")


def lazy_list(make_item: Callable[[int], T]) -> Callable[[int], list[T]]:
    """The first ``n`` items of a deterministic stream, generated once and in order (so item i never depends
    on how far the length search looked)."""
    items: list[T] = []

    def first(n: int) -> list[T]:
        while len(items) < n:
            items.append(make_item(len(items)))
        return items[:n]

    return first


class Lines:
    """A deterministic stream of haystack lines, cut to ``n`` characters (the last line partly).

    The length search runs over characters: a whole line (a uuid needle is ~80 tokens) can be more than 1%
    of a short target, a character never is.
    """

    def __init__(self, make_line: Callable[[int], str]):
        self.make_line = make_line
        self.lines: list[str] = []
        self.ends: list[int] = []  # characters through line i, its newline included

    def cut(self, n: int) -> list[str]:
        while not self.ends or self.ends[-1] < n:
            line = self.make_line(len(self.lines))
            self.lines.append(line)
            self.ends.append((self.ends[-1] if self.ends else 0) + len(line) + 1)
        k = bisect.bisect_right(self.ends, n)
        rem = n - (self.ends[k - 1] if k else 0)
        return self.lines[:k] + ([self.lines[k][:rem]] if rem > 0 else [])

    def tokens_per_char(self, tokenizer) -> float:
        """Estimated from the first eight lines (for the search's upper bound only)."""
        while len(self.lines) < 8:
            self.cut((self.ends[-1] if self.ends else 0) + 1)
        text = "\n".join(self.lines[:8]) + "\n"
        return max((count_tokens(tokenizer, text) - count_tokens(tokenizer, "")) / len(text), 0.01)


def unique_stream(draw: Callable[[], str]) -> Callable[[], str]:
    """Wrap ``draw`` so it never returns the same string twice."""
    seen: set[str] = set()

    def next_item() -> str:
        for _ in range(1000):
            item = draw()
            if item not in seen:
                seen.add(item)
                return item
        raise ValueError("ran out of distinct items; use a shorter target length")

    return next_item


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pseudo_word(rng: random.Random) -> str:
    """Three consonant-vowel syllables: pronounceable, six letters, so no word is a substring of another."""
    return "".join(rng.choice(SYLLABLES) for _ in range(3))


def insert_lines(lines: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert each ``(fraction, text)`` before line ``round(fraction * len(lines))``; items at the same
    position keep their given order."""
    n = len(lines)
    placed = sorted((round(frac * n), i, text) for i, (frac, text) in enumerate(items))
    out, prev = [], 0
    for pos, _, text in placed:
        out.extend(lines[prev:pos])
        out.append(text)
        prev = pos
    out.extend(lines[prev:])
    return out


def char_depths(prompt: str, span: tuple[int, int], needles: list[str]) -> list[float]:
    """Where each needle starts in the context span, as a fraction of the context without that needle."""
    start, end = span
    return [round((prompt.index(x, start) - start) / max(end - start - len(x), 1), 4) for x in needles]


def check_depth(depth: float | None) -> float:
    depth = 0.5 if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return depth


# ----------------------------------------------------------------------------- needle in a haystack


class RulerNiah(Task):
    """RULER NIAH: ``num_keys`` keys with ``num_values`` needles each; the first ``num_queries`` keys are
    asked.

    ``haystack`` is ``noise`` (the repeated grass sentence) or ``needle`` (distractor needles with other
    keys). With one needle it sits at ``depth``; with several, at seeded random positions (no depth axis).
    """

    haystack: str = "noise"
    key_kind: str = "words"  # "words" (adjective-noun) or "uuids"
    value_kind: str = "numbers"  # "numbers" (7 digits) or "uuids"
    num_keys = 1
    num_values = 1
    num_queries = 1
    max_new_tokens = 16  # " 1234567." is 9 tokens when digits are tokens; RULER allows 128

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        depth = check_depth(depth) if self.uses_depth else None
        rng = random.Random(f"{self.name}:{seed}")
        new_key = unique_stream(lambda: uuid4(rng) if self.key_kind == "uuids" else word_key(rng))
        new_value = unique_stream(lambda: uuid4(rng) if self.value_kind == "uuids" else number(rng))
        keys = [new_key() for _ in range(self.num_keys)]
        values = [[new_value() for _ in range(self.num_values)] for _ in keys]
        kind = self.value_kind
        needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v)
                   for k, vs in zip(keys, values, strict=True) for v in vs]
        fracs = [depth] if depth is not None else [rng.random() for _ in needles]
        items = list(zip(fracs, needles, strict=True))

        if self.haystack == "noise":
            lines = Lines(lambda i: FILLER)
        else:  # distractor needles, drawn after the real keys so none repeats them
            lines = Lines(lambda i: NIAH_NEEDLE.format(kind=self.value_kind, key=new_key(),
                                                       value=new_value()))

        queries = keys[: self.num_queries]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        template, answer = NIAH_TEMPLATE, NIAH_ANSWER
        if self.num_queries * self.num_values == 1:  # RULER rewrites single-answer prompts to the singular
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            answer = answer.replace("are", "is")
            kind = kind[:-1]
        head, tail = template.split("{context}")
        head = head.format(kind=kind)
        tail = tail.format(kind=kind, query=query) + " " + answer.format(kind=kind, query=query)

        def build(n: int) -> str:
            return head + "\n".join(insert_lines(lines.cut(n), items)) + tail

        n, prompt, n_tokens = fit(tokenizer, build, target_length, lines.tokens_per_char(tokenizer))
        expected = [v for vs in values[: self.num_queries] for v in vs]
        span = (len(head), len(prompt) - len(tail))
        meta = {"needle": needles[0], "context_span": span, "haystack_chars": n}
        if depth is not None:
            meta["needle_depth"] = char_depths(prompt, span, needles[:1])[0]
        else:
            meta["needle_depths"] = char_depths(prompt, span, needles)
        return Sample(self.name, prompt, expected, target_length, depth, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return match_all(prediction, sample.expected)


@TASKS.register()
class NiahSingle(RulerNiah):
    name = "niah_single"
    description = "RULER niah_single_1: one word -> 7-digit number needle in the repeated noise sentence"


@TASKS.register()
class NiahMultikey(RulerNiah):
    name = "niah_multikey"
    description = "RULER niah_multikey_2: word -> number needle among distractor needles with other keys"
    haystack = "needle"


@TASKS.register()
class NiahMultikeyUuid(RulerNiah):
    name = "niah_multikey_uuid"
    description = "RULER niah_multikey_3: uuid -> uuid needle among distractor uuid needles"
    haystack = "needle"
    key_kind = value_kind = "uuids"
    max_new_tokens = 44  # a uuid is 35-37 tokens when every hex digit is one token


@TASKS.register()
class NiahMultivalue(RulerNiah):
    name = "niah_multivalue"
    description = "RULER niah_multivalue: one key with 4 values at random positions; all 4 must be returned"
    uses_depth = False
    num_values = 4
    max_new_tokens = 44  # " 1234567, 2345678, 3456789, and 4567890." is 37 tokens when digits are tokens


@TASKS.register()
class NiahMultiquery(RulerNiah):
    name = "niah_multiquery"
    description = ("RULER niah_multiquery: 4 keys at random positions, all 4 queried; "
                   "all values must be returned")
    uses_depth = False
    num_keys = num_queries = 4
    max_new_tokens = 44


# ----------------------------------------------------------------------------- variable tracking

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are:"
)


def vt_chain(rng: random.Random, letters: int, hops: int) -> tuple[list[str], list[str], str]:
    """``VAR A = 12345``, then ``VAR B = VAR A`` for ``hops`` hops: returns (names, lines, value)."""
    new_name = unique_stream(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
                                             for _ in range(letters)))
    names = [new_name() for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, lines, value


@TASKS.register()
class VariableTracking(Task):
    name = "vt"
    description = ("RULER vt: one chain of 4 hops (5 variables) in noise, 1-shot; "
                   "return every variable holding the value")
    uses_depth = False
    max_new_tokens = 26  # five names are 14-18 tokens here (22 with commas); RULER allows 30
    hops = 4

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        rng = random.Random(f"{self.name}:{seed}")
        ex_names, ex_lines, ex_value = vt_chain(rng, 3, self.hops)
        ex_fracs = sorted(rng.random() for _ in ex_lines)  # sorted: the chain reads in order, as in RULER
        ex_context = "\n".join(insert_lines([FILLER] * 5, list(zip(ex_fracs, ex_lines, strict=True))))
        example = (VT_TEMPLATE.format(context=ex_context, query=ex_value) + " "
                   + VT_ANSWER.format(num_v=self.hops + 1, query=ex_value) + " " + " ".join(ex_names)
                   + "\n\n")
        names, chain, value = vt_chain(rng, 5, self.hops)
        items = list(zip(sorted(rng.random() for _ in chain), chain, strict=True))
        head, tail = VT_TEMPLATE.split("{context}")
        head = example + head
        tail = tail.format(query=value) + " " + VT_ANSWER.format(num_v=self.hops + 1, query=value)
        lines = Lines(lambda i: FILLER)

        def build(n: int) -> str:
            return head + "\n".join(insert_lines(lines.cut(n), items)) + tail

        n, prompt, n_tokens = fit(tokenizer, build, target_length, lines.tokens_per_char(tokenizer))
        span = (len(head), len(prompt) - len(tail))
        meta = {"chain": chain, "haystack_chars": n, "needle_depths": char_depths(prompt, span, chain)}
        return Sample(self.name, prompt, names, target_length, None, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return match_all(prediction, sample.expected)


# ----------------------------------------------------------------------------- common words extraction

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@TASKS.register()
class CommonWords(Task):
    name = "cwe"
    description = ("RULER cwe: numbered word list, 10 words repeated often, the rest rarely; 1-shot; "
                   "return the 10")
    uses_depth = False
    max_new_tokens = 72  # the numbered answer "1. kalomi 2. ..." is 55-61 tokens here; RULER allows 120
    num_common = 10

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        rng = random.Random(f"{self.name}:{seed}")
        new_word = unique_stream(lambda: pseudo_word(rng))
        # RULER's repeat counts: (common, uncommon) = (6, 1) below 4k tokens, (30, 3) above; its example too
        short = target_length < 4096
        ex_common, ex_uncommon, ex_n = (3, 1, 20) if short else (10, 3, 40)
        common_rep, uncommon_rep = (6, 1) if short else (30, 3)
        ex_words = [new_word() for _ in range(ex_n)]
        ex_list = ex_words[: self.num_common] * ex_common + ex_words[self.num_common:] * ex_uncommon
        rng.shuffle(ex_list)
        example = (CWE_TEMPLATE.format(context=numbered(ex_list)) + " " + CWE_ANSWER + " "
                   + numbered(ex_words[: self.num_common]) + "\n")
        common = [new_word() for _ in range(self.num_common)]
        uncommon = lazy_list(lambda i: new_word())
        head, tail = CWE_TEMPLATE.split("{context}")
        head, tail = example + head, tail + " " + CWE_ANSWER

        def build(n: int) -> str:
            words = common * common_rep + uncommon(n) * uncommon_rep
            random.Random(f"{self.name}:{seed}:{n}").shuffle(words)
            return head + numbered(words) + tail

        per_unit = uncommon_rep * unit_tokens(tokenizer, " 1000. " + common[0])
        n, prompt, n_tokens = fit(tokenizer, build, target_length, per_unit)
        meta = {"n_uncommon": n, "repeats": (common_rep, uncommon_rep)}
        return Sample(self.name, prompt, common, target_length, None, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return match_all(prediction, sample.expected)


# ----------------------------------------------------------------------------- frequent words extraction

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
    "dots '...'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"
ZETA2 = 1.6449340668482264  # zeta(2) = pi^2 / 6


def zipf_words(vocab: list[str], n: int, rng: random.Random) -> list[str]:
    """RULER's fwe text: word of rank k appears int(n * k^-2 / zeta(2)) times, shuffled."""
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n / (k * k * ZETA2)))]
    rng.shuffle(words)
    return words


@TASKS.register()
class FrequentWords(Task):
    name = "fwe"
    description = ("RULER fwe: six-letter coded words with Zipf(2) counts, rank 1 is '...'; 1-shot; "
                   "return ranks 2-4")
    uses_depth = False
    max_new_tokens = 20  # three coded words are 9-13 tokens here; RULER allows 50
    vocab_size = 2000

    def make(self, tokenizer, target_length: int, depth: float | None, seed: int) -> Sample:
        rng = random.Random(f"{self.name}:{seed}")
        new_word = unique_stream(lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)))
        ex_vocab = ["..."] + [new_word() for _ in range(20)]
        vocab = ["..."] + [new_word() for _ in range(self.vocab_size - 1)]
        example = (FWE_TEMPLATE.format(context=" ".join(zipf_words(ex_vocab, 100, rng))) + " " + FWE_ANSWER
                   + " " + " ".join(ex_vocab[1:4]) + "\n")
        head, tail = FWE_TEMPLATE.split("{context}")
        head, tail = example + head, tail + " " + FWE_ANSWER

        def build(n: int) -> str:
            return head + " ".join(zipf_words(vocab, n, random.Random(f"{self.name}:{seed}:{n}"))) + tail

        # about 0.95 words per unit of n; "..." and the coded words average ~3 tokens
        per_unit = 0.95 * unit_tokens(tokenizer, " " + vocab[1])
        n, prompt, n_tokens = fit(tokenizer, build, target_length, per_unit)
        meta = {"n_words": n}
        return Sample(self.name, prompt, vocab[1:4], target_length, None, seed, n_tokens, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return match_all(prediction, sample.expected)
