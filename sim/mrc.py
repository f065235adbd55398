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
from workloads.stack import _stack_jit, lru_mrc, lru_stack_hits

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
