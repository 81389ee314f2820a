"""Past one device: tensor parallelism (two processes, gloo), offload to disk, and per-device state.

No machine here has two accelerators, so what needs them (layers split between ``cuda:0`` and the CPU) is in
the GPU check script; here: transformers' tensor parallelism run for real by ``torchrun`` on the CPU,
accelerate's disk offload, and the per-forward memos keyed by device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model

import selfextend
from selfextend.integrations.hf import SELFEXTEND
from selfextend.integrations.hf.attention import MaskSpec

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tp_worker import outputs  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from selfextend.models import default_model_path

    path = tmp_path_factory.mktemp("tp-model")
    build_model("llama", max_position_embeddings=80).save_pretrained(path)
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(path)
    return path


@pytest.mark.slow
def test_tensor_parallel_over_two_processes_equals_one(model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    result = tmp_path / "tp.pt"
    run = subprocess.run([torchrun, "--nproc-per-node", "2", str(SCRIPTS / "tp_worker.py"), str(model_dir),
                          str(result)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    parallel = torch.load(result)
    model, _ = selfextend.load_model(model_dir)
    single = {"vanilla": outputs(model)}
    selfextend.apply(model, group_size=2, window=8)
    single["self-extend"] = outputs(model)
    selfextend.apply(model, method="dca", chunk_size=48, local_window=4)
    single["dca"] = outputs(model)
    # vanilla's own tensor-parallel rounding (the all-reduce sums in another order) sets the bar
    noise = max(float((parallel["vanilla"][k] - single["vanilla"][k]).abs().max())
                for k in ("logits", "chunked", "padded"))
    bar = max(2 * noise, 1e-5)
    for method in ("self-extend", "dca"):
        for k in ("logits", "chunked", "padded"):
            diff = float((parallel[method][k] - single[method][k]).abs().max())
            assert diff <= bar, (method, k, diff, noise)
        assert torch.equal(parallel[method]["generate"], single[method]["generate"]), method  # past L = 80
        assert float((single[method]["logits"] - single["vanilla"]["logits"]).abs().max()) > 100 * bar


def test_offload_to_disk_is_exact(tmp_path):
    from accelerate import disk_offload

    x = torch.randint(3, 100, (1, 150), generator=torch.Generator().manual_seed(2))
    model = selfextend.apply(build_model("llama"), group_size=4, window=16)
    offloaded = disk_offload(build_model("llama"), str(tmp_path), execution_device="cpu")
    selfextend.apply(offloaded, group_size=4, window=16)
    with torch.no_grad():
        assert torch.equal(model(x).logits, offloaded(x).logits)
        mask = torch.ones(1, 120, dtype=torch.long)
        want = model.generate(x[:, :120], attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=0)
        got = offloaded.generate(x[:, :120], attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(want, got)


def test_per_forward_state_is_kept_per_device():
    from transformers.masking_utils import causal_mask_function

    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    spec = MaskSpec({"attention_mask": mask, "mask_function": causal_mask_function})
    query_pos = (mask.cumsum(-1) - 1).clamp(min=0)
    facts = spec.facts(query_pos, 0, 10, 10)
    assert ("facts", 0, 10, 10, query_pos.device) in spec._materialized  # another device gets its own entry
    assert facts.key_valid.device == query_pos.device and facts.key_pos.device == query_pos.device
    assert facts.consistent and facts.max_pos == 9
    built = spec.materialize("no-such-implementation", torch.device("meta"))  # the 2D mask, moved
    assert built.device.type == "meta"
    assert ("no-such-implementation", torch.device("meta")) in spec._materialized


def test_layer_whose_keys_sit_on_another_device_is_a_clear_error():
    model = selfextend.apply(build_model("llama"), group_size=4, window=16)
    layer = model.model.layers[0].self_attn
    query = torch.randn(1, 4, 5, 16)
    key = torch.randn(1, 2, 5, 16, device="meta")
    with pytest.raises(ValueError, match="got queries on cpu but keys on meta.*one device"):
        SELFEXTEND.forward(layer, query, key, key, None)


@pytest.mark.slow
def test_cli_under_torchrun_prints_and_writes_once(model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "tp-eval"
    run = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "selfextend", "eval", "passkey", "--model",
                          str(model_dir), "--methods", "vanilla,self-extend:G=4:W=16", "--lengths", "200",
                          "--depths", "2", "--out", str(out), "--no-plots"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| passkey |") == 1  # rank 0 alone prints
    rows = [json.loads(line) for line in (out / "samples_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({(r["method"], r["depth"]) for r in rows}) == 4  # rank 0 alone writes
    assert "tensor parallel over 2 processes" in run.stderr
    # a refusal on rank 0 (another seed into the same --out) is a clear error; torchrun stops the other rank
    refused = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "selfextend", "eval", "passkey",
                              "--model", str(model_dir), "--methods", "vanilla", "--lengths", "200",
                              "--depths", "2", "--seed", "5", "--out", str(out), "--no-plots"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "seed=0" in refused.stderr, refused.stderr[-3000:]
