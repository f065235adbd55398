"""Policies behind one interface (policies/base.py), registered by name.

A new policy is one small class registered here; no engine changes.
"""
from __future__ import annotations

from devices.units import ConfigError
from policies.allocators import FixedLevel, TraceLevels
from policies.base import (Allocator, BudgetError, Demand, Key, LoadItem, NeedsFuture, PolicyContext, Routing,
                           Scheduler, load_item, needed_keys)
from policies.cache import FIFO, LFU, LRU, Belady, CachePolicy, OnDemand, StaticHot
from policies.prefetch import LastUse, NextLayerOracle, Prefetcher
from policies.schedulers import FifoScheduler

__all__ = ["Allocator", "BudgetError", "CachePolicy", "Demand", "Key", "LoadItem", "NeedsFuture", "PolicyContext",
           "Routing", "Scheduler", "Prefetcher", "load_item", "needed_keys", "CACHES", "SCHEDULERS", "ALLOCATORS",
           "PREFETCHERS", "make_cache", "make_scheduler", "make_allocator", "make_prefetcher", "register", "lookup",
           "Policies", "Decision", "Load", "build_policies", "build_online_policies"]

CACHES = {c.name: c for c in (OnDemand, FIFO, LRU, LFU, StaticHot, Belady)}
SCHEDULERS = {s.name: s for s in (FifoScheduler,)}
ALLOCATORS = {a.name: a for a in (FixedLevel, TraceLevels)}
PREFETCHERS = {"none": None} | {p.name: p for p in (LastUse, NextLayerOracle)}


def lookup(table: dict, kind: str, name: str):
    """The class registered as `name`, or a clear error listing the known names."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(table)}") from None


def make_cache(name: str, ctx: PolicyContext) -> CachePolicy:
    return lookup(CACHES, "cache policy", name)(ctx)


def make_scheduler(name: str, ctx: PolicyContext) -> Scheduler:
    return lookup(SCHEDULERS, "scheduler", name)(ctx)


def make_allocator(name: str, ctx: PolicyContext, **options) -> Allocator:
    return lookup(ALLOCATORS, "allocator", name)(ctx, **options)


def make_prefetcher(name: str, ctx: PolicyContext) -> Prefetcher | None:
    """None for "none": engines skip the hook entirely."""
    cls = lookup(PREFETCHERS, "prefetcher", name)
    return cls(ctx) if cls is not None else None


def register(table: dict, cls) -> type:
    """Register a policy class under cls.name (use as a decorator on CACHES/SCHEDULERS/ALLOCATORS)."""
    table[cls.name] = cls
    return cls


# the decision point and the bundle builders use the registries above
from policies.bundle import Decision, Load, Policies, build_online_policies, build_policies  # noqa: E402
