"""LRU at every capacity in one pass (Mattson's stack distances, extended to decision points:
the keys of one point are accessed together, so their order within it decides only the capacities
between a key's distance and that plus its point's other keys; sim/mrc.py's docstring has the
argument). A trace statistic, so it lives with the traces: sim/mrc.py draws miss-ratio curves with
it and workloads/compare.py compares traces by it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

try:                                   # the executor's extra; the pure-Python kernel is the same code
    from numba import njit
except ImportError:                    # pragma: no cover
    njit = None


def _stack_kernel(keys, starts, caps, n_keys):
    """Hits per capacity of LRU over decision points (keys[starts[g]:starts[g + 1]], distinct
    within each), capacities ascending. See the module docstring."""
    T, G, C = keys.shape[0], starts.shape[0] - 1, caps.shape[0]
    tree = np.zeros(T + 1, np.int64)               # Fenwick tree over time stamps: 1 = a key's latest
    ts = np.full(n_keys, -1, np.int64)             # key -> its latest time stamp
    owner = np.zeros(T, np.int64)                  # time stamp -> key
    live = np.zeros(T, np.bool_)
    gstart = np.zeros(T, np.int64)                 # time stamp -> first stamp of its decision point
    glen = np.zeros(T, np.int64)
    status = np.zeros((n_keys, C), np.bool_)       # key -> hit at its latest access, per capacity
    diff = np.zeros(C + 1, np.int64)               # +1 at i: a hit at every capacity from index i on
    hits = np.zeros(C, np.int64)                   # hits decided by the in-point order
    total = 0                                      # live stamps (distinct keys seen)
    for g in range(G):
        a, b = starts[g], starts[g + 1]
        m = b - a
        rows = np.zeros((m, C), np.bool_)
        for i in range(m):                         # distances on the stack before the point
            x = keys[a + i]
            tx = ts[x]
            if tx < 0:
                continue                           # first access: a miss at every capacity
            bs = gstart[tx]
            be = bs + glen[tx]
            s, j = 0, be                           # live stamps < be
            while j > 0:
                s += tree[j]
                j -= j & -j
            base = 1 + total - s                   # x, and every key accessed after its point
            mates = 0
            for t in range(bs, be):
                if live[t] and t != tx:
                    mates += 1
            lo = np.searchsorted(caps, base)               # below lo: a miss whatever the order
            hi = np.searchsorted(caps, base + mates)       # from hi on: a hit whatever the order
            diff[hi] += 1
            for c in range(hi, C):
                rows[i, c] = True
            for c in range(lo, hi):                # the order within x's point decides
                hx = status[x, c]
                above = 0
                for t in range(bs, be):
                    if live[t] and t != tx:
                        hy = status[owner[t], c]
                        if (hx and not hy) or (hx == hy and t > tx):
                            above += 1
                if base + above <= caps[c]:
                    rows[i, c] = True
                    hits[c] += 1
        for i in range(m):                         # the point's keys go on top, in router order
            x = keys[a + i]
            tx = ts[x]
            if tx >= 0:
                live[tx] = False
                j = tx + 1
                while j <= T:
                    tree[j] -= 1
                    j += j & -j
                total -= 1
            t = a + i
            ts[x], owner[t], live[t], gstart[t], glen[t] = t, x, True, a, m
            j = t + 1
            while j <= T:
                tree[j] += 1
                j += j & -j
            total += 1
            for c in range(C):
                status[x, c] = rows[i, c]
    return hits + np.cumsum(diff)[:C]


_stack_jit = njit(cache=True, nogil=True)(_stack_kernel) if njit is not None else None


def lru_stack_hits(groups: Sequence[Sequence[int]], capacities: Sequence[int], compiled: bool = True) -> dict:
    """Hits of LRU at every capacity (in keys), in one pass over `groups` (decision points of
    distinct integer keys, e.g. sim/replay.py unit_groups). compiled=False runs the same kernel
    as plain Python (what runs where numba is missing)."""
    caps = np.array(sorted(set(int(c) for c in capacities)), np.int64)
    flat = [k for g in groups for k in g]
    ids: dict[int, int] = {}
    keys = np.array([ids.setdefault(k, len(ids)) for k in flat], np.int64)
    starts = np.zeros(len(groups) + 1, np.int64)
    np.cumsum([len(g) for g in groups], out=starts[1:])
    kernel = _stack_jit if compiled and _stack_jit is not None else _stack_kernel
    hits = kernel(keys, starts, caps, max(len(ids), 1))
    return {int(c): int(h) for c, h in zip(caps, hits)}


def lru_mrc(groups, capacities) -> dict[int, float | None]:
    """Hit ratio of LRU per capacity (in experts), None below the largest decision point."""
    accesses = sum(map(len, groups))
    largest = max(map(len, groups), default=0)
    hits = lru_stack_hits(groups, capacities)
    return {int(c): (None if c < largest else hits[int(c)] / accesses if accesses else float("nan"))
            for c in capacities}


