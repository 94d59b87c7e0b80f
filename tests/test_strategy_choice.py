"""``auto`` picks the helix score strategy that sends fewer bytes, counting what is computed.

Measured traffic is checked against these formulas in ``test_comm_accounting.py``; here the
formulas are checked against hand counts, and the choice against them.
"""

from __future__ import annotations

import pytest

from megatron_helix.attention.strategy import (
    SliceGroupShape,
    allreduce_bytes_sent,
    choose_strategy,
    query_blocks,
    redistribute_bytes_sent,
)


def _shape(seq_q: int, seq_kv: int = None, m: int = 2) -> SliceGroupShape:
    return SliceGroupShape(m=m, batch=1, seq_q=seq_q, seq_kv=seq_q if seq_kv is None else seq_kv,
                           heads=4, kv_heads=4, slice_dim=32, element_bytes=2)


def test_query_blocks_stop_at_the_diagonal():
    assert list(query_blocks(10, 10, False, 4)) == [(0, 4, 10), (4, 8, 10), (8, 10, 10)]
    assert list(query_blocks(10, 10, True, 4)) == [(0, 4, 4), (4, 8, 8), (8, 10, 10)]
    # decode-like: 2 new queries after 6 cached keys see 7 and 8 keys
    assert list(query_blocks(2, 8, True, 1)) == [(0, 1, 7), (1, 2, 8)]


def test_byte_counts_by_hand():
    # m = 2: a ring all-reduce sends 2 (m-1)/m = 1 buffer; b h rows keys fp32 per block
    causal_pairs = sum(4 * keys for keys in range(4, 49, 4))  # 12 blocks of 4 rows
    assert allreduce_bytes_sent(_shape(48), True, True, 4) == 3 * 4 * 4 * causal_pairs
    assert allreduce_bytes_sent(_shape(48), False, False, 4) == 4 * 4 * 48 * 48
    # q and out all-to-all (half of s h d/m e each), k and v all-gathered (one shard each)
    shard = 48 * 4 * 32 * 2
    assert redistribute_bytes_sent(_shape(48), False) == 2 * shard // 2 + 2 * shard
    assert redistribute_bytes_sent(_shape(48), True) == 2 * (2 * shard // 2 + 2 * shard)
    assert allreduce_bytes_sent(_shape(48, m=1), True, True) == 0


def test_auto_counts_only_the_causal_scores():
    shape = _shape(48)
    # without a mask the s^2 scores outweigh the tokens; causal blocks compute about half
    assert choose_strategy("auto", shape, True, causal=False, query_block_size=4) == "redistribute"
    assert choose_strategy("auto", shape, True, causal=True, query_block_size=4) == "allreduce"
    # one block of all 48 rows sees every key even under a causal mask
    assert choose_strategy("auto", shape, True, causal=True, query_block_size=48) == "redistribute"


def test_auto_for_decode_and_for_long_training_sequences():
    assert choose_strategy("auto", _shape(1, 4096), False, causal=True) == "allreduce"
    assert choose_strategy("auto", _shape(4096), True, causal=True) == "redistribute"


def test_explicit_choices_are_checked():
    assert choose_strategy("allreduce", _shape(4096), True, causal=True) == "allreduce"
    with pytest.raises(ValueError, match="redistribute needs sq == sk divisible by 2\\*m = 4"):
        choose_strategy("redistribute", _shape(6), True, causal=True)
    with pytest.raises(ValueError, match="not in"):
        choose_strategy("fastest", _shape(8), True, causal=True)
