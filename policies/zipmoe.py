"""ZipMoE's cache (ICML'26) in two modes: as its released code (HEAD 1d0a56a) runs it, and corrected
where a released behaviour is a defect; papers.md, ZipMoE §2.

An expert in the zip format is part 0 (sign+mantissa bytes, "SM", raw) and parts 1..K (the
compressed exponent chunks, each a decompression task). ZipMoE keeps experts in two tiers:

- *full*: SM bytes + decompressed exponents, ready to compute (a BF16 slot, 2 bytes a weight);
- *SM-only*: the SM bytes alone (1 byte a weight); next time only the exponent chunks are read
  and decompressed (a Type-II task; an expert with nothing cached is Type-I).

`ZipMoECache` holds the two pools plus a *dock* for the current layer's loads (the released code's
per-expert docks). At each use of an expert its rank in its layer (tokens so far this batch) picks
its tier (`proactive_decision`); the tier is applied when the layer ends, in the order the tasks
were dispatched (the order of their loads). Victims by token-weighted LFU, or LRU / LFU / FIFO /
Marking (option `victim`); with any rule but ZipMoE's own every expert is full (`tiers=false`).
The pools' split is fixed (`split`) or planned (PlanCache: policies/zipmoe_plan.py, the corrected
planner; policies/zipmoe_released.py, the released one) from a plan trace, never from the run's own
routing. The scheduler and its bound are in policies/zipmoe_schedule.py.

`mode=released` does what the released code does (memory/cache.cpp, dispatcher/expert_dispatcher.cpp,
tensor_engine/tensor_engine.cpp):

1. the free-slot test is made once per layer, when the layer's experts are enqueued: every expert
   of the layer sees the pools as the previous layer left them, and an expert's own slot is not
   free, so an SM-only expert whose rank asks for a full slot is promoted;
2. a full-pool hit is always NORMAL (stays full; its rank still counts);
3. a hit credits the victim rule (tokens for ZipMoE's LFU, +1 for LFU, the time for LRU) only in
   the full pool: an SM-only expert keeps the count it was registered with;
4. every registration in a pool, a promotion included, starts the count at 1 (and the time now);
5. victims tie-break on the lowest slot index (a pool's free slots are taken from the top);
6. the rank counts restart with every batch (evaluate.py resets them after each one);
7. T_N and T_S are truncated to whole slots, the pools' slot counts rounded up; with any victim
   rule but ZipMoE's own the full pool is `split` (the eval script's 0.95) of the pools and the SM
   pool, unused, the rest; the docks hold one expert per expert of a layer.

`mode=corrected` keeps 1 (promotion), 2, 5, 6 and the rank rule, and corrects the defects. What
each moves alone (Table 1's setting, batch 16 x 64 at 20 GB, DeepSeek / Qwen tok/s; the released
mode with that one behaviour corrected):

- 1: a stale free-slot test lets every expert of a layer claim the same free slot, so all but one
  evict a victim the rule only meant for a full pool, and a cold expert (rank >= T_S), whose rule
  says "not cached", evicts. Corrected: the test counts the slots the layer's earlier decisions
  took (and the SM slots its promotions gave back). +C at 0.6: 7.50 -> 8.12 / 12.73 -> 13.49.
- 3: UpdateOnHit has a branch for the SM pool that never runs (it is called only for experts on
  the GPU), so SM-only experts keep count 1 and the SM pool's victims follow slot order, not use.
  Corrected: a hit credits its expert in either pool. Alone it moves little (7.50 -> 7.50): an
  SM-only expert hit again is mostly promoted.
- 4: the count follows the slot, not the expert: a promoted expert, just proven hot, becomes the
  full pool's first victim. Corrected: an expert keeps its count across tiers (with 3; without it
  the SM count it keeps is 1 anyway: 7.50 -> 7.50).
- 7: with any rule but ZipMoE's own, an SM pool no decision ever uses is memory taken from the full
  pool (Basic: LFU 6.58 -> 7.02 / 10.35 -> 11.27; LRU 3.15 -> 3.15 / 4.14 -> 6.90, past its cliff).
  Corrected: every byte full when there are no tiers; exact thresholds and pool sizes (7.50 ->
  7.49); the dock one token's experts by default (a larger layer borrows from the pools).
- 5 is kept: among equal counts (every newcomer's 1) the lowest slots are reclaimed again and
  again, which evicts the newest and keeps the rest. When a layer sweep needs more experts than the
  pool holds, that resists the thrash least-recent-use ties fall into: Basic with LFU 6.58 with the
  released ties, 5.03 with least-recent-use ties (Qwen 10.35, 6.27); +C 7.50, 7.27.
"""
from __future__ import annotations

