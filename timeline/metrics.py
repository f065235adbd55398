"""Metrics from a timeline: the same code for both engines.

Definitions (every key of `compute_metrics`; None where a run has nothing to measure,
never NaN, so metrics.json stays valid JSON):

- generated_tokens: new tokens over all requests. A request's prefill makes its first new
  token and each decode step one more, so `--tokens N` gives N per request in both engines.
- ttft_s_per_request: for each request (in trace order), the time from the start of its
  group's first step (the prefill) to that step's end. Requests decoded in lockstep share
  their group's value; waiting for earlier groups is not counted. ttft_s is the mean over
  all requests; ttft_s_cold that of the first group (which starts with an empty cache) and
  ttft_s_warm the mean over the later groups' requests (None with one group).
- tpot_s_mean / _p50 / _p99 (and _p10, _p25, _p75, _p90): time between the ends of consecutive
  steps of a group.
- throughput_tok_s: generated_tokens / makespan_s.
- peak_expert_bytes: the most resident expert bytes at any time (admitted + prefetched - evicted).
- bytes_read, loads: bytes and load items read from storage (demand loads and prefetches).
- accesses: the parts needed over all decision points (step, layer): for each expert computed
  there, the parts of the levels it was computed at.
- hit_ratio: the demand hit ratio, the share of accesses whose part was resident *before the
  layer asked*, without having been prefetched for that decision point. A part prefetched for
  the decision point that uses it is not a hit: it is counted in prefetch_coverage.
- prefetch_coverage: the share of accesses whose part was prefetched for that decision point
  (and was still resident when it came). hit_ratio + prefetch_coverage + misses / accesses = 1,
  where the misses are the demand admissions (`admits`).
- prefetch_waste_bytes: bytes prefetched and never used: evicted, or left at the end of the
  run, before any decision point needed them.
- bits_per_weight: the precision computed at, token-weighted over every expert computation
  (given the bits of each level: MWQ INT2..INT8, 16 for bf16 and zip).
- compute_bubble_fraction: the share of the makespan the compute resources (experts and
  dense parts) were idle; io_busy_fraction / decompress_busy_fraction: the share storage /
  any decompression worker was busy.
- kv_bytes_per_step, kv_bytes_peak (kv_bytes_allocated: the executor's buffers) and memory (the
  run's split): from the timeline's meta (kv_metrics).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from timeline.events import Timeline


def busy_time(intervals) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def step_spans(tl: Timeline) -> dict[int, tuple[float, float]]:
    """(first start, last end) of the work of each step."""
    spans: dict[int, list[float]] = {}
    for e in tl.events:
        if e.step < 0 or e.resource == "cache":
            continue
        span = spans.setdefault(e.step, [e.start, e.end])
        span[0] = min(span[0], e.start)
        span[1] = max(span[1], e.end)
    return {k: (v[0], v[1]) for k, v in spans.items()}


def needed_parts(tl: Timeline) -> dict[tuple[int, int], set[tuple[int, int]]]:
    """(expert, part) needed at each decision point (step, layer): for each expert computed
    there, the parts of the levels it was computed at (meta["level_parts"]: each level's parts,
    or, in older timelines, how many leading parts it needs)."""
    level_parts = [set(range(p)) if isinstance(p, int) else set(p) for p in tl.meta["level_parts"]]
    needed: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for e in tl.events:
        if e.resource == "compute":
            needed.setdefault((e.step, e.layer), set()).update((e.expert, p) for p in level_parts[e.level])
    return needed


def count_accesses(tl: Timeline) -> int:
    """Parts needed over all decision points: for each (step, layer, expert) computed, the
    union of the parts of the levels it was computed at (meta["level_parts"]: the parts of
    each level). Each was a hit or an admission."""
    level_parts = [set(parts) for parts in tl.meta["level_parts"]]
    needed: dict[tuple[int, int, int], set[int]] = {}
    for e in tl.events:
        if e.resource == "compute":
            needed.setdefault((e.step, e.layer, e.expert), set()).update(level_parts[e.level])
    return sum(len(parts) for parts in needed.values())


def prefetch_outcomes(tl: Timeline, needed: dict[tuple[int, int], set]) -> tuple[int, int, int]:
    """(admits, prefetch hits, wasted prefetch bytes), from the cache records in decision order.

    A prefetch record (step s, layer l) is for the next decision point: (s, l), or (s + 1, 0)
    when l is 0 (issued by the last layer of step s). It is used if a later decision point of
    its layer needs it before it is evicted: after an eviction the part must be loaded again
    (an admit or another prefetch) by the next decision point that needs it.
    """
    needs: dict[tuple[int, int, int], list[int]] = {}        # (layer, expert, part) -> steps needing it
    for (step, layer), parts in sorted(needed.items()):
        for expert, part in parts:
            needs.setdefault((layer, expert, part), []).append(step)
    records: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}   # key -> (kind, step of use, bytes)
    admits = 0
    for e in tl.events:
        if e.resource != "cache":
            continue
        key = (e.layer, e.expert, e.level)
        if e.kind == "admit":
            admits += 1
            records.setdefault(key, []).append(("admit", e.step, e.bytes))
        elif e.kind == "prefetch":
            records.setdefault(key, []).append(("prefetch", e.step + (e.layer == 0), e.bytes))
        elif e.kind == "evict":
            records.setdefault(key, []).append(("evict", -1, e.bytes))
    hits, waste = 0, 0
    for key, recs in records.items():
        steps = needs.get(key, [])
        for i, (kind, target, nbytes) in enumerate(recs):
            if kind != "prefetch":
                continue
            j = bisect_left(steps, target)
            first_use = steps[j] if j < len(steps) else None
            later = recs[i + 1:]
            if later and later[0][0] == "evict":
                later = later[1:]                       # the next load after the eviction, if any
            reloaded = later[0][1] if later else None    # the step of that load's decision point
            used = first_use is not None and (reloaded is None or first_use < reloaded)
            hits += used and first_use == target
            waste += 0 if used else nbytes
    return admits, hits, waste


@dataclass
class Figures:
    """What the metrics are computed from: gathered from a timeline's events (`figures_of`), or
    accumulated by the simulator as it runs (a metrics-only run, sim/record.py, records no
    events). Both give the same values bit for bit (tests/test_metrics_only.py)."""
    spans: dict[int, tuple[float, float]]     # step -> (first start, last end) of its work
    makespan: float
    peak: int                                 # the most resident expert bytes
    prefetches: int
    accesses: int
    admits: int
    prefetch_hits: int
    waste: int
    bytes_read: int
    loads: int
    io_busy: float                            # busy_time of the storage's reads
    compute_busy: float                       # of the computes and dense parts
    decompress_busy: float                    # of every decompression worker together
    tokens_at: dict[int, int]                 # level -> tokens computed at it


def figures_of(tl: Timeline) -> Figures:
    """A timeline's figures, from its events."""
    spans = step_spans(tl)
    work = [e for e in tl.events if e.resource != "cache"]
    mem, peak, prefetches = 0, 0, 0
    for e in tl.events:
        if e.resource == "cache":
            if e.kind in ("admit", "prefetch"):
                prefetches += e.kind == "prefetch"
                mem += e.bytes
                peak = max(peak, mem)
            elif e.kind == "evict":
                mem -= e.bytes
    needed = needed_parts(tl)
    admits, prefetch_hits, waste = prefetch_outcomes(tl, needed)
    io = [(e.start, e.end) for e in work if e.resource == "io"]
    tokens_at: dict[int, int] = {}
    for e in work:
        if e.resource == "compute":
            tokens_at[e.level] = tokens_at.get(e.level, 0) + e.tokens
    return Figures(spans, max((e.end for e in work), default=0.0), int(peak), prefetches,
                   sum(len(parts) for parts in needed.values()), admits, prefetch_hits, int(waste),
                   int(sum(e.bytes for e in work if e.resource == "io")), len(io), busy_time(io),
                   busy_time((e.start, e.end) for e in work if e.resource in ("compute", "dense")),
                   busy_time((e.start, e.end) for e in work if e.resource.startswith("decompress")), tokens_at)


