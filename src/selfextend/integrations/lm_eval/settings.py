"""What the ``selfextend`` lm-eval model reads from ``--model_args``, checked before any model loads.

lm-eval hands ``model_args`` over as ``key=value`` pairs, some already cast by its own parser (``"4"`` -> 4,
``"true"`` -> True), some still text. Method parameters are converted and checked by the method's own
``Param`` declarations (``METHODS[name].check_params``), as ``apply`` and the CLI's method specs check them,
so every way in refuses the same values with the same message, here prefixed with the argument. Nothing here
imports lm-eval or loads weights: ``reach`` needs the model config alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...methods import METHODS
from ...params import check_target_length, parse_value, trained_length_of

OVERFLOW = ("error", "warn", "truncate")
DTYPES = ("float32", "bfloat16")
ALIASES = {"G": "group_size", "W": "window"}  # as in the CLI's method specs (self-extend:G=4:W=1024)
# selfextend's own arguments and their types (None: any text)
OWN = {"pretrained": None, "method": str, "target_length": int, "dtype": str, "overflow": str, "threads": int,
       "max_length": int, "device": None, "tokenizer": None}  # tokenizer: a folder (lm-eval's RULER reads it)
# HFLM options that still mean something for a model we load: passed through unchanged
PASSTHROUGH = ("batch_size", "max_batch_size", "add_bos_token", "prefix_token_id", "logits_cache",
               "softmax_dtype", "mixed_precision_dtype")


@dataclass(frozen=True)
class Settings:
    """The checked ``model_args``: what to load, which method with which parameters, and past-reach policy."""

    pretrained: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    method: str = "self-extend"
    params: dict[str, Any] = field(default_factory=dict)  # the method's own, as given (derived at apply)
    target_length: int | None = None
    dtype: str = "float32"
    overflow: str | None = None  # None: the method's own rule (``policy``)
    threads: int | None = None
    max_length: int | None = None  # at most the reach: e.g. shorter loglikelihood_rolling windows
    device: str | None = None
    tokenizer: str | None = None  # a tokenizer folder in place of the model's own
    hflm: dict[str, Any] = field(default_factory=dict)

    @property
    def policy(self) -> str:
        """What a request longer than the reach gets. ``cut``: the truncate method's own cut (head and tail,
        or the last tokens); else ``overflow``, or the rule ``selfextend eval`` follows: SelfExtend refuses
        (its attention raises past the reach unless ``allow_overflow``), the others read the whole prompt and
        warn (vanilla extrapolates by definition; RoPE scaling and DCA warn past their reach)."""
        if self.method == "truncate":
            return "cut"
        if self.overflow is not None:
            return self.overflow
        if self.method == "self-extend" and not self.params.get("allow_overflow"):
            return "error"
        return "warn"


def _typed(name: str, kind: type | None, value: Any) -> Any:
    """``value`` as ``kind``: text parsed as the CLI parses it; lm-eval's casts accepted as they are."""
    if kind is None or value is None:
        return value
    if isinstance(value, str) and kind is not str:
        try:
            return parse_value(kind, value)
        except ValueError as err:
            raise ValueError(f"model_args {name}={value!r} {err}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    return value


def parse_model_args(args: Mapping[str, Any] | str | None) -> Settings:
    """``model_args`` (a dict, or lm-eval's ``"k=v,k=v"`` text) as ``Settings``; a ValueError naming the
    argument, its value and the fix otherwise."""
    if isinstance(args, str) or args is None:
        args = _split(args or "")
    given = {ALIASES.get(k, k): (None if isinstance(v, str) and v.lower() == "none" else v)
             for k, v in args.items()}
    method = given.pop("method", None) or "self-extend"
    method = _typed("method", str, method)
    try:
        impl = METHODS.get(method)
    except ValueError as err:
        raise ValueError(f"model_args method={method!r}: {err}") from None
    declared = {p.name: p for p in impl.params}
    own: dict[str, Any] = {}
    params: dict[str, Any] = {}
    hflm: dict[str, Any] = {}
    for key, value in given.items():
        if key in declared:
            if value is not None:
                params[key] = _typed(key, declared[key].type, value)
        elif key in OWN:
            own[key] = _typed(key, OWN[key], value)
        elif key in PASSTHROUGH:
            if value is not None:
                hflm[key] = value
        else:
            raise ValueError(
                f"model_args {key}={value!r}: not an argument of the selfextend model. Its own: "
                f"{', '.join(OWN)}; method {method!r} takes: {', '.join(declared) or '(none)'} (see "
                f"`selfextend methods`); lm-eval options passed on: {', '.join(PASSTHROUGH)}")
    try:
        impl.check_params(params)
        target = check_target_length(own.get("target_length"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_args: {err}") from None
    for key in ("threads", "max_length"):
        if own.get(key) is not None and (not isinstance(own[key], int) or own[key] < 1):
            raise ValueError(f"model_args {key}={own[key]!r}: use a whole number >= 1")
    dtype = own.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"model_args dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    overflow = own.get("overflow")
    if overflow is not None and overflow not in OVERFLOW:
        raise ValueError(f"model_args overflow={overflow!r}: use error (refuse a prompt past the reach), "
                         "warn (read it whole, past the reach, and warn) or truncate (lm-eval's left cut, "
                         "counted)")
    if overflow is not None and method == "truncate":
        raise ValueError(f"model_args overflow={overflow!r}: method=truncate cuts long prompts itself (its "
                         "keep and drop parameters); drop overflow")
    if method == "self-extend" and overflow is not None:
        if overflow != "warn" and params.get("allow_overflow"):
            raise ValueError(f"model_args overflow={overflow!r} contradicts allow_overflow=true (read past "
                             "the reach and warn); keep one of them")
        if overflow == "warn":
            params["allow_overflow"] = True  # SelfExtend's attention itself refuses past the reach otherwise
    pretrained = own.get("pretrained")
    if pretrained is not None and not _is_model(pretrained):
        pretrained = _model_path(str(pretrained))
    tokenizer = own.get("tokenizer")
    if tokenizer is not None and not Path(str(tokenizer)).is_dir():
        raise ValueError(f"model_args tokenizer={tokenizer!r}: not a folder; pass a tokenizer folder (e.g. "
                         "one saved by load_tokenizer().save_pretrained(DIR)), or leave it out")
    return Settings(pretrained, method, params, target, dtype, overflow, own.get("threads"),
                    own.get("max_length"), own.get("device"), None if tokenizer is None else str(tokenizer),
                    hflm)


def _split(text: str) -> dict[str, str]:
    """lm-eval's ``k=v,k=v`` without its casts (``_typed`` converts by the declared type)."""
    out = {}
    for item in (part for part in text.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"model_args {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _is_model(value: Any) -> bool:
    return not isinstance(value, (str, Path))


def _model_path(name: str) -> str:
    """A model directory, ``.gguf`` file or cached hub id, checked as the CLI's ``--model`` is."""
    from ...models import check_model_ref

    try:
        return check_model_ref(name)
    except ValueError as err:
        raise ValueError(f"model_args pretrained={name!r}: {err}") from None


def model_config(pretrained: str | None):
    """The config ``load_model(pretrained)`` would give the model, without its weights (seconds)."""
    from transformers import AutoConfig

    from ...models import default_model_path

    path = default_model_path() if pretrained is None else Path(pretrained)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(pretrained), local_files_only=True)  # no hub access, ever


def reach(settings: Settings, config) -> tuple[dict[str, Any], int]:
    """``(resolved parameters, longest input)`` of the method on a model with ``config``: the method's reach;
    for vanilla the trained length; for truncate the tokens it keeps; for a method without a bound (dynamic
    NTK) ``target_length``, else the trained length. ``max_length`` may lower it, never raise it."""
    impl = METHODS.get(settings.method)
    resolved = impl.resolve(config, settings.target_length, dict(settings.params))
    if settings.method == "truncate":
        length = resolved["keep"]
    elif settings.method == "vanilla":
        length = trained_length_of(config)
    else:
        length = impl.reach(resolved) or settings.target_length or trained_length_of(config)
    if settings.max_length is not None:
        if settings.max_length > length:
            raise ValueError(f"model_args max_length={settings.max_length} is past the reach of "
                             f"{settings.method} ({length} tokens); raise target_length instead, or read "
                             "past the reach with overflow=warn")
        length = settings.max_length
    return resolved, length


def describe(method: str, resolved: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in resolved.items() if v is not None and k != "backend")
    return f"{method} ({shown})" if shown else method


def past_reach(settings: Settings, resolved: Mapping[str, Any], length: int, needed: int, what: str) -> str:
    """The message for ``needed`` tokens (``what`` says of which request) past ``length``, naming the argument
    that moves the reach and the policies."""
    fix = f"target_length={needed}"
    if settings.method == "vanilla":
        fix = f"another method with {fix} (method=self-extend, dca, yarn ...)"
    elif settings.max_length is not None:
        fix = f"max_length={needed} or more (and a reach that covers it)"
    elif "group_size" in settings.params or "window" in settings.params:
        fix += " in place of group_size/window, or a larger group_size"
    return (f"{what} needs {needed} tokens, past the {length} that {describe(settings.method, resolved)} "
            f"reads (max_length). lm-eval would cut it from the left and score the cut prompt as if whole. "
            f"Set model_args {fix}; or say what to do past the reach: overflow=warn reads it whole and "
            "warns, overflow=truncate keeps lm-eval's left cut and counts it")
