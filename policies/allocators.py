"""Bit allocators: which precision level each token gets for each selected expert."""
from __future__ import annotations

import numpy as np

from devices.units import ConfigError
from policies.base import Allocator, BudgetError, Demand, NeedsFuture, PolicyContext, Routing
from policies.options import Option, convert


class FixedLevel(Allocator):
    """Every token at one level (default: the highest the format offers)."""
    name = "fixed"
    options = (Option("level", "int", None, "the level every token gets (0 = the lowest; default: the format's "
                                            "highest)"),)

    def __init__(self, ctx: PolicyContext, level: int | None = None):
        super().__init__(ctx)
        self.level = ctx.fmt.levels - 1 if level is None else int(level)
        ctx.fmt.check_level(self.level)

    def levels_used(self):
        return (self.level,)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        lvl = self.level
        rows = routing.experts.tolist()
        return Demand(layer, tuple([tuple([(e, lvl) for e in row]) for row in rows]),
                      _max=dict.fromkeys([e for row in rows for e in row], lvl))


class TraceLevels(Allocator):
    """Each (token, slot) at the level the routing carries: a bit-width router's choice in the
    executor, or the levels `trace record` wrote into a trace. Replaying a recorded trace with
    it makes the simulator follow the executor's bit choices exactly."""
    name = "trace-levels"

    def allocate(self, layer: int, routing: Routing) -> Demand:
        if routing.levels is None:
            raise BudgetError("the trace-levels allocator needs a level per (token, layer, slot): give a trace "
                              "that has them (`moelab trace record` with a bit-width router), or use --allocator fixed")
        top = self.fmt.levels
        levels = routing.levels.tolist()
        per_token = []
        for row, lvls in zip(routing.experts.tolist(), levels):
            for lvl in lvls:
                if not 0 <= lvl < top:
                    self.fmt.check_level(lvl)       # raises, naming the valid levels
            per_token.append(tuple(zip(row, lvls)))
        return Demand(layer, tuple(per_token))


def _normalized(scores) -> list[list[float]]:
    """Each token's gate scores over its selected experts, summing to 1."""
    out = []
    for row in scores.tolist():
        total = sum(row)
        out.append([s / total if total > 0 else 1.0 / len(row) for s in row])
    return out


class GateScore(Allocator):
    """A rule on the router's gate scores: a token's top-1 expert at the highest level; each
    other expert at level j = the number of `thresholds` its normalised gate score reaches
    (scores over the token's k selected experts, summing to 1). Default thresholds: K-1
    evenly spaced in (0, 0.5] (V1: 0.25, 0.5), so a second expert as strong as the first
    gets the top level too. Not the paper's rule (D²MoE learns its bit router; see `learned`):
    the cheap baseline it is compared with."""
    name = "gate-score"
    options = (Option("thresholds", "floats", None, "K-1 normalised gate scores a non-top-1 expert must reach for "
                                                    "each next level (default: evenly spaced in (0, 0.5])"),
               Option("top1_highest", "bool", True, "a token's top-1 expert always at the highest level"))

    def __init__(self, ctx: PolicyContext, thresholds=None, top1_highest: bool = True):
        super().__init__(ctx)
        K = ctx.fmt.levels
        if thresholds is None:
            thresholds = [0.5 * j / (K - 1) for j in range(1, K)] if K > 1 else []
        self.thresholds = sorted(_floats(thresholds, "gate-score thresholds"))
        if len(self.thresholds) != K - 1:
            raise ConfigError(f"gate-score: thresholds needs {K - 1} values for the {K} levels of "
                              f"{ctx.fmt.name}, got {self.thresholds}")
        self.top1_highest = _bool(top1_highest, "gate-score top1_highest")

    def level_of(self, p: float) -> int:
        return sum(p >= t for t in self.thresholds)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        top, per_token = self.fmt.levels - 1, []
        for row, probs in zip(routing.experts.tolist(), _normalized(routing.scores)):
            best = max(range(len(row)), key=probs.__getitem__)
            per_token.append(tuple((e, top if self.top1_highest and i == best else self.level_of(p))
                                   for i, (e, p) in enumerate(zip(row, probs))))
        return Demand(layer, tuple(per_token))


