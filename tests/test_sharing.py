"""The one sharing rule (``megatron_prefix.sharing``): counted pairs, positions and predictors agree with
the dense mask and with the duplicated layout, on random rows."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_prefix import sharing
from megatron_prefix.data.row import pack_row
from megatron_prefix.data.unit import Unit
from megatron_prefix.training.flops import row_attention_pairs
from tests.dist_scripts.attention_common import random_rows


@pytest.mark.parametrize("seed", range(6))
def test_counted_pairs_equal_dense_mask_entries(seed):
    rows = random_rows(seed, 3, 96, ks=(1, 2, 3, 5), max_prompt=12, max_resp=9)
    for row in rows:
        real = row.doc_ids != sharing.PAD_DOC
        dense = int(row.dense_mask()[real].sum())
        assert sharing.ids_pairs(row.doc_ids, row.segment_ids) == dense
        assert row_attention_pairs(row) == dense
    units_total = 0
    rng = np.random.default_rng(seed)
    for _ in range(5):
        k = int(rng.integers(1, 5))
        u = Unit(rng.integers(1, 9, int(rng.integers(1, 20))),
                 [rng.integers(1, 9, int(rng.integers(1, 15))) for _ in range(k)], np.zeros(k))
        shared = pack_row([u], u.shared_len + 3, 0)
        assert u.shared_attention_pairs() == int(shared.dense_mask()[shared.doc_ids >= 0].sum())
        dup = pack_row(u.split_unshared(), u.unshared_len, 0)
        assert u.unshared_attention_pairs() == int(dup.dense_mask().sum())
        units_total += u.shared_attention_pairs()
    assert units_total > 0


@pytest.mark.parametrize("seed", range(4))
def test_positions_and_predictors_agree_with_duplicated_layout(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(1, 5))
    u = Unit(rng.integers(1, 50, int(rng.integers(1, 10))),
             [rng.integers(1, 50, int(rng.integers(1, 8))) for _ in range(k)], np.zeros(k))
    shared = pack_row([u], u.shared_len, 0)
    for i, (s, e) in enumerate(shared.resp_spans.tolist()):
        seq = u.unshared_sequence(i)  # the duplicated sequence [prompt + r_i], positions 0..len-1
        p = u.prompt_len
        for t in range(s, e):
            j = p + (t - s)  # the token's index in its duplicated sequence
            assert shared.tokens[t] == seq[j] and shared.position_ids[t] == j
            pred = shared.pred_index[t]
            # the predictor holds the duplicated sequence's previous token at the previous position
            assert shared.tokens[pred] == seq[j - 1] and shared.position_ids[pred] == j - 1
            assert sharing.visible(0, i + 1, t, 0, shared.segment_ids[pred], pred)
    assert np.array_equal(shared.pred_index[: u.prompt_len], np.full(u.prompt_len, -1))


def test_negative_control_counts_differ():
    """Sharing must count fewer pairs than duplication whenever a prompt has two responses."""
    assert sharing.shared_pairs(10, [3, 4]) < sharing.unshared_pairs(10, [3, 4])
    assert sharing.shared_pairs(10, [3]) == sharing.unshared_pairs(10, [3])
    assert sharing.bottom_right_pairs(3, 13) == 3 * 10 + 6
