"""Attention backends behind one interface (see ``base.py``). ``"reference"`` always exists.

``"triton"`` and ``"flex"`` are GPU backends; their modules import triton / flex_attention lazily, so
this package imports without them. ``auto`` tries them first on CUDA tensors.
"""

from __future__ import annotations

import logging

from .base import Backend, SelfExtendInputs
from .cpu import BlockwiseBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

logger = logging.getLogger("selfextend")

BACKENDS: dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": BlockwiseBackend(),
    "triton": TritonBackend(),
    "flex": FlexBackend(),
}
AUTO_ORDER = ("cpu", "reference")
AUTO_ORDER_CUDA = ("triton", "flex", "cpu", "reference")
_fallback_logged: set[tuple[str, str]] = set()


def available_backends() -> list[str]:
    """``auto``, the backends that run anywhere, then the GPU ones."""
    return ["auto", *AUTO_ORDER, *sorted(set(BACKENDS) - set(AUTO_ORDER))]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Available: {', '.join(available_backends())}.")
    return name


def select_backend(name: str, inputs: SelfExtendInputs) -> Backend:
    """The backend to run ``inputs``.

    ``auto`` takes the first backend of its order (GPU backends first on CUDA) that supports the input.
    A named backend that cannot run the input raises, except backends marked
    ``fallback_when_unsupported`` (triton, flex): their limits depend on the hardware and the layer (head
    dim, device, soft-capping), so they log the reason once and fall back to ``auto``. Errors a fallback
    would hide (e.g. an unsupported dtype) come from the backend's ``validate`` and always raise.
    """
    check_backend_name(name)
    if name != "auto":
        backend = BACKENDS[name]
        validate = getattr(backend, "validate", None)
        if validate is not None:
            validate(inputs)
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        if not getattr(backend, "fallback_when_unsupported", False):
            raise ValueError(f"backend={name!r} cannot run this input: {reason}. Use backend='reference' or 'auto'.")
        if (name, reason) not in _fallback_logged:
            _fallback_logged.add((name, reason))
            logger.warning("selfextend: backend %r cannot run this input (%s); falling back to 'auto'", name, reason)
    order = AUTO_ORDER_CUDA if inputs.query.is_cuda else AUTO_ORDER
    for candidate in order:
        if candidate == name:
            continue
        backend = BACKENDS[candidate]
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        logger.info("selfextend: backend %r skipped: %s", candidate, reason)
    return BACKENDS["reference"]


__all__ = ["BACKENDS", "Backend", "SelfExtendInputs", "available_backends", "check_backend_name", "select_backend"]
