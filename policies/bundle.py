"""The one decision point both engines share (DESIGN.md, "the shared policy interface").

`Policies.decide(layer, routing)` asks the policies, in the contract's order, what to do
at one MoE layer of one batch step, and returns a `Decision`:

    demand = allocator.allocate(layer, routing)            # (expert, level) per token
    plan   = scheduler.order(layer, demand, resident)      # ordered load items
    cache.begin_layer(layer, keys, demand)                 # accesses; pin the layer's keys
    for item in plan: cache.admit(item) -> evictions       # never exceeds the budget
    wish   = prefetcher.after_layer(layer, demand, routing)  # the next decision point's keys
    cache.prefetch(wish) -> admitted without evicting a locked key
    + the scheduler's decompression and compute orders, if it sets them

`Policies.finish(layer)` ends the layer (unpin; tiering may drop parts) and returns its
evictions. The simulator, the executor and the cache-only replay call these two and
only carry the decisions out, in simulated time, in real time, or not at all; no engine
spells the sequence out itself. This module imports neither SimPy nor torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, NamedTuple

import numpy as np

from devices.units import format_size
from policies.allocators import FixedLevel, Learned, StaticImportance, TraceLevels
from policies.base import (Allocator, BudgetError, Demand, Key, LoadItem, NeedsFuture, PolicyContext, Routing,
                           Scheduler, layer_demand_bytes, largest_layer_demand, needed_keys)
from policies.cache import CachePolicy
from policies.cost import CostModel
from policies.placement import Placement
from policies.prefetch import Prefetcher
from policies.registry import make_allocator, make_cache, make_prefetcher, make_scheduler
from policies.tiers import LowerLevel, TierDecision, split_demand
from workloads.catalog import ModelArch
from workloads.formats import ExpertFormat
from workloads.stats import popularity
from workloads.workload import Workload

PLAN, PREFETCH = "admit", "prefetch"      # a load's kind, as its timeline record names it


class Load(NamedTuple):
    """One load item to carry out, in storage order: `kind` PLAN (this decision point's demand)
    or PREFETCH (the next one's), with the keys its admission evicted (to drop first)."""
    item: LoadItem
    kind: str
    evicted: list[Key]


_new_load = partial(tuple.__new__, Load)


@dataclass(slots=True)
class Decision:
    """Everything an engine needs to carry out one decision point."""
    layer: int
    demand: Demand
    keys: list[Key]                                   # every needed part (hits and loads)
    hits: int                                         # how many of them were resident already
    loads: list[Load]                                 # plan, then prefetches, in storage order
    decompress_order: list[Key] | None = None         # None: tasks in load order
    compute_order: list[tuple[int, int]] | None = None  # None: in order of readiness
    tiers: TierDecision | None = None                 # with a host level: sources, CPU share (policies/tiers.py)

    def rows(self) -> dict[tuple[int, int], list[int]]:
        """Token rows of each (expert, level) to compute."""
        return self.demand.rows()


# Allocators whose demand is a function of the layer and of these routing arrays alone (no state,
# no cache, no scores): a decision point routed as one seen before gets the same Demand back, and
# with it its needed keys and counts (memoised on it), instead of all of them built again.
# Exact types: a subclass may change what its demand depends on.
PURE_ALLOCATORS = {FixedLevel: ("experts",), StaticImportance: ("experts",), TraceLevels: ("experts", "levels"),
                   Learned: ("experts", "levels")}
MEMO_LIMIT = 1 << 14        # Demands kept at most (decode steps repeat a few thousand routings)


class DemandMemo:
    """`allocate` of a pure allocator (PURE_ALLOCATORS), each distinct routing of a layer once."""

    def __init__(self, allocator: Allocator, table: dict | None = None):
        self.allocator = allocator
        self.fields = PURE_ALLOCATORS[type(allocator)]
        self.with_levels = len(self.fields) > 1
        self.table = {} if table is None else table

    @classmethod
    def of(cls, allocator: Allocator, table: dict | None = None):
        """A memo of `allocator`'s demands, or the allocator itself where they cannot be reused."""
        return cls(allocator, table) if type(allocator) in PURE_ALLOCATORS else allocator

    def allocate(self, layer: int, routing: Routing) -> Demand:
        e = routing.experts
        key = (layer, e.shape, e.dtype.char, e.tobytes())
        if self.with_levels:                                  # and the levels
            levels = routing.levels
            if levels is None:
                return self.allocator.allocate(layer, routing)  # (it says what is missing)
            key += (levels.shape, levels.dtype.char, levels.tobytes())
        demand = self.table.get(key)
        if demand is None:
            demand = self.allocator.allocate(layer, routing)
            if len(self.table) >= MEMO_LIMIT:
                self.table.clear()
            self.table[key] = demand
        return demand


@dataclass
class Policies:
    """A policy bundle: the run's allocator, scheduler, cache and (optional) prefetcher. `demands`:
    a table of demands to reuse (DemandMemo; build_policies shares its probe's). `lower`: the host
    RAM level under the accelerator's cache, `placement`: where each expert computes (both
    optional, policies/tiers.py and policies/placement.py; placement needs the host level)."""
    allocator: Allocator
    scheduler: Scheduler
    cache: CachePolicy
    prefetcher: Prefetcher | None = None
    demands: dict | None = None
    capacities: Sequence[int] | None = None    # the shared KV mode: the expert capacity of each step
    lower: LowerLevel | None = None
    placement: Placement | None = None

    def __post_init__(self):
        self.allocator.cache = self.cache         # an allocator may read residency and the budget
        if self.placement is not None:
            assert self.lower is not None, "a CPU placement computes from host RAM: it needs the host level"
            self.placement.cache, self.placement.lower = self.cache, self.lower
        self.fmt = self.cache.ctx.fmt
        self.allocate = DemandMemo.of(self.allocator, self.demands).allocate
        # a scheduler that keeps the base class's orders (None: the engines' defaults) is not asked
        s = type(self.scheduler)
        self._orders = (s.decompress_order is not Scheduler.decompress_order
                        or s.compute_order is not Scheduler.compute_order)

    def decide(self, layer: int, routing: Routing) -> Decision:
        demand = self.allocate(layer, routing)
        if self.lower is not None:
            return self._tiered(layer, demand, routing)
        cache, sched = self.cache, self.scheduler
        plan = sched.order(layer, demand, cache.resident(layer))
        keys = needed_keys(demand, self.fmt)
        hits = cache.begin_layer(layer, keys, demand)
        admit = cache.admit
        loads = [_new_load((item, PLAN, admit(item))) for item in plan] if plan else []
        if self.prefetcher is not None:
            for item, evicted in cache.prefetch(self.prefetcher.after_layer(layer, demand, routing)):
                loads.append(_new_load((item, PREFETCH, evicted)))
        if not self._orders:
            return Decision(layer, demand, keys, hits, loads)
        return Decision(layer, demand, keys, hits, loads, sched.decompress_order(layer, plan),
                        sched.compute_order(layer, demand, plan))

    def _tiered(self, layer: int, demand: Demand, routing: Routing) -> Decision:
        """decide with a host level: the placement first (the scheduler and the accelerator's cache
        see the accelerator's share only), the accelerator's sequence as in decide, then the host
        level routes its loads and the CPU share's parts. Decision.demand is the accelerator's share."""
        placement, cpu = {}, None
        if self.placement is not None:
            placement = self.placement.place(layer, demand)
            if any(where == "cpu" for where in placement.values()):
                gpu, cpu = split_demand(demand, placement)
            else:
                gpu = demand
        else:
            gpu = demand
        cache, sched = self.cache, self.scheduler
        plan = sched.order(layer, gpu, cache.resident(layer))
        keys = needed_keys(gpu, self.fmt)
        hits = cache.begin_layer(layer, keys, gpu)
        loads = [_new_load((item, PLAN, cache.admit(item))) for item in plan]
        if self.prefetcher is not None:
            for item, evicted in cache.prefetch(self.prefetcher.after_layer(layer, gpu, routing)):
                loads.append(_new_load((item, PREFETCH, evicted)))
        orders = (sched.decompress_order(layer, plan), sched.compute_order(layer, gpu, plan)) if self._orders \
            else (None, None)
        return Decision(layer, gpu, keys, hits, loads, *orders,
                        tiers=self.lower.route(layer, demand, loads, cpu, placement))

    def finish(self, layer: int) -> list[Key]:
        if self.lower is not None:
            self.lower.end_layer(layer)           # its drops: self.lower.finished
        return self.cache.end_layer(layer)

    def begin_step(self, step: int) -> list[Key]:
        """A batch step starts: in the shared KV mode the cache takes the step's capacity (what the
        KV leaves, workloads/memory.py) and returns what it evicted to fit; else nothing happens.
        Every engine calls it before the step's first decision point."""
        if self.capacities is None:
            return []
        return self.cache.resize(self.capacities[step])

    def report(self) -> dict:
        """The policies' own counters (engines put them in the timeline's meta)."""
        out = {}
        for policy in (self.allocator, self.scheduler, self.cache, self.prefetcher, self.placement):
            report = getattr(policy, "report", None)
            if report is not None:
                out.update(report())
        return out

    def names(self) -> dict:
        return {"cache": self.cache.name, "scheduler": self.scheduler.name, "allocator": self.allocator.name,
                "prefetcher": self.prefetcher.name if self.prefetcher else "none"}


# -- walking a workload -----------------------------------------------------------------------
_routing = partial(tuple.__new__, Routing)     # a Routing from a full 4-tuple, without NamedTuple's __new__


def workload_routings(workload: Workload) -> Iterator[tuple[object, int, Routing]]:
    """(step, layer, routing) of every decision point, in engine order."""
    for step in workload.steps:
        for layer, routing in enumerate(step_routings(workload, step)):
            yield step, layer, routing


def step_routings(workload: Workload, step) -> list[Routing]:
    """The routing of each MoE layer of a step, in layer order (each array a view of the step's)."""
    experts, scores, levels = workload.routing_arrays(step)
    pred = step_predictions(workload, step)
    if levels is None and pred is None:      # (the common trace: a layer's routing is two views)
        return [_routing((experts[layer], scores[layer], None, None)) for layer in range(workload.model.layers)]
    return [_routing((experts[layer], scores[layer], None if levels is None else levels[layer],
                      None if pred is None else (pred[0][layer], pred[1][layer])))
            for layer in range(workload.model.layers)]


def step_predictions(workload: Workload, step):
    """The gate-lookahead predictions recorded with the trace for a step, (ids, probabilities)
    each [layers, tokens, P], or None (Routing.predicted, policies/lookahead.py)."""
    t = workload.trace
    if getattr(t, "predicted", None) is None:
        return None
    return t.predicted[step.tokens].transpose(1, 0, 2), t.predicted_scores[step.tokens].transpose(1, 0, 2)


def access_sequence(workload: Workload, allocator: Allocator) -> list[list[Key]]:
    """Needed keys at every decision point, in engine order (what offline policies see)."""
    return [needed_keys(allocator.allocate(layer, routing), workload.fmt)
            for _, layer, routing in workload_routings(workload)]


def largest_demand(workload: Workload, allocator: Allocator) -> int:
    """largest_layer_demand of the access sequence, without keeping the sequence."""
    fmt = workload.fmt
    base = allocator.allocator if isinstance(allocator, DemandMemo) else allocator
    if type(base) is FixedLevel:
        return _largest_fixed_demand(workload, base.level)
    return max((layer_demand_bytes(needed_keys(allocator.allocate(layer, routing), fmt), fmt)
                for _, layer, routing in workload_routings(workload)), default=0)


def _largest_fixed_demand(workload: Workload, level: int) -> int:
    """largest_demand of the fixed-level allocator, counted on the trace: each decision point needs
    the parts of `level` of each distinct expert its tokens select (tests/test_fast_path.py checks
    it against the walk through the allocator)."""
    experts, most = workload.trace.experts, 0
    for step in workload.steps:
        sel = np.sort(experts[step.tokens].transpose(1, 0, 2).reshape(workload.model.layers, -1), axis=1)
        if sel.shape[1]:
            most = max(most, int((1 + (np.diff(sel, axis=1) != 0).sum(axis=1)).max()))
    return most * workload.fmt.level_bytes(level)


class LazyFuture(Sequence):
    """The access sequence, computed when a policy first reads it: online policies never do, so a
    run of one builds none (offline ones, belady and the oracle prefetcher, read it at once)."""

    def __init__(self, compute: Callable[[], list]):
        self._compute, self._items = compute, None

    def _get(self) -> list:
        if self._items is None:
            self._items = self._compute()
        return self._items

    def __len__(self):
        return len(self._get())

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())


# -- builders --------------------------------------------------------------------------------
def build_policies(workload: Workload, budget: int, cache: str = "lru", scheduler: str = "fifo",
                   allocator: str = "fixed", prefetch: str = "none", cost: CostModel | None = None,
                   scheduler_options: dict | None = None, cache_options: dict | None = None,
                   prefetch_options: dict | None = None, allocator_options: dict | None = None,
                   future: list | None = None) -> Policies:
    """A bundle for a run whose routing is known in advance (a trace): offline policies
    (belady, static-hot, the oracle prefetcher) may read the whole access sequence. The
    budget must hold the largest single decision point's demand at the levels the allocator
    asks for; below it, the error states the minimum. `future`: that allocator's access
    sequence, when the caller already has it."""
    fmt, model = workload.fmt, workload.model
    allocator_options = allocator_options or {}
    counts = popularity(workload.trace, model.experts)
    base = PolicyContext(fmt, model.layers, model.experts, budget, popularity=counts, cost=cost)
    probe = make_allocator(allocator, base, **allocator_options)
    # a pure allocator's demands are reused: by the probe's walks and then by the run itself
    memo = DemandMemo.of(probe)
    demands = memo.table if memo is not probe else None
    if probe.reads_cache:              # its demand depends on the cache: no sequence in advance
        future = None
        _check_online_minimum(probe, model, fmt, budget)
    else:
        if future is not None:         # (a caller that builds many bundles computes it once)
            minimum = largest_layer_demand(future, fmt)
        elif demands is not None:      # stateless: walk for the minimum now, for the sequence if asked
            future = LazyFuture(partial(access_sequence, workload, memo))
            minimum = largest_demand(workload, memo)
        else:                          # one walk only: an allocator may count its calls
            future = access_sequence(workload, probe)
            minimum = largest_layer_demand(future, fmt)
        if budget < minimum:
            raise BudgetError(f"budget {format_size(budget)} is below the minimum this workload can run with: "
                              f"{format_size(minimum)} ({minimum} B = the largest single-layer demand at the "
                              f"levels the {allocator!r} allocator asks for)")
    ctx = PolicyContext(fmt, model.layers, model.experts, budget, future=future, popularity=counts, cost=cost)
    try:
        return Policies(make_allocator(allocator, ctx, **allocator_options),
                        make_scheduler(scheduler, ctx, **(scheduler_options or {})),
                        make_cache(cache, ctx, **(cache_options or {})),
                        make_prefetcher(prefetch, ctx, **(prefetch_options or {})), demands=demands)
    except NeedsFuture as e:
        raise BudgetError(f"{e.args[0]}, which the {allocator!r} allocator makes unknowable in advance (its "
                          f"choices read the cache): use an online policy with it") from None


def build_online_policies(model: ModelArch, fmt: ExpertFormat, budget: int, cache: str = "lru",
                          scheduler: str = "fifo", allocator: str = "fixed", prefetch: str = "none",
                          cost: CostModel | None = None, scheduler_options: dict | None = None,
                          cache_options: dict | None = None, prefetch_options: dict | None = None,
                          allocator_options: dict | None = None) -> Policies:
    """A bundle for routing not known in advance (a real router): no access sequence, so
    offline policies refuse. The budget must hold one decode step."""
    ctx = PolicyContext(fmt, model.layers, model.experts, budget, cost=cost)
    alloc = make_allocator(allocator, ctx, **(allocator_options or {}))
    _check_online_minimum(alloc, model, fmt, budget)
    return Policies(alloc, make_scheduler(scheduler, ctx, **(scheduler_options or {})),
                    make_cache(cache, ctx, **(cache_options or {})),
                    make_prefetcher(prefetch, ctx, **(prefetch_options or {})))


def _check_online_minimum(alloc: Allocator, model: ModelArch, fmt: ExpertFormat, budget: int) -> None:
    """One decode token's experts, each with the parts of every level the allocator may ask."""
    parts = {p for lvl in alloc.levels_used() for p in fmt.parts_of(lvl)}
    per_expert = sum(fmt.resident_bytes[p] for p in parts)
    minimum = min(model.experts, model.top_k) * per_expert
    if budget < minimum:
        raise BudgetError(f"budget {format_size(budget)} is below the minimum of one decode step: "
                          f"{format_size(minimum)} ({model.top_k} experts at the levels the {alloc.name!r} "
                          f"allocator asks for)")
