"""Every method under EleutherAI's lm-evaluation-harness (extra ``selfextend-llm[lm-eval]``).

    selfextend lm-eval --model selfextend --model_args method=self-extend,target_length=16384 \\
        --include_path benchmarks/lm_eval_tasks --tasks selfextend_passkey_16k --output_path out

or from Python::

    import lm_eval
    from selfextend.integrations.lm_eval import SelfExtendLM
    lm = SelfExtendLM(method="self-extend", target_length=16384)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=...))

lm-eval finds models only in its own registry (no entry points), so ``register`` adds ``selfextend`` there as
a lazy ``"module:object"`` entry: ``model.py`` (which imports lm-eval) loads on first use.

* ``settings.py``: ``model_args`` checked by the methods' own parameter declarations, the reach, the policy
  past it (no lm-eval import, no weights);
* ``model.py``: ``SelfExtendLM``, lm-eval's ``HFLM`` with the method applied and ``max_length`` = its reach;
* ``tasks.py``: lm-eval task folders (JSONL + YAML) from ``selfextend eval``'s generators;
* ``cli.py``: ``selfextend lm-eval``, lm-eval's own command line with ``selfextend`` registered.
"""

from __future__ import annotations

from typing import Any

MODEL = "selfextend"
TARGET = "selfextend.integrations.lm_eval.model:SelfExtendLM"
INSTALL = "pip install 'selfextend-llm[lm-eval]'  (lm-eval >= 0.4.13)"


def require() -> None:
    """An ImportError with the install command when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(f"lm-eval is not installed ({err}); {INSTALL}") from None


def register() -> None:
    """Add the ``selfextend`` model to lm-eval's registry, lazily; idempotent."""
    require()
    from lm_eval.api.registry import model_registry

    if MODEL not in model_registry:
        model_registry.register(MODEL, target=TARGET)


def __getattr__(name: str) -> Any:
    if name == "SelfExtendLM":  # imports lm-eval: only when asked for
        require()
        from .model import SelfExtendLM

        return SelfExtendLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL", "SelfExtendLM", "register", "require"]
