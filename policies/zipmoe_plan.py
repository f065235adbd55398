"""PlanCache's corrected math and the statistics both planners read (policies/zipmoe.py's cache
plans with them; policies/zipmoe_released.py has the released planner's math).

- `RankStats`, `conditional_poisson_weights`, `poisson_binomial`, `scale_to`, `layer_delay`,
  `plan_split`: the *corrected* planner. Its statistics are per decision point (the run's own
  unit: one step of `batch` tokens at one layer), k is the experts a decision point needs
  (round(sum p), about top-k at batch 1), and it conditions the Poisson-binomial hits on that k.
- Statistics from a *plan trace*, never from the run's own routing: `plan_trace` reads a trace
  file or synthesises the default one (`default_plan_trace`: the same model, another seed, 1000
  prompts of 19 tokens like the released code's shipped traces); `rank_inclusion` (corrected:
  per decision point at the run's batch) and `request_counts` (the released code's per prompt,
  per layer, per expert counts) read it.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from devices.units import ConfigError
from workloads.formats import ZipFormat

PLAN_SEED = 7919            # the default plan trace's seed (runs default to seed 0)
PLAN_REQUESTS, PLAN_TOKENS = 1000, 19     # as the released traces: ~1000 prompts of ~19 tokens


# -- PlanCache: statistics, conditional Poisson, Poisson binomial ------------------------------
class RankStats:
    """Activation statistics by rank: over windows of `window` decision points of a layer, how
    often the window's r-th most used expert was needed. `inclusion()` is p[r], the chance that
    the rank-r expert is needed at a decision point (it sums to the experts a layer needs)."""

    def __init__(self, layers: int, experts: int, window: int):
        self.counts = np.zeros((layers, experts))
        self.points = np.zeros(layers, dtype=np.int64)
        self.acc = np.zeros(experts)
        self.windows = 0
        self.window = window

    def add(self, layer: int, experts: Sequence[int]) -> None:
        self.counts[layer, list(experts)] += 1
        self.points[layer] += 1
        if self.points[layer] == self.window:
            self._close(layer)

    def _close(self, layer: int) -> None:
        self.acc += np.sort(self.counts[layer])[::-1] / self.points[layer]
        self.windows += 1
        self.counts[layer] = 0
        self.points[layer] = 0

    def inclusion(self) -> np.ndarray | None:
        acc, windows = self.acc.copy(), self.windows
        for layer in np.flatnonzero(self.points):            # partial windows count too
            acc += np.sort(self.counts[layer])[::-1] / self.points[layer]
            windows += 1
        return acc / windows if windows else None


def _esp(v: np.ndarray, k: int) -> np.ndarray:
    """Elementary symmetric polynomials e_0..e_k of v."""
    e = np.zeros(k + 1)
    e[0] = 1.0
    for x in v:
        e[1:] += x * e[:-1].copy()
    return e


def cp_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of conditional Poisson sampling of size k with weights w (odds):
    pi_i = w_i e_{k-1}(w without i) / e_k(w), by prefix and suffix polynomials."""
    n = len(w)
    pre = np.zeros((n + 1, k + 1))
    suf = np.zeros((n + 1, k + 1))
    pre[0, 0] = suf[n, 0] = 1.0
    for i in range(n):
        pre[i + 1] = pre[i]
        pre[i + 1, 1:] += w[i] * pre[i, :-1]
    for i in range(n - 1, -1, -1):
        suf[i] = suf[i + 1]
        suf[i, 1:] += w[i] * suf[i + 1, :-1]
    without = (pre[:n, :k] * suf[1:, k - 1::-1]).sum(1)       # e_{k-1} of w without i
    return w * without / pre[n, k]


