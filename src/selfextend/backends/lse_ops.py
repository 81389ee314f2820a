"""Attention calls that return the log-sum-exp, per device: what the composed backend is built from.

Every op takes q (B, H, Tq, D) and k, v (B, Hkv, Tk, D) with ``H % Hkv == 0`` (GQA, K/V never expanded)
and returns ``(out (B, H, Tq, Dv) in q's dtype, lse (B, H, Tq) fp32)``:

* ``full``: every key (an optional bool ``mask``, CPU only);
* ``causal``: bottom-right causal, query r sees keys ``<= Tk - Tq + r`` (``Tq <= Tk``);
* ``band``: bottom-right causal within ``window`` keys, query r sees ``(Tk - Tq + r - W, Tk - Tq + r]``,
  or None where the device has no windowed kernel (the composed backend builds the band from ``causal``
  and ``full`` calls then);
* ``merge_``: one softmax over two disjoint key sets, written into the first output in place, in its dtype
  and layout. A pass without keys for a row reports ``lse = -inf`` (ours) or ``+inf`` (FlashAttention):
  both weigh nothing.

``CpuOps``: torch's CPU flash kernel (``primitives.py``), the matmul path for soft-capping.
``CudaOps``: the kernels ``F.scaled_dot_product_attention`` itself runs, through torch's private aten ops
(they return the LSE, the public function does not): FlashAttention-2 (``_flash_attention_forward``:
bottom-right causal, a sliding window that skips key blocks outside it, native GQA) and, for the grouped
pass of a prefill (equal query and key lengths), cuDNN attention, which SDPA picks on Hopper because it is
faster there. Private ops can change between torch versions and GPUs, so each is probed once per dtype,
head dim and head layout against a plain computation, and what fails the probe is not used (the backend
then reports itself unsupported and ``auto`` moves on). The aten namespace is a constructor argument so
that tests run this exact code on CPU with stand-ins of the same signatures.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .merge import merge_lse
from .primitives import attention_with_lse, bottom_right_causal

logger = logging.getLogger("selfextend")

_MERGE_ROWS = 2048  # rows merged at a time on CPU: bounds the fp32 temporaries


def merge_into_torch(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                     lse_b: torch.Tensor) -> None:
    """``merge_`` in torch ops, chunked over rows so its fp32 temporaries stay small."""
    rows = out_a.shape[-2]
    for s in range(0, rows, _MERGE_ROWS):
        e = min(rows, s + _MERGE_ROWS)
        la, lb = _finite_or_empty(lse_a[..., s:e]), _finite_or_empty(lse_b[..., s:e])
        merged, _ = merge_lse(out_a[..., s:e, :], la, out_b[..., s:e, :], lb)
        out_a[..., s:e, :] = merged


def _finite_or_empty(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's ``+inf`` for a row without keys, as the ``-inf`` that ``merge_lse`` expects."""
    return lse.masked_fill(lse == float("inf"), float("-inf"))


class CpuOps:
    """torch's CPU flash kernel where it runs, the exact blockwise matmul path elsewhere (soft-capping)."""

    name = "cpu"
    band = None  # no windowed CPU kernel: the composed backend assembles the band itself

    def supports(self, query: torch.Tensor, value: torch.Tensor, softcap: float | None) -> str | None:
        return None

    @staticmethod
    def full(q, k, v, scale, softcap=None, mask=None):
        return attention_with_lse(q, k, v, scale, mask=mask, softcap=softcap)

    @staticmethod
    def causal(q, k, v, scale, softcap=None):
        return bottom_right_causal(q, k, v, scale, softcap)

    @staticmethod
    def merge_(out_a, lse_a, out_b, lse_b) -> None:
        if out_a.shape[-2] == 1:  # a decode step: one lerp, no chunk loop (CPU lse is never +inf)
            # weight of b: sigmoid(lse_b - lse_a); nan only if both sets were empty, which a decode step's
            # neighbor set (the query's own key) never is
            w_b = torch.sigmoid(lse_b - lse_a)[..., None]
            if out_a.dtype == torch.float32:
                out_a.lerp_(out_b, w_b)  # in place: 3 ops where a decode step's budget is a few microseconds
            else:  # computed in fp32 and rounded once
                out_a.copy_(torch.lerp(out_a.to(torch.float32), out_b.to(torch.float32), w_b))
            return
        merge_into_torch(out_a, lse_a, out_b, lse_b)


