"""Plain Python / PyTorch references: one source of truth for the tests and the benchmarks.

Everything here computes in float64 (or exact integers) and favours clarity over speed.
"""
from __future__ import annotations

import bisect
from typing import List, Sequence


# ---------------------------------------------------------------- packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Plain-Python best-fit decreasing: each sequence, longest first (ties by index), goes to
    the open bin with the least remaining room that still fits it. Returns bins of indices."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms: List[tuple] = []  # sorted (remaining, bin id)
    bins: List[List[int]] = []
    for i in order:
        L = lengths[i]
        k = bisect.bisect_left(rooms, (L, -1))
        if k == len(rooms):
            bins.append([i])
            b, room = len(bins) - 1, capacity - L
        else:
            room, b = rooms.pop(k)
            bins[b].append(i)
            room -= L
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins
