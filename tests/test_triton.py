"""The fused Triton kernel against the reference, run on the CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` is read when a ``@triton.jit`` function is defined, so it is set only while this
module imports the kernel module, then restored: other test modules see the environment unchanged.
The kernel itself is the same code a GPU compiles; ``test_compiles_for_nvidia`` additionally compiles it
for sm_80/sm_90 with the ptxas bundled in the triton wheel (no GPU needed) to catch what the interpreter
tolerates.
"""

import importlib.util
import logging
import os

import pytest
import torch
from helpers import interpreted_triton_kernel, make_inputs, real_rows

pytest.importorskip("triton", reason="triton is not installed: pip install 'selfextend-llm[triton]'")


tk = interpreted_triton_kernel()
if tk is None:
    pytest.skip("the kernel module was imported compiled before this module", allow_module_level=True)

from selfextend.backends import BACKENDS, select_backend  # noqa: E402
from selfextend.backends import triton as triton_backend  # noqa: E402


def run(inp, **kw):
    return tk.selfextend_attention(
        inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key,
        inp.query_pos, inp.key_pos, inp.key_valid, inp.q_start, inp.window, inp.scaling, **kw,
    )


def reference(inp):
    return real_rows(BACKENDS["reference"].forward(inp), inp)


SHAPES = [  # (bsz, heads, kv_heads, kv_len, dim, window, group)
    (2, 4, 2, 230, 64, 8, 2),  # GQA, length not a multiple of any tile
    (1, 6, 3, 77, 64, 30, 4),  # W % G != 0
    (1, 4, 4, 61, 128, 16, 3),  # MHA, d=128
    (1, 8, 1, 90, 64, 24, 5),  # MQA: 8 query heads packed into one KV head's tile
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_len", [None, 1, 23])  # prefill, decode, chunked prefill (q_start > 0)
def test_matches_reference_small_tiles(shape, q_len):
    b, h, hk, n, d, w, g = shape
    inp = make_inputs(b, h, hk, n, d, w, g, q_len=q_len)
    out, lse = run(inp, block_m=16, block_n=16)
    assert out.shape == inp.query.shape and lse.shape == inp.query.shape[:3]
    assert (out - reference(inp)).abs().max() < 2e-5


def test_default_launch_and_head_dim_256():
    inp = make_inputs(1, 2, 1, 90, 256, 40, 4)
    assert (run(inp)[0] - reference(inp)).abs().max() < 2e-5


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_split_kv_decode(num_splits):
    """One query against a long cache; the keys split over programs and merged by LSE."""
    inp = make_inputs(2, 8, 2, 700, 64, 64, 8, q_len=1)
    out, lse = run(inp, num_splits=num_splits)
    assert (out - reference(inp)).abs().max() < 2e-5
    scores = _dense_scores(inp)  # the kernel's LSE is the log-sum-exp of the merged scores
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-4)


def _dense_scores(inp):
    """(B, H, q_len, kv_len) SelfExtend scores with -inf where masked (tiny inputs only)."""
    rep = inp.query.shape[1] // inp.key.shape[1]
    k, kg = (t.repeat_interleave(rep, 1) for t in (inp.key, inp.grouped_key))
    s_n = inp.query @ k.transpose(-1, -2)
    s_g = inp.grouped_query @ kg.transpose(-1, -2)
    dist = inp.query_pos[:, None, :, None] - inp.key_pos[:, None, None, :]
    s = torch.where(dist < inp.window, s_n, s_g) * inp.scaling
    q_idx = inp.q_start + torch.arange(inp.q_len)
    allowed = torch.arange(inp.kv_len)[None, :] <= q_idx[:, None]
    return s.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("q_len", [None, 1, 25])
