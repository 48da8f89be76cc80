"""The epoch plan (megatron_prefix.data.batching): coverage, layout independence, balance, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prefix.data.batching import BatchConfig, EpochPlan, describe_plan, distribute_rows, plan_epoch


def synthetic_units(n: int, seed: int = 0, pack_tokens: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(shared_len, unshared_len) of n synthetic units with K in 2..4 that fit ``pack_tokens`` unshared."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.round(rng.lognormal(np.log(250), 0.8, n)), 4, 2000).astype(np.int64)
    k = rng.integers(2, 5, n)
    resp = np.clip(np.round(rng.lognormal(np.log(150), 0.8, (n, 4))), 2, 1000).astype(np.int64)
    resp_total = (resp * (np.arange(4)[None] < k[:, None])).sum(1)
    shared, unshared = prompt + resp_total, k * prompt + resp_total
    keep = unshared <= pack_tokens
    return shared[keep], unshared[keep]


def check_plan(plan: EpochPlan, n: int, pack_lengths, cfg: BatchConfig, dp_size: int) -> None:
    """Every invariant of a plan."""
    lengths = np.asarray(pack_lengths)
    used = plan.units
    assert sorted(used + plan.dropped) == list(range(n))  # every unit exactly once (or dropped)
    g = cfg.global_batch_units
    if cfg.drop_last:
        assert len(plan.dropped) == n % g
        assert all(len(s.units) == g for s in plan.steps)
    else:
        assert not plan.dropped
        assert all(len(s.units) == g for s in plan.steps[:-1])
    for step in plan.steps:
        assert step.dp_size == dp_size
        m = step.num_microbatches
        assert all(len(rows) == m for rows in step.rows_per_rank)  # equal micro-batches per rank
        real = [row for rows in step.rows_per_rank for row in rows if row]
        assert sorted(u for row in real for u in row) == sorted(step.units)  # rows partition the step
        assert m == -(-len(real) // dp_size)  # no more micro-batches than needed
        row_tok = [int(lengths[row].sum()) for row in real]
        assert max(row_tok) <= cfg.pack_tokens
        tokens = [sum(int(lengths[row].sum()) for row in rows if row) for rows in step.rows_per_rank]
        assert tokens == step.tokens_per_rank
        assert max(tokens) - min(tokens) <= max(row_tok)  # balanced up to the largest row
        for rows in step.rows_per_rank:  # empty rows only at the end of a rank
            flags = [bool(r) for r in rows]
            assert flags == sorted(flags, reverse=True)


@st.composite
def plan_cases(draw):
    pack_tokens = draw(st.integers(8, 200))
    n = draw(st.integers(0, 150))
    shared = draw(st.lists(st.integers(1, pack_tokens), min_size=n, max_size=n))
    extra = draw(st.lists(st.integers(0, pack_tokens), min_size=n, max_size=n))
    unshared = [min(pack_tokens, s + e) for s, e in zip(shared, extra)]
    cfg = BatchConfig(
        pack_tokens=pack_tokens,
        global_batch_units=draw(st.integers(1, 40)),
        sort_window=draw(st.integers(0, 4)),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        algorithm=draw(st.sampled_from(["bfd", "ffd"])),
        drop_last=draw(st.booleans()),
    )
    return shared, unshared, cfg, draw(st.integers(0, 3)), draw(st.integers(1, 8))


@settings(max_examples=120, deadline=None)
@given(plan_cases())
def test_plan_invariants_and_layout_independence(case):
    shared, unshared, cfg, epoch, dp_size = case
    n = len(shared)
    plan_s = plan_epoch(shared, shared, cfg, epoch, dp_size)
    plan_u = plan_epoch(shared, unshared, cfg, epoch, dp_size)
    check_plan(plan_s, n, shared, cfg, dp_size)
    check_plan(plan_u, n, unshared, cfg, dp_size)
    # the same units in the same steps whatever the layout
    assert [s.units for s in plan_s.steps] == [s.units for s in plan_u.steps]
    assert plan_s.dropped == plan_u.dropped
    # deterministic for (seed, epoch)
    again = plan_epoch(list(shared), list(unshared), cfg, epoch, dp_size)
    assert [s.rows_per_rank for s in again.steps] == [s.rows_per_rank for s in plan_u.steps]


def test_epochs_differ_and_seeds_differ():
    shared, unshared = synthetic_units(3000)
    cfg = BatchConfig(global_batch_units=64, sort_window=4)
    e0 = plan_epoch(shared, unshared, cfg, 0, 4)
    e1 = plan_epoch(shared, unshared, cfg, 1, 4)
    other = plan_epoch(shared, unshared, dataclasses.replace(cfg, seed=cfg.seed + 1), 0, 4)
    assert e0.units != e1.units and e0.units != other.units
    assert sorted(e0.units) == sorted(e1.units) == list(range(len(shared)))


def test_no_shuffle_no_sort_keeps_order():
    cfg = BatchConfig(pack_tokens=100, global_batch_units=3, sort_window=0, shuffle=False)
    plan = plan_epoch([5, 9, 1, 7, 3, 2, 8], [5, 9, 1, 7, 3, 2, 8], cfg, 0, 1)
    assert [s.units for s in plan.steps] == [[0, 1, 2], [3, 4, 5], [6]]


def test_sorting_windows():
    lengths = [50, 10, 40, 20, 30, 60]
    cfg = BatchConfig(pack_tokens=100, global_batch_units=2, sort_window=3, shuffle=False)
    plan = plan_epoch(lengths, lengths, cfg, 0, 1)
    assert [s.units for s in plan.steps] == [[1, 3], [4, 2], [0, 5]]  # one window of 3 batches, sorted
    cfg = dataclasses.replace(cfg, sort_window=1)
    plan = plan_epoch(lengths, lengths, cfg, 0, 1)
    assert [s.units for s in plan.steps] == [[1, 0], [3, 2], [4, 5]]  # membership unchanged


def test_batch_order_shuffled_and_short_batch_last():
    shared, unshared = synthetic_units(2000, seed=3)
    cfg = BatchConfig(global_batch_units=50, sort_window=40)  # one sort window for the whole epoch
    plan = plan_epoch(shared, unshared, cfg, 0, 2)
    means = [float(np.mean(shared[s.units])) for s in plan.steps[:-1]]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    for s in plan.steps:  # each step is a contiguous slice of the sorted window: sorted inside
        assert list(shared[s.units]) == sorted(shared[s.units])
    assert len(plan.steps[-1].units) == len(shared) % 50 or len(shared) % 50 == 0


def test_distribute_rows_lpt():
    assert distribute_rows([10, 9, 8, 1], 2) == [[0, 3], [1, 2]]
    # plain LPT would give rank 1 five rows (rank 0: 3); the row cap ceil(8 / 2) = 4 keeps 4 micro-batches
    assert distribute_rows([8000] * 5 + [3000, 2000, 1000], 2) == [[0, 2, 4, 7], [1, 3, 5, 6]]
    assert distribute_rows([5], 3) == [[0], [], []]
    assert distribute_rows([], 2) == [[], []]


def test_empty_rows_pad_ranks():
    cfg = BatchConfig(pack_tokens=10, global_batch_units=3, sort_window=0, shuffle=False)
    plan = plan_epoch([6, 6, 6], [6, 6, 6], cfg, 0, 2)
    (step,) = plan.steps
    assert step.rows_per_rank == [[[0], [2]], [[1], []]]
    assert step.num_microbatches == 2 and step.tokens_per_rank == [12, 6]


def test_too_long_unit_raises_naming_it():
    cfg = BatchConfig(pack_tokens=100, global_batch_units=2)
    with pytest.raises(ValueError, match=r"unit 1 takes 150 tokens > pack_tokens=100.*max_unit_tokens"):
        plan_epoch([10, 50, 20], [10, 150, 20], cfg, 0, 1)


@pytest.mark.parametrize(
    "field, value",
    [
        ("pack_tokens", 0),
        ("global_batch_units", 0),
        ("sort_window", -1),
        ("seed", -1),
        ("algorithm", "nf"),
        ("shuffle", "yes"),
        ("drop_last", 1),
        ("pack_tokens", 8.5),
    ],
)
def test_config_validation_names_field(field, value):
    cfg = dataclasses.replace(BatchConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"batch\.{field}:"):
        cfg.validate()


def test_bad_arguments():
    cfg = BatchConfig()
    with pytest.raises(ValueError, match="dp_size"):
        plan_epoch([1], [1], cfg, 0, 0)
    with pytest.raises(ValueError, match="pack_lengths"):
        plan_epoch([1, 2], [1], cfg, 0, 1)


def test_describe_plan_and_realistic_numbers():
    shared, unshared = synthetic_units(20_000)
    cfg = BatchConfig(pack_tokens=8192, global_batch_units=1024, sort_window=1)
    for lengths in (shared, unshared):
        plan = plan_epoch(shared, lengths, cfg, 0, 8)
        d = describe_plan(plan, lengths, cfg.pack_tokens)
        assert d["units"] == len(shared) and d["dropped_units"] == 0
        assert d["tokens"] == int(lengths.sum())
        assert d["rows"] == sum(s.num_rows for s in plan.steps)
        assert d["empty_rows"] == sum(8 * m for m in plan.num_microbatches) - d["rows"]
        assert d["fill"] >= 0.98  # packing inside 1024-unit global batches
        assert d["compute_fill"] <= d["fill"]
        assert d["max_token_imbalance"] <= cfg.pack_tokens
        assert d["min_rank_tokens"] <= d["max_rank_tokens"]
