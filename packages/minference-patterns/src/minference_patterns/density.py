"""Nominal pair counts of a head pattern at a given length (no data needed).

These are *estimates* from the budgets alone, used for summaries (``minference-patterns show``) and
as the fallback of the analytic cost model when no measured mask is at hand. The search itself
counts the pairs of the real kernel masks instead (see :mod:`minference_patterns.search`).

Conventions: ``n`` is the number of key positions, queries are the ``n`` last positions (a full
causal pre-fill); a pair is one (query, key) score the kernel computes.
"""

from __future__ import annotations

import math

from minference_kernels.patterns import HeadPattern

__all__ = ["dense_pairs", "nominal_pairs", "nominal_density"]


def dense_pairs(n: int) -> int:
    """Number of causal (query, key) pairs of an ``n``-token pre-fill: ``n (n + 1) / 2``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n * (n + 1) // 2


def _a_shape_pairs(sink: int, window: int, n: int) -> float:
    # Row i keeps keys [0, sink) and (i - window, i]; both sets are disjoint once i >= sink + window,
    # so row i keeps min(i + 1, sink + window) keys.
    c = min(sink + window, n)
    return c * (c + 1) / 2 + (n - c) * c


def _vertical_slash_pairs(v: int, s: int, n: int) -> float:
    # Assumes the s slashes are the nearest diagonals (a local band: the estimator always keeps the
    # nearest ones, and distant slashes cost as much as near ones) and the v verticals lie outside
    # that band, uniformly spread, each covering on average half of the rows below the band.
    s = min(s, n)
    band = s * n - s * (s - 1) / 2
    v = min(v, n - s)
    return band + v * (n - s) / 2


def _block_sparse_pairs(top_k: int, block_size: int, n: int) -> float:
    nb = math.ceil(n / block_size)
    total = 0.0
    for b in range(nb):
        rows = min(block_size, n - b * block_size)
        kept = min(top_k, b + 1)
        # the diagonal block is causal-triangular, the other kept blocks are full
        total += (kept - 1) * block_size * rows + rows * (rows + 1) / 2
    return total


def nominal_pairs(pattern: HeadPattern, n: int) -> float:
    """Estimated number of causal pairs ``pattern`` keeps in an ``n``-token pre-fill.

    Exact for ``dense`` and ``a_shape``; for ``block_sparse`` it assumes the diagonal block is
    among the kept ones; for ``vertical_slash`` it assumes the slashes form the local band and the
    verticals lie outside it (the real index is found per prompt, and the kernels round slashes up
    to whole key tiles, so the true count can be higher). Never more than :func:`dense_pairs`.
    """
    if n <= 0:
        return 0.0
    full = float(dense_pairs(n))
    if pattern.kind == "dense":
        return full
    if pattern.kind == "a_shape":
        got = _a_shape_pairs(pattern.sink_tokens, pattern.window_tokens, n)
    elif pattern.kind == "vertical_slash":
        got = _vertical_slash_pairs(pattern.num_vertical, pattern.num_slash, n)
    elif pattern.kind == "block_sparse":
        got = _block_sparse_pairs(pattern.top_k, pattern.block_size, n)
    elif pattern.kind == "vertical_block":  # columns and blocks, as if they never overlap
        got = _vertical_slash_pairs(pattern.num_vertical, 0, n) + _block_sparse_pairs(
            pattern.top_k, 64, n
        )
    else:  # pragma: no cover - a kind added to HeadPattern but not here
        raise ValueError(f"no pair count for pattern kind {pattern.kind!r}")
    return min(got, full)


def nominal_density(pattern: HeadPattern, n: int) -> float:
    """:func:`nominal_pairs` as a fraction of the causal pairs (1.0 for dense)."""
    if n <= 0:
        return 1.0
    return nominal_pairs(pattern, n) / dense_pairs(n)
