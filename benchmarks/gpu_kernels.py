"""Every SelfExtend backend on the GPU against the fp64 oracle of ``tests/reference.py`` (in gpu_check.sh).

    python benchmarks/gpu_kernels.py --out OUT/kernels.jsonl              # on CUDA: triton, flex, reference
    python benchmarks/gpu_kernels.py --out OUT/kernels.jsonl --dry-run    # CPU shapes, cpu/reference/flex

Cases: bf16 and fp16 (and fp32), GQA and MHA, head dims 64 and 128, prefill, chunked prefill and decode,
left padding, W % G != 0. The pass rule is flash-attention's: a backend's max error against the fp64 oracle
is at most twice that of the oracle computed in the same low precision (plus half an ulp of the output
scale); fp32 must stay within 1e-5 of the output scale. One JSON row per case; the summary line counts
failures and the exit code is 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import selfextend_attention_ref  # noqa: E402  (the oracle shares no code with the library)

from selfextend.backends import BACKENDS, SelfExtendInputs  # noqa: E402
from selfextend.positions import (  # noqa: E402
    absolute_key_positions,
    grouped_key_positions,
    grouped_query_positions,
)
from selfextend.rope import rotate_by  # noqa: E402

_EXACT: dict[tuple, torch.Tensor] = {}


def case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, kv_len: int, q_len: int,
         window: int, group: int, pad: int, seed: int = 0):
    """Inputs built the way the model integration builds them, and the oracle's fp64 answer."""
    g = torch.Generator().manual_seed(seed)
    bsz = 2 if pad else 1
    q = torch.randn(bsz, heads, q_len, dim, generator=g)
    k = torch.randn(bsz, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(bsz, kv_heads, kv_len, dim, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    q_start = kv_len - q_len
    valid = None
    if pad:
        valid = torch.ones(bsz, kv_len, dtype=torch.bool)
        valid[1, :pad] = False
        query_pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, q_start:]
    else:
        query_pos = (q_start + torch.arange(q_len))[None].expand(bsz, -1)
    key_pos, _ = absolute_key_positions(query_pos, valid, q_start, kv_len)
    scaling = dim**-0.5
    key = (heads, kv_heads, dim, kv_len, q_len, window, group, pad, seed)
    if key not in _EXACT:  # the fp64 oracle is the slow part: once per case, whatever the dtype
        _EXACT[key] = selfextend_attention_ref(q, k, v, query_pos, key_pos, window, group, inv_freq, scaling,
                                               key_valid=valid, q_start=q_start)
    exact = _EXACT[key]
    rounded = None
    if dtype != torch.float32:
        rounded = selfextend_attention_ref(q, k, v, query_pos, key_pos, window, group, inv_freq, scaling,
                                           key_valid=valid, q_start=q_start, precision=dtype)
    qr, kr = rotate_by(q, query_pos, inv_freq), rotate_by(k, key_pos, inv_freq)
    qg = rotate_by(qr, grouped_query_positions(query_pos, group, window) - query_pos, inv_freq)
    kg = rotate_by(kr, grouped_key_positions(key_pos, group) - key_pos, inv_freq)

    def on(t):
        return t.to(device=device, dtype=dtype)

    inputs = SelfExtendInputs(query=on(qr), key=on(kr), value=on(v), grouped_query=on(qg), grouped_key=on(kg),
                              query_pos=query_pos.to(device), key_pos=key_pos.to(device),
                              key_valid=None if valid is None else valid.to(device), q_start=q_start,
                              window=window, scaling=scaling)
    real = torch.ones(bsz, q_len, dtype=torch.bool) if valid is None else valid[:, q_start:]
    return inputs, exact.double(), None if rounded is None else rounded.double(), real


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU shapes and backends, in seconds")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    backends = ["reference", "cpu", "flex"] if args.dry_run else ["triton", "flex", "reference"]
    dtypes = [torch.float32, torch.bfloat16]
    if not args.dry_run:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
    shapes = [(4, 2, 64), (8, 8, 128)] if not args.dry_run else [(4, 2, 64)]  # heads, kv heads, head dim
    lengths = [(300, 300), (300, 37), (300, 1), (700, 700)] if not args.dry_run else [(120, 120), (120, 1)]
    settings = [(64, 4), (37, 3)] if not args.dry_run else [(16, 4), (7, 3)]  # (W, G)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failures = total = 0
    with args.out.open("w") as f:
        for dtype in dtypes:
            for heads, kv_heads, dim in shapes:
                for kv_len, q_len in lengths:
                    for window, group in settings:
                        for pad in (0, 13):
                            inputs, exact, rounded, real = case(device, dtype, heads, kv_heads, dim, kv_len,
                                                                q_len, window, group, pad)
                            scale = float(exact.abs().max())
                            if rounded is None:
                                bar = 1e-5 * max(1.0, scale)
                            else:
                                low = float(((rounded - exact).abs() * real[:, None, :, None]).max())
                                bar = 2 * low + 0.5 * torch.finfo(dtype).eps * max(1.0, scale)
                            for name in backends:
                                backend = BACKENDS[name]
                                dtype_name = str(dtype).removeprefix("torch.")
                                row = {"backend": name, "device": device, "dtype": dtype_name,
                                       "heads": heads, "kv_heads": kv_heads, "dim": dim, "kv_len": kv_len,
                                       "q_len": q_len, "window": window, "group": group, "pad": pad}
                                reason = backend.supports(inputs)
                                if reason is not None:
                                    row.update(status="unsupported", reason=reason)
                                else:
                                    out = backend.forward(inputs).double().cpu()
                                    err = float(((out - exact).abs() * real[:, None, :, None]).max())
                                    ok = err <= bar
                                    row.update(status="pass" if ok else "FAIL", error=err, bar=bar)
                                    failures += not ok
                                    total += 1
                                f.write(json.dumps(row) + "\n")
    print(f"kernels: {total - failures}/{total} cases within rounding of the fp64 oracle ({args.out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
