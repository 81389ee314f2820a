"""The contract every context-extension method follows, so one ``apply``/``remove`` drives them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import trained_length_of

STATE_ATTR = "selfextend_method"  # set on the model while a method other than vanilla is active


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any  # None: derived from target_length (or the model) when omitted
    help: str


@dataclass
class ActiveMethod:
    """What is applied to a model right now (``model.selfextend_method``)."""

    name: str
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # whatever the method needs to undo itself


class Method:
    """Subclasses implement ``resolve`` (validate or derive parameters), ``attach`` and ``detach``.

    ``resolve`` never touches the model, so a bad parameter leaves the model as it was."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def resolve(self, model: torch.nn.Module, target_length: int | None, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, params: dict[str, Any], previous: ActiveMethod | None) -> ActiveMethod:
        """Apply in place. ``previous`` is this same method's active state when settings change."""
        raise NotImplementedError

    def detach(self, model: torch.nn.Module, active: ActiveMethod) -> None:
        raise NotImplementedError

    def reach(self, model: torch.nn.Module, params: dict[str, Any]) -> int | None:
        """Longest input these settings are meant for; None when the method sets no bound (baselines)."""
        return None

    def check_params(self, params: dict[str, Any]) -> None:
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                f"{', '.join(sorted(known)) or '(none)'} (see `selfextend methods`)."
            )


def trained_length(model: torch.nn.Module, params: dict[str, Any] | None = None) -> int:
    override = (params or {}).get("trained_length")
    return int(override) if override is not None else trained_length_of(model.config)


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False, fix: str = ""):
    """Validate one parameter with a message that names it and the fix."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}{'; ' + fix if fix else ''}")
    return value
