"""A method parameter declared once: name, type, default, range and the error text, read by every way in.

``apply``'s keywords, the CLI's ``name:key=value`` specs, tuned-settings files, lm-eval's ``model_args`` and
vLLM's ``hf_overrides`` all check a value with its ``Param``, so each refuses the same values with the same
message naming the parameter. Pure Python: the method descriptions (``config.py``) and every host import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False,
                 fix: str = "") -> Any:
    """``value`` if it is a number (an int when ``integer``) at least ``minimum``, else an error naming
    ``name``."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}{'; ' + fix if fix else ''}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, "
                         f"got {value}{'; ' + fix if fix else ''}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_target_length(target_length: Any) -> int | None:
    """``target_length`` as every method takes it: None (not given) or a whole number of tokens >= 1."""
    if target_length is None:
        return None
    return check_number("target_length", target_length, minimum=1, integer=True,
                        fix="give the number of tokens to read")


def trained_length_of(model_config) -> int:
    """The context the model was trained on: ``max_position_embeddings`` (already includes llama3/yarn
    scaling)."""
    length = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 1:
        raise ValueError(
            "the model config has no usable max_position_embeddings; pass trained_length=<the context the "
            "model was trained on>."
        )
    return length


BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
            "off": False}


@dataclass(frozen=True)
class Param:
    """A method parameter and its checks."""

    name: str
    type: type
    default: Any  # None: derived from target_length (or the model) when omitted
    help: str
    minimum: float | None = None  # numbers: the smallest value allowed (finite is always required)
    strict: bool = False  # numbers: > minimum instead of >=
    choices: tuple[str, ...] = ()  # strings: the allowed values (empty: any string)
    fix: str = ""  # appended to a range error: what the value means, what to use
    refused: tuple[tuple[Any, str], ...] = ()  # single values inside the range that are errors, and why

    def check(self, value: Any) -> Any:
        """``value`` when it has this parameter's type and range (None: not given, derived later), else a
        TypeError or ValueError naming the parameter."""
        if value is None:
            return value
        if self.type is bool:
            return check_bool(self.name, value)
        if self.type in (int, float):
            check_number(self.name, value, minimum=-math.inf if self.minimum is None else self.minimum,
                         strict=self.strict, integer=self.type is int, fix=self.fix)
            for refused, why in self.refused:
                if value == refused:
                    raise ValueError(f"{self.name}={value} {why}")
            return value
        if not isinstance(value, self.type):
            raise TypeError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is not one of {', '.join(self.choices)}"
                             + (f": {self.fix}" if self.fix else ""))
        return value

    def parse(self, text: str) -> Any:
        """A value given as text (CLI specs, lm-eval's ``model_args``), strictly: booleans from a fixed
        vocabulary, finite numbers only; then ``check``. Errors say what the text is not."""
        return self.check(parse_value(self.type, text))


def parse_value(kind: type, text: str) -> Any:
    """``text`` as a value of ``kind``, or a ValueError saying what it is not (the caller names it)."""
    if kind is bool:
        if text.lower() not in BOOLEANS:
            raise ValueError("is not a boolean; use true/false (or 1/0, yes/no, on/off)")
        return BOOLEANS[text.lower()]
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise ValueError("is not a finite number")
        return value
    return kind(text)


def check_params(method: str, declared: tuple[Param, ...], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``declared`` (unknown names, types, ranges), with every omitted parameter at
    its declared default: the complete dict a method's validator reads."""
    if not isinstance(given, Mapping):
        raise TypeError(f"method {method!r} takes its settings as a dict of parameter: value, got {given!r}")
    known = {p.name: p for p in declared}
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise ValueError(
            f"method {method!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
            f"{', '.join(sorted(known)) or '(none)'} (see `selfextend methods`)."
        )
    full = {p.name: p.default for p in declared}
    for name, value in given.items():
        full[name] = known[name].default if value is None else known[name].check(value)
    return full


def defaults(declared: tuple[Param, ...]) -> dict[str, Any]:
    """Name to default: what a frozen config's field defaults are read from."""
    return {p.name: p.default for p in declared}


TRAINED_LENGTH = Param("trained_length", int, None, "override the trained context L", minimum=2)
