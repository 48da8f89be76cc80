"""Bin packing (megatron_prefix.data.packing): invariants, determinism, quality, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prefix.data.packing import bin_loads, fill_ratio, pack_bins

CAP = 8192


def realistic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal unit lengths, median ~600, clipped to [8, 4096]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(600), 0.7, n)), 8, 4096).astype(np.int64)


@st.composite
def instances(draw):
    cap = draw(st.integers(1, 120))
    lengths = draw(st.lists(st.integers(0, cap), max_size=80))
    algorithm = draw(st.sampled_from(["bfd", "ffd"]))
    window = draw(st.one_of(st.none(), st.integers(1, 25)))
    return lengths, cap, algorithm, window


@settings(max_examples=150, deadline=None)
@given(instances())
def test_every_item_once_no_bin_over_capacity(inst):
    lengths, cap, algorithm, window = inst
    bins = pack_bins(lengths, cap, algorithm, window)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # nothing split, dropped or duplicated
    assert all(b for b in bins)  # no empty bin
    assert all(load <= cap for load in bin_loads(bins, lengths))
    assert all(b == sorted(b) for b in bins)
    if window is not None:  # a bin never mixes windows
        assert all(len({i // window for i in b}) == 1 for b in bins)
    assert pack_bins(list(lengths), cap, algorithm, window) == bins  # deterministic


@settings(max_examples=100, deadline=None)
@given(instances())
def test_at_most_one_bin_half_empty_per_window(inst):
    """Any-fit property: two bins both at most half full would have been merged."""
    lengths, cap, algorithm, window = inst
    bins = pack_bins(lengths, cap, algorithm, window)
    loads = bin_loads(bins, lengths)
    step = window or max(len(lengths), 1)
    per_window: dict[int, int] = {}
    for b, load in zip(bins, loads):
        if 2 * load <= cap:
            w = b[0] // step
            per_window[w] = per_window.get(w, 0) + 1
    assert all(c <= 1 for c in per_window.values())
    lower = sum(-(-sum(lengths[s : s + step]) // cap) for s in range(0, len(lengths), step))
    assert len(bins) >= lower


def test_known_small_example_bfd_beats_ffd():
    lengths = [27, 21, 20, 12, 11, 8, 7, 5, 4, 1]
    bfd = pack_bins(lengths, 30, "bfd")
    ffd = pack_bins(lengths, 30, "ffd")
    assert bfd == [[0], [1, 5, 9], [2, 7, 8], [3, 4, 6]]  # optimal: ceil(116 / 30) = 4
    assert ffd == [[0, 9], [1, 5], [2, 6], [3, 4, 7], [8]]
    assert fill_ratio(bfd, lengths, 30) > fill_ratio(ffd, lengths, 30)


def test_bfd_fill_at_least_ffd_in_aggregate():
    rng = np.random.default_rng(7)
    bfd_bins = ffd_bins = 0
    for _ in range(300):
        cap = int(rng.integers(20, 200))
        lengths = rng.integers(1, cap + 1, int(rng.integers(5, 80))).tolist()
        bfd_bins += len(pack_bins(lengths, cap, "bfd"))
        ffd_bins += len(pack_bins(lengths, cap, "ffd"))
    assert bfd_bins <= ffd_bins


def test_ties_broken_by_index():
    assert pack_bins([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack_bins([3, 7, 3, 7], 10, "ffd") == [[0, 1], [2, 3]]
    assert pack_bins([], 10) == []


def test_over_long_item_raises_naming_it():
    with pytest.raises(ValueError, match=r"item 2 has length 11 > capacity 10.*pack_tokens.*max_unit_tokens"):
        pack_bins([1, 10, 11, 3], 10)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"algorithm": "nf"}, "algorithm"), ({"window": 0}, "window"), ({"capacity": 0}, "capacity")],
)
def test_bad_arguments_raise_naming_field(kwargs, field):
    args = {"lengths": [1, 2], "capacity": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        pack_bins(**args)


def test_fill_ratio():
    assert fill_ratio([[0, 1], [2]], [3, 4, 5], 10) == pytest.approx(12 / 20)
    assert fill_ratio([[0], []], [10], 10) == pytest.approx(0.5)  # an empty bin still costs a row
    assert fill_ratio([], [], 10) == 0.0


@pytest.mark.parametrize("algorithm", ["bfd", "ffd"])
def test_realistic_fill_at_least_098(algorithm):
    lengths = realistic_lengths(20_000)
    bins = pack_bins(lengths, CAP, algorithm)
    assert fill_ratio(bins, lengths, CAP) >= 0.98


@pytest.mark.parametrize("algorithm", ["bfd", "ffd"])
def test_speed_200k_items(algorithm):
    lengths = realistic_lengths(200_000, seed=1)
    start = time.perf_counter()
    bins = pack_bins(lengths, CAP, algorithm)
    elapsed = time.perf_counter() - start
    assert sum(len(b) for b in bins) == len(lengths)
    assert elapsed < 5.0, f"{algorithm}: 200k items took {elapsed:.2f}s"
