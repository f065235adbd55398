"""Metrics from a timeline: the same code for both engines."""
from __future__ import annotations

import numpy as np

from sim.timeline import Timeline


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


def count_accesses(tl: Timeline) -> int:
    """Parts needed over all decision points: for each (step, layer, expert) computed, the
    parts of the highest level it was computed at. Each was a hit or an admission."""
    level_parts = tl.meta["level_parts"]
    top: dict[tuple[int, int, int], int] = {}
    for e in tl.events:
        if e.resource == "compute":
            key = (e.step, e.layer, e.expert)
            if e.level > top.get(key, -1):
                top[key] = e.level
    return sum(level_parts[lvl] for lvl in top.values())


def compute_metrics(tl: Timeline) -> dict:
    steps = tl.meta["steps"]
    spans = step_spans(tl)
    work = [e for e in tl.events if e.resource != "cache"]
    makespan = max((e.end for e in work), default=0.0)
    ttft, tpot = [], []
    prev_end, group = None, None
    for s in steps:
        start, end = spans[s["step"]]
        if s["group"] != group:                  # a new group of requests starts here
            group = s["group"]
            ttft.append(end - start)
        else:
            tpot.append(end - prev_end)
        prev_end = end
    generated = sum(s["new_tokens"] for s in steps)
    mem, peak, admits, prefetches = 0, 0, 0, 0
    for e in tl.events:
        if e.resource == "cache":
            if e.kind in ("admit", "prefetch"):     # a used prefetch is a hit at its decision point
                admits += e.kind == "admit"
                prefetches += e.kind == "prefetch"
                mem += e.bytes
                peak = max(peak, mem)
            elif e.kind == "evict":
                mem -= e.bytes
    accesses = count_accesses(tl)
    io = [(e.start, e.end) for e in work if e.resource == "io"]
    compute = [(e.start, e.end) for e in work if e.resource in ("compute", "dense")]
    decomp = [(e.start, e.end) for e in work if e.resource.startswith("decompress")]
    tpot_arr = np.array(tpot) if tpot else np.array([np.nan])
    return {
        "ttft_s": float(np.mean(ttft)) if ttft else float("nan"),
        "tpot_s_mean": float(np.mean(tpot_arr)),
        "tpot_s_p50": float(np.percentile(tpot_arr, 50)),
        "tpot_s_p99": float(np.percentile(tpot_arr, 99)),
        "throughput_tok_s": generated / makespan if makespan > 0 else float("nan"),
        "makespan_s": makespan,
        "generated_tokens": generated,
        "peak_expert_bytes": int(peak),
        "bytes_read": int(sum(e.bytes for e in work if e.resource == "io")),
        "loads": len(io),
        "prefetches": prefetches,
        "hit_ratio": (accesses - admits) / accesses if accesses else float("nan"),
        "compute_bubble_fraction": 1.0 - busy_time(compute) / makespan if makespan > 0 else float("nan"),
        "io_busy_fraction": busy_time(io) / makespan if makespan > 0 else float("nan"),
        "decompress_busy_fraction": busy_time(decomp) / makespan if makespan > 0 else 0.0,
    }
