"""Miss-ratio curves: hit ratio against capacity for many policies, Belady as the bound.

LRU in one pass (Mattson's stack distances), where it is exact under moelab's decision-point
semantics: one-part experts, capacities counted in experts (the cases sim/replay.py's fast
loops cover). At a decision point every needed key is looked up first (hits move to the top
of the recency stack in router order), then the misses are admitted in order; so after a
decision point, the LRU cache of capacity C holds the top C keys of its recency stack, and a
key hits iff its stack distance before the decision point is <= C.

Not a plain Mattson stack, though: the stack order inside one decision point's keys depends
on which of them hit, which depends on C. The keys of one decision point stay contiguous in
the stack until re-accessed (later keys only go on top), so the capacity-independent part of
a distance is `1 + keys accessed in later decision points` (a Fenwick tree over time stamps),
and only the order among the still-live keys of the key's own decision point depends on C:
for the few capacities where that can decide the outcome, it is recomputed from each key's
hit-or-miss at its last access (kept per capacity). tests/test_mrc.py proves the curve equal
to per-capacity replay at every point.

Every other policy (and LRU on multi-part formats, where evicting a plane also evicts its
dependents, so the cache is no prefix of any one stack) is replayed through the policy
objects, its capacities in parallel processes.

`python -m sim.mrc` prints the one-pass LRU curve's speed against 100 separate replays.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from policies import BudgetError
from sim.replay import replay_capacities, unit_groups

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


def stack_exact(workload, policy: str, unit_bytes: int | None = None) -> bool:
    """Whether the one-pass curve is exact for `policy` on `workload` (see the module docstring)."""
    fmt = workload.fmt
    return policy == "lru" and fmt.n_parts == 1 and (unit_bytes or fmt.expert_bytes) == fmt.expert_bytes


# -- curves for many policies ----------------------------------------------------------------
def _replay_point(args):
    workload, policy, cap, unit = args
    try:
        return replay_capacities(workload, policy, [cap], unit)[cap]
    except BudgetError:                 # e.g. a per-layer pool below its layer's demand
        return None


def miss_ratio_curves(workload, policies: Sequence[str], capacities: Sequence[int], unit_bytes: int | None = None,
                      jobs: int | None = None, progress=None) -> dict[str, dict[int, float | None]]:
    """{policy: {capacity: hit ratio or None}} over `capacities` (in units of `unit_bytes`,
    default one whole expert). LRU in one pass where exact; the rest replayed, one capacity
    per task, in `jobs` processes (default: the CPU count). None: the capacity cannot run."""
    caps = [int(c) for c in capacities]
    out: dict[str, dict[int, float | None]] = {}
    tasks = []
    for policy in policies:
        if stack_exact(workload, policy, unit_bytes):
            out[policy] = lru_mrc(unit_groups(workload.trace, workload.steps), caps)
        else:
            out[policy] = {}
            tasks += [(policy, c) for c in caps]
    jobs = jobs or os.cpu_count() or 1
    args = [(workload, p, c, unit_bytes) for p, c in tasks]
    if jobs == 1 or len(args) <= 1:
        results = map(_replay_point, args)
    else:
        import multiprocessing as mp
        pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork" if os.name == "posix" else "spawn"))
        results = pool.map(_replay_point, args, chunksize=max(1, len(args) // (4 * jobs)))
    try:
        for (policy, cap), ratio in zip(tasks, results):
            out[policy][cap] = ratio
            if progress is not None:
                progress()
    finally:
        if jobs != 1 and len(args) > 1:
            pool.shutdown(cancel_futures=True)
    return {p: dict(sorted(curve.items())) for p, curve in out.items()}


def plot_mrc(curves: dict, path, title: str = "", unit: str = "experts") -> None:
    """Hit ratio against capacity, one line per policy; belady (the offline bound) dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, curve in curves.items():
        xs = [c for c, r in curve.items() if r is not None]
        ys = [curve[c] for c in xs]
        style = dict(color="black", linestyle="--", linewidth=2) if policy == "belady" else dict(marker=".")
        ax.plot(xs, ys, label=policy + (" (bound)" if policy == "belady" else ""), **style)
    ax.set_xlabel(f"capacity ({unit})")
    ax.set_ylabel("demand hit ratio")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the benchmark ------------------------------------------------------------------------------
def benchmark(accesses: int = 1_000_000, points: int = 100, model_name: str = "olmoe-1b-7b") -> dict:
    """One-pass LRU curve against `points` separate replays (sim/replay.py's fast LRU loop) on a
    synthetic decode trace of about `accesses` expert accesses."""
    from workloads.batching import batch_steps
    from workloads.catalog import get_model
    from workloads.synthetic import synthetic_trace
    model = get_model(model_name)
    tokens = -(-accesses // (model.layers * model.top_k))
    trace = synthetic_trace(model, requests=1, prompt_len=0, output_len=tokens, seed=0)
    groups = unit_groups(trace, batch_steps(trace, 1))
    n = sum(map(len, groups))
    keys = model.layers * model.experts
    caps = sorted({int(c) for c in np.linspace(model.top_k, keys, points)})
    lru_stack_hits(groups[:50], caps)                       # compile (numba caches it on disk)
    t0 = time.perf_counter()
    curve = lru_stack_hits(groups, caps)
    one_pass = time.perf_counter() - t0
    from sim.replay import _lru
    t0 = time.perf_counter()
    for c in caps:
        assert _lru(groups, c) == curve[c], c               # and the points agree
    replays = time.perf_counter() - t0
    return {"benchmark": "mrc", "model": model_name, "accesses": n, "points": len(caps),
            "one_pass_s": round(one_pass, 3), "replays_s": round(replays, 2), "speedup": round(replays / one_pass, 1),
            "compiled": _stack_jit is not None}


if __name__ == "__main__":
    print(json.dumps(benchmark()))
