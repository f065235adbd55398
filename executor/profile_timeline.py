"""What `moelab profile` reads off its forced executor runs' timelines (executor/profile_host.py):
the run's times the calibration matches, the decision path's gaps, the runtime's own gap between
expert calls, and the hand-offs between the executor's threads."""
from __future__ import annotations

import numpy as np

from devices.profile import interpolate

from timeline.metrics import busy_time

def run_times(tl) -> np.ndarray:
    """(expert-call seconds, read seconds, run seconds) of a timeline: what the calibration matches
    (experiments/calibrate.py)."""
    ev = [e for e in tl.events if e.resource in ("compute", "io", "dense")]
    return np.array([sum(e.end - e.start for e in ev if e.resource == "compute"),
                     sum(e.end - e.start for e in ev if e.resource == "io"),
                     max(e.end for e in ev) - min(e.start for e in ev)])

def overlap(start: float, end: float, spans) -> float:
    """Seconds of [start, end] during which at least one of `spans` was in progress."""
    return busy_time((max(a, start), min(b, end)) for a, b in spans if a < end and b > start)

def decision_gaps(tl) -> list[tuple[int, float]]:
    """(loads issued, dense end -> first compute start) at decision points whose first compute
    was of parts already resident (a hit: it waits for the decision path only)."""
    dense_end = {(e.step, e.layer): e.end for e in tl.of("dense")}
    loads: dict = {}
    for e in tl.of("cache"):
        if e.kind in ("admit", "prefetch"):
            loads[e.step, e.layer] = loads.get((e.step, e.layer), 0) + 1
            loads.setdefault((e.step, e.layer, "keys"), set()).add((e.expert, e.level))
    first: dict = {}
    for e in tl.of("compute"):
        k = (e.step, e.layer)
        if k not in first or e.start < first[k].start:
            first[k] = e
    out = []
    parts = tl.meta["level_parts"]
    for k, e in first.items():
        admitted = loads.get((k[0], k[1], "keys"), set())
        if any((e.expert, p) in admitted for p in parts[e.level]):
            continue                                     # it waited for its own load
        out.append((loads.get(k, 0), e.start - dense_end[k]))
    return out

def compute_gaps(tl) -> list[float]:
    """Gaps between consecutive expert calls of a layer at decision points that loaded nothing
    (every call ready at once: the gap is the runtime's own loop)."""
    loaded = {(e.step, e.layer) for e in tl.of("cache") if e.kind in ("admit", "prefetch")}
    calls: dict = {}
    for e in tl.of("compute"):
        calls.setdefault((e.step, e.layer), []).append((e.start, e.end))
    out = []
    for k, spans in calls.items():
        if k in loaded or (k[0], k[1] - 1) in loaded:
            continue
        spans.sort()
        out += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return out

def handoff_samples(tl, workers: int) -> tuple[list[float], list[float]]:
    """(wakes, handoffs) of a run: a part's ready (its read's end, or its decompression's) -> the start of
    an expert call that waited for it after the call before it in its layer (the first call of a layer
    waits for the decision path too); a read's end -> its decompression's start where fewer than
    `workers` decompressions were running at the read's end (a worker idle: no queueing in it)."""
    reads, decs = {}, {}
    for e in tl.events:
        key = (e.layer, e.expert, e.level)           # level: the part, on io and decompress lanes
        if e.resource == "io":
            reads.setdefault(key, []).append(e.end)
        elif e.resource.startswith("decompress"):
            decs.setdefault(key, []).append((e.start, e.end))
    handoffs = []
    spans = [d for v in decs.values() for d in v]
    for key, v in decs.items():
        for start, _ in v:
            read_end = max((t for t in reads.get(key, ()) if t <= start), default=None)
            if read_end is not None and sum(a <= read_end < b for a, b in spans) < workers:
                handoffs.append(start - read_end)
    ready = {k: [t for t in reads[k] if k not in decs] + [b for _, b in decs.get(k, ())] for k in reads}
    parts, wakes, calls = tl.meta["level_parts"], [], {}
    for e in tl.of("compute"):
        calls.setdefault((e.step, e.layer), []).append(e)
    for layer_calls in calls.values():
        layer_calls.sort(key=lambda e: e.start)
        for before, e in zip(layer_calls, layer_calls[1:]):
            t = max((r for p in parts[e.level] for r in ready.get((e.layer, e.expert, p), ()) if r <= e.start),
                    default=None)
            if t is not None and t > before.end:
                wakes.append(e.start - t)
    return wakes, handoffs

def decision_line(decisions) -> tuple[float, float] | None:
    """(a, b): the line a + b x loads through the mean gap per load count, weighted by its count."""
    loads = np.array([n for n, _ in decisions], float)
    gaps = np.array([g for _, g in decisions], float)
    xs = sorted(set(loads))
    if len(xs) < 2:
        return None
    ys = [float(np.mean(gaps[loads == x])) for x in xs]
    b, a = np.polyfit(xs, ys, 1, w=[float(np.sqrt((loads == x).sum())) for x in xs])
    return float(a), float(b)


def dense_excess(tl, tokens, decode) -> tuple[list[float], list[float]]:
    """(after loads, after hits): each decode dense part's time beyond its table (`decode` at
    `tokens`) in a run, split by whether the decision point before it (the layer before, or the last
    layer of the step before) loaded anything. The run's first two steps are left out (cold)."""
    loaded = {(e.step, e.layer) for e in tl.of("cache") if e.kind in ("admit", "prefetch")}
    prefill = {s["step"] for s in tl.meta["steps"] if s["prefill"]}
    dense = [e for e in tl.of("dense") if e.step not in prefill and e.step > 1]
    layers = max((e.layer for e in tl.of("dense")), default=0) + 1
    after, clean = [], []
    for e in dense:
        before = (e.step, e.layer - 1) if e.layer else (e.step - 1, layers - 1)
        (after if before in loaded else clean).append(e.end - e.start - interpolate(tokens, decode, e.tokens))
    return after, clean


def call_excess(tl, tokens, table) -> tuple[list[float], list[float]]:
    """(loaded, resident): each expert call's time beyond its table (`table[level]` at `tokens`) in a
    run, split by whether its expert was admitted at its own decision point; only calls that no read or
    decompression overlapped (what those cost is the co-runs'), after the run's first two steps."""
    loaded = {(e.step, e.layer, e.expert) for e in tl.of("cache", "admit")}
    busy = sorted((e.start, e.end) for e in tl.events if e.resource == "io" or e.resource.startswith("decompress"))
    fresh, resident = [], []
    for e in tl.of("compute"):
        if e.step < 2 or overlap(e.start, e.end, busy) > 0:
            continue
        excess = e.end - e.start - interpolate(tokens, table[e.level], e.tokens)
        (fresh if (e.step, e.layer, e.expert) in loaded else resident).append(excess)
    return fresh, resident
