"""Attention backends behind one interface (see ``base.py``). ``"reference"`` always exists."""

from __future__ import annotations

import logging

from .base import Backend, SelfExtendInputs
from .cpu import BlockwiseBackend
from .reference import ReferenceBackend

logger = logging.getLogger("selfextend")

BACKENDS: dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": BlockwiseBackend(),
}
AUTO_ORDER = ("cpu", "reference")


def available_backends() -> list[str]:
    return ["auto", *sorted(BACKENDS)]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Available: {', '.join(available_backends())}.")
    return name


def select_backend(name: str, inputs: SelfExtendInputs) -> Backend:
    """The backend to run ``inputs``. A named backend that cannot run them raises; only ``auto`` falls back."""
    check_backend_name(name)
    if name != "auto":
        backend = BACKENDS[name]
        reason = backend.supports(inputs)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this input: {reason}. Use backend='reference' or 'auto'.")
        return backend
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        logger.info("selfextend: backend %r skipped: %s", candidate, reason)
    return BACKENDS["reference"]


__all__ = ["BACKENDS", "Backend", "SelfExtendInputs", "available_backends", "check_backend_name", "select_backend"]
