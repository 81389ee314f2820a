"""Decode overhead A/B: vanilla vs SelfExtend (G=4, W=512) in one process, alternating, 1 thread.

    python benchmarks/bench_decode_overhead.py [prompt tokens, default 2048]

Short prompts make SelfExtend's fixed per-layer cost visible (attention itself is cheap there). Prints the
best of 3 medians of 32 decode steps per method and the difference per layer.
"""

from __future__ import annotations

import pydoc_data.topics
import statistics
import sys
import time

import torch

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache


@torch.no_grad()
def median_step_ms(model, ids: torch.Tensor, steps: int = 32) -> float:
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(token, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    torch.set_num_threads(1)
    model, tok = selfextend.load_model(dtype=torch.float32)
    ids = tok("\n".join(pydoc_data.topics.topics.values())[:200000], return_tensors="pt").input_ids[:, :n]
    res: dict[str, list[float]] = {"vanilla": [], "self-extend": []}
    for _ in range(3):
        res["vanilla"].append(median_step_ms(model, ids))
        selfextend.apply(model, group_size=4, window=512)
        res["self-extend"].append(median_step_ms(model, ids))
        selfextend.remove(model)
    v, s = min(res["vanilla"]), min(res["self-extend"])
    layers = model.config.num_hidden_layers
    print(f"n={n} vanilla {v:.2f} ms/step, self-extend {s:.2f} ms/step, difference {s - v:.2f} ms "
          f"({(s - v) / layers * 1000:.0f} us/layer), tok/s ratio {v / s:.3f}")


if __name__ == "__main__":
    main()
