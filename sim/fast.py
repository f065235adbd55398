"""Fused loops for the common bundles: a run carried out in one loop over integer keys.

The bundle: the fixed-level allocator, the FIFO scheduler, an LRU, FIFO or LFU cache and no
prefetcher or the oracle, on bf16 or mwq experts (no decompression), on a device without a host
model (sim/host.py). For it, the general engine's work per decision point (Demand, Key and
LoadItem objects, the Decision, the policy objects' bookkeeping, a recorder call) is mostly
bookkeeping the run does not need: here the same decisions are taken on integer keys
((layer * experts + expert) * parts + part) in an OrderedDict (LRU, FIFO) or LFU's lazy heap, the
servers' arithmetic is inline, and the metrics' figures are accumulated as the loop goes (or the
timeline's events recorded, when one is asked for).

It is not a second definition of those policies: it repeats their rules operation for operation
(the same victim scans, the same heap pushes, the same float expressions as sim/servers.py and
sim/engine.py), and tests/test_fast_path.py proves it equal to the engine running the policy
objects (a hypothesis property test over random traces, budgets, batches and devices: identical
metrics and decisions). `fused_for` picks it only for a bundle that proof covers;
`simulate(spec, fast_path=False)` (`moelab simulate --no-fast-path`) forces the general path.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from policies.allocators import FixedLevel
from policies.base import BudgetError
from policies.cache import FIFO, LFU, LRU
from policies.prefetch import NextLayerOracle
from policies.schedulers import FifoScheduler
from sim.record import Union, Watches
from timeline.events import Event, Timeline
from timeline.metrics import Figures

FORMATS = ("bf16", "mwq")
_event = tuple.__new__          # an Event from a full 10-tuple (as sim/record.py builds them)


def fused_for(sim) -> bool:
    """Whether a fused loop carries out this simulator's run (sim/engine.py Simulator, not yet run)."""
    p, fmt = sim.p, sim.w.fmt
    # (the measured hand-offs and after-load costs are the general loop's; handoff needs decompression)
    return (sim.host is None and not (sim.wake or sim.after_loads or sim.call_after_load)
            and type(p.allocator) is FixedLevel and type(p.scheduler) is FifoScheduler
            and type(p.cache) in (LRU, FIFO, LFU) and p.cache.pools is None
            and (p.prefetcher is None or type(p.prefetcher) is NextLayerOracle)
            and fmt.name in FORMATS and not any(fmt.decompress_bytes)
            and not p.cache.sizes and p.cache.clock == 0 and getattr(p.prefetcher, "point", 0) == 0
            and p.capacities is None)                      # the shared KV mode resizes the cache


def run_fused(sim, quiet: bool = True, events: bool = False) -> Timeline:
    """sim.run(quiet, events), fused: the same timeline (events=True) or the same figures."""
    from tqdm import tqdm
    from sim.engine import gc_paused
    run = _Fused(sim, events)
    with gc_paused(), tqdm(total=len(sim.w.steps), disable=quiet, desc="simulate", unit="step",
                            mininterval=0.5) as bar:
        run.steps(bar)
    tl = Timeline(run.ev if events else [], sim.meta(), figures=run.figures())
    tl.meta["peak_expert_bytes"] = run.cache.peak
    tl.meta["policy_report"] = sim.p.report()
    return tl


