"""Run under ``torchrun --nproc-per-node 2``: a tiny model split by transformers' tensor parallelism (gloo on
CPU), vanilla, SelfExtend and DCA; rank 0 saves every output for tests/test_devices.py to compare with one
process. Argument: the model directory, the output file."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import selfextend
from selfextend.models import distributed_config


def outputs(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randint(3, 100, (1, 150))
    with torch.no_grad():
        out = {"logits": model(x).logits}
        cached = model(x[:, :100], use_cache=True)  # chunked prefill: 100 then 50 tokens through the cache
        rest = model(x[:, 100:], past_key_values=cached.past_key_values, use_cache=True)
        out["chunked"] = torch.cat([cached.logits, rest.logits], 1)
        short = x[0, 40:]
        pad = x.shape[1] - short.numel()
        batch = torch.stack([x[0], torch.cat([torch.zeros(pad, dtype=torch.long), short])])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out["padded"] = model(batch, attention_mask=mask, position_ids=position_ids).logits
        out["generate"] = model.generate(x[:, :120], attention_mask=torch.ones(1, 120, dtype=torch.long),
                                         max_new_tokens=20, do_sample=False, pad_token_id=0)
    return out


def main() -> None:
    directory, target = sys.argv[1], sys.argv[2]
    model, _ = selfextend.load_model(directory, distributed=distributed_config())
    results = {"vanilla": outputs(model)}
    selfextend.apply(model, group_size=2, window=8)
    results["self-extend"] = outputs(model)
    selfextend.apply(model, method="dca", chunk_size=48, local_window=4)
    results["dca"] = outputs(model)
    if dist.get_rank() == 0:
        torch.save(results, target)
    dist.barrier()


if __name__ == "__main__":
    main()