class Capacity(Allocator):
    """D²MoE's quantized expert capacity {c_k} (Σc_k = 1; V1 {0.3, 0.4, 0.3}, V2 0.25 each):
    per expert, of the n tokens of the step that chose it, ranked by gate score, the top
    round(c_K·n) get the highest level, the next round((c_K + c_{K-1})·n) - round(c_K·n) the
    next, and so on (cumulative rounding, half up, so every token gets exactly one level).
    A lone token (batch-1 decode) lands where the cumulative share first reaches one half:
    INT3 on V1, INT7 on V2."""
    name = "capacity"
    options = (Option("capacities", "floats", None, "each level's share of an expert's tokens, lowest level first, "
                                                    "summing to 1 (default: V1 0.3,0.4,0.3; V2 0.25 each)"),)
    DEFAULTS = {3: (0.3, 0.4, 0.3), 4: (0.25, 0.25, 0.25, 0.25)}

    def __init__(self, ctx: PolicyContext, capacities=None):
        super().__init__(ctx)
        K = ctx.fmt.levels
        caps = capacities if capacities is not None else self.DEFAULTS.get(K, [1.0 / K] * K)
        self.capacities = _floats(caps, "capacity capacities")
        if len(self.capacities) != K or abs(sum(self.capacities) - 1) > 1e-6 or min(self.capacities) < 0:
            raise ConfigError(f"capacity: capacities must be {K} non-negative shares summing to 1 (lowest level "
                              f"first), got {self.capacities}")
        cum, self.cumulative = 0.0, []
        for c in reversed(self.capacities):          # highest level first
            cum += c
            self.cumulative.append(cum)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        experts = np.asarray(routing.experts)
        flat_e, flat_s = experts.ravel(), np.asarray(routing.scores, dtype=np.float64).ravel()
        # each expert's (token, slot)s, best score first, ties to the earlier token
        order = np.lexsort((np.arange(flat_e.size), -flat_s, flat_e))
        sorted_e = flat_e[order]
        first = np.searchsorted(sorted_e, sorted_e, side="left")
        n = np.searchsorted(sorted_e, sorted_e, side="right") - first      # tokens of that expert
        rank = np.arange(order.size) - first                                # 0 = its best score
        j = np.zeros(order.size, np.int64)            # how many cumulative boundaries the rank is past
        for cum in self.cumulative[:-1]:
            j += rank >= np.floor(cum * n + 0.5)
        levels = np.empty(order.size, np.int64)
        levels[order] = self.fmt.levels - 1 - j
        rows, lvls = experts.tolist(), levels.reshape(experts.shape).tolist()
        return Demand(layer, tuple([tuple(zip(row, lv)) for row, lv in zip(rows, lvls)]))


_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD], dtype=np.uint64)


