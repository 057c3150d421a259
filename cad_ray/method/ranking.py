"""Ranking without a full sort: the positions of the k best of a score array (numpy only, no torch)."""

from __future__ import annotations

import numpy as np


def first_k(key: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k smallest entries of the 1-D `key`, ties going to the earlier position, NaN last: the
    same set as `np.argsort(key, kind="stable")[:k]`, unordered, found by partition (O(n), one copy of `key`)
    instead of a full sort. The rows of a score table are in the run's tensor order, then index, so position is
    also the order of ties between components."""
    n = key.size
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(key, k - 1)[k - 1]
    if np.isnan(kth):  # fewer than k numbers: all of them, then the first NaNs
        nan = np.isnan(key)
        numbers = np.flatnonzero(~nan)
        return np.concatenate([numbers, np.flatnonzero(nan)[:k - numbers.size]])
    below = np.flatnonzero(key < kth)
    return np.concatenate([below, np.flatnonzero(key == kth)[:k - below.size]])
