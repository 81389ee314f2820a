"""One model answering one request at a time: prefix-cached prefill, sampling, stop strings, streaming.

The engine knows nothing about HTTP. ``generate`` prefills only the prompt tokens its ``PrefixCache`` has not
seen, then decodes token by token with the model's own KV cache (whatever method is applied: SelfExtend's
grouped keys stay in the cache), reporting text as it becomes final. Greedy decoding (``temperature=0``)
makes the same choices as ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import api
from ..integrations.hf.compat import cache_kwarg, output_cache
from ..methods import truncate_ids
from .prefix_cache import PrefixCache

logger = logging.getLogger("selfextend.serve")

PROGRESS_TOKENS = 2048  # prefills at least this long log their progress per quarter of the layers


class ContextLengthError(ValueError):
    """Prompt plus ``max_tokens`` past what the active method reads."""

    def __init__(self, needed: int, reach: int, hint: str) -> None:
        super().__init__(f"this request needs {needed} tokens (prompt + max_tokens), past the {reach} tokens "
                         f"the server's model reads with its current settings; {hint}")
        self.needed, self.reach = needed, reach


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class StopText:
    """Text decoded so far, cut at the first stop string; ``ready`` is what can be sent without a later token
    turning it into part of a stop string (or completing a multi-byte character)."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.text, self.stopped = "", False

    def update(self, text: str) -> None:
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
        else:
            self.text = text

    @property
    def ready(self) -> str:
        if self.stopped:
            return self.text
        text = self.text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes as U+FFFD for now
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - hold]


def sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else nucleus sampling (on the CPU, with a
    CPU generator, so a seed gives the same tokens whatever device the model runs on)."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """A model, its tokenizer and a prefix cache; ``generate`` is not re-entrant (one worker calls it)."""

    def __init__(self, model: torch.nn.Module, tokenizer, cache_bytes: int = 2 << 30,
                 extend_hint: str = "") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache = PrefixCache(cache_bytes)
        self.extend_hint = extend_hint or "start the server with a larger --target-length (or -G)"
        self._cache_arg = cache_kwarg(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    @property
    def reach(self) -> int:
        return api.max_length(self.model)

    def encode(self, text: str) -> list[int]:
        """A completion prompt as the model reads text: with its BOS token, as ``tokenizer(text)`` gives."""
        return self.tokenizer(text).input_ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The model's chat template with the assistant's turn opened (the template writes any BOS itself)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError: the template refuses these messages
            raise ValueError(f"the model's chat template refuses these messages: {err}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def check_length(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The tokens the model will read (``truncate`` keeps the last ones), or a ``ContextLengthError``."""
        kept = truncate_ids(self.model, torch.tensor([prompt]))[0][0].tolist()
        needed, reach = len(kept) + max_tokens, self.reach
        if needed > reach:
            raise ContextLengthError(needed, reach, self.extend_hint)
        return kept

    @torch.no_grad()
    def generate(self, prompt: list[int], params: Sampling, on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Result:
        """Answer ``prompt`` (token ids); ``on_text`` receives each new piece of final text."""
        tokens = self.check_length(prompt, params.max_tokens)
        cache, cached = self.prefix_cache.take(tokens)
        fed = list(tokens)  # tokens whose keys the cache will hold
        generator = None
        if params.temperature != 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int(torch.randint(2**62, (1,))))
        t0 = time.perf_counter()
        new = tokens[cached:]
        if len(new) >= PROGRESS_TOKENS:
            logger.info("prefill: %d new tokens (%d cached)", len(new), cached)
        with _progress(self.model, len(new)):
            out = self.model(torch.tensor([new], device=self.device), use_cache=True, logits_to_keep=1,
                             **({self._cache_arg: cache} if cache is not None else {}))
        cache = output_cache(out)
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        text, generated, finish = StopText(params.stop), [], "length"
        sent = 0
        logits = out.logits[0, -1]
        while len(generated) < params.max_tokens:
            if cancelled():
                finish = "cancelled"
                break
            token = sample(logits, params, generator)
            if token in self.eos_ids:
                finish = "stop"
                break
            generated.append(token)
            text.update(self.tokenizer.decode(generated, skip_special_tokens=True))
            ready = text.ready
            if on_text is not None and len(ready) > sent:
                on_text(ready[sent:])
                sent = len(ready)
            if text.stopped:
                finish = "stop"
                break
            if len(generated) == params.max_tokens:
                break
            out = self.model(torch.tensor([[token]], device=self.device), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: cache})
            cache, logits = output_cache(out), out.logits[0, -1]
            fed.append(token)
        if on_text is not None and finish != "cancelled" and len(text.text) > sent:
            on_text(text.text[sent:])  # held back for a stop string that never came
        if cache is not None:
            self.prefix_cache.put(fed, cache)
        decode = time.perf_counter() - t1
        return Result(text.text, finish, len(prompt), len(generated), cached, prefill, decode)


class _progress:
    """Log a long prefill's progress per quarter of the decoder layers (forward hooks, nothing patched)."""

    def __init__(self, model: torch.nn.Module, n_tokens: int) -> None:
        self.layers = []
        if n_tokens >= PROGRESS_TOKENS:
            lists = [m for name, m in model.named_modules() if name.endswith("layers")
                     and isinstance(m, torch.nn.ModuleList)]
            self.layers = list(lists[0]) if lists else []
        self.n_tokens, self.handles, self.done = n_tokens, [], 0

    def __enter__(self):
        total = len(self.layers)
        marks = {max(1, round(total * q / 4)) for q in (1, 2, 3)}

        def tick(*_) -> None:
            self.done += 1
            if self.done in marks:
                logger.info("prefill %d tokens: %d/%d layers", self.n_tokens, self.done, total)

        self.handles = [layer.register_forward_hook(tick) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
