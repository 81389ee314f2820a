"""Long-document perplexity with named modes, reported as mean NLL per position bucket.

Modes (named in every result, since the definitions in the literature are not comparable):

* ``single-pass``: the document of ``length`` tokens in one forward pass; token t is scored with all t - 1
  previous tokens as context. The NLL per bucket (0-2k, 2-4k, ...) shows where a method breaks down.
* ``sliding``: windows of ``window`` tokens every ``stride`` tokens; each token is scored once, in the first
  window that contains it past the previous window's end, so it sees at least ``window - stride`` context.

``truncate`` has no single pass over more tokens than it keeps: it is always scored as ``sliding`` with its
``keep`` as the window and ``keep // 2`` as the stride, and the row says so.

Memory: logits are computed from the final hidden states in chunks (a full 32k x 49k fp32 logits tensor is
6.4 GB), so a single pass costs what the forward costs.
"""

from __future__ import annotations

import math

import torch

from . import TASKS
from .base import Task
from .haystack import corpus_text


def document_ids(tokenizer, corpus: str, length: int, seed: int) -> torch.Tensor:
    """``length`` consecutive tokens of the corpus; seed 0 starts at the beginning, other seeds at a seeded
    offset. Raises when the corpus is shorter than ``length``."""
    ids = _tokenized(tokenizer, corpus)
    if ids.numel() < length:
        raise ValueError(f"corpus {corpus!r} has {ids.numel()} tokens, fewer than length={length}; "
                         "use a longer corpus or a shorter length.")
    spare = ids.numel() - length
    start = (0 if seed == 0 or spare == 0
             else int(torch.randint(spare + 1, (1,), generator=torch.Generator().manual_seed(seed))))
    return ids[start : start + length][None]


_TOKENIZED: dict[tuple[int, str], torch.Tensor] = {}


def _tokenized(tokenizer, corpus: str) -> torch.Tensor:
    key = (id(tokenizer), corpus)
    if key not in _TOKENIZED:
        _TOKENIZED[key] = torch.tensor(tokenizer(corpus_text(corpus), add_special_tokens=False).input_ids)
    return _TOKENIZED[key]


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """NLL of tokens 1..n-1 given their prefix, from one forward pass; logits built ``chunk`` rows at a
    time."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    targets = input_ids[0, 1:]
    out = torch.empty(targets.numel(), dtype=torch.float32)
    for s in range(0, targets.numel(), chunk):
        logits = head(hidden[s : s + chunk][: targets.numel() - s]).float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out[s : s + logits.shape[0]] = torch.nn.functional.cross_entropy(
            logits, targets[s : s + logits.shape[0]], reduction="none")
    return out


def sliding_nll(model, input_ids: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Per-token NLL (tokens 1..n-1), each token scored once with at least ``window - stride`` context."""
    n = input_ids.shape[1]
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in (0, window={window}]")
    out = torch.full((n - 1,), float("nan"))
    scored = 1  # next token index (in input_ids) without a score
    start = 0
    while scored < n:
        end = min(start + window, n)
        nll = token_nll(model, input_ids[:, start:end])  # scores tokens start+1 .. end-1
        out[scored - 1 : end - 1] = nll[scored - start - 1 :]
        scored = end
        start = min(start + stride, scored - 1)  # the next unscored token keeps at least one token of context
    return out


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL per position bucket; token t (1-based position of the predicted token) goes to bucket
    t // bucket."""
    positions = torch.arange(1, nll.numel() + 1)
    return [float(nll[(positions // bucket) == b].mean()) for b in range(int(positions[-1]) // bucket + 1)
            if bool(((positions // bucket) == b).any())]


@TASKS.register()
class Perplexity(Task):
    name = "ppl"
    description = "long-document perplexity: NLL per position bucket (single-pass or sliding)"
    kind = "ppl"
    uses_depth = False

    def evaluate(self, model, tokenizer, length: int, seed: int, *, corpus: str = "pydoc",
                 mode: str = "single-pass", bucket: int = 2048, window: int | None = None,
                 stride: int | None = None, keep: int | None = None) -> dict:
        """Score one document. ``keep`` (from ``truncate``) forces sliding with window ``keep``."""
        ids = document_ids(tokenizer, corpus, length, seed)
        if keep is not None and keep < length:
            mode, window, stride = "sliding", keep, keep // 2
        if mode == "single-pass":
            nll = token_nll(model, ids)
        elif mode == "sliding":
            if window is None or stride is None:
                raise ValueError("ppl mode 'sliding' needs window and stride "
                                 "(e.g. --window 8192 --stride 4096)")
            nll = sliding_nll(model, ids, window, stride)
        else:
            raise ValueError(f"unknown ppl mode {mode!r}; use 'single-pass' or 'sliding'")
        buckets = bucket_means(nll, bucket)
        mean = float(nll.mean())
        return {"mode": mode, "corpus": corpus, "bucket": bucket, "window": window, "stride": stride,
                "n_tokens": ids.shape[1], "nll": mean, "ppl": math.exp(mean), "bucket_nll": buckets,
                "bucket_ppl": [math.exp(b) for b in buckets]}