def test_left_padding_per_row_positions(q_len):
    """Rows of different lengths in one batch: per-row positions, padding keys excluded, padding queries 0."""
    valid = torch.ones(3, 72, dtype=torch.bool)
    valid[0, :17] = False
    valid[1, :40] = False
    inp = make_inputs(3, 4, 2, 72, 64, 8, 4, q_len=q_len, key_valid=valid)
    for kw in ({"block_m": 16, "block_n": 16}, {}):
        out, _ = run(inp, **kw)
        assert (real_rows(out, inp) - reference(inp)).abs().max() < 2e-5
        assert torch.equal(out, real_rows(out, inp))  # padding queries are exactly zero


def test_fp16_within_rounding_of_reference():
    inp32 = make_inputs(1, 4, 2, 130, 64, 32, 4)
    exact = BACKENDS["reference"].forward(inp32)
    inp = make_inputs(1, 4, 2, 130, 64, 32, 4, dtype=torch.float16)
    ref_low = BACKENDS["reference"].forward(inp).float()
    out = run(inp, block_m=32, block_n=32)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    eps = torch.finfo(torch.float16).eps
    assert (out.float() - exact).abs().max() <= 2 * (ref_low - exact).abs().max() + 4 * eps


def _expected_tiles(inp, block_m, block_n):
    """Brute-force tile classes (neighbor-only, grouped-only, boundary) the kernel should visit."""
    bsz, heads, m, _ = inp.query.shape
    rep = heads // inp.key.shape[1]
    counts = [0, 0, 0]
    valid = inp.key_valid if inp.key_valid is not None else torch.ones(bsz, inp.kv_len, dtype=torch.bool)
    for b in range(bsz):
        first = int(valid[b].long().argmax())
        lo = first // block_n * block_n
        for r0 in range(0, m * rep, block_m):
            qi = torch.arange(r0, min(r0 + block_m, m * rep)) // rep
            q_ok = valid[b, inp.q_start + qi]
            if not q_ok.any():
                continue
            qpos = inp.query_pos[b, qi][q_ok]
            hi = min(inp.kv_len, inp.q_start + int(qi.max()) + 1)
            for t in range(lo, hi, block_n):
                kidx = torch.arange(t, min(t + block_n, hi))
                kpos = inp.key_pos[b, kidx][valid[b, kidx]]
                if int(qpos.max() - kpos.min()) < inp.window:
                    counts[0] += 1
                elif int(qpos.min() - kpos.max()) >= inp.window:
                    counts[1] += 1
                else:
                    counts[2] += 1
    return [c * inp.key.shape[1] for c in counts]  # every KV head visits the same tiles


