"""Cache-only replay: hit ratios without timing, for miss-ratio curves over many capacities.

- `replay_policies` carries out the very decisions the engines carry out (policies/bundle.py's
  decision point, with the same policy objects), without time: any format, any policy.
- `replay_units` is a fast path for one-part experts (capacities counted in experts):
  tight loops over integer keys for the classic rules (LRU, FIFO, LFU, Belady). They are
  not a second definition of those policies: tests/test_replay.py proves them equal to
  the policy objects (a property test over random traces) and to libCacheSim, and
  `replay_capacities` uses them only where that proof holds.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from policies import CACHES, BudgetError, PolicyContext, build_policies, lookup
from policies.allocators import FixedLevel
from policies.base import largest_layer_demand
from policies.bundle import DemandMemo, access_sequence, workload_routings
from workloads.batching import unit_groups


def replay_policies(workload, policies) -> dict:
    """Every decision point of the workload through `policies.decide`/`finish`, no timing (the
    garbage collector paused, as in the engine's runs)."""
    from sim.engine import gc_paused
    p = policies
    hits = accesses = 0
    decide, finish = p.decide, p.finish
    with gc_paused():
        for step, layer, routing in workload_routings(workload):
            if layer == 0:
                p.begin_step(step.index)           # the shared KV mode's resize
            d = decide(layer, routing)
            hits += d.hits
            accesses += len(d.keys)
            finish(layer)
    return {"hits": hits, "accesses": accesses, "hit_ratio": hits / accesses if accesses else float("nan"),
            "peak_bytes": p.cache.peak}


def replay_capacities(workload, policy: str, capacities, unit_bytes: int | None = None) -> dict[int, float | None]:
    """Hit ratio of cache `policy` per capacity (in units of `unit_bytes`, default one whole
    expert), None where a capacity is below the largest single-layer demand. Fast loops
    where proven equal (one-part experts), the policy objects otherwise."""
    fmt = workload.fmt
    unit = unit_bytes or fmt.expert_bytes
    lookup(CACHES, "cache policy", policy)
    # once, for every capacity (a decision point routed like an earlier one shares its keys)
    future = access_sequence(workload, DemandMemo.of(FixedLevel(PolicyContext(fmt, 0, 0, 0))))
    minimum = largest_layer_demand(future, fmt)
    fast = FAST.get(policy) if fmt.n_parts == 1 and unit == fmt.expert_bytes else None
    groups = unit_groups(workload.trace, workload.steps) if fast else None
    out = {}
    for cap in capacities:
        if cap * unit < minimum:
            out[cap] = None
        elif fast:
            accesses = sum(map(len, groups))
            out[cap] = fast(groups, cap) / accesses if accesses else float("nan")
        else:
            out[cap] = replay_policies(workload, build_policies(workload, cap * unit, cache=policy,
                                                                future=future))["hit_ratio"]
    return out


def _lru(groups, capacity):
    cache: OrderedDict = OrderedDict()
    hits = 0
    move = cache.move_to_end
    for group in groups:
        misses = []
        for k in group:
            if k in cache:
                hits += 1
                move(k)
            else:
                misses.append(k)
        for k in misses:
            cache[k] = None
            if len(cache) > capacity:
                # the group's keys were all just moved to the back, so the front is unpinned
                cache.popitem(last=False)
    return hits


def _fifo(groups, capacity):
    cache: dict = {}                 # insertion-ordered
    hits = 0
    for group in groups:
        misses = [k for k in group if k not in cache]
        hits += len(group) - len(misses)
        for k in misses:
            if len(cache) >= capacity:
                victim = next(v for v in cache if v not in group)   # oldest unpinned
                del cache[victim]
            cache[k] = None
    return hits


def _lfu(groups, capacity):
    freq, last, heap = {}, {}, []
    hits = tick = 0
    for group in groups:
        pinned = set(group)
        misses = []
        for k in group:
            if k in freq:
                hits += 1
                freq[k] += 1
                tick += 1
                last[k] = tick
                heapq.heappush(heap, (freq[k], tick, k))
            else:
                misses.append(k)
        for k in misses:
            if len(freq) >= capacity:
                skipped = []
                while True:
                    f, t, v = heapq.heappop(heap)
                    if last.get(v) != t:
                        continue
                    if v in pinned:
                        skipped.append((f, t, v))
                        continue
                    del freq[v], last[v]
                    break
                for entry in skipped:
                    heapq.heappush(heap, entry)
            freq[k] = 1
            tick += 1
            last[k] = tick
            heapq.heappush(heap, (1, tick, k))
    return hits


def _belady(groups, capacity):
    never = 1 << 62
    nxt = [None] * len(groups)          # next decision point using each key of each group
    seen: dict[int, int] = {}
    for i in range(len(groups) - 1, -1, -1):
        nxt[i] = [seen.get(k, never) for k in groups[i]]
        for k in groups[i]:
            seen[k] = i
    cache: dict[int, int] = {}          # key -> its next use
    heap: list = []
    hits = 0
    for i, group in enumerate(groups):
        pinned = set(group)
        misses = []
        for k, n in zip(group, nxt[i]):
            if k in cache:
                hits += 1
                cache[k] = n
                heapq.heappush(heap, (-n, k))
            else:
                misses.append((k, n))
        for k, n in misses:
            if len(cache) >= capacity:
                skipped = []
                while True:
                    neg, v = heapq.heappop(heap)
                    if cache.get(v) != -neg:          # stale entry
                        continue
                    if v in pinned:
                        skipped.append((neg, v))
                        continue
                    del cache[v]
                    break
                for entry in skipped:
                    heapq.heappush(heap, entry)
            cache[k] = n
            heapq.heappush(heap, (-n, k))
    return hits


FAST = {"lru": _lru, "fifo": _fifo, "lfu": _lfu, "belady": _belady,
        "on-demand": lambda g, c: 0}


def replay_units(groups: list[list[int]], policy: str, capacities) -> dict[int, float | None]:
    """Hit ratio per capacity (in experts) for one-part experts; None for a capacity below the
    largest single-layer demand, which cannot run (a layer's experts must all be resident)."""
    if policy not in FAST:
        raise BudgetError(f"no fast replay for {policy!r}; fast policies: {', '.join(FAST)}")
    accesses = sum(len(g) for g in groups)
    largest = max((len(g) for g in groups), default=0)
    out = {}
    for cap in capacities:
        if cap < largest:
            out[cap] = None
            continue
        out[cap] = FAST[policy](groups, cap) / accesses if accesses else float("nan")
    return out
