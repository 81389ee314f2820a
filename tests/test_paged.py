"""The paged path of the vLLM plugin (``integrations/vllm/paged.py``) against the independent fp64 oracle,
without vLLM: a request's keys gathered from a scrambled block table, prefill, a chunk and a decode step."""

from __future__ import annotations

import math

import pytest
import torch
from reference import dca_attention_ref, rope, selfextend_attention_ref

from selfextend.config import DCAConfig, SelfExtendConfig
from selfextend.integrations.vllm.paged import PagedDCA, PagedSelfExtend, gather, write
from selfextend.rope import rotate_by

H, HKV, D, T, BS = 4, 2, 32, 150, 16
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float) / D))


def cached_request(seed: int = 0):
    """Unrotated q/k/v of one request, and its keys/values stored in a paged cache via a scrambled table."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, T, D, generator=g) * 2 for h in (H, HKV, HKV))
    pos = torch.arange(T)[None]
    q_rot, k_rot = rope(q, pos, INV_FREQ).float(), rope(k, pos, INV_FREQ).float()
    blocks = torch.randperm(32, generator=g)[: -(-T // BS)]  # the request's blocks, in no particular order
    slots = (blocks[:, None] * BS + torch.arange(BS)).flatten()[:T]
    key_cache, value_cache = torch.zeros(32, HKV, BS, D), torch.zeros(32, HKV, BS, D)
    write(key_cache, k_rot[0].transpose(0, 1), slots)
    write(value_cache, v[0].transpose(0, 1), slots)
    return q, k, v, q_rot, key_cache, value_cache, blocks


def test_write_gather_roundtrip_skips_padding_slots():
    cache = torch.zeros(4, 2, 8, 3)
    tokens = torch.randn(5, 2, 3)
    write(cache, tokens, torch.tensor([9, 10, -1, 3, 31]))
    blocks = torch.tensor([1, 0, 3])
    got = gather(cache, blocks, 24)
    assert torch.equal(got[1], tokens[0]) and torch.equal(got[2], tokens[1])  # slots 9, 10: block 1
    assert torch.equal(got[11], tokens[3]) and torch.equal(got[23], tokens[4])  # slot 3 (block 0), 31
    assert int((cache != 0).any(-1).sum()) == 8  # 4 tokens x 2 heads: the -1 slot wrote nothing


@pytest.mark.parametrize("q_len", [T, 37, 1])  # prefill, a chunk, a decode step
@pytest.mark.parametrize("group_size,window,scale,base", [(4, 16, 1.0, 0), (3, 200, 1.0, 0), (4, 16, 1.7, 0),
                                                           (4, 16, 1.0, 64)])
def test_paged_selfextend_equals_oracle(q_len, group_size, window, scale, base):
    """Past the window, every pair a neighbor, a sharper grouped part (``grouped_scale``) and the log
    scaling of the authors' code (``scale_base``: each query row's logits x max(1, ln(i + 1) / ln base))."""
    q, k, v, q_rot, key_cache, value_cache, blocks = cached_request()
    method = PagedSelfExtend(SelfExtendConfig(group_size, window, 64, backend="cpu", grouped_scale=scale,
                                              scale_base=base), INV_FREQ)
    out = method.attend(q_rot[0, :, T - q_len :].transpose(0, 1), gather(key_cache, blocks, T),
                        gather(value_cache, blocks, T), D ** -0.5)
    pos = torch.arange(T)[None]
    query = q[:, :, T - q_len :].double()
    if base:  # by hand, in fp64: the row's factor on the unrotated query (rotation is linear)
        query = query * (torch.log(pos[0, T - q_len :].double() + 1) / math.log(base)).clamp(min=1)[:, None]
    want = selfextend_attention_ref(query, k, v, pos[:, T - q_len :], pos, window, group_size,
                                    INV_FREQ, D ** -0.5, grouped_scale=scale)
    torch.testing.assert_close(out.transpose(0, 1)[None].to(want.dtype), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len", [T, 1])
@pytest.mark.parametrize("base", [0, 32])
def test_paged_dca_equals_oracle(q_len, base):
    """With the log scaling (``scale_base``) on the rows DCA remaps (from ``exact_below`` on) only."""
    q, k, v, q_rot, key_cache, value_cache, blocks = cached_request(1)
    cfg = DCAConfig(chunk_size=48, local_window=8, trained_length=64, backend="cpu", scale_base=base)
    queries = q_rot[0, :, T - q_len :].transpose(0, 1)
    keys, values = gather(key_cache, blocks, T), gather(value_cache, blocks, T)
    out = PagedDCA(cfg, INV_FREQ).attend(queries, keys, values, D ** -0.5)
    pos = torch.arange(T)[None]
    query = q[:, :, T - q_len :].double()
    if base:  # by hand, in fp64, as for SelfExtend; rows below exact_below keep vanilla's logits
        rows = pos[0, T - q_len :].double()
        factor = (torch.log(rows + 1) / math.log(base)).clamp(min=1)
        query = query * torch.where(rows >= cfg.exact_below, factor, 1.0)[:, None]
    want = dca_attention_ref(query, k, v, pos[:, T - q_len :], pos, 48, 8, cfg.exact_below,
                             INV_FREQ, D ** -0.5)
    torch.testing.assert_close(out.transpose(0, 1)[None].to(want.dtype), want, atol=2e-5, rtol=1e-4)


def test_rotation_table_grows_and_equals_rotate_by():
    method = PagedSelfExtend(SelfExtendConfig(4, 16, 64), INV_FREQ)
    x = torch.randn(9000, 2, D)
    for n in (10, 9000):  # the second call grows the table past its first size
        pos = torch.arange(n)
        got = method.keys.rotate(x[:n], pos, "rotate_half")
        want = rotate_by(x[:n].transpose(0, 1)[None], (pos // 4 - pos)[None], INV_FREQ)[0].transpose(0, 1)
        assert torch.equal(got, want)


@pytest.mark.parametrize("method, params", [
    ("selfextend", {"group_size": 4, "window": 64}),
    ("selfextend", {"target_length": 2000, "grouped_scale": 1.3, "temperature": True, "scale_base": 512,
                    "backend": "reference", "allow_overflow": True}),
    ("selfextend", {"group_size": 80, "window": 64, "allow_large_group_size": True}),
    ("dca", {"chunk_size": 400, "local_window": 64, "backend": "reference", "vanilla_within_trained": False}),
    ("dca", {"scale_base": 1024}),
])
def test_overrides_carry_every_resolved_setting(method, params):
    """``overrides_for`` of resolved settings, read back by the plugin, gives the same settings: no setting
    (grouped_scale, backend, ...) is dropped on the way to vLLM."""
    from transformers import LlamaConfig

    from selfextend.integrations.vllm.settings import overrides_for, resolve

    def hf_config(extra):
        config = LlamaConfig(max_position_embeddings=512, hidden_size=64, num_attention_heads=4)
        for key, value in extra.items():
            setattr(config, key, value)
        return config

    settings = resolve(hf_config({method: params}))
    again = resolve(hf_config(overrides_for(settings)), trained_length=512)
    assert again.config == settings.config and again.reach == settings.reach


def engine_config(hf_config, head: int = D, dtype=torch.bfloat16):
    """The parts of a vLLM config the plugin's CUDA-graph decision reads (no vLLM needed)."""
    from types import SimpleNamespace

    model = SimpleNamespace(hf_text_config=hf_config, hf_config_path=None, model="/nonexistent",
                            revision=None, get_head_size=lambda: head, dtype=dtype, max_model_len=232)
    return SimpleNamespace(model_config=model)


