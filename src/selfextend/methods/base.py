"""The contract every context-extension method follows, so one ``apply``/``remove`` drives them all."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from ..backends import available_backends
from ..config import check_bool, check_number, trained_length_of
from ..integrations.hf import AttentionIntegration

STATE_ATTR = "selfextend_method"  # set on the model while a method other than vanilla is active


@dataclass(frozen=True)
class Param:
    """A method parameter: its type and range, checked by ``check`` wherever a value enters (``apply``, the
    CLI's method specs, tuned-settings files, vLLM's ``hf_overrides``), so every way in refuses the same
    values with the same message naming the parameter."""

    name: str
    type: type
    default: Any  # None: derived from target_length (or the model) when omitted
    help: str
    minimum: float | None = None  # numbers: the smallest value allowed (finite is always required)
    strict: bool = False  # numbers: > minimum instead of >=
    choices: tuple[str, ...] = ()  # strings: the allowed values (empty: any string)
    fix: str = ""  # appended to a range error: what the value means, what to use

    def check(self, value: Any) -> Any:
        """``value`` when it has this parameter's type and range (None: not given, derived later), else a
        TypeError or ValueError naming the parameter."""
        if value is None:
            return value
        if self.type is bool:
            return check_bool(self.name, value)
        if self.type in (int, float):
            return check_number(self.name, value, minimum=-math.inf if self.minimum is None else self.minimum,
                                strict=self.strict, integer=self.type is int, fix=self.fix)
        if not isinstance(value, self.type):
            raise TypeError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is not one of {', '.join(self.choices)}"
                             + (f": {self.fix}" if self.fix else ""))
        return value


TRAINED_LENGTH = Param("trained_length", int, None, "override the trained context L", minimum=2)


def backend_param(method: str) -> Param:
    """The ``backend`` parameter of an attention method, listing the backends that run it."""
    return Param("backend", str, "auto", f"attention backend: {', '.join(available_backends(method))}")


@dataclass
class ActiveMethod:
    """What is applied to a model right now (``model.selfextend_method``)."""

    name: str
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # whatever the method needs to undo itself


class Method:
    """Subclasses implement ``resolve`` (validate or derive parameters), ``attach`` and ``detach``.

    ``resolve`` never touches the model, so a bad parameter leaves the model as it was."""

    name: ClassVar[str]  # set by ``@METHODS.register(name)``
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def resolve(self, model: torch.nn.Module, target_length: int | None,
                params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, params: dict[str, Any],
               previous: ActiveMethod | None) -> ActiveMethod:
        """Apply in place. ``previous`` is this same method's active state when settings change."""
        raise NotImplementedError

    def detach(self, model: torch.nn.Module, active: ActiveMethod) -> None:
        raise NotImplementedError

    def reach(self, model: torch.nn.Module, params: dict[str, Any]) -> int | None:
        """Longest input these settings are meant for; None when the method sets no bound (baselines)."""
        return None

    def settings(self, active: ActiveMethod) -> Any:
        """The active frozen config (``config.py``), or None for methods without one."""
        return None

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Every given parameter is one of this method's, of its type and in its range, and the given ones
        agree with each other (``check_together``): what needs no model, so every way in checks it at once."""
        if not isinstance(params, Mapping):
            raise TypeError(f"method {self.name!r} takes its settings as a dict of parameter: value, "
                            f"got {params!r}")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known), key=str)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                f"{', '.join(sorted(known)) or '(none)'} (see `selfextend methods`)."
            )
        for name, value in params.items():
            known[name].check(value)
        self.check_together(params)

    def check_together(self, params: Mapping[str, Any]) -> None:
        """Constraints between given parameters that need no model (each one is already valid alone)."""


class AttentionMethod(Method):
    """A method that runs its own attention function (SelfExtend, DCA): ``resolve`` returns the fields of its
    frozen config, and attach/detach go through its transformers integration."""

    config_class: ClassVar[type]
    integration: ClassVar[AttentionIntegration]

    def config(self, params: dict[str, Any]) -> Any:
        return self.config_class(**params)

    def settings(self, active: ActiveMethod) -> Any:
        return active.data["state"].config

    def attach(self, model, params, previous):
        config = self.config(params)
        if previous is not None:  # settings change: keep the layer state, drop what the old ones left
            self.integration.update(model, previous.data["state"], config)
            return ActiveMethod(self.name, params, previous.data)
        return ActiveMethod(self.name, params, {"state": self.integration.install(model, config)})

    def detach(self, model, active):
        self.integration.uninstall(model, active.data["state"])


def config_params(config: Any) -> dict[str, Any]:
    """A frozen config as the parameter dict ``apply`` takes back (``resolve``'s return value)."""
    return asdict(config)


def trained_length(model: torch.nn.Module, params: dict[str, Any] | None = None) -> int:
    override = (params or {}).get("trained_length")
    return TRAINED_LENGTH.check(override) if override is not None else trained_length_of(model.config)
