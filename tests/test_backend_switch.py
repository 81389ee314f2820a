"""Switching backends mid-generation: prefill on one, decode (same KV cache) on another, same logits.

Every backend reads the same transformers KV cache (keys rotated at their true positions) and the same
grouped keys, so ``selfextend.apply(model, ..., backend=other)`` between two forward calls must not
change a single logit beyond float noise. The Triton kernel runs under the interpreter
(its build for the interpreter, ``interpreted.py``, as in ``test_triton.py``).
"""


import interpreted
import pytest
import torch
from conftest import build_model
from helpers import interpreted_triton_kernel

import selfextend
from selfextend.backends import BACKENDS

G, W = 4, 16  # reach (64 - 16) * 4 + 16 = 208 tokens on the tiny models
PROMPT, STEPS = 80, 6


KERNEL = interpreted_triton_kernel()


def _generate(model, ids, mask, prefill_backend, decode_backend):
    """Logits of a prefill over ids[:, :PROMPT] and STEPS single-token steps, switching backend in between."""
    selfextend.apply(model, group_size=G, window=W, backend=prefill_backend)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], position_ids=pos[:, :PROMPT],
                    use_cache=True)
        logits = [out.logits[:, -1]]
        selfextend.apply(model, group_size=G, window=W, backend=decode_backend)
        for t in range(PROMPT, PROMPT + STEPS):
            out = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                past_key_values=out.past_key_values, use_cache=True,
            )
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _check(model, pairs, monkeypatch, bsz=2):
    calls = {name: [0, 0] for name in BACKENDS}  # [prefill calls, decode calls] that really ran

    def spy(name, forward):
        def counted(inp):
            calls[name][inp.q_len == 1] += 1
            return forward(inp)
        return counted

    for name, backend in BACKENDS.items():
        monkeypatch.setattr(backend, "forward", spy(name, backend.forward))
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (bsz, PROMPT + STEPS))
    mask = torch.ones_like(ids)
    if bsz > 1:
        mask[1, :11] = 0  # left padding: rows of different lengths
    single = _generate(model, ids, mask, "reference", "reference")
    real = mask[:, PROMPT - 1 :].bool().all(1)
    for first, second in pairs:
        for c in calls.values():
            c[:] = [0, 0]
        switched = _generate(model, ids, mask, first, second)
        assert calls[first][0] > 0 and calls[second][1] > 0, calls  # no silent fallback
        diff = (switched - single)[real].abs().max()
        assert diff < 1e-4, (first, second, float(diff))


def test_cpu_reference_switch(monkeypatch):
    _check(build_model("llama"), [("cpu", "reference"), ("reference", "cpu"), ("cpu", "cpu")], monkeypatch)


def test_flex_switch(monkeypatch):
    _check(build_model("llama"), [("flex", "cpu"), ("cpu", "flex")], monkeypatch)


@pytest.mark.skipif(KERNEL is None, reason="triton is not installed")
def test_triton_switch(monkeypatch):
    model = build_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    with interpreted.installed():
        _check(model, [("triton", "reference"), ("cpu", "triton"), ("triton", "flex")], monkeypatch)


@pytest.mark.parametrize("padded", [False, True])
def test_backend_is_chosen_once_a_forward_unless_padded(monkeypatch, padded):
    """Layers of one forward pass tensors of the same kinds, so the choice is made once (a decode step would
    otherwise pay for it in every layer); with padding each layer chooses, as a backend's ``supports`` may
    read the padding."""
    from selfextend.integrations.hf import attention

    layers = 4
    model = build_model("llama", num_hidden_layers=layers)
    selfextend.apply(model, group_size=G, window=W)
    ids = torch.randint(3, 128, (2, PROMPT + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = []
    choose = attention.select_backend
    monkeypatch.setattr(attention, "select_backend", lambda *a: calls.append(a) or choose(*a))
    with torch.no_grad():
        out = model(ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], position_ids=pos[:, :PROMPT],
                    use_cache=True)
        calls.clear()
        model(ids[:, PROMPT:], attention_mask=mask, position_ids=pos[:, PROMPT:],
              past_key_values=out.past_key_values, use_cache=True)
    assert len(calls) == (layers if padded else 1)
