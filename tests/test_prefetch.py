"""Prefetchers and the cache's prefetch admission (policies/prefetch.py, CachePolicy.prefetch)."""
import pytest

from conftest import TINY, make_trace
from policies import BudgetError, Key, PolicyContext, load_item, make_cache, make_prefetcher
from policies.allocators import FixedLevel
from policies.base import Routing
from policies import build_online_policies, build_policies
from workloads.workload import Workload
from workloads.formats import make_format

FMT = make_format("bf16", TINY.expert_shapes)
E = FMT.expert_bytes


def demand(layer, experts):
    import numpy as np
    alloc = FixedLevel(PolicyContext(FMT, TINY.layers, TINY.experts, 10 * E))
    return alloc.allocate(layer, Routing(np.array([experts]), np.ones((1, len(experts)), dtype=np.float32)))


def test_last_use_proposes_what_the_next_layer_needed_last_time():
    pf = make_prefetcher("last-use", PolicyContext(FMT, TINY.layers, TINY.experts, 10 * E))
    assert pf.after_layer(0, demand(0, [1])) == []              # layer 1 not seen yet
    assert pf.after_layer(1, demand(1, [0])) == [Key(0, 1, 0)]  # wraps to layer 0 of the next step
    assert pf.after_layer(0, demand(0, [0])) == [Key(1, 0, 0)]


def test_oracle_reads_the_next_decision_point_and_needs_a_trace():
    w = Workload(TINY, make_trace([[[0], [1]], [[1], [0]]]), FMT)
    pol = build_policies(w, 4 * E, prefetch="oracle")
    pf = pol.prefetcher
    assert [pf.after_layer(i % 2, None) for i in range(4)] == [[Key(1, 1, 0)], [Key(0, 1, 0)], [Key(1, 0, 0)], []]
    with pytest.raises(BudgetError, match="access sequence"):
        build_online_policies(TINY, FMT, 4 * E, prefetch="oracle")


def test_unknown_prefetcher_names_the_known_ones():
    from devices.units import ConfigError
    with pytest.raises(ConfigError, match="last-use"):
        build_online_policies(TINY, FMT, 4 * E, prefetch="psychic")


@pytest.mark.parametrize("cache", ["lru", "fifo", "lfu", "on-demand"])
def test_prefetch_admission_keeps_pins_and_the_budget(cache):
    c = make_cache(cache, PolicyContext(FMT, TINY.layers, 4, 3 * E))
    c.begin_layer(0, [Key(0, 0, 0)])
    c.admit(load_item(Key(0, 0, 0), FMT))
    c.admit(load_item(Key(0, 1, 0), FMT))            # unpinned, evictable
    got = c.prefetch([Key(1, 0, 0), Key(1, 1, 0), Key(1, 2, 0)])
    # (0,0,0) is pinned: room for two prefetches, the second evicting (0,1,0); the third must not
    # evict the first prefetch
    assert [item.key for item, _ in got] == [Key(1, 0, 0), Key(1, 1, 0)]
    assert [ev for _, ev in got] == [[], [Key(0, 1, 0)]]
    assert c.used == 3 * E <= c.capacity
    assert c.end_layer(0) == ([Key(0, 0, 0)] if cache == "on-demand" else [])   # prefetched keys stay


def test_prefetch_pins_wished_keys_already_resident():
    c = make_cache("lru", PolicyContext(FMT, TINY.layers, 4, 2 * E))
    c.begin_layer(1, [])
    c.admit(load_item(Key(1, 0, 0), FMT))            # least recently used, but wished for next
    c.admit(load_item(Key(0, 3, 0), FMT))
    got = c.prefetch([Key(1, 0, 0), Key(1, 1, 0)])
    assert [(item.key, ev) for item, ev in got] == [(Key(1, 1, 0), [Key(0, 3, 0)])]