class _Cache:
    """The residency of an LRU, FIFO or LFU cache on integer keys, as policies/cache.py keeps it."""

    def __init__(self, kind: type, capacity: int, fmt, E: int, P: int):
        self.lfu, self.E = kind is LFU, E
        self.capacity, self.used, self.peak = capacity, 0, 0
        self.rsize = fmt.resident_bytes
        self.deps = [tuple(fmt.dependents(q)) for q in range(P)]
        self.P = P
        self.sizes: dict[int, int] = {}
        self.order: OrderedDict = OrderedDict()           # LRU / FIFO: the best victim first
        self.freq: dict[int, int] = {}                    # LFU: _LazyHeap's entries (freq, tick, key)
        self.heap: list = []
        self.version: dict[int, int] = {}
        self.tick = 0
        self.pinned: set = set()
        # what a hit does: LRU moves the key to the back, LFU counts it, FIFO nothing
        self.touch = self.order.move_to_end if kind is LRU else self._touch_lfu if kind is LFU else None

    def _touch_lfu(self, k: int) -> None:
        self.freq[k] += 1
        self._push(k, self.freq[k])

    def _push(self, k: int, freq: int) -> None:
        self.tick += 1
        self.version[k] = self.tick
        heapq.heappush(self.heap, (freq, self.tick, k))

    def admit(self, k: int) -> list[int]:
        """Make room for part `k` (evicting unpinned keys), count it resident; returns the evictions."""
        size = self.rsize[k % self.P]
        evicted = []
        while self.used + size > self.capacity:
            victim = self._victim()
            if victim is None:
                raise BudgetError(f"budget {self.capacity} B cannot hold layer {k // self.P // self.E}'s demand: "
                                  f"{self.used} B locked, {size} B more needed")
            evicted.extend(self._evict(victim))
        self.sizes[k] = size
        self.used += size
        if self.used > self.peak:
            self.peak = self.used
        if self.lfu:
            self.freq[k] = 1
            self._push(k, 1)
        else:
            self.order[k] = None
        return evicted

    def _victim(self):
        pinned = self.pinned
        if not self.lfu:
            return next((k for k in self.order if k not in pinned), None)
        heap, version, passed, victim = self.heap, self.version, [], None
        while heap:
            entry = heapq.heappop(heap)
            if version.get(entry[2]) != entry[1]:         # stale: dropped for good
                continue
            passed.append(entry)
            if entry[2] not in pinned:
                victim = entry[2]
                break
        for entry in passed:                             # back, the victim's too (stale once evicted)
            heapq.heappush(heap, entry)
        return victim

    def _evict(self, k: int) -> list[int]:
        """`k` and the resident parts useless without it (higher planes), in that order."""
        q = k % self.P
        out = []
        for part in (q, *self.deps[q]):
            v = k - q + part
            size = self.sizes.pop(v, None)
            if size is None:
                continue
            self.used -= size
            if self.lfu:
                del self.freq[v]
                self.version.pop(v, None)
            else:
                del self.order[v]
            out.append(v)
        return out

    def prefetch(self, wish: list[int]) -> list[tuple[int, list[int]]]:
        """CachePolicy.prefetch: what fits without evicting a pinned key, wished keys pinned first."""
        sizes = self.sizes
        pinned = self.pinned = set(self.pinned)
        pinned.update(k for k in wish if k in sizes)
        items = [k for k in wish if k not in sizes]
        locked = sum(sizes[k] for k in pinned if k in sizes)
        out = []
        for k in items:
            size = self.rsize[k % self.P]
            if locked + size > self.capacity:
                break
            out.append((k, self.admit(k)))
            pinned.add(k)
            locked += size
        return out


