"""Dual Chunk Attention (DCA; ChunkLlama, arXiv 2402.17463; Qwen2.5-1M) as a method.

Keys sit at ``j mod (chunk_size - local_window)``; queries at three positions (own chunk, previous chunk,
older chunks), so every distance stays within ``chunk_size < L`` at any length. The position maps are in
``positions.py``, the description (parameters, validation) in ``config.py``, the attention in
``integrations/hf/dca.py`` and ``backends/``.

Defaults: ``chunk_size = 3L/4`` (ChunkLlama), ``local_window = L/16`` (ChunkLlama's first release, whose
published results ours compare with; its current code uses L/8). A model whose config carries Qwen's
``dual_chunk_attention_config`` (``chunk_size``, ``local_size``, ``original_max_position_embeddings``) uses it
when neither size is given, and turns the temperature on by default, as Qwen always pairs DCA with it.

Reach: DCA has no position limit (distances never exceed ``chunk_size``), so ``reach`` is a soft bound,
``DCA_REACH_FACTOR * L`` (32x, the longest published training-free use); a ``target_length`` past it warns.
Nothing else depends on ``target_length``: the chunk sizes follow L, not the input length.
"""

from __future__ import annotations

from ..config import ATTENTION_SPECS
from ..integrations.hf import DCA
from . import METHODS
from .base import AttentionMethod


@METHODS.register("dca")
class DualChunkAttention(AttentionMethod):
    summary = ("Dual Chunk Attention (ChunkLlama): keys at j mod chunk_len; "
               "intra/successive/inter-chunk queries")
    spec = ATTENTION_SPECS["dca"]
    integration = DCA

    def check_together(self, params):
        cs, w = params.get("chunk_size"), params.get("local_window")
        if cs is not None and w is not None and w >= cs:
            raise ValueError(f"local_window={w} must be smaller than chunk_size={cs} (chunk_len = "
                             f"chunk_size - local_window must be >= 1); use local_window <= {cs // 4}.")
