"""A steady decode step reads nothing back to the host that vanilla does not, and adds few ops per layer.

On a GPU every read of a tensor's value on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``)
stops the CPU until the device has caught up, so the CPU can no longer queue the next kernels ahead. The
count is made on CPU with a ``TorchDispatchMode`` that sees every aten op (a read is
``aten::_local_scalar_dense`` or ``aten::is_nonzero``, ``aten::equal`` returns a Python bool) and a patched
``Tensor.tolist`` (which does not dispatch on CPU, but copies to the host on CUDA); vanilla, the same model
without ``apply``, is the control. Vanilla's own decode step reads once: transformers' check whether the
mask pads anything. SelfExtend replaces that mask creation and reads once per forward, not per layer: the
padding check, the position check and the largest position, fetched together. Without an attention mask
vanilla reads nothing and SelfExtend still reads once (the position check and the largest position): the
one read it adds, stated by ``test_without_a_mask_one_read``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import build_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import selfextend

READS = ("_local_scalar_dense", "is_nonzero", "equal")
# measured 16 (torch 2.13, CPU) over vanilla's 72 per layer: 2 rotations of one row (the query, the
# key leaving the window: a view, an mm and a view each, the key written back with one copy_), 1 more
# attention call on slices of the cache (4 slices, 1 for the leaving key), the merge (sub, sigmoid,
# unsqueeze, lerp_). In a decode step each op costs microseconds, a visible share of a layer's attention.
EXTRA_OPS_PER_LAYER = 18


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "_to_copy" and (kwargs or {}).get("device") not in (None, args[0].device):
            self.ops["device copy"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> int:
        return sum(self.ops[n] for n in (*READS, "tolist", "device copy"))


def decode_step_ops(layers: int, extend: bool, monkeypatch, masked: bool = True) -> CountOps:
    model = build_model("llama", num_hidden_layers=layers)
    if extend:
        selfextend.apply(model, group_size=4, window=16)
    x = torch.randint(3, 128, (1, 103), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)

    def step(n: int, counter: CountOps | None = None):
        mask = torch.ones(1, n, dtype=torch.long) if masked else None
        if counter is None:
            return model(x[:, n - 1 : n], past_key_values=cache, use_cache=True, attention_mask=mask)
        with counter:
            return model(x[:, n - 1 : n], past_key_values=cache, use_cache=True, attention_mask=mask)

    counter = CountOps()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.ops["tolist"] += 1
        return tolist(self)

    with torch.no_grad():
        model(x[:, :100], past_key_values=cache, use_cache=True,
              attention_mask=torch.ones(1, 100) if masked else None)
        step(101)  # the first decode step after a prefill may still group the prefill's last keys
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        step(102, counter)
        monkeypatch.undo()
    return counter


@pytest.fixture(scope="module")
def counts():
    mp = pytest.MonkeyPatch()
    try:
        return {(layers, extend): decode_step_ops(layers, extend, mp) for layers in (2, 4)
                for extend in (False, True)}
    finally:
        mp.undo()


def test_no_host_read_beyond_vanillas(counts):
    for layers in (2, 4):
        vanilla, extended = counts[(layers, False)], counts[(layers, True)]
        assert vanilla.host_reads <= 1
        assert extended.host_reads <= vanilla.host_reads, (layers, extended.ops, vanilla.ops)


def test_few_extra_ops_per_layer(counts):
    extra = {layers: sum(counts[(layers, True)].ops.values()) - sum(counts[(layers, False)].ops.values())
             for layers in (2, 4)}
    per_layer = (extra[4] - extra[2]) / 2
    assert per_layer <= EXTRA_OPS_PER_LAYER, per_layer


def test_without_a_mask_one_read(monkeypatch):
    vanilla = decode_step_ops(2, False, monkeypatch, masked=False)
    extended = decode_step_ops(2, True, monkeypatch, masked=False)
    assert vanilla.host_reads == 0 and extended.host_reads == 1, (vanilla.ops, extended.ops)