class _Fused:
    """One fused run: the engine's step loop and decision points (sim/engine.py) for the bundle of
    the module docstring, recording the figures as FigureRecorder would, or the events as
    EventRecorder would (sim/record.py)."""

    def __init__(self, sim, events: bool):
        w, p, fmt = sim.w, sim.p, sim.w.fmt
        self.sim, self.w = sim, w
        self.ev = [] if events else None                  # the events, as EventRecorder records them
        self.E, self.P = w.model.experts, fmt.n_parts
        self.level = p.allocator.level
        parts = fmt.level_parts[self.level]
        self.parts = tuple(parts) if fmt.nested else tuple(sorted(set(parts)))   # needed_keys' order
        self.pbytes, self.rsize, self.level_bytes = fmt.part_bytes, fmt.resident_bytes, fmt.level_sizes[self.level]
        self.by_id = p.scheduler.by_id
        self.cache = _Cache(type(p.cache), p.cache.capacity, fmt, self.E, self.P)
        self.future = p.prefetcher.ctx.future if p.prefetcher is not None else None
        self.point, self.wishes = 0, {}                    # the oracle's decision point; its wishes as ints
        self.pending: dict[int, float] = {}
        io = sim.storage
        self.slots, self.wire = [0.0] * io.queue_depth, 0.0
        self.latency, self.bandwidth = io.latency, io.read_bandwidth
        self.seconds: dict[int, float] = {}                # tokens -> seconds of one expert at the level
        # the figures (timeline/metrics.py Figures), accumulated as FigureRecorder does
        self.spans: dict[int, list[float]] = {}
        self.prefetches = self.admits = self.accesses = self.bytes_read = self.loads = self.tokens = 0
        self.io = Union()
        self.busy_run = (0, 0, 0.0)                        # the main thread's: see _step
        self.watches = Watches()

    def steps(self, bar) -> None:
        w, cost = self.w, self.sim.cost
        clock = 0                                          # SimPy's clock: an int 0 until the first step ends
        for step in w.steps:
            n = len(step.tokens)
            t = self._step(clock, step.index, w.routing_arrays(step)[0].tolist(), n,
                           cost.layer_dense_seconds(n, step.prefill, w.kv[step.index]))
            t += cost.step_seconds(n, step.prefill)
            clock = t                                      # the next step starts where this one ended
            bar.update(1)

    def _step(self, t, s: int, rows: list, n_tokens: int, t_dense: float) -> float:
        """The layers of step `s` from `t`: per layer its dense part, then its decision point
        (Policies.decide, then Simulator._layer and _plan); returns when the last compute ends.

        The main thread's work (dense parts, computes) is a chain: each part starts when the one
        before it ended or later. Their union (compute_busy) is then the sum of the runs between
        idle gaps, kept as (run start, run end, total of the runs before): what Union.add does,
        inline."""
        P, E, parts, cache, sim, level = self.P, self.E, self.parts, self.cache, self.sim, self.level
        sizes, touch, admit, oracle = cache.sizes, cache.touch, cache.admit, self.future is not None
        base, per_load, gap, pending, seconds = sim.decide_base, sim.decide_per_load, sim.gap, self.pending, self.seconds
        watches, ev, by_id = self.watches, self.ev, self.by_id
        bs, be, bt = self.busy_run
        accesses = computed = 0
        span = self.spans[s] = [t, t]
        for layer, tokens in enumerate(rows):
            now = t + t_dense
            if t > be:                                    # an idle gap before the dense part
                bt += be - bs
                bs = t
            be = now
            if ev is not None:
                ev.append(_event(Event, ("dense", "dense", t, now, layer, -1, -1, 0, s, n_tokens)))
            counts = dict.fromkeys(tokens[0], 1) if len(tokens) == 1 else None   # expert -> tokens
            if counts is None or len(counts) != len(tokens[0]):
                counts = {}                               # (first-appearance order)
                for row in tokens:
                    for e in row:
                        counts[e] = counts.get(e, 0) + 1
            first = layer * E
            keys = [(first + e) * P + q for e in counts for q in parts] if P > 1 else [first + e for e in counts]
            plan = [k for k in keys if k not in sizes]    # FifoScheduler.order (before the hits are touched)
            if by_id and len(plan) > 1:
                plan.sort(key=lambda k: k // P)           # (stable: parts stay ascending)
            if touch is not None:
                for k in keys:
                    if k in sizes:
                        touch(k)
            cache.pinned = keys                           # (a list: as fast as a set for a layer's keys)
            loads = [(k, True, admit(k)) for k in plan] if plan else []
            if oracle:                                    # the next decision point's keys
                self.point += 1
                loads += [(k, False, out) for k, out in cache.prefetch(self._wish())]
            if loads or pending:
                tasks, hi = self._io(now, s, first, keys, counts, loads, span[1])
            else:                                         # all resident: in first-appearance order
                tasks, hi = [(now, 0, e, n) for e, n in counts.items()], span[1]
            free = now + base + per_load * len(loads)
            for i, (t_ready, _, e, n) in enumerate(tasks):
                if i:
                    free += gap
                start = t_ready if t_ready > free else free
                secs = seconds.get(n)
                if secs is None:
                    secs = seconds[n] = sim.cost.expert_seconds(level, n)
                free = start + secs
                if start > be:
                    bt += be - bs
                    bs = start
                be = free
                computed += n
                if ev is not None:
                    ev.append(_event(Event, ("compute", "expert", start, free, layer, e, level, self.level_bytes, s, n)))
            t = free if tasks else now
            span[1] = t if t > hi else hi
            accesses += len(keys)
            if watches.open:
                for k in keys:
                    watches.need(k, s)
            # (end_layer: LRU, FIFO and LFU unpin and drop nothing; the next layer pins its own keys)
        self.busy_run = bs, be, bt
        self.accesses += accesses
        self.tokens += computed
        return t

    def _io(self, now: float, s: int, first: int, keys, counts, loads, hi: float):
        """A decision point's cache records and reads (StorageChannel.reserve, inline), and its
        computes in order of readiness: ([(ready, rank, expert, tokens)], the latest read's end
        or `hi`). Prefetched keys wait in `pending` until a decision point uses them."""
        pending, ready, prefetched, P, ev = self.pending, {}, {}, self.P, self.ev
        if loads:
            self._records(now, s, loads)
            slots, pbytes, latency, bandwidth, io_add = self.slots, self.pbytes, self.latency, self.bandwidth, self.io.add
            issue_at, per_load, wire = now + self.sim.decide_base, self.sim.decide_per_load, self.wire
            for k, is_plan, _ in loads:
                issue_at += per_load
                i = slots.index(min(slots)) if len(slots) > 1 else 0
                issue = issue_at if issue_at > slots[i] else slots[i]
                start = issue + latency
                if wire > start:
                    start = wire
                nbytes = pbytes[k % P]
                done = wire = start + nbytes / bandwidth
                slots[i] = issue + (done - issue)
                io_add(issue, done)
                self.bytes_read += nbytes
                if ev is not None:
                    ev.append(_event(Event, ("io", "load", issue, done, *self._split(k), nbytes, s, 0)))
                if done > hi:
                    hi = done
                (ready if is_plan else prefetched)[k] = done
            self.wire, self.loads = wire, self.loads + len(loads)
        if pending or prefetched:                         # prefetched: ready when its load is
            for k in keys:
                r = prefetched.get(k, pending.get(k))
                if r is not None and r > now:
                    ready[k] = r
        tasks = []
        for e, n in counts.items():
            t_ready, k = now, (first + e) * P
            for q in self.parts:
                r = ready.get(k + q)
                if r is not None and r > t_ready:
                    t_ready = r
            tasks.append((t_ready, len(tasks) if ready else 0, e, n))
        if ready:
            tasks.sort()
        if prefetched:
            pending.update(prefetched)
        if pending:                                       # prefetched earlier: used now
            for k in keys:
                pending.pop(k, None)
        return tasks, hi

    def figures(self) -> Figures:
        spans = {s: (a, b) for s, (a, b) in self.spans.items()}
        return Figures(spans, max((b for _, b in spans.values()), default=0.0), self.cache.peak, self.prefetches,
                       self.accesses, self.admits, self.watches.hits, self.watches.unused(), self.bytes_read,
                       self.loads, self.io.length(), self.busy_run[2] + (self.busy_run[1] - self.busy_run[0]), 0.0,
                       {self.level: self.tokens} if self.tokens else {})

    def _wish(self) -> list[int]:
        """The oracle's wish (NextLayerOracle.after_layer) as integer keys."""
        future, point = self.future, self.point
        if point >= len(future):
            return []
        keys = future[point]
        wish = self.wishes.get(id(keys))                  # (the sequence holds each list it repeats)
        if wish is None:
            E, P = self.E, self.P
            wish = self.wishes[id(keys)] = ([(k.layer * E + k.expert) * P + k.part for k in keys], keys)
        return wish[0]

    def _records(self, now: float, s: int, loads) -> None:
        """The cache's records of a decision point at `now`: pending prefetches evicted, the figures,
        the events."""
        pending, watches, ev, rsize, P = self.pending, self.watches, self.ev, self.rsize, self.P
        for k, plan, evicted in loads:
            for v in evicted:
                if pending:
                    pending.pop(v, None)
                if watches.open:
                    watches.record(v, "evict")
                if ev is not None:
                    ev.append(_event(Event, ("cache", "evict", now, now, *self._split(v), rsize[v % P], s, 0)))
            if plan:
                self.admits += 1
                if watches.open:
                    watches.record(k, "admit")
            else:
                self.prefetches += 1
                watches.record(k, "prefetch", s + (k < self.E * P), rsize[k % P])
            if ev is not None:
                ev.append(_event(Event, ("cache", "admit" if plan else "prefetch", now, now, *self._split(k),
                                         rsize[k % P], s, 0)))

    def _split(self, k: int) -> tuple[int, int, int]:
        """(layer, expert, part) of an integer key."""
        P, E = self.P, self.E
        return k // P // E, k // P % E, k % P
