"""Policies behind one interface (policies/base.py), registered by name.

A new policy is one small class registered here; no engine changes.
"""
from __future__ import annotations

from devices.units import ConfigError
from policies.allocators import FixedLevel
from policies.base import (Allocator, BudgetError, Demand, Key, LoadItem, PolicyContext, Routing,
                           Scheduler, load_item, needed_keys)
from policies.cache import FIFO, LFU, LRU, Belady, CachePolicy, OnDemand, StaticHot
from policies.prefetch import LastUse, NextLayerOracle, Prefetcher
from policies.schedulers import FifoScheduler

__all__ = ["Allocator", "BudgetError", "CachePolicy", "Demand", "Key", "LoadItem", "PolicyContext", "Routing",
           "Scheduler", "Prefetcher", "load_item", "needed_keys", "CACHES", "SCHEDULERS", "ALLOCATORS",
           "PREFETCHERS", "make_cache", "make_scheduler", "make_allocator", "make_prefetcher", "register"]

CACHES = {c.name: c for c in (OnDemand, FIFO, LRU, LFU, StaticHot, Belady)}
SCHEDULERS = {s.name: s for s in (FifoScheduler,)}
ALLOCATORS = {a.name: a for a in (FixedLevel,)}
PREFETCHERS = {"none": None} | {p.name: p for p in (LastUse, NextLayerOracle)}


def _pick(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(table)}") from None


def make_cache(name: str, ctx: PolicyContext) -> CachePolicy:
    return _pick(CACHES, "cache policy", name)(ctx)


def make_scheduler(name: str, ctx: PolicyContext) -> Scheduler:
    return _pick(SCHEDULERS, "scheduler", name)(ctx)


def make_allocator(name: str, ctx: PolicyContext, **options) -> Allocator:
    return _pick(ALLOCATORS, "allocator", name)(ctx, **options)


def make_prefetcher(name: str, ctx: PolicyContext) -> Prefetcher | None:
    """None for "none": engines skip the hook entirely."""
    cls = _pick(PREFETCHERS, "prefetcher", name)
    return cls(ctx) if cls is not None else None


def register(table: dict, cls) -> type:
    """Register a policy class under cls.name (use as a decorator on CACHES/SCHEDULERS/ALLOCATORS)."""
    table[cls.name] = cls
    return cls
