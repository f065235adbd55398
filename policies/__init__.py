"""Policies behind one interface (policies/base.py), registered by name.

A new policy is one small class registered here; no engine changes.
"""
from __future__ import annotations

from devices.units import ConfigError
from policies.allocators import (Capacity, FixedLevel, GateScore, Learned, ResidentFirst, StaticImportance,
                                 TraceLevels)
from policies.base import (Allocator, BudgetError, Demand, Key, LoadItem, NeedsFuture, PolicyContext, Routing,
                           Scheduler, load_item, needed_keys)
from policies.cache import FIFO, LFU, LRU, Belady, BudgetRule, CachePolicy, OnDemand, StaticHot
from policies.layered import LAYERED_CACHES
from policies.lookahead import LOOKAHEAD_PREFETCHERS
from policies.prefetch import LastUse, NextLayerOracle, Prefetcher
from policies.schedulers import HEBF, FifoScheduler
from policies.zipmoe import ZIPMOE_CACHES, LayerStream, NextLayerAll, ZipMoEScheduler

__all__ = ["Allocator", "BudgetError", "CachePolicy", "Demand", "Key", "LoadItem", "NeedsFuture", "PolicyContext",
           "Routing", "Scheduler", "Prefetcher", "load_item", "needed_keys", "CACHES", "SCHEDULERS", "ALLOCATORS",
           "PREFETCHERS", "caches_for", "make_cache", "make_scheduler", "make_allocator", "make_prefetcher", "register", "lookup",
           "Policies", "Decision", "Load", "build_policies", "build_online_policies"]

CACHES = {c.name: c for c in (OnDemand, FIFO, LRU, LFU, StaticHot, Belady, BudgetRule, *LAYERED_CACHES,
                              *ZIPMOE_CACHES)}
SCHEDULERS = {s.name: s for s in (FifoScheduler, HEBF, ZipMoEScheduler, LayerStream)}
ALLOCATORS = {a.name: a for a in (FixedLevel, GateScore, Capacity, ResidentFirst, StaticImportance, TraceLevels,
                                  Learned)}
PREFETCHERS = {"none": None} | {p.name: p for p in (LastUse, NextLayerOracle, NextLayerAll,
                                                  *LOOKAHEAD_PREFETCHERS)}


def caches_for(fmt_name: str) -> dict:
    """The registered cache policies that run on format `fmt_name` (a class may name its `formats`)."""
    return {n: c for n, c in CACHES.items() if fmt_name in getattr(c, "formats", (fmt_name,))}


def lookup(table: dict, kind: str, name: str):
    """The class registered as `name`, or a clear error listing the known names."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(table)}") from None


def make_cache(name: str, ctx: PolicyContext, **options) -> CachePolicy:
    return _build(lookup(CACHES, "cache policy", name), ctx, options)


def make_scheduler(name: str, ctx: PolicyContext, **options) -> Scheduler:
    return _build(lookup(SCHEDULERS, "scheduler", name), ctx, options)


def make_allocator(name: str, ctx: PolicyContext, **options) -> Allocator:
    return _build(lookup(ALLOCATORS, "allocator", name), ctx, options)


def _build(cls, ctx: PolicyContext, options: dict):
    """cls(ctx, **options), with an unknown option named against the ones cls takes."""
    import inspect
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if n not in ("self", "ctx") and p.kind is not p.VAR_KEYWORD]
    for key in options:
        if key not in known and not takes_any:
            raise ConfigError(f"{cls.name}: unknown option {key!r}; options: {', '.join(known) or 'none'}")
    if not options:
        return cls(ctx)
    try:
        return cls(ctx, **options)
    except (TypeError, ValueError) as e:        # an option string that is not a number, say
        raise ConfigError(f"{cls.name}: bad option value in {options} ({e})") from None


def make_prefetcher(name: str, ctx: PolicyContext, **options) -> Prefetcher | None:
    """None for "none": engines skip the hook entirely."""
    cls = lookup(PREFETCHERS, "prefetcher", name)
    if cls is None:
        if options:
            raise ConfigError(f"prefetcher none: takes no options, got {options}")
        return None
    return _build(cls, ctx, options)


def register(table: dict, cls) -> type:
    """Register a policy class under cls.name (use as a decorator on CACHES/SCHEDULERS/ALLOCATORS)."""
    table[cls.name] = cls
    return cls


# the decision point and the bundle builders use the registries above
from policies.bundle import Decision, Load, Policies, build_online_policies, build_policies  # noqa: E402