@pytest.mark.parametrize("case", ["prefill", "chunk", "decode", "padded"])
def test_tile_classes_and_skipped_work(case):
    """Only boundary tiles compute two products; tiles past the diagonal and before the padding are
    skipped."""
    valid = None
    if case == "padded":
        valid = torch.ones(2, 200, dtype=torch.bool)
        valid[0, :37] = False
    q_len = {"prefill": None, "chunk": 40, "decode": 1, "padded": None}[case]
    inp = make_inputs(1 if valid is None else 2, 2, 1, 200, 64, 40, 4, q_len=q_len, key_valid=valid)
    counts = torch.zeros(3, dtype=torch.int32)
    out, _ = run(inp, block_m=16, block_n=16, num_splits=1, tile_counts=counts)
    assert (real_rows(out, inp) - reference(inp)).abs().max() < 2e-5
    got = counts.tolist()
    assert got == _expected_tiles(inp, 16, 16)
    n_tiles = -(-inp.kv_len // 16)
    row_tiles = -(-inp.q_len * 2 // 16)
    if case != "decode":
        assert sum(got) < row_tiles * n_tiles * inp.key.shape[1]  # causal-future tiles skipped
        assert got[2] < got[0] + got[1]  # boundary tiles are a thin band


def test_supports_and_fallback(caplog, monkeypatch):
    backend = BACKENDS["triton"]
    assert backend.supports(make_inputs(1, 4, 2, 40, 64, 8, 2)) is None  # interpreter: CPU tensors run
    assert "head dim 32" in backend.supports(make_inputs(1, 4, 2, 40, 32, 8, 2))
    assert "soft-capping" in backend.supports(make_inputs(1, 4, 2, 40, 64, 8, 2, softcap=5.0))
    holes = torch.ones(1, 40, dtype=torch.bool)
    holes[0, 10:15] = False
    assert "contiguous" in backend.supports(make_inputs(1, 4, 2, 40, 64, 8, 2, q_len=1, key_valid=holes))
    monkeypatch.setattr(triton_backend, "_built_interpreted", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "needs CUDA" in backend.supports(make_inputs(1, 4, 2, 40, 64, 8, 2))
    monkeypatch.undo()

    # explicit backend='triton' that cannot run: logged, then auto's choice (exact on CPU)
    inp = make_inputs(1, 4, 2, 40, 32, 8, 2)
    with caplog.at_level(logging.WARNING, logger="selfextend"):
        assert select_backend("triton", inp).name == "composed"
    assert "backend 'triton' cannot run this input (head dim 32" in caplog.text
    # ... but an unsupported dtype is a configuration error
    with pytest.raises(ValueError,
                       match=r"does not support dtype torch.float64; supported dtypes: float16, bfloat16, "
                             r"float32"):
        select_backend("triton", make_inputs(1, 4, 2, 40, 64, 8, 2, dtype=torch.float64))
    # auto on CPU: never triton
    assert select_backend("auto", make_inputs(1, 4, 2, 40, 64, 8, 2)).name == "composed"


def test_backend_forward_matches_reference():
    inp = make_inputs(2, 4, 2, 90, 64, 16, 4, q_len=1)
    assert (BACKENDS["triton"].forward(inp) - reference(inp)).abs().max() < 2e-5


def _compiled_copy():
    """A second copy of the kernel module built in compiled mode (this module's copy is interpreted)."""
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location("_selfextend_triton_kernel_compiled", tk.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def test_compiles_for_nvidia():
    """Compile (not run) the kernel to cubin for sm_90 (bf16 prefill) and sm_80 (fp16 split decode), no GPU
    needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if type(triton.language.standard.max).__name__ == "InterpretedFunction":
        pytest.skip("triton itself was imported under TRITON_INTERPRET=1: no compiled library to build with")
    try:
        from triton.backends import backends as triton_backends

        if "nvidia" not in triton_backends:
            pytest.skip("this triton wheel has no NVIDIA backend")
    except ImportError:
        pytest.skip("triton.backends not importable")

    fn = _compiled_copy()._selfextend_fwd
    configs = [("bf16", 128, *tk._PREFILL_CONFIG[128], True, False, 90),
               ("fp16", 64, 16, *tk._DECODE_CONFIG[64], True, True, 80)]
    for dtype, dim, bm, bn, warps, stages, pad, split, arch in configs:
        sig = {name: "i32" for name in fn.arg_names}
        sig.update({p: f"*{dtype}" for p in ("Q", "K", "V", "QG", "KG")})
        sig.update(QPOS="*i32", KPOS="*i32", KVALID="*i8", KFIRST="*i32", LSE="*fp32", TILES="*i32",
                   qk_scale="fp32")
        sig["OUT"] = "*fp32" if split else f"*{dtype}"
        consts = dict(HKV=8, REP=4, HAS_PAD=pad, SPLIT=split, HEAD_DIM=dim, HEAD_DIM_V=dim, BLOCK_M=bm,
                      BLOCK_N=bn, COUNT_TILES=False)
        sig.update({c: "constexpr" for c in consts})
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
        except RuntimeError as err:  # a missing toolchain piece, not a kernel bug
            if "ptxas" in str(err) and "not found" in str(err):
                pytest.skip(f"no ptxas: {err}")
            raise
        assert kernel.asm["cubin"], (dtype, dim, arch)