import math
import os

import numpy as np

from devices.units import ConfigError
from policies import zipmoe_released as rel
from policies.base import Key, PolicyContext
from policies.cache import CachePolicy, _LazyHeap
from policies.options import Option
from policies.zipmoe_plan import (RankStats, conditional_poisson_weights, cp_inclusion, layer_delay,  # noqa: F401
                                  plan_split, plan_statistics, poisson_binomial, scale_to)
from workloads.formats import ZipFormat

NORMAL, SMCACHE, EVICT = "normal", "smcache", "evict"      # the released code's expert states
VICTIM_RULES = ("tw-lfu", "lru", "lfu", "fifo", "marking")
MODES = ("released", "corrected")
FALLBACK_SPLIT = 0.5         # corrected mode: the full share before a plan
ONLINE = "online"


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


# -- the cache ------------------------------------------------------------------------------------
class ZipMoECache(CachePolicy):
    """Full and SM-only tiers under one budget, ZipMoE's way, released or corrected (module docstring).

    Pools: "full" (F slots of a whole expert), "sm" (S slots of SM bytes) and "dock" (this
    layer's loads and prefetches; bounded by the budget only). A layer's parts are loaded into
    the dock; when the layer ends, each expert it used goes to the tier its decision named
    (`_move`: no bytes move), evicting victims where needed, or is dropped.

    A plan (split=plan) is made at the run's second step, whose tokens say the batch (a decode step
    has one token per request), from `plan_trace`: a trace file, the default (the same model
    synthesised separately, policies/zipmoe_plan.py), or `online` (the run's first plan_after steps). Until then the full share is the released config's 0.6 (corrected:
    0.5). No statistic is ever read from the run's own future."""
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
        Option("window", "int", 64, "statistics window of the corrected planner", unit="decision points"),
        Option("plan_after", "int", 32, "plan_trace=online: steps before planning", unit="steps"),
        Option("dock", "int", None, "bytes kept for loads in flight (default: released, one expert per expert "
                                    "of a layer; corrected, one token's experts)", unit="bytes"),
        Option("mode", "str", "released", "the released code's tier rules, or corrected where they are "
                                          "defects (policies/zipmoe.py says which and why)", choices=MODES),
        Option("planner", "str", None, "PlanCache's math: released or corrected (default: the mode's)",
               choices=MODES),
        Option("plan_trace", "str", None, "the plan's statistics: a trace file, or online (the run's first "
                                          "plan_after steps); default: the model synthesised with another seed",
               special=(ONLINE,)))

    def __init__(self, ctx: PolicyContext, victim: str = "tw-lfu", tiers: bool = True,
                 split: str | float = "plan", margin: float = 0.1, thresholds: str = "pool",
                 window: int = 64, plan_after: int = 32, dock: int | None = None, mode: str = "released",
                 planner: str | None = None, plan_trace: str | None = None):
        super().__init__(ctx)
        require_zip(ctx.fmt, f"the {self.name} cache")
        self._check(victim, thresholds, split, margin, mode, planner, plan_trace)
        self.victim, self.tiers, self.split, self.window, self.plan_after = victim, tiers, split, window, plan_after
        self.margin, self.thresholds, self.mode = float(margin), thresholds, mode
        self.released = mode == "released"
        # the released behaviours the corrected mode changes (module docstring), one switch each
        self.stale_test = self.count_by_slot = self.whole_slots = self.unused_sm = self.released
        self.sm_credit = not self.released
        self.slot_ties = True                              # both modes (module docstring, 5)
        self.planner, self.plan_trace = planner or mode, plan_trace
        self.full_slot, self.sm_slot = sum(ctx.fmt.resident_bytes), ctx.fmt.resident_bytes[0]
        if dock is None:
            top_k = ctx.cost.model.top_k if ctx.cost is not None else 1
            dock = (ctx.experts if self.released else min(ctx.experts, top_k)) * self.full_slot
        self.dock = int(dock)
        self.room = max(0, self.capacity - self.dock)      # what the two tiers share
        self.pools = {"full": 0, "sm": 0, "dock": self.capacity}
        self.pool_used = {"full": 0, "sm": 0, "dock": 0}
        self.hold = {"full": 0, "sm": 0}                   # bytes freed late (released promotions)
        self.deferred: list[int] = []                      # their SM slots, freed with them
        self.tier: dict[tuple[int, int], str] = {}         # cached expert -> "full" | "sm"
        self.n_in = {"full": 0, "sm": 0}
        self.heaps = {"full": _LazyHeap(), "sm": _LazyHeap()}
        self.meta: dict[tuple[int, int], list] = {}        # expert -> [count, last use, inserted, marked]
        self.slot: dict[tuple[int, int], int] = {}         # cached expert -> its slot in its pool
        self.free = {"full": [], "sm": []}                 # free slots, taken from the end
        self.rank_count = np.zeros((ctx.layers, ctx.experts))   # tokens this batch: the decision's rank
        self.decisions: list[tuple[int, str]] = []
        self.dispatched: dict[int, None] = {}              # this layer's experts in the order of their loads
        self.layer = -1
        self.states = {NORMAL: 0, SMCACHE: 0, EVICT: 0}
        self.type2_hits, self.batches, self.steps, self.last_tokens = 0, 0, 0, 0
        self.stats, self.plan_info, self.pending = None, {}, False
        self.source = "fixed"
        if not self.tiers:
            self._set_split(float(split) if self.unused_sm and split != "plan" else
                            rel.EVAL_SHARE if self.unused_sm else 1.0)
        elif split != "plan":
            self._set_split(float(split))
        else:
            self.pending = True
            self._set_split(rel.CONFIG_SHARE if self.released else FALLBACK_SPLIT)
            self.source = "not planned yet (the run ended first)"
            if plan_trace == ONLINE:
                self.stats = RankStats(ctx.layers, ctx.experts, window)
                self.counts = rel.BatchCounts(ctx.layers, ctx.experts)

    def _check(self, victim, thresholds, split, margin, mode, planner, plan_trace) -> None:
        """The options' values a direct construction may get wrong (the factory checks the choices)."""
        n = self.name
        for label, value, allowed in (("victim", victim, VICTIM_RULES), ("thresholds", thresholds, ("pool", "layer")),
                                      ("mode", mode, MODES), ("planner", planner, (None, *MODES))):
            if value not in allowed:
                raise ConfigError(f"{n}: {label} must be one of {', '.join(a for a in allowed if a)}; got {value!r}")
        if split != "plan" and not (isinstance(split, (int, float)) and 0 < float(split) < 1):
            raise ConfigError(f"{n}: split must be 'plan' or a share between 0 and 1; got {split!r}")
        if not 0 <= margin < 1:
            raise ConfigError(f"{n}: margin must be in [0, 1); got {margin!r}")
        if plan_trace not in (None, ONLINE) and not os.path.exists(plan_trace):
            raise ConfigError(f"{n}: plan_trace {plan_trace}: no such file (a trace file `moelab trace import` "
                              f"reads, or online)")

    # -- pools, slots and the plan ----------------------------------------------------------
    def _set_split(self, share: float) -> None:
        self.share = share
        fs, ss = self.full_slot, self.sm_slot
        if self.whole_slots:
            full, sm = rel.released_slots(self.room, share, fs, ss)
            if full * fs + sm * ss > self.capacity:        # a budget too tight to round up in
                full, sm = int(share * self.room) // fs, (self.room - int(share * self.room)) // ss
        else:
            full = int(share * self.room // fs)
            sm = int((self.room - full * fs) // ss) if self.tiers else 0
        self.pools["full"], self.pools["sm"] = full * fs, sm * ss
        self.full_slots, self.sm_slots = full, sm
        self._renumber()

    def _renumber(self) -> None:
        """Slots 0.. to the cached experts of each pool in their slot order, the rest free."""
        for pool, n in (("full", self.full_slots), ("sm", self.sm_slots)):
            held = sorted((self.slot[x], x) for x, t in self.tier.items() if t == pool)
            for i, (_, x) in enumerate(held):
                self.slot[x] = i
            self.free[pool] = list(range(len(held), n))
        self._repush()

    def _plan(self, batch: int) -> None:
        """PlanCache at `batch` requests a step (module docstring; the planners' modules)."""
        self.pending = False
        cost = self.ctx.need_cost("the zipmoe cache's pool plan (PlanCache)")
        model, fmt, L, E = cost.model, self.fmt, self.ctx.layers, self.ctx.experts
        where = "online" if self.plan_trace == ONLINE else self.plan_trace or "default plan trace"
        source = f"{self.planner} planner, {where}, batch {batch}"
        share = None
        if model.name.startswith("switch"):
            why = "a Switch model"
        elif self.planner == "released":
            dist = self.counts.dist() if self.stats is not None else rel.released_rank_dist(
                plan_statistics(self.plan_trace, model, batch, self.window, "counts"), batch)
            why = "fewer plan prompts than the batch"
            if dist is not None:
                share, feasible, self.plan_info = rel.released_plan(dist, model.top_k, L, E, self.room, self.full_slot,
                                                                    self.sm_slot, rel.released_delay(fmt, cost))
                share, why = (share, "") if feasible else (None, "no feasible split")
        else:
            p = self.stats.inclusion() if self.stats is not None else \
                plan_statistics(self.plan_trace, model, batch, self.window, "inclusion")
            if p is not None:
                share, self.plan_info = plan_split(p, L, E, self.room, self.full_slot, self.sm_slot,
                                                   layer_delay(fmt, cost))
            why = "no feasible split"
        if share is None:                                   # the released code falls back to LFU
            self.tiers, self.victim = False, "lfu"
            self._set_split(rel.FALLBACK_SHARE if self.unused_sm else 1.0)
            self.source = f"{source}: LFU fall-back ({why})"
        else:
            self._set_split(share)
            self.source = source

    # -- the victim rules ---------------------------------------------------------------------
    def _priority(self, x) -> tuple:
        count, last, inserted, marked = self.meta[x]
        key = {"tw-lfu": (count,), "lfu": (count,), "lru": (last,), "fifo": (inserted,),
               "marking": (marked, inserted)}[self.victim]
        if self.slot_ties:
            return (*key, self.slot[x])                     # ties: the lowest slot
        return (count, last) if self.victim in ("tw-lfu", "lfu") else key     # ties: least recently used

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
        if old is not None:                                 # a promotion or a demotion
            self.n_in[old] -= 1
            self.heaps[old].discard(Key(x[0], x[1], 0))
            if self.stale_test:                             # its SM slot is given back after the layer's
                self.deferred.append(self.slot.pop(x))      # registrations (when its loads are done)
            else:
                self._free_slot(x, old)
        if old is None or self.count_by_slot:               # a registration sets the count to 1
            self.meta[x] = [1, self.clock, self.clock, 1]
        self.tier[x] = tier
        self.n_in[tier] += 1
        free = self.free[tier]
        self.slot[x] = free.pop() if free else self.full_slots + self.sm_slots + len(self.slot)
        self._push(x)

    def _free_slot(self, x, pool: str) -> None:
        i = self.slot.pop(x)
        if i < (self.full_slots if pool == "full" else self.sm_slots):
            self.free[pool].append(i)

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
        while self.pool_used[pool] + self.hold[pool] + need > self.pools[pool]:
            victim = self._pick(pool)
            if victim is None:
                return False
            dropped.extend(self._evict(victim))
        return True

    # -- the decision point --------------------------------------------------------
    def pool(self, key):
        return "dock"

    def admit(self, item):
        if item.key.layer == self.layer:                    # the order tasks are dispatched in
            self.dispatched.setdefault(item.key.expert, None)
        return super().admit(item)

    def begin_layer(self, layer, keys, demand=None):
        self.clock += 1
        self.layer, self.dispatched = layer, {}
        sizes = self.sizes
        hits = sum(k in sizes for k in keys)
        self.pinned = set(keys)
        tokens: dict[int, int] = {}
        if demand is not None:
            for (e, _), n in demand.counts().items():
                tokens[e] = tokens.get(e, 0) + n
        else:
            tokens = {k.expert: 1 for k in keys}
        if layer == 0:
            self._new_step(len(demand.per_token) if demand is not None else len(tokens))
        if self.stats is not None and self.pending:      # online statistics (both planners')
            self.stats.add(layer, sorted(tokens))
            self.counts.add(layer, tokens)
        for e, n in tokens.items():                         # hits credit the victim rule
            x = (layer, e)
            tier = self.tier.get(x)
            if tier is None:
                continue
            if tier == "sm":
                self.type2_hits += 1
                if not self.sm_credit:                      # the released code credits full hits only
                    continue
            m = self.meta[x]
            m[0] += n if self.victim == "tw-lfu" else 1
            m[1], m[3] = self.clock, 1
            self._push(x)
        self.decisions = self._decide(layer, tokens)
        return hits

    def _new_step(self, tokens: int) -> None:
        """A step begins (its first layer). A batch begins where a step has more tokens than the one
        before (requests only leave a batch decoded in lockstep; a new one starts with its prefill):
        the rank counts restart. The second step says the batch (one token per request): plan then."""
        self.steps += 1
        if tokens > self.last_tokens:
            self.rank_count[:] = 0
            self.batches += 1
            if self.stats is not None:
                self.counts.close()
        self.last_tokens = tokens
        if self.pending and self.steps == (2 if self.stats is None else self.plan_after + 1):
            self._plan(tokens)

    def _decide(self, layer: int, tokens: dict[int, int]) -> list[tuple[int, str]]:
        """ProactiveDecision for each expert of the layer, in router order: its rank (experts of the
        layer with more tokens this batch) against T_N and T_S, and the free slots. A full hit stays
        full. An expert's own slot is not free. Released: the free slots as the layer began (victims
        are found when the layer's tiers are applied). Corrected: less the slots earlier decisions
        took, plus the SM slots promotions give back, and a victim promised only while an unlocked
        expert is in that pool (else not cached)."""
        E = self.ctx.experts
        per = self.ctx.layers if self.thresholds == "layer" else 1
        t_n = self.full_slots / per + self.margin * E
        t_s = t_n + self.sm_slots / per + self.margin * E
        if self.whole_slots:
            t_n, t_s = math.floor(t_n), math.floor(t_s)
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
            if t == "full":
                state, victim_pool = NORMAL, None
            elif self.tiers:
                rank = int((counts > counts[e]).sum())
                state, victim_pool = proactive_decision(rank, t_n, t_s, free["full"] > 0, free["sm"] > 0)
                if state == SMCACHE and t == "sm":
                    victim_pool = None                      # it holds its SM slot already
            else:
                state, victim_pool = (NORMAL, None) if free["full"] > 0 else (NORMAL, "full")
            if not self.stale_test and t != "full":
                state = self._claim(state, victim_pool, t, free, claimable)
            self.states[state] += 1
            out.append((e, state))
        return out

    @staticmethod
    def _claim(state: str, victim_pool: str | None, tier: str | None, free: dict, claimable: dict) -> str:
        """Corrected mode: what one decision takes from the layer's free slots (and victims)."""
        if victim_pool is not None:
            if claimable[victim_pool] > 0:
                claimable[victim_pool] -= 1
            else:
                state = EVICT                               # nothing unlocked to evict: not cached
        elif state == NORMAL:
            free["full"] -= 1
        elif state == SMCACHE and tier is None:
            free["sm"] -= 1
        if tier == "sm" and state != SMCACHE:               # a promotion or a drop gives its SM slot back
            free["sm"] += 1
        return state

    def end_layer(self, layer):
        dropped: list[Key] = []
        state_of = dict(self.decisions)
        order = [e for e in self.dispatched if e in state_of] if self.stale_test else []
        order += [e for e in state_of if e not in self.dispatched or not self.stale_test]
        for e in order:
            self._apply(layer, e, state_of[e], dropped)
        self.hold = {"full": 0, "sm": 0}                    # promotions' SM slots given back
        for i in self.deferred:
            if i < self.sm_slots:
                self.free["sm"].append(i)
        self.deferred = []
        sizes, pool_of = self.sizes, self.pool_of
        for k in sorted(self.by_layer[layer]):              # unused prefetches of this layer
            if k in sizes and pool_of[k] == "dock" and k.expert not in state_of:
                dropped.extend(self._evict(k))
        self.decisions = []
        self.pinned = set()
        shrunk = False
        for pool in ("full", "sm"):                         # a new plan may shrink a pool
            shrunk |= self.pool_used[pool] > self.pools[pool]
            self._make_room(pool, 0, dropped)
        if shrunk:
            self._renumber()
        return dropped

    def _apply(self, layer: int, e: int, state: str, dropped: list) -> None:
        """Expert e goes to the tier of its decision (its registration), evicting victims."""
        x, k0 = (layer, e), Key(layer, e, 0)
        sizes, pool_of = self.sizes, self.pool_of
        if k0 not in sizes:
            return
        if state == NORMAL:
            parts = [Key(layer, e, p) for p in range(self.fmt.n_parts)]
            need = sum(sizes[k] for k in parts if pool_of[k] != "full")
            if self._make_room("full", need, dropped):
                if self.stale_test and pool_of[k0] == "sm":
                    self.hold["sm"] += sizes[k0]            # its SM slot stays taken this layer
                for k in parts:
                    self._move(k, "full")
                self._place(x, "full")
                return
        elif state == SMCACHE:
            dropped.extend(self._evict(Key(layer, e, 1)))   # the exponent chunks go
            if self._make_room("sm", 0 if pool_of[k0] == "sm" else sizes[k0], dropped):
                self._move(k0, "sm")
                self._place(x, "sm")
                return
        dropped.extend(self._evict(k0))                     # EVICT, or no room after all

    # -- the base class's hooks (its budget loop falls back on these) ----------------
    def _forget(self, key):
        if key.part == 0:
            x = (key.layer, key.expert)
            t = self.tier.pop(x, None)
            if t is not None:
                self.n_in[t] -= 1
                self.heaps[t].discard(key)
                self._free_slot(x, t)
                del self.meta[x]                            # eviction resets the count

    def _order(self):
        """When loads outgrow the dock's reserve: prefetched parts not needed now go first
        (speculative), then SM-only experts, then full ones, each by the victim rule."""
        yield from sorted(k for k, pool in self.pool_of.items() if pool == "dock")
        for pool in ("sm", "full"):
            yield from self.heaps[pool]

    def report(self) -> dict:
        info = self.plan_info
        return {"zipmoe_mode": self.mode, "zipmoe_planner": self.planner,
                "zipmoe_full_share": self.share, "zipmoe_split_source": self.source,
                "zipmoe_plan_k": info.get("k"), "zipmoe_victim": self.victim, "zipmoe_full_slots": self.full_slots,
                "zipmoe_sm_slots": self.sm_slots, "zipmoe_decisions_normal": self.states[NORMAL],
                "zipmoe_decisions_smcache": self.states[SMCACHE], "zipmoe_decisions_evict": self.states[EVICT],
                "zipmoe_type2_hits": self.type2_hits, "zipmoe_batches": self.batches}


ZIPMOE_CACHES = (ZipMoECache,)
