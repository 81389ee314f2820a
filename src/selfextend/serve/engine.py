"""One model answering one request at a time: prefix-cached prefill, sampling, stop strings, streaming.

The engine knows nothing about HTTP. ``generate`` prefills only the prompt tokens its ``PrefixCache`` has not
seen, then decodes token by token with the model's own KV cache (whatever method is applied: SelfExtend's
grouped keys stay in the cache), reporting text as it becomes final. Greedy decoding (``temperature=0``)
makes the same choices as ``model.generate(do_sample=False)``.

The prefill runs in chunks of ``prefill_chunk`` tokens on one KV cache (exact: each chunk's queries read the
cache at their true positions, as one pass would), and asks ``cancelled()`` before each chunk and each
generated token: a client that left or a server shutting down frees the worker within one chunk. A prefill
stopped that way leaves what it read in the prefix cache, so the same prompt again continues from there.
Measured throughput (prompt tokens/s, generated tokens/s) and the running request's progress feed the
server's wait estimates.
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
from . import PREFILL_CHUNK
from .prefix_cache import PrefixCache

logger = logging.getLogger("selfextend.serve")

PROGRESS_TOKENS = 2048  # prefills of at least this many new tokens log their progress after every chunk
TYPICAL_ANSWER = 256  # tokens an answer is assumed to take in wait estimates until answers were measured


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
    prefilled: int = 0  # new prompt tokens read (all of them unless cancelled during the prefill)
    to_prefill: int = 0  # new prompt tokens it had to read (the prompt less what the prefix cache held)


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


class Rate:
    """A ratio of decayed sums (amount / seconds, or tokens / requests): recent records weigh most, and a
    record weighs by its size, so long prefills dominate the prompt tokens/s that wait estimates use."""

    DECAY = 0.9

    def __init__(self) -> None:
        self.amount = self.per = 0.0

    def add(self, amount: float, per: float) -> None:
        self.amount = self.amount * self.DECAY + amount
        self.per = self.per * self.DECAY + per

    @property
    def value(self) -> float | None:
        return self.amount / self.per if self.per > 0 else None


@dataclass
class Progress:
    """The running request, as the worker thread updates it (read by the server for estimates)."""

    prompt_tokens: int
    cached: int
    to_prefill: int  # new prompt tokens this request reads
    max_tokens: int
    prefilled: int = 0
    generated: int = 0


class Engine:
    """A model, its tokenizer and a prefix cache; ``generate`` is not re-entrant (one worker calls it)."""

    def __init__(self, model: torch.nn.Module, tokenizer, cache_bytes: int = 2 << 30,
                 extend_hint: str = "", prefill_chunk: int = PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: use at least 1 token per chunk")
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache = PrefixCache(cache_bytes)
        self.prefill_chunk = prefill_chunk
        self.prefill_rate = Rate()  # prompt tokens / second, per chunk
        self.decode_rate = Rate()  # generated tokens / second, per request
        self.answer_tokens = Rate()  # generated tokens / request
        self.running: Progress | None = None
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

    def estimate(self, to_prefill: int, max_tokens: int, prefilled: int = 0,
                 generated: int = 0) -> float | None:
        """Seconds a request still needs: its unread prompt tokens at the measured prefill rate, then a
        typical answer (the mean length so far, at most ``max_tokens``) at the measured decode rate; None
        until a prefill was measured."""
        prefill = self.prefill_rate.value
        if prefill is None:
            return None
        seconds = max(0, to_prefill - prefilled) / prefill
        typical = self.answer_tokens.value
        answer = min(max_tokens, round(typical) if typical is not None else TYPICAL_ANSWER)
        decode = self.decode_rate.value
        if decode:
            seconds += max(0, answer - generated) / decode
        return seconds

    def seconds_left(self) -> float | None:
        """The estimate for the running request (0 when none runs)."""
        now = self.running
        if now is None:
            return 0.0
        return self.estimate(now.to_prefill, now.max_tokens, now.prefilled, now.generated)

    def prefill(self, new: list[int], cache=None, cancelled: Callable[[], bool] = lambda: False,
                progress: Progress | None = None) -> tuple[torch.Tensor | None, object, int]:
        """Read ``new`` token ids after what ``cache`` holds, ``prefill_chunk`` tokens per forward pass on one
        KV cache: ``(logits of the last token, cache, tokens read)``, logits None when ``cancelled()`` said
        stop before a chunk (the cache then holds exactly the tokens read)."""
        step, total = self.prefill_chunk, len(new)
        log = total >= PROGRESS_TOKENS
        cached = progress.cached if progress is not None else 0
        if log:
            logger.info("prefill: %d new tokens (%d cached), %d per chunk", total, cached, step)
        logits, done, t0 = None, 0, time.perf_counter()
        while done < total:
            if cancelled():
                if log:
                    logger.info("prefill stopped after %d/%d tokens", done, total)
                return None, cache, done
            piece = new[done:done + step]
            t = time.perf_counter()
            out = self.model(torch.tensor([piece], device=self.device), use_cache=True, logits_to_keep=1,
                             **({self._cache_arg: cache} if cache is not None else {}))
            cache, logits = output_cache(out), out.logits[0, -1]
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)  # time the chunk, not its launch
            done += len(piece)
            self.prefill_rate.add(len(piece), time.perf_counter() - t)
            if progress is not None:
                progress.prefilled = done
            if log:
                elapsed = time.perf_counter() - t0
                rate = done / elapsed if elapsed > 0 else float("inf")
                logger.info("prefill %d/%d tokens (%d%%), %.0f tokens/s, about %.0f s left", done, total,
                            100 * done // total, rate, (total - done) / rate)
        return logits, cache, done

    @torch.no_grad()
    def generate(self, prompt: list[int], params: Sampling, on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Result:
        """Answer ``prompt`` (token ids); ``on_text`` receives each new piece of final text. ``cancelled`` is
        asked before every prefill chunk and every token: True stops with ``finish_reason="cancelled"``."""
        tokens = self.check_length(prompt, params.max_tokens)
        cache, cached = self.prefix_cache.take(tokens)
        generator = None
        if params.temperature != 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int(torch.randint(2**62, (1,))))
        new = tokens[cached:]
        progress = Progress(len(prompt), cached, len(new), params.max_tokens)
        self.running = progress
        try:
            t0 = time.perf_counter()
            logits, cache, done = self.prefill(new, cache, cancelled, progress)
            prefill = time.perf_counter() - t0
            if logits is None:  # stopped between chunks: keep what was read for the same prompt again
                if cache is not None and cached + done > 0:
                    self.prefix_cache.put(tokens[:cached + done], cache)
                return Result("", "cancelled", len(prompt), 0, cached, prefill, 0.0, done, len(new))
            return self._decode(tokens, logits, cache, params, generator, on_text, cancelled, progress,
                                cached, prefill)
        finally:
            self.running = None

    def _decode(self, tokens: list[int], logits: torch.Tensor, cache, params: Sampling,
                generator: torch.Generator | None, on_text: Callable[[str], None] | None,
                cancelled: Callable[[], bool], progress: Progress, cached: int, prefill: float) -> Result:
        fed = list(tokens)  # tokens whose keys the cache will hold
        t1 = time.perf_counter()
        text, generated, finish = StopText(params.stop), [], "length"
        sent = 0
        while len(generated) < params.max_tokens:
            if cancelled():
                finish = "cancelled"
                break
            token = sample(logits, params, generator)
            if token in self.eos_ids:
                finish = "stop"
                break
            generated.append(token)
            progress.generated = len(generated)
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
        if finish != "cancelled":
            if generated and decode > 0:
                self.decode_rate.add(len(generated), decode)
            self.answer_tokens.add(len(generated), 1)
        return Result(text.text, finish, progress.prompt_tokens, len(generated),
                      cached, prefill, decode, progress.to_prefill, progress.to_prefill)
