"""What ZipMoE's released code (HEAD 1d0a56a; papers.md, ZipMoE §2) does where moelab's corrected
mode does otherwise: its PlanCache math, its budget mapping and its pool sizes. The cache's
released tier rules are in policies/zipmoe.py (`mode=released`).

The released planner (`released_plan`), read from runtime/cache_planning.py:

1. statistics from the shipped trace (per prompt, per layer, per expert counts): the prompts in
   batches of the run's batch size, each batch's counts per layer summed and sorted, accumulated
   over layers and batches, scaled to sum to 1 (`released_rank_dist`);
2. scaled to sum to the model's top-k, each value capped just below 1 (`released_scale_to_k`);
3. the Chen-Dempster-Liu fixed point for conditional-Poisson odds, 50 iterations, the odds scaled
   to mean 1 after each (`coverage_to_weight`); then p = w / (1 + w), so p depends on that scale;
4. k = int(sum p): 22-29 experts on the shipped statistics instead of the model's top-k, because
   of the mean-1 scaling (the corrected planner conditions on the experts a decision point needs);
5. for each full share 0.01..0.99, per-layer slots of device_memory_ratio x memory / layers; the
   delay of `released_delay` in expectation over the Poisson-binomial hits conditioned on k;
6. a share below 0.3 never sets the minimum: when no share of at least 0.3 is feasible the plan is
   0.99; otherwise the arg-min of the curve smoothed over 5 shares, which may itself lie below 0.3;
7. no feasible share at all: 0.99 and the LFU rule without tiers (also for Switch models).

Budget: the scripts map a memory footprint of F GB to device_memory_ratio (`MEMORY_MAP`, profiled
with jtop on the AGX Orin; evaluation/profile_tools.py); the pools are that ratio of the device's
memory; the docks for the experts in flight (one per expert of a layer) are allocated outside
them (`released_budget`). The config's full share is 0.6 (`ZipMoEConfig`), the eval script's 0.95;
PlanCache overwrites either whenever the cache rule is ZipMoE's own, and with any other rule every
expert is full while the SM share of the pools is allocated and never used.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from policies.zipmoe_plan import conditioned_mean, cp_inclusion, delay_table

CONFIG_SHARE = 0.6           # ZipMoEConfig.gpu_pool_ratio (utils/config.py)
EVAL_SHARE = 0.95            # evaluation/evaluate.py --gpu_pool_ratio
FALLBACK_SHARE = 0.99        # PlanCache's return when nothing is feasible (or nothing >= GATE)
GATE = 0.3                   # the smallest share that may set the minimum
MEMORY_MAP = {5: 0.03, 10: 0.1, 15: 0.17, 20: 0.25, 25: 0.34, 30: 0.43}   # footprint GB -> ratio


# -- the budget ---------------------------------------------------------------------------------
def released_budget(device_memory: int, footprint_gb: int, experts: int, full_slot: int) -> tuple[int, int]:
    """(moelab budget, dock bytes) for the released scripts' footprint of `footprint_gb` GB: pools of
    MEMORY_MAP[footprint] x device memory plus the docks (`experts` full slots) outside them."""
    pools = int(device_memory * MEMORY_MAP[footprint_gb])
    dock = experts * full_slot
    return pools + dock, dock


def released_slots(room: int, share: float, full_slot: int, sm_slot: int) -> tuple[int, int]:
    """The released pool sizes (memory/cache.cpp): the full pool int(share x room) bytes, the SM pool
    the rest, each rounded *up* to whole slots."""
    full_bytes = int(share * room)
    return math.ceil(full_bytes / full_slot), math.ceil((room - full_bytes) / sm_slot)


# -- the statistics ---------------------------------------------------------------------------------
def released_rank_dist(counts: np.ndarray, batch: int) -> np.ndarray | None:
    """ObtainDistFromTrace: counts [prompts, layers, experts] in batches of `batch` prompts (the
    remainder dropped), each batch's per-layer sums sorted descending, accumulated; sums to 1."""
    n = counts.shape[0] // batch
    if n == 0:
        return None
    per_batch = counts[:n * batch].reshape(n, batch, *counts.shape[1:]).sum(1)      # [n, layers, experts]
    acc = -np.sort(-per_batch, axis=-1).sum((0, 1))
    return acc / acc.sum() if acc.sum() > 0 else None


