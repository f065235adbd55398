"""The registries of policies by name, and the factories that build one from its name and options
(each option converted and checked by the class's own declaration, policies/options.py).

A new policy is one small class registered here; no engine changes.
"""
from __future__ import annotations

from devices.units import ConfigError
from policies.allocators import ALLOCATOR_CLASSES
from policies.base import Allocator, PolicyContext, Scheduler
from policies.cache import FIFO, LFU, LRU, Belady, BudgetRule, CachePolicy, OnDemand, StaticHot
from policies.layered import LAYERED_CACHES
from policies.lookahead import LOOKAHEAD_PREFETCHERS
from policies.options import convert
from policies.prefetch import LastUse, NextLayerOracle, Prefetcher
from policies.schedulers import HEBF, FifoScheduler
from policies.zipmoe import ZIPMOE_CACHES
from policies.zipmoe_schedule import LayerStream, NextLayerAll, ZipMoEScheduler

CACHES = {c.name: c for c in (OnDemand, FIFO, LRU, LFU, StaticHot, Belady, BudgetRule, *LAYERED_CACHES,
                              *ZIPMOE_CACHES)}
SCHEDULERS = {s.name: s for s in (FifoScheduler, HEBF, ZipMoEScheduler, LayerStream)}
ALLOCATORS = dict(ALLOCATOR_CLASSES)
PREFETCHERS = {"none": None} | {p.name: p for p in (LastUse, NextLayerOracle, NextLayerAll,
                                                  *LOOKAHEAD_PREFETCHERS)}


def offline_names() -> dict[str, tuple[str, ...]]:
    """Per role, the registered policies that read the run's own future (bounds: `offline = True`)."""
    tables = {"allocator": ALLOCATORS, "scheduler": SCHEDULERS, "cache": CACHES, "prefetch": PREFETCHERS}
    return {role: tuple(n for n, c in table.items() if getattr(c, "offline", False)) for role, table in tables.items()}


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
    """cls(ctx, **options), each option converted and checked by cls's declaration (policies/options.py)."""
    return cls(ctx, **convert(cls, options))


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

