"""A random-weight model end to end on the GPU, and one split across devices (part of gpu_check.sh).

    python benchmarks/gpu_model.py bench --out OUT/model.jsonl            # Llama-3-8B shapes, 32k prefill
    python benchmarks/gpu_model.py split --out OUT/split.jsonl            # layers on cuda:0 and the CPU
    python benchmarks/gpu_model.py bench --out OUT/model.jsonl --dry-run  # tiny shapes on the CPU

``bench``: a Llama-3-8B-shaped model (32 heads, 8 KV heads, d=128, hidden 4096) with ``--layers`` decoder
layers of random weights (real weights cannot be sent to the GPU machine), bf16: prefill ``--length`` tokens
with ``logits_to_keep=1``, then ``--new-tokens`` greedy decode steps, vanilla and SelfExtend (the authors'
rule for the length) alternating for ``--rounds``; time, decode tokens/s and ``max_memory_allocated`` above
the weights, with SelfExtend / vanilla ratios from the same round.

``split``: the same small model twice, once on one device and once dispatched by accelerate with some
decoder layers on ``cuda:0`` and the rest on the CPU; SelfExtend past the trained length must give the same
logits (within fp32 rounding between the devices) and the same greedy tokens. ``--dry-run`` dispatches onto
the CPU alone (the hooks and per-device state run, the devices do not differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import selfextend


def llama(layers: int, hidden: int, heads: int, kv_heads: int, trained: int, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, vocab_size=vocab,
                                  max_position_embeddings=trained,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


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


def bench(args) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        model = llama(2, 64, 4, 2, 64, 128)
        length, new_tokens = 200, 8
    else:
        model = llama(args.layers, 4096, 32, 8, 8192, 128256)
        length, new_tokens = args.length, args.new_tokens
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    rows = []
    for r in range(args.rounds):
        row = {"round": r, "length": length, "dtype": str(dtype), "device": device,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "layers": len(model.model.layers)}
        selfextend.remove(model)
        row["vanilla"] = timed(model, ids, new_tokens, device)
        selfextend.apply(model, target_length=length + new_tokens)
        row["settings"] = selfextend.settings(model).describe()
        row["self_extend"] = timed(model, ids, new_tokens, device)
        v, s = row["vanilla"], row["self_extend"]
        row["ratios"] = {"prefill_time": s["prefill_s"] / v["prefill_s"],
                         "decode_tok_s": s["decode_tok_s"] / v["decode_tok_s"],
                         "peak_memory": s["peak_bytes"] / v["peak_bytes"] if v["peak_bytes"] else None}
        rows.append(row)
    medians = {k: statistics.median(r["ratios"][k] for r in rows) for k in ("prefill_time", "decode_tok_s")}
    print(f"model {length} tokens, {rows[0]['layers']} layers, {rows[0]['gpu']}: SelfExtend / vanilla "
          f"prefill time {medians['prefill_time']:.3f}x, decode tokens/s {medians['decode_tok_s']:.3f}x, "
          f"peak memory {rows[-1]['ratios']['peak_memory']}")
    return rows


@torch.no_grad()
def split(args) -> list[dict]:
    from accelerate import dispatch_model

    device = "cpu" if args.dry_run else "cuda"
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    single = llama(4, 64, 4, 2, 64, 128).to(device)
    selfextend.apply(single, group_size=4, window=16)
    want = single(ids.to(device)).logits.float().cpu()
    mask = torch.ones(1, 160, dtype=torch.long)
    want_gen = single.generate(ids[:, :160].to(device), attention_mask=mask.to(device), max_new_tokens=16,
                               do_sample=False, pad_token_id=0).cpu()
    other = "cpu" if args.dry_run else 0
    device_map = {"model.embed_tokens": other, "model.rotary_emb": other, "model.layers.0": other,
                  "model.layers.1": other, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    twin = dispatch_model(llama(4, 64, 4, 2, 64, 128), device_map=device_map)
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
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    rows = bench(args) if args.what == "bench" else split(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