class BatchCounts:
    """The released statistic gathered online (plan_trace=online): per layer, the tokens each expert
    got in each of the run's batches so far, each batch's counts sorted and accumulated."""

    def __init__(self, layers: int, experts: int):
        self.now = np.zeros((layers, experts))
        self.acc = np.zeros(experts)

    def add(self, layer: int, tokens: dict[int, int]) -> None:
        for e, n in tokens.items():
            self.now[layer, e] += n

    def close(self) -> None:
        """A batch ended."""
        self.acc += -np.sort(-self.now, axis=-1).sum(0)
        self.now[:] = 0

    def dist(self) -> np.ndarray | None:
        acc = self.acc - np.sort(-self.now, axis=-1).sum(0)
        return acc / acc.sum() if acc.sum() > 0 else None


def released_scale_to_k(p: np.ndarray, k: int, tol: float = 1e-9) -> np.ndarray:
    """scale_to_k: p scaled to sum to k; values reaching 1 - tol are capped there and the rest
    rescaled to the remaining mass, until none exceeds it."""
    pi = np.asarray(p, float) * (k / np.sum(p))
    rest, left = np.arange(len(pi)), float(k)
    while len(rest):
        total = pi[rest].sum()
        if total < tol:
            break
        new = pi[rest] * (left / total)
        over = new >= 1 - tol
        if not over.any():
            pi[rest] = new
            break
        pi[rest[over]] = 1 - tol
        left -= int(over.sum())
        rest = rest[~over]
        if left <= 0:
            pi[rest] = 0.0
            break
    return pi


def coverage_to_weight(pi: np.ndarray, k: int, iters: int = 50, tol: float = 1e-8) -> np.ndarray:
    """CoverageToWeight: odds w with conditional-Poisson inclusion pi, by w <- w pi / pi(w), the
    odds scaled to mean 1 after every update (the scale the released p = w / (1 + w) then keeps)."""
    pi = np.asarray(pi, float)
    w = pi / (1.0 - pi + 1e-12)
    for _ in range(iters):
        got = cp_inclusion(w, k)
        if np.linalg.norm(got - pi) < tol:
            return w
        w = w * (pi / (got + 1e-12))
        w = w / w.mean()
    return w


# -- the delay model and the plan ---------------------------------------------------------------------
def released_delay(fmt, cost) -> Callable[[int, int, int], float]:
    """DelaySimu(full hits, SM hits, misses) with this device's costs, per expert (the released code
    counts per tensor; the sums are the same): max(K (k - full) / L x (t_dec + t_sm r / K),
    t_sm misses + t_sm r SM-hits), t_dec one chunk's decompression, t_sm the SM bytes' read, r the
    exponent ratio. (An SM hit's exponent reads count on both sides, a miss's only in the first.)"""
    K, L, r = fmt.chunks, cost.decompress_workers, fmt.exponent_ratio
    t_dec = cost.decompress_seconds(fmt.decompress_bytes[1])
    t_sm = cost.read_seconds(fmt.part_bytes[0])

    def delay(full: int, sm: int, miss: int) -> float:
        k = full + sm + miss
        return max(K * (k - full) / L * (t_dec + t_sm * r / K), t_sm * miss + sm * t_sm * r)
    return delay


def released_odds(p_dist: np.ndarray, top_k: int) -> tuple[np.ndarray, int]:
    """(Bernoulli p by rank, k) as PlanCache makes them from the rank distribution."""
    w = coverage_to_weight(released_scale_to_k(p_dist, top_k), top_k)
    q = w / (1 + w)
    return q, int(np.sum(q))


def released_plan(p_dist: np.ndarray, top_k: int, layers: int, experts: int, pool_bytes: int, full_slot: int,
                  sm_slot: int, delay, step: float = 0.01) -> tuple[float, bool, dict]:
    """CachePoolPlanningSimu + PlanCache (module docstring, 5-7): (share, feasible, curve)."""
    q, k = released_odds(p_dist, top_k)
    table = delay_table(delay, k)
    per_layer = pool_bytes / layers
    shares, curve, best, feasible = [], [], math.inf, False
    for i in range(1, int(round(1 / step))):
        ratio = i * step                                   # the released float, for the slot counts
        share = round(ratio, 4)
        full, sm = int(ratio * per_layer / full_slot), int((1 - ratio) * per_layer / sm_slot)
        if full + sm > experts or full * layers < experts or sm * layers < experts:
            continue
        feasible = True
        value = conditioned_mean(q, k, full, sm, table)
        if value is None:
            continue
        shares.append(share)
        curve.append(value)
        if value < best and share >= GATE:
            best = value
    info = {"shares": shares, "delay": curve, "k": k, "sum_p": float(np.sum(q))}
    if not feasible:
        return FALLBACK_SHARE, False, info
    if best == math.inf:
        return round(1 - step, 4), True, info
    c = np.asarray(curve)
    smoothed = np.array([c[max(0, j - 2):j + 3].mean() for j in range(len(c))])
    return shares[int(np.argmin(smoothed))], True, info
