import pytest
import torch
from reference import dca_distance_table

from selfextend.positions import (
    absolute_key_positions,
    chunk_key_positions,
    dca_exact_below,
    dca_relative_positions,
    grouped_key_positions,
    grouped_query_positions,
    inter_chunk_query_positions,
    intra_chunk_query_positions,
    log_scale_factor,
    max_reach,
    recommended_group_size,
    smallest_group_size,
    successive_chunk_query_positions,
    temperature_factor,
)


def test_grouped_positions_by_hand():
    pos = torch.arange(12)
    # G=4, W=8: query i -> i//4 + 8 - 2; key j -> j//4
    assert grouped_query_positions(pos, 4, 8).tolist() == [6, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 8]
    assert grouped_key_positions(pos, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_grouped_distance_is_continuous_at_the_window():
    G, W = 4, 8
    for i in range(W, 200):
        j = i - W  # first grouped key
        d = int(grouped_query_positions(torch.tensor(i), G, W) - grouped_key_positions(torch.tensor(j), G))
        assert W - G < d <= W + 1


def test_integer_shift_when_window_not_multiple_of_group():
    # the official code's float W - W/G gave 1024 - 204.8; ours is integer and identical in every path
    pos = torch.tensor([5000])
    assert grouped_query_positions(pos, 5, 1024).item() == 5000 // 5 + 1024 - 1024 // 5


def test_reach_and_group_size_rules():
    assert max_reach(8192, 1024, 4) == 29696
    assert max_reach(4096, 1024, 4) == 13312
    assert smallest_group_size(32768, 4096, 1024) == 11
    assert max_reach(4096, 1024, smallest_group_size(32768, 4096, 1024)) >= 32768
    assert smallest_group_size(4000, 4096, 1024) == 1
    # authors' rule: W + (N - W) / G <= 2/3 L; 16k on an 8k model with W=1024 -> G = 4
    assert recommended_group_size(16384, 8192, 1024) == 4
    assert recommended_group_size(8000, 8192, 1024) == 1


def test_key_positions_no_padding_chunk():
    q_pos = torch.tensor([[5, 6, 7]])
    k_pos, q_valid = absolute_key_positions(q_pos, None, q_start=5, kv_len=8)
    assert k_pos.tolist() == [list(range(8))] and q_valid is None


def test_key_positions_left_padding_like_generate():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    q_pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # what generate() passes
    k_pos, q_valid = absolute_key_positions(q_pos, valid, q_start=0, kv_len=5)
    assert k_pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert q_valid.tolist() == valid.tolist()
    # decode step: one new token per row
    valid2 = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1)
    k_pos2, _ = absolute_key_positions(torch.tensor([[3], [5]]), valid2, q_start=5, kv_len=6)
    assert k_pos2.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]


def test_key_positions_rejects_packed_sequences():
    with pytest.raises(ValueError, match="position_ids must count the non-padding tokens"):
        absolute_key_positions(torch.tensor([[0, 1, 2, 0, 1, 2]]), None, q_start=0, kv_len=6)


# ---- Dual Chunk Attention ------------------------------------------------------------------------------

# chunk_size 6, local_window 2 (chunk_len 4), 16 tokens, worked out by hand from the maps:
# keys at j mod 4; queries at i mod 4 (own chunk), min(i mod 4 + 4, 6) (previous chunk), 6 (older chunks)
HAND_TABLE = """
0
1 0
2 1 0
3 2 1 0
4 3 2 1 0
5 4 3 2 1 0
6 5 4 3 2 1 0
6 5 4 3 3 2 1 0
6 5 4 3 4 3 2 1 0
6 5 4 3 5 4 3 2 1 0
6 5 4 3 6 5 4 3 2 1 0
6 5 4 3 6 5 4 3 3 2 1 0
6 5 4 3 6 5 4 3 4 3 2 1 0
6 5 4 3 6 5 4 3 5 4 3 2 1 0
6 5 4 3 6 5 4 3 6 5 4 3 2 1 0
6 5 4 3 6 5 4 3 6 5 4 3 3 2 1 0
"""


def test_position_maps_match_the_hand_computed_table():
    pos = torch.arange(16)
    table = dca_relative_positions(pos, pos, chunk_size=6, local_window=2)
    for i, line in enumerate(HAND_TABLE.strip().splitlines()):
        assert table[i, : i + 1].tolist() == [int(t) for t in line.split()], f"row {i}"
    assert chunk_key_positions(pos, 4).tolist() == [0, 1, 2, 3] * 4
    assert intra_chunk_query_positions(pos, 4).tolist() == [0, 1, 2, 3] * 4
    assert successive_chunk_query_positions(pos, 6, 4).tolist() == [4, 5, 6, 6] * 4
    assert inter_chunk_query_positions(pos, 6).tolist() == [6] * 16
    # no distance exceeds chunk_size at any length
    long = torch.arange(2000)
    assert int(dca_relative_positions(long, long, 6, 2).tril().max()) == 6
    # the gate: rows below it keep i - j; without it, rows up to min(cs + 1, 2 cl) are exact anyway
    gated = dca_relative_positions(pos, pos, 6, 2, exact_below=10)
    assert torch.equal(gated[:10], (pos[:10, None] - pos[None, :]))
    assert torch.equal(gated[10:], table[10:])
    assert dca_exact_below(6, 2, 64, False) == 7 and torch.equal(table[:7].tril(),
                                                                 (pos[:7, None] - pos).tril())
    assert dca_exact_below(6, 2, 64, True) == 64


def test_temperature_is_yarn_past_the_trained_length_only():
    f = temperature_factor(torch.tensor([0, 63, 64, 127, 1023]), 64)
    assert f[:2].tolist() == [1.0, 1.0]
    expected = 0.1 * torch.log(torch.tensor([65 / 64, 2.0, 16.0])) + 1
    assert torch.allclose(f[2:], expected)


def test_log_scale_is_one_up_to_its_base_then_log_ratio():
    f = log_scale_factor(torch.tensor([0, 62, 63, 127, 4095]), 64)
    assert f[:3].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(f[3:], torch.tensor([7 / 6, 2.0]))  # ln 128 / ln 64, ln 4096 / ln 64


def test_oracle_table_is_the_hand_drawn_one():
    pos = torch.arange(16)
    table = dca_distance_table(pos, pos, chunk_size=6, local_window=2)
    expected = [[int(v) for v in row.split()] for row in HAND_TABLE.strip().splitlines()]
    assert [table[i, : i + 1].tolist() for i in range(16)] == expected
