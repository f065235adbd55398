"""Fused loops for the common bundles: a metrics-only run carried out in one loop over integer keys.

The bundle: the fixed-level allocator, the FIFO scheduler, an LRU, FIFO or LFU cache and no
prefetcher or the oracle, on bf16 or mwq experts (no decompression), on a device without a host
model (sim/host.py). For it, the general engine's work per decision point (a Demand, Key and
LoadItem objects, the Decision, the policy objects' bookkeeping, a recorder call) is mostly
bookkeeping the run does not need: here the same decisions are taken on integer keys
((layer * experts + expert) * parts + part), an OrderedDict LRU/FIFO or LFU's lazy heap, the
servers' arithmetic inline and the metrics' figures accumulated as the loop goes.

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
from timeline.events import Timeline
from timeline.metrics import Figures

FORMATS = ("bf16", "mwq")


def fused_for(sim) -> bool:
    """Whether a fused loop carries out this simulator's run (sim/engine.py Simulator, not yet run)."""
    p, fmt = sim.p, sim.w.fmt
    return (sim.host is None and type(p.allocator) is FixedLevel and type(p.scheduler) is FifoScheduler
            and type(p.cache) in (LRU, FIFO, LFU) and p.cache.pools is None
            and (p.prefetcher is None or type(p.prefetcher) is NextLayerOracle)
            and fmt.name in FORMATS and not any(fmt.decompress_bytes)
            and not p.cache.sizes and p.cache.clock == 0 and getattr(p.prefetcher, "point", 0) == 0)


def run_fused(sim, quiet: bool = True, log: list | None = None) -> Timeline:
    """Sim.run(events=False), fused. `log`: a list to append the cache's decisions to, as
    Timeline.decisions() lists them (the equality tests compare them)."""
    from tqdm import tqdm
    from sim.engine import gc_paused
    run = _Fused(sim, log)
    with gc_paused(), tqdm(total=len(sim.w.steps), disable=quiet, desc="simulate", unit="step",
                            mininterval=0.5) as bar:
        run.steps(bar)
    tl = Timeline([], sim.meta(), figures=run.figures())
    tl.meta["peak_expert_bytes"] = run.cache.peak
    tl.meta["policy_report"] = sim.p.report()
    return tl


