"""The fused Triton kernel against the fp64 oracle (``tests/reference.py``), run on the CPU by Triton's
interpreter.

Every test takes the kernel from the ``tk`` fixture: the module built for the interpreter (``interpreted.py``:
a private copy when this process imported the compiled one first, so test order cannot turn these tests into
skips), installed where the ``"triton"`` backend imports it from; the test fails if the kernel never launched.
Expected values come from the oracle, which shares no code with the library: the q and k the kernel gets are
un-rotated in fp64 by the oracle's own RoPE, so the library's grouped q and k are under test too. fp32 must
be within the oracle's fp32 tolerance, fp16 within twice the error of attention written plainly in fp16 (the
2x rule). ``test_compiles_for_nvidia`` also compiles the kernel for sm_80/sm_90 with the ptxas bundled in the
triton wheel (no GPU needed) to catch what the interpreter tolerates.
"""

import logging

import interpreted
import pytest
import torch
from helpers import make_inputs, real_rows
from reference import fp32_tolerance, rope, rounding_tolerance, selfextend_attention_ref

from selfextend.backends import BACKENDS, select_backend
from selfextend.backends import triton as triton_backend

pytest.importorskip("triton", reason="triton is not installed: pip install 'selfextend-llm[triton]'")


@pytest.fixture
def kernel_module():
    """The kernel module built for the interpreter, installed where the backend imports it from."""
    with interpreted.installed() as built:
        yield built["triton_kernel"]


@pytest.fixture
def tk():
    """``kernel_module``, for a test that must launch the kernel (it fails if the kernel never ran)."""
    yield from interpreted.launching("triton_kernel", "_selfextend_fwd")


def run(tk, inp, **kw):
    return tk.selfextend_attention(
        inp.query, inp.key, inp.value, inp.grouped_query, inp.grouped_key,
        inp.query_pos, inp.key_pos, inp.key_valid, inp.q_start, inp.window, inp.scaling, **kw,
    )


def oracle(inp, group, precision=None, with_lse=False):
    """The fp64 oracle on the kernel's inputs (``make_inputs``: q and k rotated at their positions, real
    tokens counted from 0), q and k un-rotated by the oracle's own RoPE; ``precision``: as
    ``attention_ref``."""
    bsz, _, kv_len, dim = inp.key.shape
    valid = inp.key_valid if inp.key_valid is not None else torch.ones(bsz, kv_len, dtype=torch.bool)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    query_pos = pos[:, inp.q_start :]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))  # make_inputs' frequencies
    q, k = rope(inp.query, -query_pos, inv_freq), rope(inp.key, -pos, inv_freq)
    return selfextend_attention_ref(q, k, inp.value.double(), query_pos, pos, inp.window, group, inv_freq,
                                    inp.scaling, key_valid=inp.key_valid, q_start=inp.q_start,
                                    precision=precision, with_lse=with_lse)


def error(out, expected):
    return float((out.double() - expected).abs().max())


