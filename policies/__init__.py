"""Policies behind one interface (policies/base.py), registered by name (policies/registry.py),
each declaring its options (policies/options.py); the decision point both engines share is
policies/bundle.py.
"""
from __future__ import annotations

from policies.base import (Allocator, BudgetError, Demand, Key, LoadItem, NeedsFuture, PolicyContext, Routing,
                           Scheduler, load_item, needed_keys)
from policies.bundle import Decision, Load, Policies, build_online_policies, build_policies
from policies.cache import CachePolicy
from policies.options import Option, declared
from policies.prefetch import Prefetcher
from policies.registry import (ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS, caches_for, lookup, make_allocator,
                               make_cache, make_prefetcher, make_scheduler, register)

__all__ = ["Allocator", "BudgetError", "CachePolicy", "Demand", "Key", "LoadItem", "NeedsFuture", "PolicyContext",
           "Routing", "Scheduler", "Prefetcher", "Option", "declared", "load_item", "needed_keys", "CACHES",
           "SCHEDULERS", "ALLOCATORS", "PREFETCHERS", "caches_for", "make_cache", "make_scheduler", "make_allocator",
           "make_prefetcher", "register", "lookup", "Policies", "Decision", "Load", "build_policies",
           "build_online_policies"]
