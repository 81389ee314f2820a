"""The ``"triton"`` backend: SelfExtend as one fused GPU kernel (``triton_kernel.py``).

This module is the interface only and imports triton lazily, so ``selfextend`` imports on machines
without it. What the kernel does and why is documented in ``triton_kernel.py``; here:

* ``supports`` says why an input cannot run (head dim outside {64, 128, 256}, tensors not on CUDA unless
  the kernel was built under ``TRITON_INTERPRET=1``, logit soft-capping, padding with holes, triton
  missing). ``select_backend`` logs the reason and falls back (``auto`` and an explicit
  ``backend="triton"`` alike: a model whose layers or inputs are partly outside the kernel's range still
  runs, exactly, on the next backend).
* ``validate`` raises for a dtype the kernel cannot take at all: asking explicitly for ``"triton"`` with
  a float64 model is a configuration error, not something to silently work around.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from . import BACKENDS
from .base import Backend, SelfExtendInputs, contiguous_padding

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32: exact (ieee) products, for tests


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def load_kernel() -> ModuleType | None:
    """The kernel module, or None when triton is not installed (imported on first use)."""
    try:
        return importlib.import_module(".triton_kernel", __package__)
    except ImportError:
        return None


@BACKENDS.register()
class TritonBackend(Backend):
    """Fused SelfExtend attention on CUDA (prefill and split-KV decode, native GQA, fp16/bf16)."""

    name = "triton"
    methods = ("self-extend",)
    fallback_when_unsupported = True  # explicit backend="triton" logs the reason and falls back

    def validate(self, inp: SelfExtendInputs) -> None:
        """Errors that falling back would hide: called when this backend is requested by name."""
        if inp.query.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"backend='triton' does not support dtype {inp.query.dtype}; "
                f"supported dtypes: {_dtype_names()}. "
                "Load the model in one of them, or use backend='auto'."
            )

    def supports(self, inp: SelfExtendInputs) -> str | None:
        dim, dim_v = inp.query.shape[-1], inp.value.shape[-1]
        if dim not in SUPPORTED_HEAD_DIMS or dim_v not in SUPPORTED_HEAD_DIMS:
            return f"head dim {dim} (value {dim_v}) is not one of {SUPPORTED_HEAD_DIMS}"
        dtypes = {t.dtype for t in (inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key)}
        if len(dtypes) != 1 or inp.query.dtype not in SUPPORTED_DTYPES:
            return f"dtype {sorted(map(str, dtypes))} is not one of {_dtype_names()} (all of q, k, v alike)"
        if inp.softcap is not None:
            return "logit soft-capping (Gemma 2) is not implemented in the kernel"
        if not contiguous_padding(inp):
            return "padding is not one contiguous block per row"
        if (not inp.query.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
                and not _built_interpreted()):
            return (f"tensors are on {inp.query.device.type}: "
                    "the kernel needs CUDA (or TRITON_INTERPRET=1 for tests)")
        kernel = load_kernel()
        if kernel is None:
            return "triton is not installed (pip install 'selfextend-llm[triton]')"
        if not inp.query.is_cuda and not kernel.INTERPRET:
            return (f"tensors are on {inp.query.device.type} and the kernel was not built under "
                    "TRITON_INTERPRET=1")
        return None

    def forward(self, inp: SelfExtendInputs) -> torch.Tensor:
        kernel = load_kernel()
        if kernel is None:
            raise ImportError("backend 'triton' needs triton: pip install 'selfextend-llm[triton]'")
        out, _ = kernel.selfextend_attention(
            inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key,
            inp.query_pos, inp.key_pos, inp.key_valid, inp.q_start, inp.window, inp.scaling,
        )
        return out


def _built_interpreted() -> bool:
    """Whether the kernel module is already imported in interpreter mode (without importing it)."""
    kernel = sys.modules.get(f"{__package__}.triton_kernel")
    return bool(getattr(kernel, "INTERPRET", False))