def test_cuda_graph_support_is_decode_only_and_opt_in(monkeypatch):
    """Captured decode steps only for SelfExtend whose every decode batch runs the paged kernel, and only when
    asked for (``SELFEXTEND_CUDA_GRAPHS=1``); no method: vLLM decides; DCA and heads the kernel lacks: none,
    each with its reason; a bad value of the variable is named."""
    pytest.importorskip("triton")
    from transformers import LlamaConfig

    from selfextend.integrations.vllm.engine import CUDA_GRAPHS_ENV, cuda_graph_support

    def llama(**extra):
        return LlamaConfig(hidden_size=4 * 64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=1, max_position_embeddings=232, vocab_size=128, **extra)

    se = llama(selfextend={"group_size": 4, "window": 8, "trained_length": 64})
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert cuda_graph_support(engine_config(llama(), 64))[0] == "vllm"
    support, why = cuda_graph_support(engine_config(se, 64))
    assert support == "none" and f"{CUDA_GRAPHS_ENV}=1" in why
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    assert cuda_graph_support(engine_config(se, 64))[0] == "decode"
    support, why = cuda_graph_support(engine_config(se, 64, torch.float64))
    assert support == "none" and "float64" in why
    dca = llama(dca={"chunk_size": 48, "local_window": 8, "trained_length": 64})
    support, why = cuda_graph_support(engine_config(dca, 64))
    assert support == "none" and "gathers" in why
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CUDA_GRAPHS_ENV}='yes': use 1"):
        cuda_graph_support(engine_config(se, 64))
