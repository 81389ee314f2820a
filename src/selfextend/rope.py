"""RoPE delta rotations: move already-rotated queries and keys to other positions.

RoPE is a rotation, so ``R(a) R(b) = R(a + b)``: a key rotated at its true position ``j`` moves to its
grouped position ``j // G`` by one more rotation of ``j // G - j``. The attention registry hands us q and
k after the model's own RoPE, so this is all SelfExtend needs, for any rope type: the deltas use the
model's ``inv_freq`` *after* its rope-type adjustments (llama3, linear, yarn frequencies) and *without*
the attention scaling that yarn/longrope fold into cos/sin (scaling is not a rotation and is already in
q and k). Angles are computed in fp64 and products in fp32 whatever the model dtype.

Layouts:
* ``rotate_half`` (NeoX/Llama, what transformers uses for every supported family): channel ``c`` pairs
  with ``c + rd/2``;
* ``interleaved`` (GPT-J style): channel ``2c`` pairs with ``2c + 1``;
* partial rotary (Phi): only the first ``rd = 2 * len(inv_freq)`` channels rotate, the rest pass through.
"""

from __future__ import annotations

import torch

LAYOUTS = ("rotate_half", "interleaved")
_CHUNK = 2048  # positions rotated at a time
_SMALL = 8  # at most this many (row, position) deltas: rotate by a cached matrix (decode steps)
_WIDE = (torch.float32, torch.float64)  # dtypes a rotation computes in as they are


def rotate_by(
    x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = "rotate_half",
    memo: dict | None = None
) -> torch.Tensor:
    """Rotate ``x`` by ``delta`` positions.

    Args:
        x: (B, H, T, D) queries or keys, already rotated at their true positions.
        delta: (B, T) integer position offsets (may be negative).
        inv_freq: (rd/2,) the model's inverse frequencies; ``rd <= D`` channels rotate.
        layout: ``"rotate_half"`` or ``"interleaved"``.
        memo: a dict that lives for one forward call (every layer shares its deltas). With it, a few deltas
            (a decode step) rotate by one cached (D x D) matrix product (``_by_matrix`` says where): about 15
            small ops per call become one, which is most of SelfExtend's per-layer cost when decoding.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (memo is not None and delta.numel() <= _SMALL and _by_matrix(x)
            and not torch.compiler.is_compiling()):  # an eager shortcut: dynamo cannot trace id(delta)
        return _rotate_small(x, delta, inv_freq, layout, memo)
    if x.shape[2] > _CHUNK:  # fp32 temporaries per chunk, not per sequence: a 16k bf16 prefill would
        out = torch.empty_like(x)  # otherwise hold ~8 query-sized fp32 tensors at once
        for s in range(0, x.shape[2], _CHUNK):
            out[:, :, s : s + _CHUNK] = rotate_by(x[:, :, s : s + _CHUNK], delta[:, s : s + _CHUNK],
                                                  inv_freq, layout)
        return out
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rotation_table(delta.to(x.device)[:, None, :], inv_freq, work)  # (B, 1, T, rd/2)
    return rotate_with(x, cos, sin, layout)


def rotation_table(delta: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of ``delta[..., None] * inv_freq`` (shape ``delta.shape + (rd/2,)``), in ``dtype``.

    Angles in fp64: positions reach 1e5+ and an fp32 angle there is off by ~1e-2 rad. A table depends on the
    deltas only, so callers whose deltas repeat (every layer of a forward, every step of a decode) keep it."""
    angle = delta.to(torch.float64)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float64)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layout: str = "rotate_half") -> torch.Tensor:
    """Rotate ``x`` (..., D) by a table from ``rotation_table`` (broadcastable to ``x``'s leading dims, last
    dim rd/2), computing in the table's dtype; returns ``x``'s dtype."""
    half = cos.shape[-1]
    rd = 2 * half
    xr = x[..., :rd].to(cos.dtype)
    if layout == "rotate_half":
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    if rd == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rd:]), dim=-1)


def _by_matrix(x: torch.Tensor) -> bool:
    """May a few deltas rotate ``x`` by a cached matrix product? On CPU, yes. On a GPU, where the product is 3
    kernel launches against ~16 for the table and the elementwise rotation (per rotation, twice a layer in a
    decode step), yes unless fp32 matmuls may round to TF32 (``torch.set_float32_matmul_precision``): the
    product would then lose precision that the elementwise path keeps."""
    return x.device.type == "cpu" or not _matmul_may_round_to_tf32()


def _matmul_may_round_to_tf32() -> bool:
    """Read without raising: torch refuses to answer the legacy ``allow_tf32`` once the new
    ``fp32_precision`` API was used, and either API may have set it."""
    backends = torch.backends
    new = (getattr(backends.cuda.matmul, "fp32_precision", "none"),
           getattr(backends, "fp32_precision", "none"))
    if "tf32" in new:
        return True
    if new[0] == "ieee":
        return False
    try:
        return torch.get_float32_matmul_precision() != "highest" or bool(backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # the two APIs mixed: assume the rounding
        return True


def _rotate_small(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str,
                  memo: dict) -> torch.Tensor:
    """``rotate_by`` as ``x @ M`` with ``M`` (per row and position) the rotation of the identity, built once
    per forward and delta. Rotations are linear, so this is the same map; only the rounding order differs.

    The memo is keyed by the delta *tensor* (callers share one per forward: the query delta, a cache's key
    delta), never by its values: reading them would stop the host until the device caught up, every layer.
    The entry keeps the delta and the frequencies alive, so their ids cannot be reused by other tensors
    during the forward."""
    work = x.dtype if x.dtype in _WIDE else torch.float32  # promote_types is an op (microseconds a call)
    dim = x.shape[-1]
    key = ("rotation", id(delta), delta._version, x.device, id(inv_freq), inv_freq._version, layout, dim,
           work)
    entry = memo.get(key)
    if entry is None or entry[0] is not delta or entry[2] is not inv_freq:
        basis = (torch.eye(dim, dtype=work, device=x.device).expand(delta.shape[0], dim, dim)[:, :, None, :]
                 .expand(-1, -1, delta.shape[1], -1))
        mat = rotate_by(basis, delta, inv_freq, layout)  # (B, D, T, D): row c is e_c rotated
        entry = memo[key] = (delta, mat[0, :, 0] if delta.numel() == 1 else mat, inv_freq)
    mat = entry[1]
    xw = x if x.dtype == work else x.to(work)
    if delta.numel() == 1:  # one mm on the rows (matmul's broadcasting adds ops a decode step pays for)
        out = torch.mm(xw.reshape(-1, dim), mat).view(xw.shape)
    else:
        out = torch.einsum("bhtc,bctd->bhtd", xw, mat)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
               layout: str = "rotate_half") -> torch.Tensor:
    """Plain RoPE of un-rotated ``x`` at ``pos`` (used by tests and the reference formulation)."""
    return rotate_by(x, pos, inv_freq, layout)
