"""The host RAM level under the accelerator, as a cache of its own (issue 26, item 2).

The accelerator's level is the bundle's cache policy, unchanged. The level below it (host RAM,
devices/tiers.py) has its own CachePolicy instance, any registered online cache policy, with its
own budget; it sees only this level's accesses: the parts the accelerator loads (its misses and
its prefetches) and the parts of the experts placed on the CPU (policies/placement.py).

At a decision point (Policies.decide, after the accelerator's cache has admitted its loads):
- every part the accelerator loads, and every part a CPU-placed expert needs, is looked up here:
  a hit costs only the copy over the link (or nothing more, for the CPU); a miss is read from
  storage into host RAM first (its source is "storage");
- inclusive on the way in: a missed part is admitted here as it passes (evicting what this
  level's policy says), so a later miss on the accelerator finds it in RAM. This level's
  evictions do not evict the accelerator's copy (no back-invalidation: weights are read-only), so
  the accelerator may hold a part host RAM has since dropped;
- the parts asked for at this decision point are pinned here until it ends, like the
  accelerator's; a prefetch is kept here only if it fits without evicting a pinned part (else it
  passes through RAM to the accelerator without staying: source "storage", no admission).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from devices.units import ConfigError, format_size
from policies.base import Demand, Key, NeedsFuture, PolicyContext, largest_layer_demand, load_item, needed_keys
from policies.cache import CachePolicy
from policies.registry import make_cache, make_placement

HOST, STORAGE = "host-ram", "storage"     # a part's source level
PLAN, PREFETCH = "admit", "prefetch"      # as policies/bundle.py names a load's kind


@dataclass(slots=True)
class TierDecision:
    """The lower level's side of one decision point (Decision.tiers)."""
    sources: list[str]                          # per load of Decision.loads: HOST or STORAGE
    cpu: dict[tuple[int, int], int]             # CPU-placed (expert, level) -> tokens, first-appearance order
    cpu_rows: dict[tuple[int, int], list[int]]  # their token rows (what an executor computes)
    cpu_parts: list[tuple[Key, str]]            # the parts they need, with their source
    records: list[tuple[Key, str, list[Key]]]   # this level's admissions (PLAN / PREFETCH) with their evictions
    hits: int = 0                               # of this level's accesses, how many were resident
    accesses: int = 0
    placement: dict = field(default_factory=dict)   # (expert, level) -> "gpu" | "cpu" (empty: all gpu)


def split_demand(demand: Demand, placement: dict) -> tuple[Demand, Demand]:
    """(the accelerator's share, the CPU's share) of a demand, token rows kept (a token with nothing
    on one side has an empty tuple there)."""
    gpu = tuple(tuple(p for p in token if placement[p] != "cpu") for token in demand.per_token)
    cpu = tuple(tuple(p for p in token if placement[p] == "cpu") for token in demand.per_token)
    return Demand(demand.layer, gpu), Demand(demand.layer, cpu)


class LowerLevel:
    """Host RAM: `cache` (a CachePolicy built with this level's budget) and its name."""

    def __init__(self, cache: CachePolicy, name: str = HOST):
        self.cache = cache
        self.name = name
        self.finished: list[Key] = []       # what the last end_layer dropped (engines record it)

    def route(self, layer: int, demand: Demand, loads, cpu_demand: Demand | None,
              placement: dict) -> TierDecision:
        """The sources of the accelerator's `loads` and of the CPU share's parts, admitting misses."""
        cache, fmt = self.cache, self.cache.fmt
        cpu_keys = needed_keys(cpu_demand, fmt) if cpu_demand is not None else []
        plan = [load.item.key for load in loads if load.kind == PLAN]
        wanted = list(dict.fromkeys(plan + cpu_keys))
        hits = cache.begin_layer(layer, wanted, demand)
        sizes, admit, records = cache.sizes, cache.admit, []
        found = {k for k in wanted if k in sizes}
        for key in wanted:
            if key not in found:
                records.append((key, PLAN, admit(load_item(key, fmt))))
        prefetch = [load.item.key for load in loads if load.kind != PLAN]
        if prefetch:              # resident before this decision point (not just admitted for the CPU share)
            admitted = {key for key, _, _ in records}
            found |= {k for k in prefetch if k in sizes and k not in admitted}
            records += [(item.key, PREFETCH, evicted) for item, evicted in cache.prefetch(prefetch)]
        sources = [HOST if load.item.key in found else STORAGE for load in loads]
        cpu = cpu_demand.counts() if cpu_demand is not None else {}
        return TierDecision(sources, cpu, cpu_demand.rows() if cpu else {},
                            [(k, HOST if k in found else STORAGE) for k in cpu_keys], records, hits, len(wanted),
                            placement)

    def end_layer(self, layer: int) -> list[Key]:
        self.finished = self.cache.end_layer(layer)
        return self.finished



def attach_tiers(policies, budget: int, cache: str = "lru", cache_options: dict | None = None,
                 placement: str = "gpu-only", placement_options: dict | None = None, name: str = HOST) -> None:
    """Give a bundle its host level (a `cache` policy with `budget` bytes) and, unless gpu-only, its
    placement policy. The host level's accesses depend on the accelerator's cache, so its policy must
    be online (belady, static-hot refuse)."""
    ctx = policies.cache.ctx
    if ctx.future is not None:
        minimum = largest_layer_demand(ctx.future, ctx.fmt)
        if budget < minimum:
            raise ConfigError(f"host budget {format_size(budget)} is below the largest single-layer demand "
                              f"{format_size(minimum)} ({minimum} B): the host level holds what a layer loads")
    host_ctx = PolicyContext(ctx.fmt, ctx.layers, ctx.experts, budget, cost=ctx.cost)
    try:
        policies.lower = LowerLevel(make_cache(cache, host_ctx, **(cache_options or {})), name)
    except NeedsFuture as e:
        raise ConfigError(f"host cache {cache}: {e.args[0]}; the host level sees the accelerator's misses, unknown "
                          f"in advance: use an online policy (lru, lfu, fifo, ...)") from None
    if placement != "gpu-only":
        p = make_placement(placement, PolicyContext(ctx.fmt, ctx.layers, ctx.experts, ctx.capacity_bytes,
                                                    cost=ctx.cost), **(placement_options or {}))
        p.cache, p.lower = policies.cache, policies.lower
        policies.placement = p
