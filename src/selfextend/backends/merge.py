"""Log-sum-exp merge of two attention passes over disjoint key sets.

If pass a has output ``o_a`` and log-sum-exp ``lse_a`` over its keys and pass b likewise, one softmax
over the union gives ``o = o_a * sigmoid(lse_a - lse_b) + o_b * sigmoid(lse_b - lse_a)``, i.e.
``lerp(o_b, o_a, sigmoid(lse_a - lse_b))``. A pass with no keys for a row has ``lse = -inf`` and
contributes nothing (its output must be finite, e.g. zero).
"""

from __future__ import annotations

import torch


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions.

    Args:
        out_a, out_b: (..., T, D) outputs, any float dtype.
        lse_a, lse_b: (..., T) fp32 log-sum-exp of the scaled scores; ``-inf`` where a pass saw no key.

    Returns:
        ``(out, lse)`` with ``out`` in fp32 and ``lse = logaddexp(lse_a, lse_b)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # sigmoid(-inf) = 0 for a pass without keys; NaN (-inf - -inf: neither pass has keys) -> 0
    w_a = torch.sigmoid(lse_a - lse_b).nan_to_num_(0.0)[..., None]
    # one fused pass over the outputs: out_b + w_a * (out_a - out_b)
    out = torch.lerp(out_b.to(torch.float32), out_a.to(torch.float32), w_a)
    return out, lse