def _uniform(seed: int, step: int, rows: np.ndarray, layer: int, experts: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per (row, expert): splitmix64 of (seed, step, row, layer, expert)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * _MIX[0] ^ np.uint64(step) * _MIX[1] ^ np.uint64(layer) * _MIX[3]
             ^ rows.astype(np.uint64)[:, None] * _MIX[2] ^ experts.astype(np.uint64) * _MIX[4])
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class Shares(Allocator):
    """Each (token, expert) at a level drawn from given per-level shares: the level a learned
    bit-width router gives, for routing that has no router (the synthetic traces of models moelab
    cannot run). A token's draw is a number in [0, 1) from a seeded hash (splitmix64) of (seed, step,
    token row, layer, expert), the step counted by the allocator itself (a new one whenever the layer
    does not increase); its level is the share interval it falls in. With `group` g > 0, a token
    takes instead, with probability g (another hash), its (step, layer, expert) group's common draw:
    the shares stay the same, but tokens of one expert agree more (a learned router scores the
    tokens an expert's router picked alike). Online: it reads neither the future nor the cache, and
    is identical in both engines. Unlike `capacity`, an expert's tokens are not ranked: a share is a
    probability, not a per-expert quota (reproduce d2moe passes the learned router's measured shares
    and group, experiments/d2moe_levels.py)."""
    name = "shares"
    options = (Option("shares", "floats", None, "each level's probability, lowest level first, summing to 1 "
                                                "(default: equal)"),
               Option("group", "float", 0.0, "the probability a token takes its (step, layer, expert) group's draw"),
               Option("seed", "int", 0, "the hash's seed"))

    def __init__(self, ctx: PolicyContext, shares=None, group: float = 0.0, seed: int = 0):
        super().__init__(ctx)
        K = ctx.fmt.levels
        self.shares = _floats(shares, "shares shares") if shares is not None else [1.0 / K] * K
        if len(self.shares) != K or abs(sum(self.shares) - 1) > 1e-6 or min(self.shares) < 0:
            raise ConfigError(f"shares: shares must be {K} non-negative numbers summing to 1 (lowest level "
                              f"first), got {self.shares}")
        self.group = float(group)
        if not 0 <= self.group <= 1:
            raise ConfigError(f"shares: group must be a probability in [0, 1], got {group}")
        self.bounds = np.cumsum(self.shares)[:-1]
        self.seed, self.step, self.last_layer = int(seed), -1, None

    def levels_used(self):
        return tuple(k for k, share in enumerate(self.shares) if share > 0)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        if self.last_layer is None or layer <= self.last_layer:
            self.step += 1
        self.last_layer = layer
        experts = np.asarray(routing.experts)
        rows = np.arange(len(experts))
        u = _uniform(self.seed, self.step, rows, layer, experts)
        if self.group > 0:                  # row -1: the group's draw; seed + 1: whether to take it
            common = _uniform(self.seed, self.step, np.array([-1]), layer, experts.ravel()).reshape(experts.shape)
            take = _uniform(self.seed + 1, self.step, rows, layer, experts) < self.group
            u = np.where(take, common, u)
        levels = np.searchsorted(self.bounds, u, side="right")
        rows, lvls = experts.tolist(), levels.tolist()
        return Demand(layer, tuple([tuple(zip(row, lv)) for row, lv in zip(rows, lvls)]))


class ResidentFirst(Allocator):
    """What HOBBIT does and D²MoE does not: ask `base`'s level, but when it is not resident and
    a lower level of the same expert is, at most `max_drop` levels below, use the highest
    such resident level instead (no load at all). `report()` says how often it did."""
    name = "resident-first"
    reads_cache = True
    # its base allocator's options pass through to it (the base refuses one it does not take)
    options = (Option("base", "str", "fixed", "the allocator whose level is asked for"),
               Option("max_drop", "int", 1, "at most this many levels below the asked one"),
               *FixedLevel.options, *GateScore.options, *Capacity.options)

    def __init__(self, ctx: PolicyContext, base: str = "fixed", max_drop: int = 1, **base_options):
        super().__init__(ctx)
        if base not in ALLOCATOR_CLASSES or base == self.name:
            raise ConfigError(f"resident-first: option base must be another allocator "
                              f"({', '.join(n for n in ALLOCATOR_CLASSES if n != self.name)}), got {base!r}")
        cls = ALLOCATOR_CLASSES[base]
        self.base = cls(ctx, **convert(cls, base_options, f"resident-first (base {base})"))
        self.max_drop = int(max_drop)
        if self.max_drop < 0:
            raise ConfigError(f"resident-first: max_drop must be >= 0, got {max_drop}")
        self.asked = self.substituted = 0

    def levels_used(self):
        return self.base.levels_used()

    def _resident(self, layer: int, expert: int, level: int) -> bool:
        sizes = self.cache.sizes
        return all((layer, expert, p) in sizes for p in self.fmt.level_parts[level])

    def allocate(self, layer: int, routing: Routing) -> Demand:
        self.base.cache = self.cache
        demand = self.base.allocate(layer, routing)
        choice: dict[tuple[int, int], int] = {}
        for token in demand.per_token:
            for pair in token:
                if pair not in choice:
                    e, lvl = pair
                    choice[pair] = lvl
                    if not self._resident(layer, e, lvl):
                        for lower in range(lvl - 1, max(-1, lvl - 1 - self.max_drop), -1):
                            if self._resident(layer, e, lower):
                                choice[pair] = lower
                                break
        per_token = tuple(tuple((e, choice[e, lvl]) for e, lvl in token) for token in demand.per_token)
        self.asked += sum(len(t) for t in per_token)
        self.substituted += sum(choice[p] != p[1] for t in demand.per_token for p in t)
        return Demand(layer, per_token)

    def report(self) -> dict:
        return {"resident_first_asked": self.asked, "resident_first_substituted": self.substituted,
                "resident_first_fraction": self.substituted / self.asked if self.asked else 0.0}