class CudaOps:
    """FlashAttention-2 and cuDNN attention through torch's aten ops, a Triton merge (see module docstring).

    Args:
        aten: the namespace the ops are looked up in (``torch.ops.aten``; tests pass CPU stand-ins).
        grouped: ``"auto"`` (cuDNN for equal-length causal calls where it passes the probe, else
            FlashAttention), ``"cudnn"`` or ``"flash"``: benchmarks time both.
        merge: the in-place merge (default: the Triton kernel, torch ops where triton is missing).
    """

    name = "cuda"
    dtypes = (torch.float16, torch.bfloat16)  # FlashAttention and cuDNN attention take no fp32
    max_head_dim = 256

    def __init__(self, aten: Any = None, grouped: str = "auto", merge: Any = None) -> None:
        if grouped not in ("auto", "cudnn", "flash"):
            raise ValueError(f"grouped must be 'auto', 'cudnn' or 'flash', got {grouped!r}")
        self.aten = aten if aten is not None else torch.ops.aten
        self.grouped = grouped
        self._merge = merge
        self._probed: dict[tuple, str | None] = {}

    # --- capability ---

    def supports(self, query: torch.Tensor, value: torch.Tensor, softcap: float | None) -> str | None:
        if softcap is not None:
            return "logit soft-capping (Gemma 2) has no fused kernel that returns the LSE"
        if query.dtype not in self.dtypes:
            return f"dtype {query.dtype} (FlashAttention and cuDNN attention take float16 and bfloat16)"
        dim, dim_v = query.shape[-1], value.shape[-1]
        if dim != dim_v or dim % 8 or dim > self.max_head_dim:
            return f"head dim {dim} (value {dim_v}): FlashAttention needs equal dims, a multiple of 8, <= 256"
        gqa = query.shape[1] != value.shape[1]
        if self.grouped != "flash":  # probed now, not inside a forward: cuDNN failing it only means flash
            self._probe("cudnn", query.dtype, dim, gqa, query.device)
        return self._probe("flash", query.dtype, dim, gqa, query.device)

    def _use_cudnn(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if self.grouped == "flash":
            return False
        return self._probe("cudnn", q.dtype, q.shape[-1], q.shape[1] != k.shape[1], q.device) is None

    def _probe(self, op: str, dtype: torch.dtype, dim: int, gqa: bool, device: torch.device) -> str | None:
        """None if ``op`` computes a small causal (and, for flash, windowed) case right, else the reason."""
        key = (op, dtype, dim, gqa, str(device))
        if key not in self._probed:
            self._probed[key] = _probe_op(self, op, dtype, dim, gqa, device)
            if self._probed[key] is not None:
                logger.info("selfextend: %s attention not used for %s, head dim %d%s: %s", op, dtype, dim,
                            " (GQA)" if gqa else "", self._probed[key])
        return self._probed[key]

    # --- the ops ---

    def _flash(self, q, k, v, scale, causal, window=None):
        """``_flash_attention_forward`` in its (B, T, H, D) layout: transposed views in and out, no copy."""
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        qt, kt, vt = (x if x.stride(-1) == 1 else x.contiguous() for x in (qt, kt, vt))
        left, right = (window - 1, 0) if window is not None else (None, None)
        out, lse = self.aten._flash_attention_forward(
            qt, kt, vt, None, None, qt.shape[1], kt.shape[1], 0.0, causal, False, scale=scale,
            window_size_left=left, window_size_right=right)[:2]
        return out.transpose(1, 2), lse

    def full(self, q, k, v, scale, softcap=None, mask=None):
        if mask is not None or softcap is not None:
            raise ValueError("CudaOps.full takes no mask and no soft-capping")
        return self._flash(q, k, v, scale, causal=False)

    def causal(self, q, k, v, scale, softcap=None):
        if q.shape[2] == k.shape[2] and q.shape[2] > 1 and self._use_cudnn(q, k):
            try:
                out, lse = self.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
                return out, lse.reshape(lse.shape[:3])  # cuDNN's lse is (B, H, T, 1)
            except RuntimeError as err:  # the probe's tensors were contiguous; a layout it refuses lands here
                key = ("cudnn", q.dtype, q.shape[-1], q.shape[1] != k.shape[1], str(q.device))
                self._probed[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                logger.warning("selfextend: cuDNN attention refused a call (%s); FlashAttention from now on",
                               self._probed[key])
        return self._flash(q, k, v, scale, causal=True)

    def band(self, q, k, v, window, scale, softcap=None):
        return self._flash(q, k, v, scale, causal=True, window=window)

    def merge_(self, out_a, lse_a, out_b, lse_b) -> None:
        merge = self._merge if self._merge is not None else _default_cuda_merge()
        merge(out_a, lse_a, out_b, lse_b)


@functools.cache
def _default_cuda_merge():
    from . import triton as triton_backend

    if triton_backend.load_kernel() is None:
        return merge_into_torch
    from .triton_merge import merge_into

    return merge_into


def _probe_op(ops: CudaOps, op: str, dtype: torch.dtype, dim: int, gqa: bool,
              device: torch.device) -> str | None:
    """Run ``op`` on a small case with keys of every kind (GQA or not) against fp32 matmuls on the same
    device; an error or a wrong answer both mean "do not use it"."""
    heads, kv_heads, n = 4, 2 if gqa else 4, 150
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, n, dim, generator=g).to(device=device, dtype=dtype)
               for h in (heads, kv_heads, kv_heads))
    scale = dim**-0.5
    pos = torch.arange(n, device=device)
    causal = pos[:, None] >= pos[None, :]
    try:
        if op == "cudnn":
            out, lse = ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
            lse = lse.reshape(lse.shape[:3])
            cases = [(out, lse, causal)]
        else:
            window = 37
            cases = [(*ops._flash(q, k, v, scale, causal=True), causal),
                     (*ops._flash(q, k, v, scale, causal=True, window=window),
                      causal & (pos[:, None] - pos[None, :] < window)),
                     (*ops._flash(q[:, :, -5:], k, v, scale, causal=True), causal[-5:])]  # bottom-right
        for out, lse, allowed in cases:
            ref, ref_lse = _plain(q[:, :, -allowed.shape[0]:], k, v, scale, allowed)
            if out.shape != ref.shape or lse.shape != ref_lse.shape:
                return f"returned shapes {tuple(out.shape)}, {tuple(lse.shape)}"
            tol = 4 * torch.finfo(dtype).eps * max(1.0, float(ref.abs().max()))
            if (float((out.float() - ref).abs().max()) > tol
                    or float((lse.float() - ref_lse).abs().max()) > 1e-2):
                return "a probe case returned a wrong result"
    except Exception as err:  # noqa: BLE001 - any failure of a private op means "do not use it"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _plain(q, k, v, scale, allowed):
    rep = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(rep, 1) for x in (k, v))
    s = (q.float() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)
    return torch.softmax(s, -1) @ v, lse


CPU_OPS = CpuOps()
_CUDA_OPS: CudaOps | None = None


def ops_for(tensor: torch.Tensor) -> CpuOps | CudaOps:
    """The ops for ``tensor``'s device: CUDA's kernels on CUDA, the CPU ops anywhere else."""
    global _CUDA_OPS
    if tensor.device.type != "cuda":
        return CPU_OPS
    if _CUDA_OPS is None:
        _CUDA_OPS = CudaOps()
    return _CUDA_OPS