SHAPES = [  # (bsz, heads, kv_heads, kv_len, dim, window, group)
    (2, 4, 2, 230, 64, 8, 2),  # GQA, length not a multiple of any tile
    (1, 6, 3, 77, 64, 30, 4),  # W % G != 0
    (1, 4, 4, 61, 128, 16, 3),  # MHA, d=128
    (1, 8, 1, 90, 64, 24, 5),  # MQA: 8 query heads packed into one KV head's tile
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_len", [None, 1, 23])  # prefill, decode, chunked prefill (q_start > 0)
def test_matches_oracle_small_tiles(tk, shape, q_len):
    b, h, hk, n, d, w, g = shape
    inp = make_inputs(b, h, hk, n, d, w, g, q_len=q_len)
    out, lse = run(tk, inp, block_m=16, block_n=16)
    assert out.shape == inp.query.shape and lse.shape == inp.query.shape[:3]
    exact = oracle(inp, g)
    assert error(out, exact) <= fp32_tolerance(exact)


def test_default_launch_and_head_dim_256(tk):
    inp = make_inputs(1, 2, 1, 90, 256, 40, 4)
    exact = oracle(inp, 4)
    assert error(run(tk, inp)[0], exact) <= fp32_tolerance(exact)


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_split_kv_decode(tk, num_splits):
    """One query against a long cache; the keys split over programs and merged by LSE."""
    inp = make_inputs(2, 8, 2, 700, 64, 64, 8, q_len=1)
    out, lse = run(tk, inp, num_splits=num_splits)
    exact, exact_lse = oracle(inp, 8, with_lse=True)
    assert error(out, exact) <= fp32_tolerance(exact)
    assert error(lse, exact_lse) <= fp32_tolerance(exact_lse)  # the LSE of the merged scores


@pytest.mark.parametrize("q_len", [None, 1, 25])
def test_left_padding_per_row_positions(tk, q_len):
    """Rows of different lengths in one batch: per-row positions, padding keys excluded, padding queries 0."""
    valid = torch.ones(3, 72, dtype=torch.bool)
    valid[0, :17] = False
    valid[1, :40] = False
    inp = make_inputs(3, 4, 2, 72, 64, 8, 4, q_len=q_len, key_valid=valid)
    exact = oracle(inp, 4)  # zeros for padding queries
    for kw in ({"block_m": 16, "block_n": 16}, {}):
        out, _ = run(tk, inp, **kw)
        assert error(out, exact) <= fp32_tolerance(exact)
        assert torch.equal(out, real_rows(out, inp))  # padding queries are exactly zero


def test_fp16_within_rounding_of_oracle(tk):
    """The 2x rule: off the oracle by at most twice what attention written plainly in fp16 is off."""
    inp = make_inputs(1, 4, 2, 130, 64, 32, 4, dtype=torch.float16)
    out = run(tk, inp, block_m=32, block_n=32)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    exact = oracle(inp, 4)
    plain = oracle(inp, 4, precision=torch.float16)
    assert error(out, exact) <= rounding_tolerance(plain, exact, torch.float16)


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
def test_tile_classes_and_skipped_work(tk, case):
    """Only boundary tiles compute two products; tiles past the diagonal and before the padding are
    skipped."""
    valid = None
    if case == "padded":
        valid = torch.ones(2, 200, dtype=torch.bool)
        valid[0, :37] = False
    q_len = {"prefill": None, "chunk": 40, "decode": 1, "padded": None}[case]
    inp = make_inputs(1 if valid is None else 2, 2, 1, 200, 64, 40, 4, q_len=q_len, key_valid=valid)
    counts = torch.zeros(3, dtype=torch.int32)
    out, _ = run(tk, inp, block_m=16, block_n=16, num_splits=1, tile_counts=counts)
    exact = oracle(inp, 4)
    assert error(out, exact) <= fp32_tolerance(exact)
    got = counts.tolist()
    assert got == _expected_tiles(inp, 16, 16)
    n_tiles = -(-inp.kv_len // 16)
    row_tiles = -(-inp.q_len * 2 // 16)
    if case != "decode":
        assert sum(got) < row_tiles * n_tiles * inp.key.shape[1]  # causal-future tiles skipped
        assert got[2] < got[0] + got[1]  # boundary tiles are a thin band


def test_supports_and_fallback(kernel_module, caplog, monkeypatch):
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


def test_backend_forward_matches_oracle(tk):
    inp = make_inputs(2, 4, 2, 90, 64, 16, 4, q_len=1)
    exact = oracle(inp, 4)
    assert error(BACKENDS["triton"].forward(inp), exact) <= fp32_tolerance(exact)


def test_compiles_for_nvidia(kernel_module):
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

    fn = interpreted.compiled()["triton_kernel"]._selfextend_fwd
    configs = [("bf16", 128, *kernel_module.LAUNCH.prefill[128], True, False, 90),
               ("fp16", 64, 16, *kernel_module.LAUNCH.decode[64], True, True, 80)]
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