def _floats(value, what: str) -> list[float]:
    """A list of floats from a list or a comma-separated string (CLI options)."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected comma-separated numbers, got {value!r}") from None


def _bool(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"{what}: expected true or false, got {value!r}")


class StaticImportance(Allocator):
    """EdgeMoE's static per-expert bit-width: experts ranked by importance (how often the
    router picks them, from the trace's counts) get one level each for the whole run: the
    top `shares[-1]` of each layer's experts the highest level, the next `shares[-2]` the
    next, and so on (shares lowest level first, summing to 1; default: equal). EdgeMoE ranks
    by a profiled accuracy sensitivity; moelab uses activation frequency instead (the one
    importance signal a trace carries), counted over the run's own trace: an offline bound (a
    deployment would rank by a calibration run's counts)."""
    name = "static-importance"
    offline = True
    options = (Option("shares", "floats", None, "share of each layer's experts at each level, lowest level first, "
                                                "summing to 1 (default: equal)"),)

    def __init__(self, ctx: PolicyContext, shares=None):
        super().__init__(ctx)
        if ctx.popularity is None:
            raise NeedsFuture("static-importance needs expert popularity counts (from the trace)")
        K = ctx.fmt.levels
        self.shares = _floats(shares, "static-importance shares") if shares is not None else [1.0 / K] * K
        if len(self.shares) != K or abs(sum(self.shares) - 1) > 1e-6 or min(self.shares) < 0:
            raise ConfigError(f"static-importance: shares must be {K} non-negative numbers summing to 1 (lowest "
                              f"level first), got {self.shares}")
        self.level: dict[tuple[int, int], int] = {}
        for layer, counts in enumerate(ctx.popularity):
            ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
            cum, start = 0.0, 0
            for j, share in enumerate(reversed(self.shares)):        # highest level first
                cum += share
                end = len(ranked) if j == K - 1 else int(cum * len(ranked) + 0.5)
                for e in ranked[start:end]:
                    self.level[layer, e] = K - 1 - j
                start = max(start, end)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        lv = self.level
        return Demand(layer, tuple(tuple((e, lv[layer, e]) for e in row) for row in routing.experts.tolist()))


class Learned(TraceLevels):
    """D²MoE's learned bit-width router (executor/bit_router.py, `moelab train-bit-router`): the
    levels it chose from each token's hidden state reach the allocator as Routing.levels (the
    executor's level_fn, or a trace recorded with `trace record --bit-router`)."""
    name = "learned"


ALLOCATOR_CLASSES = {a.name: a for a in (FixedLevel, GateScore, Capacity, Shares, ResidentFirst,
                                         StaticImportance, TraceLevels, Learned)}
