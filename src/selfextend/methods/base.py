"""The contract every context-extension method follows, so one ``apply``/``remove`` drives them all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from ..config import AttentionSpec
from ..integrations.hf import AttentionIntegration
from ..params import TRAINED_LENGTH, Param, check_params, trained_length_of

STATE_ATTR = "selfextend_method"  # set on the model while a method other than vanilla is active


@dataclass
class ActiveMethod:
    """What is applied to a model right now (``model.selfextend_method``)."""

    name: str
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # whatever the method needs to undo itself


class Method:
    """Subclasses implement ``resolve`` (validate or derive parameters), ``attach`` and ``detach``.

    ``resolve`` reads the model's config only, so a bad parameter leaves the model as it was, and settings
    resolve where no model is loaded (the CLI, the vLLM plugin)."""

    name: ClassVar[str]  # set by ``@METHODS.register(name)``
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def resolve(self, model_config: Any, target_length: int | None,
                params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, params: dict[str, Any],
               previous: ActiveMethod | None) -> ActiveMethod:
        """Apply in place. ``previous`` is this same method's active state when settings change."""
        raise NotImplementedError

    def detach(self, model: torch.nn.Module, active: ActiveMethod) -> None:
        raise NotImplementedError

    def reach(self, params: dict[str, Any]) -> int | None:
        """Longest input these settings are meant for; None when the method sets no bound (baselines)."""
        return None

    def settings(self, active: ActiveMethod) -> Any:
        """The active frozen config (``config.py``), or None for methods without one."""
        return None

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Every given parameter is one of this method's, of its type and in its range, and the given ones
        agree with each other (``check_together``): what needs no model, so every way in checks it at once."""
        check_params(self.name, self.params, params)
        self.check_together(params)

    def check_together(self, params: Mapping[str, Any]) -> None:
        """Constraints between given parameters that need no model (each one is already valid alone)."""


class AttentionMethod(Method):
    """A method that runs its own attention function (SelfExtend, DCA): its ``spec`` (``config.py``) says
    everything but how it attaches, which its transformers integration does."""

    spec: ClassVar[AttentionSpec]
    integration: ClassVar[AttentionIntegration]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.params = cls.spec.params

    def resolve(self, model_config, target_length, params):
        self.check_params(params)
        return config_params(self.spec.resolve(model_config, target_length, params))

    def config(self, params: dict[str, Any]) -> Any:
        return self.spec.config_class(**params)

    def reach(self, params):
        return self.config(params).reach

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


def trained_length(model_config: Any, params: dict[str, Any] | None = None) -> int:
    override = (params or {}).get("trained_length")
    return TRAINED_LENGTH.check(override) if override is not None else trained_length_of(model_config)
