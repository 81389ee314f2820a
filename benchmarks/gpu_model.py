"""A random-weight model end to end on the GPU, and one split across devices (part of gpu_check.sh).

    python benchmarks/gpu_model.py bench --out OUT/model.jsonl            # Llama-3-8B shapes, 32k prefill
    python benchmarks/gpu_model.py split --out OUT/split.jsonl            # layers on cuda:0 and the CPU
    python benchmarks/gpu_model.py bench --out OUT/model.jsonl --dry-run  # tiny shapes on the CPU

``bench``: a Llama-3-8B-shaped model (32 heads, 8 KV heads, d=128, hidden 4096) with ``--layers`` decoder
layers of random weights (real weights cannot be sent to the GPU machine), bf16, built on the GPU: prefill
``--length`` tokens with ``logits_to_keep=1``, then ``--new-tokens`` greedy decode steps, vanilla and
SelfExtend (the authors' rule for the length, ``--backend``) alternating for ``--rounds``; time, decode
tokens/s and ``max_memory_allocated`` above the weights, with SelfExtend / vanilla ratios from the same round.
Round 0 pays for the kernels' compiles and cuDNN's plans: the last round is the measurement (the summary of
``gpu_summary.py`` reads it). Each round's row is flushed as written; with ``--budget-s`` a round that would
not finish in time (longer than the last one took) is written as ``{"status": "skipped", "skipped": "out of
time"}``.

``split``: the same small model twice, once on one device and once dispatched by accelerate with some
decoder layers on ``cuda:0`` and the rest on the CPU; SelfExtend past the trained length must give the same
logits (within fp32 rounding between the devices) and the same greedy tokens. Head dim 64, so that on CUDA
fp32 runs the Triton kernel (with a head dim of 16 it fell back to Flex: its compile is the likely cause of
the 49 s the split part took on 2026-12-04).
``--dry-run`` dispatches onto the CPU alone (the hooks and per-device state run, the devices do not differ).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from budget import Budget, open_rows, skipped, write_row  # benchmarks/ is on sys.path when a script runs

import selfextend


def llama(layers: int, hidden: int, heads: int, kv_heads: int, trained: int, vocab: int, device: str = "cpu",
          dtype: torch.dtype = torch.float32):
    """Random weights, initialised on ``device`` in ``dtype``: on a GPU in seconds (the fp32 init on the CPU
    and the copy took about 45 of the 72 s of the model part on 2026-12-04, by its log)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, vocab_size=vocab,
                                  max_position_embeddings=trained,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    from selfextend.integrations.hf.compat import cache_kwarg, output_cache

    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - t0
    cache, name = output_cache(out), cache_kwarg(model)
    token = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, logits_to_keep=1, **{name: cache})
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    sync(device)
    decode = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    return {"prefill_s": prefill, "decode_tok_s": new_tokens / decode, "peak_bytes": peak}


def bench(args, out, budget: Budget) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        layers, length, new_tokens = 2, 200, 8
    else:
        layers, length, new_tokens = args.layers, args.length, args.new_tokens
    ids = {"length": length, "new_tokens": new_tokens, "dtype": str(dtype), "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "layers": layers,
           "backend": args.backend}
    rows, last = [], 0.0
    model = None
    for r in range(args.rounds):
        if not budget.allows(last):  # the next round would take about as long as the last one
            write_row(out, skipped({"round": r, **ids}))
            continue
        t0 = time.perf_counter()
        if model is None:
            model = (llama(2, 64, 4, 2, 64, 128, device, dtype) if args.dry_run
                     else llama(layers, 4096, 32, 8, 8192, 128256, device, dtype))
            tokens = torch.randint(3, model.config.vocab_size, (1, length), device=device,
                                   generator=torch.Generator(device).manual_seed(0))
        row = {"round": r, **ids}
        selfextend.remove(model)
        row["vanilla"] = timed(model, tokens, new_tokens, device)
        selfextend.apply(model, target_length=length + new_tokens, backend=args.backend)
        row["settings"] = selfextend.settings(model).describe()
        row["self_extend"] = timed(model, tokens, new_tokens, device)
        v, s = row["vanilla"], row["self_extend"]
        row["ratios"] = {"prefill_time": s["prefill_s"] / v["prefill_s"],
                         "decode_tok_s": s["decode_tok_s"] / v["decode_tok_s"],
                         "peak_memory": s["peak_bytes"] / v["peak_bytes"] if v["peak_bytes"] else None}
        row["round_s"] = last = time.perf_counter() - t0
        write_row(out, row)
        rows.append(row)
    if rows:
        medians = {k: statistics.median(r["ratios"][k] for r in rows)
                   for k in ("prefill_time", "decode_tok_s")}
        print(f"model {length} tokens, {layers} layers, {ids['gpu']}: SelfExtend / vanilla prefill time "
              f"{medians['prefill_time']:.3f}x, decode tokens/s {medians['decode_tok_s']:.3f}x (median of "
              f"{len(rows)} rounds; last round {rows[-1]['ratios']}), {budget.elapsed():.0f} s")
    else:
        print(f"model: no round fitted in {args.budget_s} s")
    return rows


@torch.no_grad()
def split(args, out, budget: Budget) -> list[dict]:
    from accelerate import dispatch_model

    if not budget.allows():
        write_row(out, skipped({"check": "split"}))
        return []
    device = "cpu" if args.dry_run else "cuda"
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    single = llama(4, 256, 4, 2, 64, 128).to(device)  # head dim 64
    selfextend.apply(single, group_size=4, window=16)
    want = single(ids.to(device)).logits.float().cpu()
    mask = torch.ones(1, 160, dtype=torch.long)
    want_gen = single.generate(ids[:, :160].to(device), attention_mask=mask.to(device), max_new_tokens=16,
                               do_sample=False, pad_token_id=0).cpu()
    other = "cpu" if args.dry_run else 0
    device_map = {"model.embed_tokens": other, "model.rotary_emb": other, "model.layers.0": other,
                  "model.layers.1": other, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    twin = dispatch_model(llama(4, 256, 4, 2, 64, 128), device_map=device_map)
    selfextend.apply(twin, group_size=4, window=16)
    got = twin(ids.to(device)).logits.float().cpu()
    got_gen = twin.generate(ids[:, :160].to(device), attention_mask=mask.to(device), max_new_tokens=16,
                            do_sample=False, pad_token_id=0).cpu()
    diff = float((got - want).abs().max())
    row = {"check": "split", "device_map": {k: str(v) for k, v in device_map.items()},
           "max_abs_logit_diff": diff, "generate_equal": bool(torch.equal(got_gen, want_gen)),
           "ok": diff < 1e-3}
    print(f"split across devices: max |logit diff| {diff:.2e} vs one device, generate equal: "
          f"{row['generate_equal']}")
    write_row(out, row)
    return [row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["bench", "split"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="SelfExtend's backend in bench (default auto)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds from the process's start; "
                        "what is not reached by then is written as skipped rows")
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    with open_rows(args.out, "a") as out:
        rows = bench(args, out, budget) if args.what == "bench" else split(args, out, budget)
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
