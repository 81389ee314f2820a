"""``SelfExtendLM``: lm-eval's ``HFLM`` over a model from ``selfextend.load_model`` with a method applied.

Everything lm-eval does with a transformers model (``generate_until``, ``loglikelihood``,
``loglikelihood_rolling``, batching, its results and samples files) is ``HFLM``'s own. This class changes what
"too long" means: ``max_length`` is the method's reach, and a request past it is never cut silently, which is
what ``HFLM`` does (it keeps the last ``max_length`` tokens and logs a warning). ``Settings.policy`` decides:
refuse, read it whole and warn, lm-eval's left cut (counted), or the ``truncate`` method's own cut.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from ... import api
from ...methods import truncate_ids
from .settings import describe, parse_model_args, past_reach, reach

logger = logging.getLogger("selfextend")


def _device(name: str | None) -> torch.device:
    """lm-eval's rule: the device asked for, but CUDA only where there is one (its CLI default is cuda:0)."""
    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SelfExtendLM(HFLM):
    """lm-eval model ``selfextend``: ``model_args`` are ``settings.parse_model_args``'s (``pretrained``,
    ``method``, ``target_length``, the method's parameters, ``dtype``, ``overflow``, ``threads``, ...).

    ``pretrained`` may also be a loaded model (then pass ``tokenizer``): the method is applied to it in place.
    """

    def __init__(self, pretrained: Any = None, tokenizer: Any = None, **model_args: Any) -> None:
        named = {"tokenizer": tokenizer} if isinstance(tokenizer, str) else {}
        settings = parse_model_args({"pretrained": pretrained, **named, **model_args})  # before any load
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pretrained=<a loaded model> needs tokenizer=<its tokenizer>")
            model = pretrained
        else:
            from ...models import load_model

            if settings.tokenizer is not None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer, local_files_only=True)
            model, tokenizer = load_model(settings.pretrained, dtype=settings.dtype, tokenizer=tokenizer)
        device = _device(settings.device)
        if model.device != device:
            model.to(device)
        self.settings = settings
        self.resolved, self.reach = reach(settings, model.config)
        self._reading: int | None = None  # set while requests past the reach are read whole (policy warn)
        self.past_reach = 0  # requests read past the reach
        self.cut = 0  # requests cut (overflow=truncate, or the truncate method)
        api.remove(model)
        api.apply(model, method=settings.method, target_length=settings.target_length, **settings.params)
        super().__init__(pretrained=model, tokenizer=tokenizer, **settings.hflm)
        logger.info("selfextend: lm-eval model %s, max_length %d, past it: %s",
                    describe(settings.method, self.resolved), self.reach, settings.policy)

    @property
    def max_length(self) -> int:
        return self._reading or self.reach

    def _past(self, lengths: list[int], budget: int, kind: str) -> None:
        """Requests of ``lengths`` tokens (+ ``budget`` to generate) longer than ``max_length``: refuse, or
        count and say what happens to them."""
        needed = max(lengths) + budget
        what = (f"a {kind} request of {max(lengths)} prompt tokens"
                + (f" + {budget} to generate" if budget else ""))
        policy = self.settings.policy
        if policy == "error":
            raise ValueError(past_reach(self.settings, self.resolved, self.reach, needed, what))
        if policy == "warn":
            self.past_reach += len(lengths)
            logger.warning("selfextend: %d %s request(s) past the reach %d of %s (the longest needs %d "
                           "tokens): read whole (overflow=warn)", len(lengths), kind, self.reach,
                           self.settings.method, needed)
        else:
            self.cut += len(lengths)
            how = ("lm-eval's left truncation (overflow=truncate)" if policy == "truncate"
                   else "the truncate method's own cut")
            logger.warning("selfextend: %d %s request(s) longer than %d tokens: cut by %s", len(lengths),
                           kind, self.reach, how)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                         left_truncate_len: int | None = None,
                         truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``generate_until``'s prompts; past ``left_truncate_len`` (the reach less the tokens to generate)
        handled by the policy instead of cut."""
        ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
        if not left_truncate_len or ids.shape[1] <= left_truncate_len:
            return ids, mask
        over = [n for n in mask.sum(1).tolist() if n > left_truncate_len]
        self._past(over, self.max_length - left_truncate_len, "generate_until")
        if self.settings.policy == "truncate":
            return ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
        return ids, mask  # whole: read past the reach, or cut in _model_generate by the truncate method

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """The truncate method cuts each prompt (``truncate_ids``, as ``selfextend eval`` does) before
        generating; the output keeps the uncut context in front, where ``HFLM`` strips it."""
        active = api.active(self.model)
        keep = active.params["keep"] if active is not None and active.name == "truncate" else None
        if keep is None or context.shape[1] <= keep:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        new_tokens = max_length - context.shape[1]
        mask = generation_kwargs.pop("attention_mask", None)
        rows = []
        for i in range(context.shape[0]):  # rows differ in padding, so each is cut and generated alone
            row = context[i] if mask is None else context[i][mask[i].bool()]
            cut, _ = truncate_ids(self.model, row[None])
            out = super()._model_generate(cut, cut.shape[1] + new_tokens, stop,
                                          attention_mask=torch.ones_like(cut), **dict(generation_kwargs))
            rows.append(out[0, cut.shape[1]:])
        generated = torch.full((len(rows), max(r.shape[0] for r in rows)), self.tokenizer.pad_token_id,
                               dtype=context.dtype, device=context.device)
        for i, r in enumerate(rows):
            generated[i, : r.shape[0]] = r
        return torch.cat([context, generated], dim=1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Scored inputs (context + continuation, less the last token) past ``max_length``: the policy, not
        ``HFLM``'s silent-but-logged left cut. ``loglikelihood_rolling`` windows always fit."""
        over = [len(c) + len(x) - 1 for _, c, x in requests if len(c) + len(x) - 1 > self.max_length]
        if not over:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        self._past(over, 0, "loglikelihood")
        policy = self.settings.policy
        if policy == "warn":
            self._reading = max(over)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                self._reading = None
        if policy == "cut" and self.resolved.get("drop", "middle") == "middle":
            requests = [self._cut_middle(r) for r in requests]
        # policy truncate, and truncate:drop=start (its own cut is lm-eval's: the last `keep` tokens)
        return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

    def _cut_middle(self, request):
        """``truncate``'s LongBench cut of a scored input: its first ``keep // 2`` tokens and its last ones,
        the continuation among those."""
        key, context, continuation = request
        keep = self.resolved["keep"]
        full = context + continuation
        if len(full) - 1 <= keep:
            return request
        tail = keep - keep // 2
        if len(continuation) > tail:
            raise ValueError(f"a loglikelihood continuation of {len(continuation)} tokens is longer than the "
                             f"{tail} tokens truncate keeps of the end (keep={keep}); raise keep")
        inputs = full[:-1]
        kept = inputs[: keep // 2] + inputs[-tail:] + full[-1:]
        return key, kept[: -len(continuation)], continuation

    def get_model_info(self) -> dict:
        """What the results JSON records under ``config``: the method as applied, the reach, the policy and
        how many requests passed the reach or were cut. No hub lookup (``HFLM`` asks the hub for a sha)."""
        from ... import __version__
        from ...eval.runner import json_safe

        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": "",
            "model_sha": "",
            "selfextend": {
                "version": __version__,
                "pretrained": self.settings.pretrained or "embedded:SmolLM2-135M-Instruct",
                "method": self.settings.method, "params": json_safe(self.resolved), "max_length": self.reach,
                "overflow": self.settings.policy, "past_reach": self.past_reach, "cut": self.cut,
            },
        }
