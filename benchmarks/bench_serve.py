"""``selfextend serve`` on the embedded model: the prefix cache and the server's overhead, side by side.

    python benchmarks/bench_serve.py --threads 2                      # 16k-token document, fp32
    python benchmarks/bench_serve.py --length 4k --new-tokens 16      # a quick look

A live server (uvicorn on 127.0.0.1, SelfExtend by the authors' rule for the document's length) answers
through the real ``openai`` client:

* prefix cache: two questions about the same ``--length``-token document (the first tokens of
  ``pydoc_data.topics``), streamed; time to first token of the second over the first (target <= 0.10);
* overhead: ``--rounds`` alternating rounds of a streamed greedy completion through the server and
  ``model.generate`` on the same prompt (a short one: decoding, not prefill, is what the server could slow
  down); tokens/s of the server over ``generate``, median of the per-round ratios (target >= 0.90).

Rows are appended to ``--out``; the machine, threads and versions are recorded with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

TARGETS = {"ttft_ratio": 0.10, "overhead_ratio": 0.90}


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def start_server(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def stream_timed(client, name: str, prompt: str, max_tokens: int) -> tuple[float, float, str, int]:
    """(time to first token, total time, text, completion tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, pieces, tokens = None, [], 0
    for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - t0, "".join(pieces), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", default="16k", help="document tokens (16k = 16384)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serve.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import pydoc_data.topics

    from openai import OpenAI

    import selfextend
    from selfextend.serve.app import create_app
    from selfextend.serve.engine import Engine

    length = parse_length(args.length)
    model, tokenizer = selfextend.load_model(dtype=args.dtype)
    selfextend.apply(model, target_length=length + 256)
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    document = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:length])
    questions = ["\n\nQuestion: which statement does this document describe first?\nAnswer:",
                 "\n\nQuestion: name one built-in type this document mentions.\nAnswer:"]
    server, thread, url = start_server(create_app(Engine(model, tokenizer), "smol"))
    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    row = {"bench": "serve", "length": length, "dtype": args.dtype, "threads": args.threads,
           "new_tokens": args.new_tokens, "settings": selfextend.settings(model).describe(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "selfextend": selfextend.__version__}
    try:
        ttft1, total1, _, _ = stream_timed(client, "smol", document + questions[0], args.new_tokens)
        ttft2, total2, _, _ = stream_timed(client, "smol", document + questions[1], args.new_tokens)
        row.update(ttft_first=round(ttft1, 3), ttft_second=round(ttft2, 3),
                   ttft_ratio=round(ttft2 / ttft1, 4))
        print(f"prefix cache, {length}-token document: time to first token {ttft1:.2f} s, then {ttft2:.2f} s "
              f"with the document cached: {ttft2 / ttft1:.3f}x (target <= {TARGETS['ttft_ratio']})")

        short = "The story of a lighthouse keeper who found a message in a bottle. Once upon a time,"
        ids = tokenizer(short, add_special_tokens=False).input_ids
        ratios, server_tps, generate_tps = [], [], []
        for _ in range(args.rounds):
            _, t_server, _, n_server = stream_timed(client, "smol", short, args.new_tokens)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            t_generate, n_generate = time.perf_counter() - t0, out.shape[1] - len(ids)
            server_tps.append(n_server / t_server)
            generate_tps.append(n_generate / t_generate)
            ratios.append(server_tps[-1] / generate_tps[-1])
            if n_server != n_generate:
                print(f"warning: {n_server} tokens from the server, {n_generate} from generate",
                      file=sys.stderr)
        ratio = statistics.median(ratios)
        row.update(server_tokens_per_s=round(statistics.median(server_tps), 2),
                   generate_tokens_per_s=round(statistics.median(generate_tps), 2),
                   overhead_ratio=round(ratio, 4), overhead_ratios=[round(r, 4) for r in ratios])
        print(f"streamed completion vs model.generate, {args.new_tokens} tokens: "
              f"{row['server_tokens_per_s']} vs {row['generate_tokens_per_s']} tokens/s: {ratio:.3f}x "
              f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}; target >= {TARGETS['overhead_ratio']})")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    met = row["ttft_ratio"] <= TARGETS["ttft_ratio"] and row["overhead_ratio"] >= TARGETS["overhead_ratio"]
    print("targets met" if met else "targets NOT met", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
