"""Where a decode step's time goes: vanilla then a method, in one process, on the embedded model.

    python benchmarks/profile_decode.py --length 4096             # SelfExtend G=4 W=1024, fp32, 2 threads

Prefills ``--length`` tokens of ``pydoc_data.topics``, times ``--steps`` greedy decode steps (median, min),
then runs 5 more under ``torch.profiler`` and prints the ops by self CPU time. A diagnosis, not a benchmark:
both runs share one process and its heap (``bench_model.py`` gives the side-by-side ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import selfextend


def decode(model, ids: torch.Tensor, steps: int, label: str, rows: int) -> None:
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step() -> None:
            nonlocal token
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(f"{label}: decode step median {1e3 * statistics.median(times):.2f} ms, "
              f"min {1e3 * min(times):.2f} ms", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="profiler rows printed")
    args = parser.parse_args()
    import pydoc_data.topics

    torch.set_num_threads(args.threads)
    model, tok = selfextend.load_model(dtype=getattr(torch, args.dtype))
    ids = tok("\n".join(pydoc_data.topics.topics.values()), return_tensors="pt").input_ids[:, : args.length]
    decode(model, ids, args.steps, "vanilla", args.rows)
    selfextend.apply(model, group_size=args.group_size, window=args.window)
    decode(model, ids, args.steps, f"self-extend G={args.group_size} W={args.window}", args.rows)


if __name__ == "__main__":
    main()