class _Cache:
    """The residency of an LRU, FIFO or LFU cache on integer keys, as policies/cache.py keeps it."""

    def __init__(self, kind: type, capacity: int, fmt, E: int, P: int):
        self.lfu, self.move = kind is LFU, kind is LRU
        self.E = E
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

    def begin(self, keys) -> None:
        """The hits of a decision point's keys (LRU: to the back; LFU: counted); pins the keys."""
        sizes = self.sizes
        if self.move:
            move = self.order.move_to_end
            for k in keys:
                if k in sizes:
                    move(k)
        elif self.lfu:
            for k in keys:
                if k in sizes:
                    self.freq[k] += 1
                    self._push(k, self.freq[k])
        self.pinned = set(keys)

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
        sizes, pinned = self.sizes, self.pinned
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
    the module docstring, recording the figures as FigureRecorder would (sim/record.py)."""

    def __init__(self, sim, log):
        w, p, fmt = sim.w, sim.p, sim.w.fmt
        self.sim, self.w, self.log = sim, w, log
        self.E, self.P = w.model.experts, fmt.n_parts
        self.level = p.allocator.level
        parts = fmt.level_parts[self.level]
        self.parts = tuple(parts) if fmt.nested else tuple(sorted(set(parts)))   # needed_keys' order
        self.pbytes, self.rsize = fmt.part_bytes, fmt.resident_bytes
        self.by_id = p.scheduler.by_id
        self.cache = _Cache(type(p.cache), p.cache.capacity, fmt, self.E, self.P)
        self.future = p.prefetcher.ctx.future if p.prefetcher is not None else None
        self.point, self.wishes = 0, {}                    # the oracle's decision point; its wishes as ints
        self.pending: dict[int, float] = {}
        io = sim.storage
        self.slots, self.wire = [0.0] * io.queue_depth, 0.0
        self.latency, self.bandwidth = io.latency, io.read_bandwidth
        self.base, self.per_load, self.gap = sim.decide_base, sim.decide_per_load, sim.gap
        self.seconds = {}                                  # tokens -> seconds of one expert at the level
        # the figures (timeline/metrics.py Figures), accumulated as FigureRecorder does
        self.spans: dict[int, list[float]] = {}
        self.prefetches = self.admits = self.accesses = self.bytes_read = self.loads = 0
        self.io, self.busy = Union(), Union()
        self.tokens = 0
        self.watches = Watches()

    def steps(self, bar) -> None:
        w, sim = self.w, self.sim
        cost, layers, layer_fn = sim.cost, w.model.layers, self.layer
        clock = 0                                          # SimPy's clock: an int 0 until the first step ends
        for step in w.steps:
            rows = w.routing_arrays(step)[0].tolist()      # [layer][token][k]
            n, s = len(step.tokens), step.index
            t_dense = cost.dense_seconds(n, step.prefill)
            t = clock
            span = self.spans[s] = [t, t]
            busy_add = self.busy.add
            for layer in range(layers):
                end = t + t_dense
                busy_add(t, end)
                if end > span[1]:
                    span[1] = end
                t = layer_fn(end, s, layer, rows[layer], span)
            t += cost.step_seconds(n, step.prefill)
            clock = clock + (t - clock)                    # as SimPy's timeout(t - now) advances it
            bar.update(1)

    def figures(self) -> Figures:
        spans = {s: (a, b) for s, (a, b) in self.spans.items()}
        return Figures(spans, max((b for _, b in spans.values()), default=0.0), self.cache.peak, self.prefetches,
                       self.accesses, self.admits, self.watches.hits, self.watches.unused(), self.bytes_read,
                       self.loads, self.io.length(), self.busy.length(), 0.0,
                       {self.level: self.tokens} if self.tokens else {})

    def layer(self, now: float, s: int, layer: int, tokens: list, span: list) -> float:
        """One decision point at `now` (Policies.decide, then Simulator._layer); returns when its
        last compute ends."""
        P, parts, cache = self.P, self.parts, self.cache
        counts: dict[int, int] = {}                       # expert -> tokens, in first-appearance order
        for row in tokens:
            for e in row:
                counts[e] = counts.get(e, 0) + 1
        first = layer * self.E
        keys = [(first + e) * P + q for e in counts for q in parts] if P > 1 else [first + e for e in counts]
        sizes = cache.sizes
        plan = [k for k in keys if k not in sizes]        # FifoScheduler.order
        if self.by_id and len(plan) > 1:
            plan.sort(key=lambda k: k // P)               # (stable: parts stay ascending)
        cache.begin(keys)
        loads = [(k, True, cache.admit(k)) for k in plan]
        if self.future is not None:                       # the oracle: the next decision point's keys
            self.point += 1
            loads += [(k, False, ev) for k, ev in cache.prefetch(self._wish())]
        free = self._carry(now, s, first, keys, counts, loads, span)
        cache.pinned = set()                              # end_layer: LRU, FIFO and LFU drop nothing
        return free

    def _wish(self) -> list[int]:
        future, point = self.future, self.point
        if point >= len(future):
            return []
        keys = future[point]
        wish = self.wishes.get(id(keys))                  # (the sequence holds each list it repeats)
        if wish is None:
            E, P = self.E, self.P
            wish = self.wishes[id(keys)] = ([(k.layer * E + k.expert) * P + k.part for k in keys], keys)
        return wish[0]

    def _records(self, s: int, loads) -> None:
        """The cache's records of a decision point: pending prefetches evicted, the figures, the log."""
        pending, watches, log, rsize, P = self.pending, self.watches, self.log, self.rsize, self.P
        for k, plan, evicted in loads:
            for v in evicted:
                if pending:
                    pending.pop(v, None)
                if watches.open:
                    watches.record(v, "evict")
                if log is not None:
                    log.append(("evict", s, *self._split(v)))
            if plan:
                self.admits += 1
                if watches.open:
                    watches.record(k, "admit")
            else:
                self.prefetches += 1
                watches.record(k, "prefetch", s + (k < self.E * P), rsize[k % P])
            if log is not None:
                log.append(("admit" if plan else "prefetch", s, *self._split(k)))

    def _split(self, k: int) -> tuple[int, int, int]:
        """(layer, expert, part) of an integer key."""
        P, E = self.P, self.E
        return k // P // E, k // P % E, k % P

    def _carry(self, now: float, s: int, first: int, keys, counts, loads, span) -> float:
        """Simulator._layer and _plan for the decision: its reads on the storage (StorageChannel's
        arithmetic), then its computes in order of readiness; the figures as it goes."""
        if loads:
            self._records(s, loads)
        pending, hi = self.pending, span[1]
        ready, prefetched = {}, {}
        issue_at, per_load = now + self.base, self.per_load
        slots, pbytes, P, io_add = self.slots, self.pbytes, self.P, self.io.add
        latency, bandwidth, wire = self.latency, self.bandwidth, self.wire
        for k, plan, _ in loads:
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
            if done > hi:
                hi = done
            if plan:
                ready[k] = done
            else:
                prefetched[k] = done
        self.wire, self.loads = wire, self.loads + len(loads)
        if pending or prefetched:                         # prefetched: ready when its load is
            for k in keys:
                t = prefetched.get(k, pending.get(k))
                if t is not None and t > now:
                    ready[k] = t
        free = self._computes(now, now + self.base + per_load * len(loads), first, counts, ready)
        span[1] = free if free > hi else hi
        self.accesses += len(keys)
        if self.watches.open:
            for k in keys:
                self.watches.need(k, s)
        if prefetched:
            pending.update(prefetched)
        if pending:                                       # prefetched earlier: used now
            for k in keys:
                pending.pop(k, None)
        return free

    def _computes(self, now: float, path_end: float, first: int, counts, ready) -> float:
        """The computes of one (expert, level) each, in order of readiness (first appearance when
        everything was resident), on the compute queue free from the end of the decision path;
        `first`: the layer's first expert (layer * experts)."""
        P, parts, busy_add, seconds = self.P, self.parts, self.busy.add, self.seconds
        if ready:
            tasks = []
            for e, n in counts.items():
                t_ready, k = now, (first + e) * P
                for q in parts:
                    t = ready.get(k + q)
                    if t is not None and t > t_ready:
                        t_ready = t
                tasks.append((t_ready, len(tasks), n))
            tasks.sort()
        else:
            tasks = [(now, 0, n) for n in counts.values()]
        free, gap, started = path_end, self.gap, False
        for t_ready, _, n in tasks:
            if started:
                free += gap
            started = True
            start = t_ready if t_ready > free else free
            secs = seconds.get(n)
            if secs is None:
                secs = seconds[n] = self.sim.cost.expert_seconds(self.level, n)
            free = start + secs
            busy_add(start, free)
            self.tokens += n
        return free if tasks else now
