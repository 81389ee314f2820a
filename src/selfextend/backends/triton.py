"""The ``"triton"`` backend: SelfExtend as one fused GPU kernel (``triton_kernel.py``).

This module is the interface only and imports triton lazily, so ``selfextend`` imports on machines
without it. What the kernel does and why is documented in ``triton_kernel.py``; here:

* ``KERNELS`` declares what the kernels compute (head dims, dtypes, soft-capping); the vLLM plugin's paged
  path checks the same declaration.
* ``supports`` says why an input cannot run (head dim or dtype outside ``KERNELS``, tensors not on CUDA unless
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
from dataclasses import dataclass
from types import ModuleType

import torch

from .base import Backend, SelfExtendInputs, contiguous_padding


@dataclass(frozen=True)
class KernelCapabilities:
    """What the fused Triton kernels compute, declared once: the contiguous kernel's backend
    (``TritonBackend``) and the vLLM plugin's paged path (``PagedSelfExtend.paged_reason``) both check
    inputs against it, without importing triton."""

    head_dims: tuple[int, ...]  # of q/k and of v; powers of two (tl.arange), sizes the tile configs cover
    dtypes: tuple[torch.dtype, ...]  # q, k and v alike
    softcap: bool  # Gemma 2's logit soft-capping

    def dtype_names(self) -> str:
        return ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)

    def head_dim_reason(self, dim: int, dim_v: int) -> str | None:
        """Why the kernels cannot take these head dims (None: they can)."""
        if dim in self.head_dims and dim_v in self.head_dims:
            return None
        return f"head dim {dim} (value {dim_v}) is not one of {self.head_dims}"

    def dtype_reason(self, *dtypes: torch.dtype) -> str | None:
        """Why the kernels cannot take tensors of these dtypes (None: they can)."""
        if len(set(dtypes)) == 1 and dtypes[0] in self.dtypes:
            return None
        return (f"dtype {sorted(map(str, set(dtypes)))} is not one of {self.dtype_names()} "
                "(all of q, k, v alike)")


KERNELS = KernelCapabilities(
    head_dims=(64, 128, 256),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),  # fp32: exact (ieee) products, for tests
    softcap=False,
)


def load_kernel() -> ModuleType | None:
    """The kernel module, or None when triton is not installed (imported on first use)."""
    try:
        return importlib.import_module(".triton_kernel", __package__)
    except ImportError:
        return None


class TritonBackend(Backend):
    """Fused SelfExtend attention on CUDA (prefill and split-KV decode, native GQA, fp16/bf16)."""

    name = "triton"
    methods = ("self-extend",)
    fallback_when_unsupported = True  # explicit backend="triton" logs the reason and falls back

    def validate(self, inp: SelfExtendInputs) -> None:
        """Errors that falling back would hide: called when this backend is requested by name."""
        if inp.query.dtype not in KERNELS.dtypes:
            raise ValueError(
                f"backend='triton' does not support dtype {inp.query.dtype}; "
                f"supported dtypes: {KERNELS.dtype_names()}. "
                "Load the model in one of them, or use backend='auto'."
            )

    def supports(self, inp: SelfExtendInputs) -> str | None:
        tensors = (inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key)
        reason = (KERNELS.head_dim_reason(inp.query.shape[-1], inp.value.shape[-1])
                  or KERNELS.dtype_reason(*(t.dtype for t in tensors)))
        if reason is not None:
            return reason
        if inp.softcap is not None and not KERNELS.softcap:
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
