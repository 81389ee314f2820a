"""Run one vLLM engine (CPU, fp32, offline) on token prompts and print what it returned as JSON.

One process per engine: the plugin's registration is process-wide, so vanilla vLLM (``VLLM_PLUGINS``
without ``selfextend``) and the plugin cannot share a process. Usage: ``python worker.py SPEC.json OUT.json``,
SPEC ``{"engine": {LLM kwargs}, "runs": [{"prompts": [[ids]], "max_tokens": n}, ...], "metrics": bool}``.
A run whose request vLLM refuses records ``{"error": message}`` and the next run goes on.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def logprob(entry: dict) -> float:
    return next(iter(entry.values())).logprob


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    result: dict = {"runs": []}
    try:
        llm = LLM(skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                  disable_log_stats=not spec.get("metrics"), **spec["engine"])
    except Exception as exc:  # the engine-start refusals under test
        result["start_error"] = f"{type(exc).__name__}: {exc}"
        open(out_path, "w").write(json.dumps(result))
        return
    for run in spec["runs"]:
        # vLLM serves no prefix-cache hit to a request that asks for prompt logprobs: runs may opt out
        prompt_logprobs = 0 if run.get("prompt_logprobs", True) else None
        params = SamplingParams(max_tokens=run.get("max_tokens", 6), temperature=0, logprobs=0,
                                ignore_eos=True, prompt_logprobs=prompt_logprobs)
        try:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params,
                                   use_tqdm=False)
        except Exception as exc:
            result["runs"].append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        result["runs"].append({"outputs": [{
            "prompt_logprobs": [logprob(e) for e in o.prompt_logprobs[1:]] if o.prompt_logprobs else None,
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [logprob(e) for e in o.outputs[0].logprobs],
            "cached_tokens": o.num_cached_tokens or 0,
        } for o in outputs]})
    if spec.get("metrics"):
        result["metrics"] = {m.name: getattr(m, "value", getattr(m, "sum", None)) for m in llm.get_metrics()
                             if isinstance(getattr(m, "value", getattr(m, "sum", None)), (int, float))}
    open(out_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