def conditional_poisson_weights(pi: np.ndarray, k: int, iters: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Odds w whose conditional-Poisson design of size k has inclusion probabilities pi (the fixed
    point of Chen, Dempster & Liu 1994, which the released code cites). pi sums to k; ranks with
    pi = 1 are certain (w = inf), pi = 0 never drawn (w = 0)."""
    pi = np.asarray(pi, float)
    w = np.zeros_like(pi)
    sure, free = pi >= 1 - 1e-9, (pi > 1e-12) & (pi < 1 - 1e-9)
    w[sure] = np.inf
    kf = k - int(sure.sum())
    if kf <= 0 or not free.any():
        return w
    x = pi[free]
    v = x / (1 - x)
    for _ in range(iters):
        got = cp_inclusion(v, kf)
        if np.max(np.abs(got - x)) < tol:
            break
        v = v * x / got
        v /= v.max()
    w[free] = v
    return w


def poisson_binomial(p: np.ndarray) -> np.ndarray:
    """pmf of the number of successes of independent Bernoulli(p_i)."""
    f = np.ones(1)
    for q in p:
        g = np.zeros(len(f) + 1)
        g[:-1] += f * (1 - q)
        g[1:] += f * q
        f = g
    return f


def scale_to(p: np.ndarray, k: int) -> np.ndarray:
    """p scaled to sum to k, each value capped at 1 (the capped mass goes to the others)."""
    p = np.asarray(p, float).copy()
    for _ in range(len(p) + 1):
        cap = p >= 1
        rest = k - cap.sum()
        free = p[~cap].sum()
        if free <= 0:
            break
        p[~cap] *= rest / free
        p[cap] = 1.0
        if not (p > 1 + 1e-12).any():
            break
    return np.minimum(p, 1.0)


def layer_delay(fmt: ZipFormat, cost) -> Callable[[int, int, int], float]:
    """delay(full hits, SM hits, misses) of one layer: max(decompression, I/O). Decompression:
    ceil(tasks * K / L) chunk tasks on L workers; I/O (one storage queue in moelab, which also
    carries the exponent chunks the released code's workers read themselves): the SM bytes of
    every miss plus the chunks of every task."""
    K, L = fmt.chunks, cost.decompress_workers
    t_dec = cost.decompress_seconds(fmt.decompress_bytes[1])
    t_sm, t_chunk = cost.read_seconds(fmt.part_bytes[0]), cost.read_seconds(fmt.part_bytes[1])

    def delay(full: int, sm: int, miss: int) -> float:
        tasks = sm + miss
        return max(math.ceil(tasks * K / L) * t_dec, miss * t_sm + tasks * K * t_chunk)
    return delay


def delay_table(delay: Callable[[int, int, int], float], k: int) -> np.ndarray:
    """delay(f, s, k - f - s) for f + s <= k, as a (k + 1) x (k + 1) table (0 elsewhere)."""
    table = np.zeros((k + 1, k + 1))
    for f in range(k + 1):
        for s in range(k + 1 - f):
            table[f, s] = delay(f, s, k - f - s)
    return table


def conditioned_mean(q: np.ndarray, k: int, full: int, sm: int, table: np.ndarray) -> float | None:
    """E[delay | k experts needed in all] when ranks [0, full) are full, [full, full + sm) SM-only and
    the rest uncached, each rank needed independently with probability q[r] (Poisson binomial per
    group); None when k needed experts are impossible."""
    pf, ps, po = poisson_binomial(q[:full]), poisson_binomial(q[full:full + sm]), poisson_binomial(q[full + sm:])
    f = np.arange(min(k, full) + 1)[:, None]
    s = np.arange(min(k, sm) + 1)[None, :]
    o = k - f - s
    ok = (o >= 0) & (o < len(po))
    prob = np.where(ok, pf[f] * ps[s] * po[np.clip(o, 0, len(po) - 1)], 0.0)
    den = prob.sum()
    if den <= 0:
        return None
    return float((prob * table[f, s]).sum() / den)


def plan_split(p_rank: np.ndarray, layers: int, experts: int, pool_bytes: int, full_slot: int, sm_slot: int,
               delay: Callable[[int, int, int], float], smooth: int = 5) -> tuple[float | None, dict]:
    """PlanCache: the full pool's share of `pool_bytes` that minimises the expected layer delay.

    p_rank[r]: the chance that the rank-r expert is needed (RankStats). It is scaled to sum to
    k (the experts a layer needs, rounded), fitted with conditional-Poisson odds w, p = w/(1+w).
    For each share 0.01..0.99 the top F/layers ranks are full, the next S/layers SM-only; the
    hits of each group are Poisson-binomial, conditioned on k in all; E[delay] is taken over
    them. Shares whose slots exceed the experts of a layer, or with fewer than `experts` slots
    in either pool, are skipped. The curve is smoothed (window `smooth`); its arg-min is returned,
    or None if no share is feasible (the caller falls back to LFU). Also returns the curve."""
    k = max(1, int(round(float(np.sum(p_rank)))))
    w = conditional_poisson_weights(scale_to(np.sort(p_rank)[::-1], k), k)
    q = np.where(np.isinf(w), 1.0, w / (1 + np.where(np.isinf(w), 0, w)))
    table = delay_table(delay, k)
    shares, curve = [], []
    for share in np.round(np.arange(1, 100) / 100, 2):
        full = int(share * pool_bytes // full_slot)
        sm = int((pool_bytes - full * full_slot) // sm_slot)
        fl, sl = full // layers, sm // layers
        if fl + sl > experts or full < experts or sm < experts:
            continue
        value = conditioned_mean(q, k, fl, sl, table)
        if value is not None:
            shares.append(float(share))
            curve.append(value)
    if not shares:
        return None, {"shares": [], "delay": [], "k": k}
    c = np.asarray(curve)
    h = smooth // 2
    smoothed = np.array([c[max(0, i - h):i + h + 1].mean() for i in range(len(c))])
    return shares[int(np.argmin(smoothed))], {"shares": shares, "delay": curve, "k": k}


# -- the statistics' source: a plan trace ---------------------------------------------------------
def _routing_trace(model, requests: int, prompt_len: int, output_len: int, seed: int):
    """A synthetic trace of `model` with the catalog's default routing for it when the catalog has
    one (workloads/catalog.py `synthetic_default`), else the generator's defaults."""
    from workloads.synthetic import synthetic_trace
    try:
        from workloads.catalog import synthetic_default
        fit = "catalog" if synthetic_default(model.name) is not None else None
    except ImportError:
        fit = None
    return synthetic_trace(model, requests=requests, prompt_len=prompt_len, output_len=output_len, seed=seed,
                           **({"fit": fit} if fit else {}))


@functools.lru_cache(maxsize=8)
def default_plan_trace(model):
    """The default plan trace: `model`'s routing synthesised on its own (seed PLAN_SEED), 1000 requests
    of 19 generated tokens, as the released code plans from its shipped per-prompt traces."""
    return _routing_trace(model, PLAN_REQUESTS, 0, PLAN_TOKENS, PLAN_SEED)


def plan_trace(path: str | None, model, layers: int, experts: int):
    """The plan's statistics' trace: the file at `path` (any format `moelab trace import` reads), or
    the default one (`default_plan_trace`). Its shape must be the run's."""
    if path is None:
        trace = default_plan_trace(model)
    else:
        from workloads.importers import import_trace
        trace = import_trace(path)
    _, L, _ = trace.experts.shape
    if L != layers or int(trace.experts.max(initial=0)) >= experts:
        where = path or "the default plan trace"
        raise ConfigError(f"plan_trace {where}: routes {L} layers and experts up to {int(trace.experts.max())}; "
                          f"the run's model has {layers} layers of {experts} experts")
    return trace


def request_counts(trace, layers: int, experts: int) -> np.ndarray:
    """[requests, layers, experts]: how often each request's tokens chose each expert (the
    released traces' content), requests in order of first appearance."""
    _, first = np.unique(trace.request_ids, return_index=True)
    order = trace.request_ids[np.sort(first)]
    index = {int(r): i for i, r in enumerate(order)}
    rows = np.fromiter((index[int(r)] for r in trace.request_ids), np.int64, len(trace.request_ids))
    counts = np.zeros((len(order), layers, experts))
    t, L, k = trace.experts.shape
    np.add.at(counts, (np.repeat(rows, L * k), np.tile(np.repeat(np.arange(L), k), t), trace.experts.ravel()), 1)
    return counts


def rank_inclusion(trace, batch: int, layers: int, experts: int, window: int) -> np.ndarray | None:
    """The corrected planner's statistics: p[r] at the decision points of `batch` requests decoded
    together (workloads/batching.py), by rank within windows of `window` points of a layer, partial
    windows included (what RankStats gathers, vectorised)."""
    from workloads.batching import batch_steps
    steps = batch_steps(trace, batch)
    if not steps:
        return None
    step_of = np.empty(len(trace.request_ids), np.int64)
    for step in steps:
        step_of[step.tokens] = step.index
    used = np.zeros((len(steps), layers, experts), bool)
    t, L, k = trace.experts.shape
    used[np.repeat(step_of, L * k), np.tile(np.repeat(np.arange(L), k), t), trace.experts.ravel()] = True
    acc, n = np.zeros(experts), 0
    for start in range(0, len(steps), window):
        part = used[start:start + window]
        acc += (-np.sort(-part.sum(0), axis=-1)).sum(0) / len(part)
        n += layers
    return acc / n


@functools.lru_cache(maxsize=16)
def plan_statistics(path: str | None, model, batch: int, window: int, kind: str):
    """The plan trace's statistics, read once per process: "counts" (`request_counts`, the released
    planner's input) or "inclusion" (`rank_inclusion` at `batch`, the corrected one's)."""
    trace = plan_trace(path, model, model.layers, model.experts)
    if kind == "counts":
        return request_counts(trace, model.layers, model.experts)
    return rank_inclusion(trace, batch, model.layers, model.experts, window)
