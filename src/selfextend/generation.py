"""Greedy answering with timing and a prefill progress bar (one tick per decoder layer)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .integrations.hf.compat import cache_kwarg, output_cache


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, desc: str = "prefill", enabled: bool = True) -> Iterator[None]:
    """Show a progress bar over the decoder layers of the next forward passes (forward hooks, no patching)."""
    layers = [m for name, m in model.named_modules()
              if name.endswith(("layers",)) and isinstance(m, torch.nn.ModuleList)]
    if not enabled or not layers:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers[0]), desc=desc, unit="layer", leave=False)
    def tick(*_) -> None:  # a forward hook must return None, or it replaces the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(tick) for layer in layers[0]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        bar.close()


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    prefill_seconds: float
    new_tokens: int
    decode_seconds: float
    kept_tokens: int = -1  # tokens the model read (fewer than prompt_tokens under ``truncate``)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 16, progress: bool = True,
                  stream=None) -> Answer:
    """Prefill ``prompt`` once (progress bar), then decode greedily with the KV cache, streaming text to
    ``stream``."""
    from .methods import truncate_ids

    full = tokenizer(prompt, return_tensors="pt").input_ids
    ids, _ = truncate_ids(model, full)
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    with layer_progress(model, f"prefill {ids.shape[1]} tokens", progress):
        out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    cache, cache_arg = output_cache(out), cache_kwarg(model)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    generated: list[int] = []
    t1 = time.perf_counter()
    text = ""
    for _ in range(max_new_tokens):
        tid = int(token)
        if tid == eos:
            break
        generated.append(tid)
        new_text = tokenizer.decode(generated, skip_special_tokens=True)
        if stream is not None:
            stream.write(new_text[len(text):])
            stream.flush()
        text = new_text
        if len(generated) == max_new_tokens:
            break
        out = model(token, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - t1
    return Answer(text, full.shape[1], prefill, len(generated), decode, ids.shape[1])
