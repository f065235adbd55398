"""ZipMoE's policies (ICML'26), as its released code (HEAD 1d0a56a) makes them; papers.md, ZipMoE §2.

An expert in the zip format is part 0 (sign+mantissa bytes, "SM", raw) and parts 1..K (the
compressed exponent chunks, each a decompression task). ZipMoE keeps experts in two tiers:

- *full*: SM bytes + decompressed exponents, ready to compute (a BF16 slot, 2 bytes a weight);
- *SM-only*: the SM bytes alone (1 byte a weight); next time only the exponent chunks are read
  and decompressed (a Type-II task; an expert with nothing cached is Type-I).

Pieces (each its own class or function below):

- `ZipMoECache`: the two pools plus a *dock* for the current layer's loads (the released code's
  per-expert docks; in moelab the budget covers them, so the pools share what the dock leaves:
  the largest single-layer demand of the trace, or top-k experts online). At each use an
  expert's rank in its layer (by tokens so far) picks its tier (`proactive_decision`: the
  margin and the fall-backs of the released code); the tier is applied when the layer ends.
  Victims by token-weighted LFU, or LRU / LFU / FIFO / Marking (option `victim`); with any rule
  but ZipMoE's own the released code keeps every expert full (option `tiers=false`).
- `plan_split` (PlanCache): the full/SM split that minimises the expected max(decompression,
  I/O) of a layer, from a rank distribution of activations, conditional-Poisson weights and
  Poisson-binomial distributions. `RankStats` gathers the distribution: from the trace's access
  sequence when the run has one (planned once, at the start, as the released code plans from
  traces at init), else online from the first `plan_after` steps (planned once then).
- The scheduler, its makespan bound and the evaluation's baselines: policies/zipmoe_schedule.py.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from devices.units import ConfigError
from policies.base import Key, PolicyContext, largest_layer_demand
from policies.cache import CachePolicy, _LazyHeap
from policies.options import Option
from workloads.formats import ZipFormat

NORMAL, SMCACHE, EVICT = "normal", "smcache", "evict"      # the released code's expert states
VICTIM_RULES = ("tw-lfu", "lru", "lfu", "fifo", "marking")
FALLBACK_SPLIT = 0.5         # the full share when not planned (the released config's default is not known)


def require_zip(fmt, who: str) -> None:
    if not isinstance(fmt, ZipFormat):
        raise ConfigError(f"{who} needs --format zip (this run is --format {fmt.name}); use --format zip, "
                          f"or a policy for any format (`moelab policies`)")


# -- ProactiveDecision -------------------------------------------------------------------------
def proactive_decision(rank: int, t_normal: float, t_sm: float, full_free: bool, sm_free: bool) -> tuple[str, str | None]:
    """The released code's tier rule for one enqueued expert: (state, pool to evict a victim from).

    rank < T_N: full if a full slot is free, else SM-only if an SM slot is, else full evicting a
    full victim. T_N <= rank < T_S: SM-only, else full, else SM-only evicting an SM victim.
    rank >= T_S: SM-only, else full, else not cached."""
    if rank < t_normal:
        return (NORMAL, None) if full_free else (SMCACHE, None) if sm_free else (NORMAL, "full")
    if rank < t_sm:
        return (SMCACHE, None) if sm_free else (NORMAL, None) if full_free else (SMCACHE, "sm")
    return (SMCACHE, None) if sm_free else (NORMAL, None) if full_free else (EVICT, None)


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
    shares, curve = [], []
    for share in np.round(np.arange(1, 100) / 100, 2):
        full = int(share * pool_bytes // full_slot)
        sm = int((pool_bytes - full * full_slot) // sm_slot)
        fl, sl = full // layers, sm // layers
        if fl + sl > experts or full < experts or sm < experts:
            continue
        pf, ps, po = poisson_binomial(q[:fl]), poisson_binomial(q[fl:fl + sl]), poisson_binomial(q[fl + sl:])
        num = den = 0.0
        for f in range(min(k, fl) + 1):
            for s in range(min(k - f, sl) + 1):
                o = k - f - s
                if o < len(po):
                    pr = pf[f] * ps[s] * po[o]
                    num += pr * delay(f, s, o)
                    den += pr
        if den > 0:
            shares.append(float(share))
            curve.append(num / den)
    if not shares:
        return None, {"shares": [], "delay": [], "k": k}
    c = np.asarray(curve)
    h = smooth // 2
    smoothed = np.array([c[max(0, i - h):i + h + 1].mean() for i in range(len(c))])
    return shares[int(np.argmin(smoothed))], {"shares": shares, "delay": curve, "k": k}


# -- the cache ------------------------------------------------------------------------------------
class ZipMoECache(CachePolicy):
    """Full and SM-only tiers under one budget, ZipMoE's way (module docstring).

    Pools: "full" (F slots of a whole expert), "sm" (S slots of SM bytes) and "dock" (this
    layer's loads and prefetches; bounded by the budget only). A layer's parts are loaded into
    the dock; when the layer ends, each expert it used goes to the tier its decision named
    (`_move`: no bytes move), evicting victims where the decision said so, or is dropped.

    Options (declared below): victim, tiers, split, margin, thresholds ("pool": T_N = full slots +
    margin x experts, the pool-wide slot count as the released code compares it with a rank in one
    layer; "layer": slots per layer), window, plan_after, dock."""
    name = "zipmoe"
    formats = ("zip",)
    options = (
        Option("victim", "str", "tw-lfu", "victim rule of both pools (token-weighted LFU is ZipMoE's own)",
               choices=VICTIM_RULES),
        Option("tiers", "bool", True, "keep SM-only experts (false: every expert full, as the released code "
                                      "runs with any victim rule but its own)"),
        Option("split", "float", "plan", "the full pool's share of the tiers' room, or plan (PlanCache)",
               special=("plan",)),
        Option("margin", "float", 0.1, "T_N = full slots + margin x experts"),
        Option("thresholds", "str", "pool", "compare a rank with the pool-wide or the per-layer slot count",
               choices=("pool", "layer")),
        Option("window", "int", 64, "statistics window", unit="decision points"),
        Option("plan_after", "int", 32, "online statistics: decode steps before planning", unit="steps"),
        Option("dock", "int", None, "bytes kept for loads in flight (default: the largest layer demand)",
               unit="bytes"))

    def __init__(self, ctx: PolicyContext, victim: str = "tw-lfu", tiers: bool = True,
                 split: str | float = "plan", margin: float = 0.1, thresholds: str = "pool",
                 window: int = 64, plan_after: int = 32, dock: int | None = None):
        super().__init__(ctx)
        fmt = ctx.fmt
        require_zip(fmt, f"the {self.name} cache")
        self.victim = victim
        if self.victim not in VICTIM_RULES:
            raise ConfigError(f"{self.name}: victim must be one of {', '.join(VICTIM_RULES)}; got {self.victim!r}")
        if thresholds not in ("pool", "layer"):
            raise ConfigError(f"{self.name}: thresholds must be 'pool' or 'layer'; got {thresholds!r}")
        if split != "plan" and not (isinstance(split, (int, float)) and 0 < float(split) < 1):
            raise ConfigError(f"{self.name}: split must be 'plan' or a share between 0 and 1; got {split!r}")
        if not 0 <= margin < 1:
            raise ConfigError(f"{self.name}: margin must be in [0, 1); got {margin!r}")
        self.tiers, self.split, self.window, self.plan_after, self.dock = tiers, split, window, plan_after, dock
        self.margin, self.thresholds = float(margin), thresholds
        self.full_slot, self.sm_slot = sum(fmt.resident_bytes), fmt.resident_bytes[0]
        if dock is None:
            if ctx.future is not None:
                dock = largest_layer_demand(ctx.future, fmt)
            else:
                top_k = ctx.cost.model.top_k if ctx.cost is not None else 1
                dock = min(ctx.experts, top_k) * self.full_slot
        self.room = max(0, self.capacity - int(dock))      # what the two tiers share
        self.pools = {"full": 0, "sm": 0, "dock": self.capacity}
        self.pool_used = {"full": 0, "sm": 0, "dock": 0}
        self.tier: dict[tuple[int, int], str] = {}         # cached expert -> "full" | "sm"
        self.n_in = {"full": 0, "sm": 0}
        self.heaps = {"full": _LazyHeap(), "sm": _LazyHeap()}
        self.meta: dict[tuple[int, int], list] = {}        # expert -> [count, last use, inserted, marked]
        self.rank_count = np.zeros((ctx.layers, ctx.experts))   # tokens so far: the decision's rank
        self.decisions: list[tuple[int, str]] = []
        self.states = {NORMAL: 0, SMCACHE: 0, EVICT: 0}
        self.type2_hits = 0
        self.stats = None
        self.plan_at = None
        self.source = "fixed"
        if not self.tiers:
            self._set_split(1.0)
        elif split != "plan":
            self._set_split(float(split))
        else:
            self.stats = RankStats(ctx.layers, ctx.experts, window)
            self._set_split(FALLBACK_SPLIT)
            if ctx.future is not None:                      # statistics from the trace: plan now
                for keys in ctx.future:
                    if keys:
                        self.stats.add(keys[0].layer, sorted({k.expert for k in keys}))
                self._plan("trace")
            else:                                           # learned online: plan once, later
                self.plan_at = plan_after * ctx.layers
                self.source = f"online (planned after {plan_after} steps)"

    # -- pools and the plan ------------------------------------------------------
    def _set_split(self, share: float) -> None:
        self.share = share
        full = int(share * self.room // self.full_slot) * self.full_slot
        self.pools["full"] = full
        self.pools["sm"] = int((self.room - full) // self.sm_slot) * self.sm_slot if self.tiers else 0
        self.full_slots, self.sm_slots = full // self.full_slot, self.pools["sm"] // self.sm_slot

    def _plan(self, source: str) -> None:
        p = self.stats.inclusion()
        model = self.ctx.cost.model if self.ctx.cost is not None else None
        share, _ = (None, None) if p is None else plan_split(
            p, self.ctx.layers, self.ctx.experts, self.room, self.full_slot, self.sm_slot,
            layer_delay(self.fmt, self.ctx.need_cost("the zipmoe cache's pool plan (PlanCache)")))
        if model is not None and model.name.startswith("switch"):
            share, why = None, "a Switch model"
        else:
            why = "no feasible split"
        if share is None:                                   # the released code falls back to LFU
            self.tiers, self.victim = False, "lfu"
            self._set_split(1.0)
            self._repush()
            self.source = f"{source}: LFU fall-back ({why})"
        else:
            self._set_split(share)
            self.source = source

    def _priority(self, x) -> tuple:
        count, last, inserted, marked = self.meta[x]
        return {"tw-lfu": (count,), "lfu": (count,), "lru": (last,), "fifo": (inserted,),
                "marking": (marked, inserted)}[self.victim]

    def _push(self, x) -> None:
        self.heaps[self.tier[x]].push(Key(x[0], x[1], 0), *self._priority(x))

    def _repush(self) -> None:
        self.heaps = {"full": _LazyHeap(), "sm": _LazyHeap()}
        for x in self.tier:
            self._push(x)

    def _place(self, x, tier: str) -> None:
        """Expert x is cached in `tier` from now on (its parts are in that pool already)."""
        old = self.tier.get(x)
        if old == tier:
            return
        if old is None:
            self.meta[x] = [1, self.clock, self.clock, 1]    # a miss sets the count to 1
        else:
            self.n_in[old] -= 1
            self.heaps[old].discard(Key(x[0], x[1], 0))
        self.tier[x] = tier
        self.n_in[tier] += 1
        self._push(x)

    def _pick(self, pool: str) -> Key | None:
        """The best unlocked victim in `pool` (Marking: a new phase when every one is marked)."""
        for attempt in (0, 1):
            it = iter(self.heaps[pool])
            try:
                victim = next((k for k in it if not self._locked(k)), None)
            finally:
                it.close()
            if victim is None or self.victim != "marking" or not self.meta[victim[:2]][3] or attempt:
                return victim
            for x, t in self.tier.items():                  # every candidate marked: unmark all
                if t == pool and Key(x[0], x[1], 0) not in self.pinned:
                    self.meta[x][3] = 0
            self._repush()
        return None

    def _make_room(self, pool: str, need: int, dropped: list) -> bool:
        while self.pool_used[pool] + need > self.pools[pool]:
            victim = self._pick(pool)
            if victim is None:
                return False
            dropped.extend(self._evict(victim))
        return True

    # -- the decision point --------------------------------------------------------
    def pool(self, key):
        return "dock"

    def begin_layer(self, layer, keys, demand=None):
        self.clock += 1
        sizes = self.sizes
        hits = sum(k in sizes for k in keys)
        self.pinned = set(keys)
        tokens: dict[int, int] = {}
        if demand is not None:
            for (e, _), n in demand.counts().items():
                tokens[e] = tokens.get(e, 0) + n
        else:
            tokens = {k.expert: 1 for k in keys}
        if self.plan_at is not None:
            self.stats.add(layer, sorted(tokens))
            if self.clock == self.plan_at:
                self._plan(self.source)
                self.plan_at = None
        for e, n in tokens.items():                         # token-weighted hits
            x = (layer, e)
            if x in self.tier:
                if self.tier[x] == "sm":
                    self.type2_hits += 1
                m = self.meta[x]
                m[0] += n if self.victim == "tw-lfu" else 1
                m[1], m[3] = self.clock, 1
                self._push(x)
        self.decisions = self._decide(layer, tokens)
        return hits

    def _decide(self, layer: int, tokens: dict[int, int]) -> list[tuple[int, str]]:
        """ProactiveDecision at each use of an expert, in router order: its rank (experts of the
        layer with more tokens so far) against T_N and T_S, and the slots free after the earlier
        decisions. The expert's own slot is up for decision (it counts as free in its own pool),
        so a cached expert stays where it is unless its rank sends it elsewhere and there is room.
        A victim is only promised while an unlocked expert is in that pool; with none, the
        expert is not cached."""
        E = self.ctx.experts
        per = self.ctx.layers if self.thresholds == "layer" else 1
        t_n = self.full_slots / per + self.margin * E
        t_s = t_n + self.sm_slots / per + self.margin * E
        free = {"full": self.full_slots - self.n_in["full"], "sm": self.sm_slots - self.n_in["sm"]}
        claimable = dict(self.n_in)
        for e in tokens:
            t = self.tier.get((layer, e))
            if t is not None:
                claimable[t] -= 1                           # the layer's own experts are locked
        counts = self.rank_count[layer]
        out = []
        for e, n in tokens.items():
            counts[e] += n
            t = self.tier.get((layer, e))
            if t is not None:
                free[t] += 1
            rank = int((counts > counts[e]).sum())
            if self.tiers:
                state, victim_pool = proactive_decision(rank, t_n, t_s, free["full"] > 0, free["sm"] > 0)
            else:
                state, victim_pool = (NORMAL, None) if free["full"] > 0 else (NORMAL, "full")
            if victim_pool is not None:
                if claimable[victim_pool] > 0:
                    claimable[victim_pool] -= 1
                else:
                    state = EVICT                           # nothing unlocked to evict: not cached
            elif state != EVICT:
                free["full" if state == NORMAL else "sm"] -= 1
            self.states[state] += 1
            out.append((e, state))
        return out

    def end_layer(self, layer):
        dropped: list[Key] = []
        n_parts, sizes, pool_of = self.fmt.n_parts, self.sizes, self.pool_of
        decided = set()
        for e, state in self.decisions:
            decided.add(e)
            x, k0 = (layer, e), Key(layer, e, 0)
            if k0 not in sizes:
                continue
            if state == NORMAL:
                parts = [Key(layer, e, p) for p in range(n_parts)]
                need = sum(sizes[k] for k in parts if pool_of[k] != "full")
                if self._make_room("full", need, dropped):
                    for k in parts:
                        self._move(k, "full")
                    self._place(x, "full")
                    continue
            elif state == SMCACHE:
                dropped.extend(self._evict(Key(layer, e, 1)))       # the exponent chunks go
                if self._make_room("sm", 0 if pool_of[k0] == "sm" else sizes[k0], dropped):
                    self._move(k0, "sm")
                    self._place(x, "sm")
                    continue
            dropped.extend(self._evict(k0))                         # EVICT, or no room after all
        for k in sorted(self.by_layer[layer]):                      # unused prefetches of this layer
            if k in sizes and pool_of[k] == "dock" and k.expert not in decided:
                dropped.extend(self._evict(k))
        self.decisions = []
        self.pinned = set()
        for pool in ("full", "sm"):                                 # a new plan may shrink a pool
            self._make_room(pool, 0, dropped)
        return dropped

    # -- the base class's hooks (its budget loop falls back on these) ----------------
    def _forget(self, key):
        if key.part == 0:
            x = (key.layer, key.expert)
            t = self.tier.pop(x, None)
            if t is not None:
                self.n_in[t] -= 1
                self.heaps[t].discard(key)
                del self.meta[x]                                    # eviction resets the count

    def _order(self):
        """When loads outgrow the dock's reserve: prefetched parts not needed now go first
        (speculative), then SM-only experts, then full ones, each by the victim rule."""
        yield from sorted(k for k, pool in self.pool_of.items() if pool == "dock")
        for pool in ("sm", "full"):
            yield from self.heaps[pool]

    def report(self) -> dict:
        return {"zipmoe_full_share": self.share if self.tiers else 1.0, "zipmoe_split_source": self.source,
                "zipmoe_victim": self.victim, "zipmoe_full_slots": self.full_slots, "zipmoe_sm_slots": self.sm_slots,
                "zipmoe_decisions_normal": self.states[NORMAL], "zipmoe_decisions_smcache": self.states[SMCACHE],
                "zipmoe_decisions_evict": self.states[EVICT], "zipmoe_type2_hits": self.type2_hits}


ZIPMOE_CACHES = (ZipMoECache,)
