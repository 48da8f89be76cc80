"""Bin packing of whole documents (units) into rows of a fixed token budget.

``pack_bins(lengths, capacity)`` returns bins (rows) as lists of item indices. Items are never split
and never dropped; an item longer than ``capacity`` is an error (raise ``pack_tokens`` or lower
``max_unit_tokens``).

Algorithms (both "decreasing": items are placed longest first, ties by ascending item index, via a
stable argsort, so the result is a pure function of the inputs):

- ``bfd`` best-fit decreasing (default): each item goes to the open bin whose remaining capacity is the
  *smallest* that still fits it; among bins with that same remaining capacity, the lowest-numbered bin.
  A new bin is opened only when no open bin fits. Data structure: a sorted list of the distinct remaining
  capacities (``bisect`` finds the best fit in O(log)), each mapping to a min-heap of bin numbers.
  Remaining capacities are integers in ``[0, capacity]``, so the sorted list never holds more than
  ``capacity + 1`` keys however many items there are, and a bin whose remaining capacity is below the
  shortest item is closed (never looked at again). Cost: O(n log n) plus a memmove of at most a few
  thousand keys per item; 200k items take well under a second.
- ``ffd`` first-fit decreasing: each item goes to the lowest-numbered bin that fits it. Data structure:
  a max segment tree over bin numbers whose leaves start at ``capacity`` (an untouched leaf is a bin not
  yet opened), so "leftmost leaf >= item" is one root-to-leaf descent. The tree is sized by the bound
  ``bins <= 2 * ceil(total / capacity) + 1`` (no two bins of a fit algorithm are both at most half full).
  Cost: O(n log bins).

``window``: pack consecutive windows of ``window`` items independently (items ``[0, w)``, ``[w, 2w)``,
...) and concatenate their bins in window order; ``None`` packs all items together. A bin never mixes
windows, which keeps packing local (e.g. to a global batch).

Output order: bins in the order they were opened (per window), item indices ascending inside a bin.

Pure Python + numpy: no torch, no megatron.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

ALGORITHMS = ("bfd", "ffd")


def _check_lengths(lengths: np.ndarray, capacity: int) -> None:
    """Raise ``ValueError`` for a bad capacity, a negative length, or an item longer than capacity."""
    if int(capacity) <= 0:
        raise ValueError(f"capacity: must be positive, got {capacity}")
    if lengths.size == 0:
        return
    if lengths.min() < 0:
        i = int(np.argmin(lengths))
        raise ValueError(f"item {i} has negative length {int(lengths[i])}")
    if lengths.max() > capacity:
        i = int(np.argmax(lengths > capacity))
        raise ValueError(
            f"item {i} has length {int(lengths[i])} > capacity {capacity}: it cannot be packed without "
            f"splitting; raise pack_tokens or lower max_unit_tokens (which drops such units)"
        )


def _best_fit(lengths: list[int], order: np.ndarray, capacity: int, min_len: int) -> list[list[int]]:
    """Best-fit over items in ``order``; returns bins of item indices in placement order."""
    bins: list[list[int]] = []
    keys: list[int] = []  # sorted distinct remaining capacities of open bins
    heaps: dict[int, list[int]] = {}  # remaining capacity -> min-heap of bin numbers
    for i in order.tolist():
        x = lengths[i]
        k = bisect_left(keys, x)
        if k == len(keys):
            b = len(bins)
            bins.append([i])
            rem = capacity - x
        else:
            r = keys[k]
            heap = heaps[r]
            b = heapq.heappop(heap)
            if not heap:
                del keys[k]
                del heaps[r]
            bins[b].append(i)
            rem = r - x
        if rem >= min_len:  # else no remaining item fits: the bin is closed
            heap = heaps.get(rem)
            if heap is None:
                heaps[rem] = [b]
                insort(keys, rem)
            else:
                heapq.heappush(heap, b)
    return bins


def _first_fit(lengths: list[int], order: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit over items in ``order`` with a max segment tree; bins in placement order."""
    total = sum(lengths[i] for i in order.tolist())
    max_bins = min(len(order), 2 * (-(-total // capacity)) + 1)
    size = 1
    while size < max(max_bins, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # leaf size + b = remaining capacity of bin b
    bins: list[list[int]] = []
    for i in order.tolist():
        x = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with remaining >= x
            node *= 2
            if tree[node] < x:
                node += 1
        b = node - size
        if b == len(bins):
            bins.append([i])
        else:
            bins[b].append(i)
        value = tree[node] - x
        tree[node] = value
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = max(left, right)
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    return bins


def pack_bins(
    lengths: Sequence[int], capacity: int, algorithm: str = "bfd", window: int | None = None
) -> list[list[int]]:
    """Pack items of ``lengths`` into bins of ``capacity``; returns bins as lists of item indices.

    Every item appears in exactly one bin; no bin's total exceeds ``capacity``. ``algorithm`` is
    ``"bfd"`` (best-fit decreasing) or ``"ffd"`` (first-fit decreasing); ``window`` packs consecutive
    windows of that many items independently (``None``: all items together). Deterministic. Raises
    ``ValueError`` naming the item for an item longer than ``capacity``.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: must be one of {ALGORITHMS}, got {algorithm!r}")
    if window is not None and int(window) <= 0:
        raise ValueError(f"window: must be positive or None, got {window}")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    capacity = int(capacity)
    _check_lengths(arr, capacity)
    n = int(arr.size)
    if n == 0:
        return []
    step = n if window is None else int(window)
    as_list = arr.tolist()
    bins: list[list[int]] = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        # longest first, ties by ascending index (stable sort of the negated lengths)
        order = start + np.argsort(-arr[start:stop], kind="stable")
        if algorithm == "bfd":
            min_len = int(arr[start:stop].min())
            part = _best_fit(as_list, order, capacity, min_len)
        else:
            part = _first_fit(as_list, order, capacity)
        bins.extend(sorted(b) for b in part)
    return bins


def bin_loads(bins: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[int]:
    """Total length of each bin."""
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    return [int(arr[list(b)].sum()) if len(b) else 0 for b in bins]


def fill_ratio(bins: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> float:
    """Packed tokens over ``len(bins) * capacity`` (empty bins count as capacity); 0.0 with no bins."""
    if not bins:
        return 0.0
    return float(sum(bin_loads(bins, lengths))) / (len(bins) * int(capacity))
