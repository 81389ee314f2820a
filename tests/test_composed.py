"""The composed backend's CUDA code path on CPU: which kernels each call runs, the probe, the merge kernel.

``tests/test_oracle.py`` checks its results against the fp64 oracle (variants ``composed-cuda*``); here the
stand-ins of ``tests/standins.py`` count the calls, so the tests see the composition itself: a prefill is
one windowed FlashAttention call and one cuDNN call, a decode step two FlashAttention calls, and nothing
is copied into another layout.
"""

from __future__ import annotations

import pytest
import torch
from helpers import interpreted_triton_kernel, make_inputs
from standins import AtenStandins, Broken

from selfextend.backends import BACKENDS
from selfextend.backends.composed import ComposedBackend
from selfextend.backends.lse_ops import CudaOps, merge_into_torch
from selfextend.backends.merge import merge_lse

MERGE = interpreted_triton_kernel("triton_merge")


def composed(aten=None, **kw) -> tuple[ComposedBackend, AtenStandins]:
    aten = aten or AtenStandins()
    return ComposedBackend(ops=CudaOps(aten=aten, merge=merge_into_torch, **kw)), aten


def reference(inp):
    return BACKENDS["reference"].forward(inp)


@pytest.mark.parametrize(("q_len", "expected"), [
    (None, {"flash-window": 1, "cudnn": 1}),  # prefill: the band, then the grouped square on cuDNN
    (40, {"flash-window": 1, "flash": 1}),  # chunk: the grouped pass is bottom-right, FlashAttention's
    (1, {"flash": 2}),  # decode: the last W keys and the grouped rest, unmasked
])
def test_each_call_is_two_kernel_calls(q_len, expected):
    backend, aten = composed()
    inp = make_inputs(2, 8, 2, 300, 64, 32, 4, q_len=q_len, dtype=torch.bfloat16)
    assert backend.supports(inp) is None
    aten.calls.clear()
    out = backend.forward(inp)
    assert dict(aten.calls) == expected
    assert out.transpose(1, 2).is_contiguous()  # stored as the layer returns it: no copy follows
    assert (out.float() - reference(inp).float()).abs().max() < 0.05


def test_grouped_kernel_can_be_chosen():
    backend, aten = composed(grouped="flash")
    backend.forward(make_inputs(1, 4, 2, 200, 64, 32, 4, dtype=torch.float16))
    assert "cudnn" not in aten.calls and aten.calls["flash"] == 1
    with pytest.raises(ValueError, match="grouped must be"):
        CudaOps(grouped="fa3")


def test_probe_keeps_wrong_or_failing_kernels_out():
    backend, _ = composed(Broken())
    reason = backend.supports(make_inputs(1, 4, 2, 100, 64, 16, 4, dtype=torch.bfloat16))
    assert reason == "a probe case returned a wrong result"

    class NoCudnn(AtenStandins):
        _scaled_dot_product_cudnn_attention = Broken._scaled_dot_product_cudnn_attention

    backend, aten = composed(NoCudnn())
    inp = make_inputs(1, 4, 2, 100, 64, 16, 4, dtype=torch.bfloat16)
    assert backend.supports(inp) is None
    aten.calls.clear()
    out = backend.forward(inp)  # cuDNN failed its probe: the grouped pass runs on FlashAttention
    assert dict(aten.calls) == {"flash-window": 1, "flash": 1}
    assert (out.float() - reference(inp).float()).abs().max() < 0.05


def test_cuda_ops_state_what_they_cannot_run():
    backend, _ = composed()
    assert "dtype torch.float32" in backend.supports(make_inputs(1, 4, 2, 50, 64, 8, 2))
    assert "soft-capping" in backend.supports(make_inputs(1, 4, 2, 50, 64, 8, 2, dtype=torch.float16,
                                                          softcap=5.0))
    assert "head dim 20" in backend.supports(make_inputs(1, 4, 2, 50, 20, 8, 2, dtype=torch.float16))


@pytest.mark.parametrize("merge", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_in_place_in_the_layers_layout(merge, dtype):
    """Both merges against ``merge_lse``: a (B, T, H, D) buffer seen as (B, H, T, D), out_b in another
    dtype, rows where one pass had no keys (-inf, or FlashAttention's +inf)."""
    if merge == "triton" and MERGE is None:
        pytest.skip("triton is not installed")
    fn = MERGE.merge_into if merge == "triton" else merge_into_torch
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 37, 80  # d not a power of two: masked feature lanes
    out_a = torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)
    out_b = torch.randn(b, h, t, d, generator=g)
    lse_a, lse_b = torch.randn(b, h, t, generator=g) * 3, torch.randn(b, h, t, generator=g) * 3
    lse_a[0, 0, :5] = float("-inf")
    lse_b[1, 2, 5:9] = float("inf")
    expected, _ = merge_lse(out_a, lse_a, out_b, lse_b.masked_fill(lse_b == float("inf"), float("-inf")))
    fn(out_a, lse_a, out_b, lse_b)
    assert out_a.dtype == dtype and out_a.transpose(1, 2).is_contiguous()
    tol = 2 * torch.finfo(dtype).eps * float(expected.abs().max())
    assert (out_a.float() - expected).abs().max() <= tol
    # no keys in pass a: pass b alone (within one rounding: the interpreter truncates to bf16)
    assert (out_a[0, 0, :5].float() - out_b[0, 0, :5]).abs().max() <= tol


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("q_len", [None, 33, 1])
def test_head_dims_and_left_padding(dim, q_len):
    """Head dims 128/256 and a left-padded batch (each row's real tokens sliced, so kernels never see a
    mask) on the CUDA code path, in fp16."""
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[1, :41] = False
    backend, _ = composed()
    inp = make_inputs(2, 4, 2, 150, dim, 16, 4, q_len=q_len, key_valid=valid, dtype=torch.float16)
    assert backend.supports(inp) is None
    real = valid[:, inp.q_start :, None, None].transpose(1, 2)
    err = ((backend.forward(inp).float() - reference(inp).float()) * real).abs().max()
    assert err < 5e-3


@pytest.mark.parametrize("q_len", [None, 30, 1])
def test_dca_runs_on_the_cuda_ops(q_len):
    from helpers import make_dca_inputs

    backend, aten = composed()
    inp = make_dca_inputs(1, 4, 2, 140, q_len=q_len, dim=64, cs=48, lw=8, dtype=torch.bfloat16)[0]
    assert backend.supports(inp) is None
    aten.calls.clear()
    out = backend.forward(inp)
    assert aten.calls["flash"] > 0
    assert (out.float() - reference(inp).float()).abs().max() < 0.05


def test_cudnn_refusing_a_call_falls_back_for_good(caplog):
    """The probe runs on contiguous tensors; a real call with a layout cuDNN refuses must not fail the
    forward: FlashAttention takes that call and every later one."""

    class Picky(AtenStandins):
        def _scaled_dot_product_cudnn_attention(self, query, *args, **kwargs):
            if not query.is_contiguous():
                raise RuntimeError("cuDNN Frontend error: stride not supported")
            return super()._scaled_dot_product_cudnn_attention(query, *args, **kwargs)

    backend, aten = composed(Picky())
    inp = make_inputs(1, 4, 2, 120, 64, 16, 4, dtype=torch.float16)
    inp.grouped_query = inp.grouped_query.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) storage
    assert backend.supports(inp) is None
    out = backend.forward(inp)
    assert "cuDNN attention refused a call" in caplog.text
    assert (out.float() - reference(inp).float()).abs().max() < 0.05
    aten.calls.clear()
    backend.forward(inp)
    assert "cudnn" not in aten.calls
