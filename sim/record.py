"""What a simulator run records: every event (EventRecorder, the timeline) and what the metrics
need (FigureRecorder; TimelineRecorder records both), or only the latter (a metrics-only run:
sweeps, reproductions, validation).

The engine hands both the same thing once per layer (its dense part and its decision point). The
figures a FigureRecorder accumulates equal those timeline/metrics.py gathers from the full
timeline, bit for bit (tests/test_metrics_only.py): the same sums in the same order, the same
interval unions (Union), the same prefetch outcomes decided as the records come (Watches).
"""
from __future__ import annotations

from policies.bundle import PLAN
from timeline.events import Event, Timeline
from timeline.metrics import Figures, busy_time

_event = tuple.__new__          # an Event from a full 10-tuple: a third of Event(...)'s cost


class EventRecorder:
    """Every event of the run, in the order the engine carries them out."""

    def __init__(self, fmt):
        self.events: list[Event] = []
        self.sizes, self.level_sizes = fmt.resident_bytes, fmt.level_sizes

    def layer(self, s, layer, start, now, n, d, reads, decs, computes, finished, free) -> None:
        """One layer of step `s`: its dense part for `n` tokens from `start` to `now`, then its
        decision point at `now`: the cache's records, its reads, decompressions and computes (as the
        engine timed them) and the evictions of its end (at `free`)."""
        add, sizes = self.events.append, self.sizes
        add(_event(Event, ("dense", "dense", start, now, layer, -1, -1, 0, s, n)))
        for item, kind, evicted in d.loads:
            for k in evicted:
                add(_event(Event, ("cache", "evict", now, now, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
            key = item.key
            add(_event(Event, ("cache", kind, now, now, key.layer, key.expert, key.part, item.resident_bytes, s, 0)))
        for (item, _, _), (issue, done) in zip(d.loads, reads):
            key = item.key
            add(_event(Event, ("io", "load", issue, done, key.layer, key.expert, key.part, item.nbytes, s, 0)))
        for i, start, done, worker in decs:
            key, nbytes = d.loads[i][0].key, d.loads[i][0].decompress_bytes
            add(_event(Event, (f"decompress[{worker}]", "decompress", start, done, key.layer, key.expert, key.part,
                               nbytes, s, 0)))
        level_sizes = self.level_sizes
        for start, end, expert, level, n in computes:
            add(_event(Event, ("compute", "expert", start, end, layer, expert, level, level_sizes[level], s, n)))
        for k in finished:
            add(_event(Event, ("cache", "evict", free, free, k.layer, k.expert, k.part, sizes[k.part], s, 0)))

    def evict(self, s: int, t: float, keys) -> None:
        """Evictions at the start of step `s` (the shared KV mode's resize), at `t`."""
        sizes = self.sizes
        for k in keys:
            self.events.append(_event(Event, ("cache", "evict", t, t, k.layer, k.expert, k.part, sizes[k.part], s, 0)))

    def timeline(self, meta: dict) -> Timeline:
        return Timeline(self.events, meta)


class Union:
    """The length of a union of [start, end) intervals added one at a time, as busy_time computes
    it: the same runs summed in the same order, hence the same float. Intervals come with
    nondecreasing starts on the storage (a FIFO server fed in time order); one that does not
    (decompression workers fed out of order) is kept aside and the union merged again at the end,
    which gives the same runs."""
    __slots__ = ("start", "end", "total", "runs", "late")

    def __init__(self):
        self.start = self.end = None
        self.total = 0.0
        self.runs: list[tuple[float, float]] = []
        self.late: list[tuple[float, float]] = []

    def add(self, a: float, b: float) -> None:
        if self.end is None:
            self.start, self.end = a, b
        elif a < self.start:
            self.late.append((a, b))
        elif a > self.end:                      # a gap: the current run is complete
            self.total += self.end - self.start
            self.runs.append((self.start, self.end))
            self.start, self.end = a, b
        elif b > self.end:
            self.end = b

    def length(self) -> float:
        if self.end is None:
            return 0.0
        if self.late:
            return busy_time(self.runs + [(self.start, self.end)] + self.late)
        return self.total + (self.end - self.start)


class Watches:
    """Prefetch outcomes decided as the records come, as timeline/metrics.py prefetch_outcomes
    decides them from the whole timeline. A prefetch (for the next decision point, as the
    contract says) is used if a decision point needs the key before the key's next record after
    it (skipping one eviction: a reload or a second eviction); used by the decision point it was
    for, it is a prefetch hit; unused, its bytes are waste."""

    def __init__(self):
        self.open: dict = {}          # key -> [decision step it is for, bytes, evicted since]
        self.hits = self.waste = 0

    def record(self, key, kind: str, target: int = 0, nbytes: int = 0) -> None:
        """A cache record of `key` ("admit", "prefetch", "evict"); a prefetch's `target` is the
        batch step of the decision point it is for, `nbytes` its bytes."""
        w = self.open.get(key)
        if w is not None:
            if kind == "evict" and not w[2]:
                w[2] = True
            else:                         # reloaded (or evicted twice) before any use
                del self.open[key]
                self.waste += w[1]
        if kind == "prefetch":
            self.open[key] = [target, nbytes, False]

    def need(self, key, step: int) -> None:
        w = self.open.get(key)
        if w is not None and step >= w[0]:
            del self.open[key]
            self.hits += step == w[0]

    def unused(self) -> int:
        """Waste, the prefetches never used included (call once, at the end)."""
        return self.waste + sum(w[1] for w in self.open.values())


class FigureRecorder:
    """Only what the metrics need (timeline/metrics.py Figures), accumulated as the run goes.

    The engine's main thread (dense parts, then the computes of each layer) is a chain: each part
    starts when the one before it ended or later. Its union (compute_busy) is then the sum of the
    runs between idle gaps, kept as (run start, run end, total of the runs before): Union.add with
    nothing out of order. And every event of a step starts at or after its first dense part, so a
    step's span starts there."""

    def __init__(self, fmt):
        self.sizes = fmt.resident_bytes
        self.spans: dict[int, list[float]] = {}
        self.mem = self.peak = self.prefetches = self.admits = self.accesses = 0
        self.bytes_read = self.loads = 0
        self.io, self.decomp = Union(), Union()
        self.run = (0, 0, 0.0)                   # the main thread's (run start, run end, total before)
        self.tokens_at: dict[int, int] = {}
        self.watches = Watches()

    def layer(self, s, layer, start, now, n, d, reads, decs, computes, finished, free) -> None:
        """As EventRecorder.layer, into the figures."""
        span = self.spans.get(s)
        if span is None:                         # the step's first layer: its dense part starts it
            span = self.spans[s] = [start, now]
        bs, be, bt = self.run
        assert start >= be, "the main thread's work is a chain"
        if start > be:                           # an idle gap before the dense part
            bt += be - bs
            bs = start
        be = hi = now
        if d.loads:
            self._records(s, d.loads)
            add, nbytes = self.io.add, self.bytes_read
            for (item, _, _), (issue, done) in zip(d.loads, reads):
                nbytes += item.nbytes
                add(issue, done)
                if done > hi:
                    hi = done
            self.bytes_read = nbytes
            self.loads += len(reads)
        for _, a, b, _ in decs:
            self.decomp.add(a, b)
            if b > hi:
                hi = b
        tokens_at = self.tokens_at
        for a, b, _, level, tokens in computes:
            if a > be:
                bt += be - bs
                bs = a
            be = b
            tokens_at[level] = tokens_at.get(level, 0) + tokens
        self.run = bs, be, bt
        if be > hi:
            hi = be
        if hi > span[1]:
            span[1] = hi
        self.accesses += len(d.keys)             # the parts of the levels computed: the needed keys
        watches = self.watches
        if watches.open:
            for key in d.keys:
                watches.need(key, s)
        for k in finished:
            self._evict(k)

    def _records(self, s: int, loads) -> None:
        watches, open_ = self.watches, self.watches.open
        for item, kind, evicted in loads:
            for k in evicted:
                self._evict(k)
            self.mem += item.resident_bytes
            if self.mem > self.peak:
                self.peak = self.mem
            if kind is PLAN:
                self.admits += 1
            else:
                self.prefetches += 1
            if open_ or kind is not PLAN:        # a prefetch is for (s, layer), or layer 0 of the next step
                watches.record(item.key, kind, s + (item.key.layer == 0), item.resident_bytes)

    def _evict(self, k) -> None:
        self.mem -= self.sizes[k.part]
        if self.watches.open:
            self.watches.record(k, "evict")

    def evict(self, s: int, t: float, keys) -> None:
        for k in keys:
            self._evict(k)

    def figures(self) -> Figures:
        spans = {s: (a, b) for s, (a, b) in self.spans.items()}
        return Figures(spans, max((b for _, b in spans.values()), default=0.0), self.peak, self.prefetches,
                       self.accesses, self.admits, self.watches.hits, self.watches.unused(), self.bytes_read,
                       self.loads, self.io.length(), self.run[2] + (self.run[1] - self.run[0]), self.decomp.length(),
                       self.tokens_at)

    def timeline(self, meta: dict) -> Timeline:
        return Timeline([], meta, figures=self.figures())


class TimelineRecorder:
    """Every event and the figures too: the metrics of a run with a timeline are then read from
    the figures (the same values) instead of from a second pass over its events."""

    def __init__(self, fmt):
        self.events, self.figures = EventRecorder(fmt), FigureRecorder(fmt)

    def layer(self, *args) -> None:
        self.events.layer(*args)
        self.figures.layer(*args)

    def evict(self, *args) -> None:
        self.events.evict(*args)
        self.figures.evict(*args)

    def timeline(self, meta: dict) -> Timeline:
        return Timeline(self.events.events, meta, figures=self.figures.figures())
