"""Where the last token's attention goes when the model must name the passkey (issue 18: why 32k fails).

For one passkey prompt per depth, under SelfExtend (the rule's G/W) and dynamic NTK, one forward pass records
for every layer the attention of the prompt's last token (the one that predicts the answer), averaged over
heads: the mass on the passkey line's tokens, and for SelfExtend the share of all mass on grouped keys
(distance >= W) against neighbor keys. Recording goes through the projects' own extension points: a backend
registered in ``selfextend.backends.BACKENDS`` (SelfExtend) and an attention function registered with
transformers' ``AttentionInterface`` (dynamic NTK); both compute the row exactly and then attend as usual.

Usage: ``python benchmarks/attention_diagnostic.py --length 32768 --depths 0.05,0.5 --threads 2
--out docs/results/diagnostic_32k`` (bf16, the embedded model; about 2.5 min per forward at 32k here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import selfextend
from selfextend.backends import BACKENDS, SelfExtendInputs
from selfextend.backends.composed import ComposedBackend
from selfextend.eval.runner import parse_method
from selfextend.eval.tasks import TASKS

RECORD: list[dict] = []
NEEDLE: dict = {}


def last_row(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(H, Tk) fp32 scores of the last query row against every key (GQA keys repeated)."""
    q = query[0, :, -1].float()  # (H, D)
    k = key[0].float()  # (Hkv, Tk, D)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return torch.einsum("hd,htd->ht", q, k) * scaling


def summarise(probs: torch.Tensor, grouped: torch.Tensor | None) -> dict:
    start, end = NEEDLE["span"]
    row = {"needle": float(probs[:, start:end].sum(-1).mean()),
           "sink": float(probs[:, :4].sum(-1).mean())}  # the first tokens, where idle heads park their mass
    if grouped is not None:
        row["grouped"] = float(probs[:, grouped].sum(-1).mean())
    return row


class RecordingBackend(ComposedBackend):
    """The ``cpu`` backend, recording the last query row's SelfExtend attention (neighbor or grouped scores by
    distance, one softmax) before attending."""

    name = "record"
    methods = ("self-extend",)

    def forward(self, inp: SelfExtendInputs) -> torch.Tensor:
        if inp.q_len > 1:
            distance = inp.query_pos[0, -1] - inp.key_pos[0]  # (Tk,)
            grouped = distance >= inp.window
            scores = torch.where(grouped, last_row(inp.grouped_query, inp.grouped_key, inp.scaling),
                                 last_row(inp.query, inp.key, inp.scaling))
            RECORD.append(summarise(scores.softmax(-1), grouped))
        return super().forward(inp)


def recording_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] > 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        RECORD.append(summarise(last_row(query, key, scale).softmax(-1), None))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def needle_span(tokenizer, prompt: str, passkey: str) -> tuple[int, int]:
    """Token indices [start, end) of the passkey line."""
    line = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    a = prompt.index(line)
    b = a + len(line)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    tokens = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
    return tokens[0], tokens[-1] + 1


BANDS = ((0, 11), (11, 17), (17, 30))  # early, middle and late layers of the embedded model's 30


def report(path: Path) -> str:
    """Markdown table of a ``diagnostic.jsonl``: needle mass averaged over bands of layers, the late layers'
    mass on the first 4 tokens (sink) and on grouped keys."""
    head = ("| task | tokens | depth | method | answer | needle mass, layers 0-10 / 11-16 / 17-29 "
            "| late: sink | late: grouped keys |\n|---|---:|---:|---|---|---|---:|---:|")
    lines = [head]
    for r in map(json.loads, path.open()):
        layers = r["layers"]
        bands = " / ".join(f"{sum(x['needle'] for x in layers[a:b]) / (b - a):.3f}" for a, b in BANDS)
        late = layers[BANDS[-1][0]:]
        sink = sum(x["sink"] for x in late) / len(late)
        grouped = f"{sum(x['grouped'] for x in late) / len(late):.2f}" if "grouped" in late[0] else "-"
        ok = "right" if r["passkey"] in r["answer"] else "wrong"
        lines.append(f"| {r.get('task', 'passkey')} | {r['length']} | {r['depth']} | {r['method']} | {ok}: "
                     f"{r['answer'].strip()[:24]!r} | {bands} | {sink:.2f} | {grouped} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=None, help="print the table of this diagnostic.jsonl and exit")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--depths", default="0.05,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="self-extend,dynamic-ntk",
                        help="comma list of method specs as in `selfextend eval` (name:key=value)")
    parser.add_argument("--task", default="passkey", help="passkey or a variant with the Landmark wording "
                        "(passkey_essays, passkey_pydoc)")
    parser.add_argument("--out", default="docs/results/diagnostic_32k")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    torch.set_num_threads(args.threads)
    from transformers import AttentionInterface

    BACKENDS.add("record", RecordingBackend())
    AttentionInterface.register("record_sdpa", recording_sdpa)
    model, tokenizer = selfextend.load_model(None, dtype=torch.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnostic.jsonl"
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    done = {(r.get("task", "passkey"), r["length_asked"] if "length_asked" in r else args.length, r["method"],
             r["depth"]) for r in rows}
    for depth in map(float, args.depths.split(",")):
        sample = TASKS[args.task].make(tokenizer, args.length, depth, 0)
        ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
        NEEDLE["span"] = needle_span(tokenizer, sample.prompt, sample.expected[0])
        for method in args.methods.split(","):
            if (args.task, args.length, method, depth) in done:
                continue
            RECORD.clear()
            spec = parse_method(method)  # a name, or name:key=value (e.g. self-extend:grouped_scale=1.3)
            if spec.name == "self-extend":
                selfextend.apply(model, target_length=args.length + 16, backend="record", **spec.params)
            else:
                selfextend.apply(model, method=spec.name, target_length=args.length + 16, **spec.params)
                model.set_attn_implementation("record_sdpa")
            start = time.perf_counter()
            with torch.no_grad():  # the prefill records (decode steps have one query row and are skipped)
                generated = model.generate(ids, max_new_tokens=8, do_sample=False)
            answer = tokenizer.decode(generated[0, ids.shape[1]:])
            row = {"task": args.task, "method": method, "depth": depth, "length_asked": args.length,
                   "length": ids.shape[1], "needle_tokens": NEEDLE["span"],
                   "needle_distance": ids.shape[1] - NEEDLE["span"][0], "passkey": sample.expected[0],
                   "answer": answer, "layers": list(RECORD), "seconds": time.perf_counter() - start,
                   "settings": str(selfextend.settings(model))}
            selfextend.remove(model)
            model.set_attn_implementation("sdpa")
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method} depth {depth}: {answer!r}; needle mass per layer "
                  + " ".join(f"{r['needle']:.3f}" for r in RECORD))


if __name__ == "__main__":
    main()
