"""Two routing traces side by side (`moelab trace compare A B`), and their LRU miss-ratio curves.

The curve is LRU's hit ratio over one cache of (layer, expert) keys against its capacity, as
a fraction of the trace's key space (layers x experts), so that traces of different models
compare. Decision points are each token's layers in request order (batch=None: the trace's own
order of accesses, independent of any batching), or the engines' batch steps
(workloads/batching.py) for a given batch. The hits come from sim/mrc.py's one-pass stack
algorithm (exact for LRU at every capacity at once). The distance between two curves is the
largest absolute difference of hit ratio over the capacities where both are defined (a capacity
below one decision point's keys cannot run).
"""
from __future__ import annotations

import math

import numpy as np

from workloads.stats import trace_stats
from workloads.structure import request_order
from workloads.trace import RoutingTrace

FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))      # 5%, 10%, ..., 100% of the keys


def decision_groups(trace: RoutingTrace, batch: int | None = None) -> list[list[int]]:
    """Decision points as lists of keys layer * experts + expert (see the module doc)."""
    E = trace.num_experts
    if batch is not None:
        from workloads.batching import batch_steps, unit_groups
        return unit_groups(trace, batch_steps(trace, batch))
    order, _, _ = request_order(trace)
    keys = trace.experts[order] + (np.arange(trace.layers) * E)[None, :, None]
    return keys.reshape(-1, trace.top_k).tolist()               # one token's layer: k distinct keys


def lru_curve(trace: RoutingTrace, fractions=FRACTIONS, batch: int | None = None) -> dict[float, float | None]:
    """{fraction of the key space: LRU hit ratio}, None where the capacity cannot run."""
    space = trace.layers * trace.num_experts
    caps = {f: max(1, int(round(f * space))) for f in fractions}
    ratios = _token_mrc(trace, sorted(set(caps.values()))) if batch is None else _groups_mrc(trace, caps, batch)
    return {f: ratios[c] for f, c in caps.items()}


def _groups_mrc(trace: RoutingTrace, caps: dict, batch: int) -> dict:
    from workloads.stack import lru_mrc
    return lru_mrc(decision_groups(trace, batch), sorted(set(caps.values())))


def _token_mrc(trace: RoutingTrace, caps: list[int]) -> dict:
    """lru_mrc for token decision points, straight from arrays: the one-pass kernel (what
    lru_stack_hits runs) without building millions of Python lists."""
    from workloads.stack import _stack_jit, _stack_kernel
    order, _, _ = request_order(trace)
    k = trace.top_k
    keys = (trace.experts[order] + (np.arange(trace.layers) * trace.num_experts)[None, :, None]).ravel()
    starts = np.arange(0, len(keys) + 1, k, dtype=np.int64)
    kernel = _stack_jit if _stack_jit is not None else _stack_kernel
    hits = kernel(keys.astype(np.int64), starts, np.array(caps, np.int64), trace.layers * trace.num_experts)
    return {c: (None if c < k else int(h) / len(keys)) for c, h in zip(caps, hits)}


def curve_distance(a: dict, b: dict) -> float:
    """Largest |hit ratio difference| over the fractions both curves define (NaN if none)."""
    diffs = [abs(a[f] - b[f]) for f in a if f in b and a[f] is not None and b[f] is not None]
    return max(diffs) if diffs else float("nan")


def compare_traces(a: RoutingTrace, b: RoutingTrace, batch: int | None = None, fractions=FRACTIONS) -> dict:
    """Both traces' statistics (trace_stats), their LRU curves and the distance between them."""
    ca, cb = lru_curve(a, fractions, batch), lru_curve(b, fractions, batch)
    return {"a": trace_stats(a), "b": trace_stats(b), "lru_a": ca, "lru_b": cb,
            "lru_distance": curve_distance(ca, cb), "batch": batch}


# what format_compare prints, in order: (key of trace_stats' mean, label)
ROWS = [("top2_share", "top-2 share"), ("topk_share", "top-k share"), ("top25_share", "top-25% share"),
        ("entropy", "entropy (normalised)"), ("gini", "gini"), ("reuse_rate", "reuse at next token"),
        ("slot_reuse", "slot reuse"), ("own_topk_share", "own top-k share"),
        ("distinct_w1", "distinct / 1 token"), ("distinct_w8", "distinct / 8 tokens"),
        ("distinct_w19", "distinct / 19 tokens"), ("distinct_w64", "distinct / 64 tokens"),
        ("distinct_r4", "distinct / 4 requests"), ("distinct_r16", "distinct / 16 requests"),
        ("pair_lift_top", "pair lift (top tenth)"), ("pair_lift_mean", "pair lift (mean)"),
        ("cross_layer", "cross-layer predict.")]


def format_compare(result: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The two traces' layer means side by side, then their LRU curves and the distance."""
    a, b = result["a"], result["b"]

    def fmt(v) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    def shape(s):
        return f"{s['tokens']} tokens, {s['requests']} requests, {s['layers']} layers, top-{s['k']} of {s['experts']}"
    width = max(12, *(len(n) for n in names))
    lines = [f"{names[0]}: {shape(a)}", f"{names[1]}: {shape(b)}",
             f"{'mean over layers':<22}  {names[0]:>{width}}  {names[1]:>{width}}"]
    lines += [f"{label:<22}  {fmt(a['mean'].get(key)):>{width}}  {fmt(b['mean'].get(key)):>{width}}"
              for key, label in ROWS]
    steps = "each token's layers" if result["batch"] is None else f"batch {result['batch']} steps"
    lines.append(f"LRU hit ratio by capacity (fraction of layers x experts; decision points: {steps})")
    for f in result["lru_a"]:
        lines.append(f"{f:>22.0%}  {fmt(result['lru_a'][f]):>{width}}  {fmt(result['lru_b'].get(f)):>{width}}")
    lines.append(f"LRU miss-ratio curve distance (max |difference|): {fmt(result['lru_distance'])}")
    return "\n".join(lines)
