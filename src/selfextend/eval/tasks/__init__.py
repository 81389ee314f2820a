"""Evaluation tasks: seeded generators and string-match scorers, registered by name in ``TASKS``.

``base.py`` is what a task is; ``haystack.py`` the texts they hide things in; one module per task family:
``passkey``, ``niah``, ``ruler`` (niah_*, vt, cwe, fwe), ``kv_retrieval``, ``ppl``.
"""

from __future__ import annotations

from ...registry import Registry
from .base import Sample, Task, count_tokens, fit_length

TASKS: Registry[Task] = Registry("task")

from . import kv_retrieval, niah, passkey, ppl, ruler  # noqa: E402,F401  (each registers its tasks)

__all__ = ["TASKS", "Sample", "Task", "count_tokens", "fit_length"]
