"""Evaluation tasks: seeded generators and string-match scorers, in a registry (``TASKS``)."""

from .base import TASKS, Sample, Task, count_tokens, fit_length, get_task, register_task


def load_all() -> None:
    """Import every task module so each registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["TASKS", "Sample", "Task", "count_tokens", "fit_length", "get_task", "load_all", "register_task"]
