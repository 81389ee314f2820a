"""Decode A/B on one prefill: vanilla and SelfExtend decode steps interleaved in one process, same heap.

    python benchmarks/bench_decode_ab.py --length 16384 --dtype float32 --threads 2 \
        --out benchmarks/results/decode_ab.jsonl

``bench_model.py`` runs each method in its own process, so a decode step's time there includes where glibc
happened to place the cache's growing K/V (vanilla's own decode rate moved by up to 26% between identical
rounds at 16k fp32). Here one vanilla prefill of the embedded model (the first ``--length`` tokens of
``pydoc_data.topics``) fills a ``DynamicCache``; a copy of it goes to a second instance of the model with
SelfExtend applied (settings from ``target_length=length``, as ``bench_model.py``). Then ``--blocks`` rounds
of ``--steps`` greedy decode steps per method, alternating, each on its own cache: both caches grow alike and
every heap effect lands on both methods. SelfExtend's first step groups the copied cache in place (not
timed: one warm-up step per method). The copied keys are vanilla's, not what SelfExtend's own prefill would
have produced: a cost measure, not an answer. Prints the median ms a step per method, the decode rate ratio
SelfExtend / vanilla (target >= 0.95) and the per-round ratios; appends one JSON row to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import pydoc_data.topics
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_model import _source_commit  # benchmarks/ is on sys.path when a script runs

import selfextend
from selfextend.integrations.hf.compat import cache_kwarg, output_cache


def parse_length(text: str) -> int:
    text = text.strip().lower()
    try:
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--length takes tokens like 16384 or 16k, got {text!r}") from None


@torch.no_grad()
def step(model, token: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    out = model(token, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter() - t


def interleaved(steps: dict, blocks: int, per_block: int) -> tuple[dict[str, list[float]], list[float]]:
    """``blocks`` rounds; in each, ``per_block`` calls of every ``steps[name]()`` (which runs one decode step
    and returns its seconds), the methods one after the other. Returns every step's seconds per method and
    each round's ratio of medians, vanilla / self-extend (the decode rate ratio, taken within the round)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    rounds = []
    for _ in range(blocks):
        medians = {}
        for name, run in steps.items():
            block = [run() for _ in range(per_block)]
            times[name] += block
            medians[name] = statistics.median(block)
        rounds.append(medians["vanilla"] / medians["self-extend"])
        print(f"round {len(rounds)}: vanilla {medians['vanilla'] * 1e3:.1f} ms, self-extend "
              f"{medians['self-extend'] * 1e3:.1f} ms a step: {rounds[-1]:.3f}x", file=sys.stderr, flush=True)
    return times, rounds


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=parse_length, default=16384)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=8, help="rounds of each method, alternating")
    p.add_argument("--steps", type=int, default=16, help="decode steps a round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.blocks < 1 or args.steps < 1:
        p.error("--blocks and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    vanilla, tok = selfextend.load_model(dtype=dtype)
    extended, _ = selfextend.load_model(dtype=dtype)
    selfextend.apply(extended, target_length=args.length)
    params = {k: v for k, v in selfextend.active(extended).params.items() if not isinstance(v, bool)}
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    if ids.shape[1] < args.length:
        p.error(f"--length {args.length}: the prompt has only {ids.shape[1]} tokens")
    t0 = time.perf_counter()
    out = vanilla(ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    caches = {"vanilla": output_cache(out)}
    caches["self-extend"] = copy.deepcopy(caches["vanilla"])
    models = {"vanilla": vanilla, "self-extend": extended}
    tokens = {name: first for name in models}
    for name in models:  # warm-up: SelfExtend groups the copied cache here
        tokens[name], _ = step(models[name], tokens[name], caches[name])
    def one_step(name: str) -> float:
        tokens[name], dt = step(models[name], tokens[name], caches[name])
        return dt

    times, rounds = interleaved({name: (lambda n=name: one_step(n)) for name in models}, args.blocks,
                                args.steps)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    row = {"bench": "decode_ab", "length": args.length, "dtype": args.dtype, "threads": args.threads,
           "blocks": args.blocks, "steps": args.steps, "params": params, "prefill_s": prefill_s,
           "vanilla_ms": ms["vanilla"], "self_extend_ms": ms["self-extend"],
           "decode_ratio": ms["vanilla"] / ms["self-extend"], "round_ratios": rounds,
           "commit": _source_commit(selfextend), "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"{args.length} tokens, {args.dtype}, {args.threads} threads, {params}: decode vanilla "
          f"{ms['vanilla']:.1f} ms, self-extend {ms['self-extend']:.1f} ms a step (median of "
          f"{args.blocks * args.steps}): rate ratio {row['decode_ratio']:.3f}x (target >= 0.95; rounds "
          f"{min(rounds):.3f}-{max(rounds):.3f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
