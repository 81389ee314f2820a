import pytest
import torch

from selfextend.rope import apply_rope, rotate_by


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("rotary_dims", [16, 8])  # 8 of 16 channels = partial rotary (Phi)
def test_rotation_composes(layout, rotary_dims):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dims, 2).double() / rotary_dims))
    a = torch.randint(0, 5000, (2, 7))
    b = torch.randint(-3000, 3000, (2, 7))
    once = apply_rope(x, a + b, inv_freq, layout)
    twice = rotate_by(apply_rope(x, a, inv_freq, layout), b, inv_freq, layout)
    assert torch.allclose(once.double(), twice.double(), atol=1e-4)
    if rotary_dims < 16:
        assert torch.equal(twice[..., rotary_dims:], x[..., rotary_dims:])


def test_rotation_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 8)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(100, 105)[None]
    emb = torch.cat([pos[..., None].float() * inv_freq] * 2, -1)
    q_hf, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    assert torch.allclose(apply_rope(x, pos, inv_freq), q_hf, atol=1e-5)


def test_zero_delta_is_identity():
    x = torch.randn(1, 2, 5, 8)
    inv_freq = torch.rand(4)
    assert torch.equal(rotate_by(x, torch.zeros(1, 5, dtype=torch.long), inv_freq), x)


def test_long_inputs_rotate_in_chunks_with_the_same_result():
    x = torch.randn(1, 3, 5000, 16, dtype=torch.bfloat16)
    delta = torch.randint(-9000, 0, (1, 5000))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pieces = [rotate_by(x[:, :, s : s + 1000], delta[:, s : s + 1000], inv_freq)
              for s in range(0, 5000, 1000)]
    assert torch.equal(rotate_by(x, delta, inv_freq), torch.cat(pieces, 2))


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("rotary_dims", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rotation_by_cached_matrix_matches(layout, rotary_dims, dtype):
    """A decode step's few deltas rotate by a cached (D x D) matrix: the same map, rounding aside."""
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
    # like a model's (B, H, 1, D) view
    x = torch.randn(2, 3, 1, 16).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    delta = torch.tensor([[-7000], [-12]])  # rows at different positions (a left-padded batch)
    memo: dict = {}
    fast = rotate_by(x, delta, inv_freq, layout, memo)
    assert len(memo) == 1 and fast.dtype == dtype and fast.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(fast.float(), rotate_by(x, delta, inv_freq, layout).float(), atol=tol)
    again = rotate_by(x * 2, delta, inv_freq, layout, memo)  # same deltas: the matrix is reused
    assert len(memo) == 1 and torch.allclose(again.float(), 2 * fast.float(), atol=2 * tol)
    rotate_by(x, delta + 1, inv_freq, layout, memo)
    assert len(memo) == 2
    if rotary_dims < 16:
        assert torch.equal(fast[..., rotary_dims:], x[..., rotary_dims:])


def test_rotations_off_cpu_take_the_matrix_unless_matmuls_may_round_to_tf32():
    """On a GPU the cached matrix is 3 kernel launches where the table and the elementwise rotation are ~16,
    twice a layer in a decode step; with TF32 matmuls allowed it would round the rotation, so the elementwise
    path stays. The meta device stands in for a GPU (the choice reads the device type and the setting)."""
    x = torch.empty(1, 4, 1, 16, device="meta")
    delta = torch.zeros(1, 1, dtype=torch.long, device="meta")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    matmul = torch.backends.cuda.matmul

    def by_matrix() -> bool:
        memo: dict = {}
        assert rotate_by(x, delta, inv_freq, "rotate_half", memo).shape == x.shape
        return len(memo) == 1

    before = torch.get_float32_matmul_precision()
    try:
        assert by_matrix()
        torch.set_float32_matmul_precision("high")  # the legacy API
        assert not by_matrix()
        torch.set_float32_matmul_precision("highest")
        assert by_matrix()
        if hasattr(matmul, "fp32_precision"):  # the new API: torch then refuses to read the legacy flag
            matmul.fp32_precision = "tf32"
            assert not by_matrix()
            matmul.fp32_precision = "ieee"
            assert by_matrix()
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(before)


def test_low_precision_frequencies_are_one_fp32_tensor_per_forward():
    """A bf16 model's ``inv_freq`` is copied to fp32 once and shared by every layer: per-forward rotation
    memos are keyed by the frequencies' identity, so a copy per layer would rebuild them per layer (and a
    recycled address must never pass for other frequencies). Changed in place or replaced: a new copy."""
    from selfextend.integrations.hf.model_info import inv_freq_getter

    rotary = torch.nn.Module()
    rotary.register_buffer("inv_freq", (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)).to(torch.bfloat16))
    layers = [torch.nn.Module(), torch.nn.Module()]
    getters = [inv_freq_getter(rotary, layer) for layer in layers]
    first = getters[0]()
    assert first.dtype == torch.float32 and getters[1]() is first and getters[0]() is first
    assert torch.equal(first, rotary.inv_freq.float())
    rotary.inv_freq.mul_(2)
    again = getters[1]()
    assert again is not first and torch.equal(again, rotary.inv_freq.float())
    rotary.inv_freq = rotary.inv_freq.float()  # an fp32 buffer is returned as it is
    assert getters[0]() is rotary.inv_freq
