"""Attention backends behind one contract (``base.py``), in one registry, chosen by one policy.

Each backend states which methods' inputs it computes (``Backend.methods``): ``reference``, ``composed``
and ``cpu`` run SelfExtend and DCA, ``flex`` and ``triton`` run SelfExtend. ``"auto"`` tries them in
``AUTO_ORDER`` for the tensors' device and takes the first that supports the input.

The GPU backends are lazy registry entries: their modules load on first lookup, so ``import selfextend``
neither pays for them nor breaks when their toolchains are half installed. Their ``methods`` are declared
beside the entry, so listing and validating backend names (``BACKENDS.peek``) never imports them; the
registry checks the declaration against the class when it loads.
"""

from __future__ import annotations

import logging

from ..registry import Registry
from .base import Backend, DCAInputs, Inputs, SelfExtendInputs

logger = logging.getLogger("selfextend")

BACKENDS: Registry[Backend] = Registry("backend", base=Backend)

from . import composed, reference  # noqa: E402,F401  (each registers itself)

BACKENDS.add("flex", "selfextend.backends.flex:FlexBackend", methods=("self-extend",))
BACKENDS.add("triton", "selfextend.backends.triton:TritonBackend", methods=("self-extend",))

AUTO_ORDER = ("composed", "reference")
AUTO_ORDER_CUDA = ("composed", "triton", "flex", "cpu", "reference")
_fallback_logged: set[tuple[str, str]] = set()


def available_backends(method: str = "self-extend") -> list[str]:
    """``auto``, then the backends of ``method`` that run anywhere, then the GPU ones."""
    names = [n for n in (*AUTO_ORDER, *sorted(set(BACKENDS) - set(AUTO_ORDER)))
             if method in BACKENDS.peek(n, "methods")]
    return ["auto", *names]


def check_backend_name(name: str, method: str = "self-extend") -> str:
    """``name`` if it is ``auto`` or a backend that computes ``method``, else an error listing the choices."""
    if name == "auto":
        return name
    choices = ", ".join(available_backends(method))
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Available: {choices}.")
    if method not in BACKENDS.peek(name, "methods"):
        raise ValueError(f"Backend {name!r} does not run {method}. Available for {method}: {choices}.")
    return name


def select_backend(name: str, inputs: Inputs) -> Backend:
    """The backend to run ``inputs`` (any method).

    ``auto`` takes the first backend of its order (GPU backends first on CUDA) that supports the input.
    A named backend that cannot run the input raises, except backends marked ``fallback_when_unsupported``
    (triton, flex): their limits depend on the hardware and the layer (head dim, device, soft-capping), so
    they log the reason once and fall back to ``auto``. Errors a fallback would hide (an unsupported dtype)
    come from the backend's ``validate`` and always raise.
    """
    method = inputs.method
    check_backend_name(name, method)
    if name != "auto":
        backend = BACKENDS[name]
        backend.validate(inputs)
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        if not backend.fallback_when_unsupported:
            raise ValueError(f"backend={name!r} cannot run this input: {reason}. "
                             "Use backend='reference' or 'auto'.")
        if (name, reason) not in _fallback_logged:
            _fallback_logged.add((name, reason))
            logger.warning("selfextend: backend %r cannot run this input (%s); falling back to 'auto'",
                           name, reason)
    for candidate in AUTO_ORDER_CUDA if inputs.query.is_cuda else AUTO_ORDER:
        if candidate == name or method not in BACKENDS.peek(candidate, "methods"):
            continue
        backend = BACKENDS[candidate]
        reason = backend.supports(inputs)
        if reason is None:
            return backend
        logger.info("selfextend: backend %r skipped for %s: %s", candidate, method, reason)
    return BACKENDS["reference"]


__all__ = ["BACKENDS", "Backend", "DCAInputs", "SelfExtendInputs", "available_backends", "check_backend_name",
           "select_backend"]