def compute_metrics(tl: Timeline, level_bits: list[float] | None = None) -> dict:
    """The metrics of the module docstring. level_bits: bits per weight of each precision level.
    A metrics-only run's timeline carries its figures instead of events (tl.figures)."""
    f = tl.figures if tl.figures is not None else figures_of(tl)
    steps = tl.meta["steps"]
    makespan = f.makespan
    groups: list[tuple[float, int]] = []         # (TTFT, requests) per group
    tpot = []
    prev_end, group = None, None
    for s in steps:
        if s["step"] not in f.spans:
            continue
        start, end = f.spans[s["step"]]
        if s["group"] != group:                  # a new group of requests starts here
            group = s["group"]
            groups.append((end - start, s["new_tokens"]))
        else:
            tpot.append(end - prev_end)
        prev_end = end
    ttft = [t for t, n in groups for _ in range(n)]
    warm = [t for t, n in groups[1:] for _ in range(n)]
    generated = sum(s["new_tokens"] for s in steps)
    weighted = sum(f.tokens_at.values())
    # (integer bits per level, as level_bits gives them, make this sum exact in any order)
    bits = (sum(level_bits[level] * n for level, n in f.tokens_at.items()) / weighted
            if level_bits is not None and weighted else None)
    accesses, prefetch_hits = f.accesses, f.prefetch_hits

    def share(x):
        return x / makespan if makespan > 0 else None
    return {
        "ttft_s": float(np.mean(ttft)) if ttft else None,
        "ttft_s_cold": groups[0][0] if groups else None,
        "ttft_s_warm": float(np.mean(warm)) if warm else None,
        "ttft_s_per_request": ttft,
        "tpot_s_mean": float(np.mean(tpot)) if tpot else None,
        "tpot_s_p50": float(np.percentile(tpot, 50)) if tpot else None,
        "tpot_s_p99": float(np.percentile(tpot, 99)) if tpot else None,
        # the rest of the distribution, for box plots of many runs (`moelab plot --kind tpot`)
        **{f"tpot_s_p{q}": float(np.percentile(tpot, q)) if tpot else None for q in (10, 25, 75, 90)},
        "throughput_tok_s": share(generated),
        "makespan_s": makespan,
        "generated_tokens": generated,
        "peak_expert_bytes": f.peak,
        "bytes_read": f.bytes_read,
        "loads": f.loads,
        "prefetches": f.prefetches,
        "accesses": accesses,
        "admits": f.admits,
        "hit_ratio": (accesses - f.admits - prefetch_hits) / accesses if accesses else None,
        "prefetch_coverage": prefetch_hits / accesses if accesses else None,
        "prefetch_waste_bytes": f.waste,
        "bits_per_weight": bits,
        "compute_bubble_fraction": 1.0 - f.compute_busy / makespan if makespan > 0 else None,
        "io_busy_fraction": share(f.io_busy),
        "decompress_busy_fraction": f.decompress_busy / makespan if makespan > 0 else 0.0,
        **kv_metrics(tl.meta),
    }


def kv_metrics(meta: dict) -> dict:
    """The KV cache and the memory split, as the engine put them in the meta: kv_bytes_per_step (the
    KV held at each step's end: the simulator's prediction, the executor's tensors), kv_bytes_peak,
    and the run's memory split (workloads/memory.py; absent where the engine computed none)."""
    per_step = meta.get("kv_bytes_per_step")
    out = {} if per_step is None else {"kv_bytes_per_step": list(per_step), "kv_bytes_peak": max(per_step, default=0)}
    if "kv_bytes_allocated" in meta:
        out["kv_bytes_allocated"] = meta["kv_bytes_allocated"]
    if "memory" in meta:
        out["memory"] = dict(meta["memory"])
    return out
