"""Layer-aware eviction (policies/layered.py): what the layer-cyclic model predicts, Belady as
the bound, libCacheSim where it has the same policy, the budget, and both engines."""
import libcachesim as lcs
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_within_budget, make_device, make_trace, requested
from devices.units import ConfigError
from executor.execute import execute, strip_experts
from executor.model import model_arch
from executor.store_build import ensure_store
from policies import build_policies
from policies.layered import LAYERED_CACHES, layer_shares
from sim.engine import Simulator
from sim.replay import replay_capacities, replay_policies
from test_executor import tiny_model
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

LAYERED = [c.name for c in LAYERED_CACHES]


def model(layers=8, experts=8, k=2):
    return ModelArch("cyc", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)


def decode_workload(m, tokens=120, seed=0):
    trace = synthetic_trace(m, requests=1, prompt_len=0, output_len=tokens, seed=seed)
    return Workload(m, trace, make_format("bf16", m.expert_shapes))


def test_below_one_tokens_working_set_layer_aware_policies_beat_lru_by_a_wide_margin():
    m = model()
    w = decode_workload(m)
    ws = m.layers * m.top_k                         # one token's working set, in experts
    for cap in (ws - 1, ws * 3 // 4, ws // 2):
        r = {p: replay_capacities(w, p, [cap])[cap] for p in ("lru", "least-stale", "layered-lru", "belady")}
        # global LRU: the oldest keys are the next layers' (used one token ago); a quarter below
        # one token's working set it misses every access
        assert cap == ws - 1 or r["lru"] == 0, (cap, r)
        for p in ("least-stale", "layered-lru"):
            assert r[p] > r["lru"] + 0.25 and r[p] > 0.6 * r["belady"], (cap, p, r)


def test_at_exactly_one_tokens_working_set_lru_is_the_per_layer_lru():
    # with capacity layers x k, global LRU holds exactly the previous token's experts: a miss at
    # layer c evicts a key of layer c itself, as k slots per layer would
    m = model()
    w = decode_workload(m, seed=3)
    ws = m.layers * m.top_k
    ratios = {p: replay_capacities(w, p, [ws])[ws] for p in ("lru", "layer-lru", "layered-lru", "least-stale")}
    assert len({round(v, 12) for v in ratios.values()}) == 1, ratios


def test_per_layer_lru_equals_libcachesim_lru_on_each_layers_requests():
    m = model(layers=4, experts=10, k=1)
    rng = np.random.default_rng(5)
    p = 1.0 / np.arange(1, 11) ** 1.1
    ex = rng.choice(10, size=(400, 4, 1), p=p / p.sum())
    w = Workload(m, make_trace(ex, num_experts=10), make_format("bf16", m.expert_shapes))
    per_layer = 3
    got = replay_policies(w, build_policies(w, per_layer * 4 * m.expert_bytes, cache="layer-lru"))
    want = 0
    for layer in range(4):
        cache = lcs.LRU(cache_size=per_layer)
        for i, e in enumerate(ex[:, layer, 0].tolist()):
            req = lcs.Request()
            req.obj_id, req.obj_size, req.clock_time = e, 1, i
            want += bool(cache.get(req))
    assert got["hits"] == want


def test_shares_fixed_and_proportional():
    m = model(layers=2, experts=8, k=1)
    ex = np.array([[[0], [i % 8]] for i in range(64)])      # layer 0: one expert; layer 1: all eight
    w = Workload(m, make_trace(ex, num_experts=8), make_format("bf16", m.expert_shapes))
    unit = m.expert_bytes
    fixed = build_policies(w, 10 * unit, cache="layer-lru").cache.shares
    prop = build_policies(w, 10 * unit, cache="layer-lfu", cache_options={"share": "proportional"})
    assert fixed == [5 * unit, 5 * unit]
    assert prop.cache.shares == fixed              # online: nothing seen yet, an equal split
    replay_policies(w, prop)
    # after the run: the split follows the routing seen, re-split at each step's first layer, so the
    # last step's accesses are not in it: layer 0 one expert 63 times, layer 1 seven experts 8 times
    # and one 7 times (tokens 0..62 of i % 8)
    p1 = np.array([8] * 7 + [7]) / 63
    effective = np.exp(-(p1 * np.log(p1)).sum())
    assert prop.cache.shares[1] == int(10 * unit * effective / (1 + effective))
    assert sum(prop.cache.shares) == 10 * unit
    with pytest.raises(ConfigError, match="layer-lru: option share: must be one of fixed, proportional, got 'half'"):
        build_policies(w, 10 * unit, cache="layer-lru", cache_options={"share": "half"})
    # the layer's share full: a miss evicts in its own layer, even with the other layer's room free
    p = build_policies(w, 10 * unit, cache="layer-lru", cache_options={"share": "proportional"})
    tl = Simulator(make_device(), w, p).run()
    assert {e.layer for e in tl.of("cache", "evict")} <= {1}
    assert layer_shares(unit, [0, 0], "fixed", "layer-lru") == [unit - unit // 2, unit // 2]   # rounding to layer 0


def test_page_cache_promotes_on_the_second_access_and_reclaims_the_inactive_tail():
    # one layer, capacity 3 experts, top-1: 0 0 0 (active) 1 2 3 -> 3 evicts 1 (inactive tail), not 0
    m = model(layers=1, experts=6, k=1)
    ex = [[[e]] for e in (0, 0, 0, 1, 2, 3, 0)]
    w = Workload(m, make_trace(ex, num_experts=6), make_format("bf16", m.expert_shapes))
    p = build_policies(w, 3 * m.expert_bytes, cache="page-cache")
    tl = Simulator(make_device(), w, p).run()
    assert [e.expert for e in tl.of("cache", "evict")] == [1]
    assert p.cache.report()["page_cache_activations"] == 1
    lru = Simulator(make_device(), w, build_policies(w, 3 * m.expert_bytes, cache="lru")).run()
    assert [e.expert for e in lru.of("cache", "evict")] == [0, 1]       # LRU loses 0, then reloads it


def test_page_cache_counts_readahead_into_neighbours():
    m = model(layers=1, experts=4, k=1)
    w = Workload(m, make_trace([[[1]]], num_experts=4), make_format("bf16", m.expert_shapes))
    p = build_policies(w, 4 * m.expert_bytes, cache="page-cache")
    replay_policies(w, p)
    page = -(-m.expert_bytes // 4096) * 4096
    assert p.cache.report()["page_cache_readahead_bytes"] == 2 * min(64 * 1024, page)
    with pytest.raises(ConfigError, match="page-cache: option ratio must be a number > 0"):
        build_policies(w, 4 * m.expert_bytes, cache="page-cache", cache_options={"ratio": -1})


# -- properties: Belady bounds every policy; the budget holds; every expert is computed --------
@st.composite
def cases(draw):
    layers, experts, k = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(1, 2))
    k = min(k, experts)
    tokens, seed = draw(st.integers(1, 30)), draw(st.integers(0, 10**6))
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    return layers, experts, k, ex, rng.integers(0, 3, tokens), draw(st.integers(1, 3)), \
        draw(st.sampled_from(LAYERED)), draw(st.integers(0, layers * experts))


@settings(max_examples=80, deadline=None)
@given(cases())
def test_belady_bounds_every_layer_aware_policy(case):
    layers, experts, k, ex, req, batch, policy, extra = case
    m = model(layers, experts, k)
    w = Workload(m, make_trace(ex, request_ids=req, num_experts=experts), make_format("bf16", m.expert_shapes),
                 batch=batch)
    per_layer = max(len(keys) for keys in build_policies(w, 10**12).cache.ctx.future)
    cap = per_layer * (layers if policy.startswith("layer-") else 1) + extra
    ours = replay_policies(w, build_policies(w, cap * m.expert_bytes, cache=policy))
    best = replay_policies(w, build_policies(w, cap * m.expert_bytes, cache="belady"))
    assert ours["hits"] <= best["hits"]
    assert ours["peak_bytes"] <= cap * m.expert_bytes


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from(["mwq", "copies", "zip"]), st.sampled_from(["none", "last-use", "oracle"]))
def test_budget_holds_and_every_requested_expert_is_computed(case, fmt_name, prefetch):
    layers, experts, k, ex, req, batch, policy, extra = case
    rng = np.random.default_rng(extra)
    m = model(layers, experts, k)
    fmt = make_format(fmt_name, m.expert_shapes, **({"b1": 2, "bK": 4} if fmt_name != "zip" else {}))
    trace = make_trace(ex, request_ids=req, num_experts=experts)
    allocator = "fixed"
    if fmt_name != "zip":
        trace.levels = rng.integers(0, fmt.levels, ex.shape).astype(np.uint8)
        allocator = "trace-levels"
    w = Workload(m, trace, fmt, batch=batch)
    budget = max((experts * k * 3 + extra) * max(fmt.resident_bytes) * layers, 2 * experts * fmt.expert_bytes)
    p = build_policies(w, budget, cache=policy, allocator=allocator, prefetch=prefetch)
    tl = Simulator(make_device(), w, p).run()
    assert_within_budget(tl, budget)
    levels = trace.levels if trace.levels is not None else np.full(ex.shape, fmt.levels - 1)
    want = requested(w.steps, ex, levels)
    assert {(e.step, e.layer, e.expert, e.level): e.tokens for e in tl.of("compute")} == want


# -- both engines, the same decisions --------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {name: ensure_store(tiny_model(), root / name, name, quiet=True) for name in ("mwq", "zip")}


@pytest.mark.parametrize("fmt_name,allocator,cache,prefetch", [
    ("mwq", "trace-levels", "least-stale", "last-use"),
    ("mwq", "trace-levels", "layered-lru", "none"),
    ("zip", "fixed", "layer-lfu", "none"),
    ("zip", "fixed", "page-cache", "last-use"),
    ("mwq", "fixed", "layer-lru", "last-use"),
])
def test_both_engines_make_the_same_decisions(stores, fmt_name, allocator, cache, prefetch):
    store = stores[fmt_name]
    fmt, arch = store.format, model_arch(tiny_model())
    per_layer = cache.startswith("layer-")          # a pool per layer: shorter prompts, a larger budget
    trace = synthetic_trace(arch, requests=2, prompt_len=1 if per_layer else 3, output_len=5, skew=1.0,
                            locality=0.5, seed=len(cache))
    trace.levels = np.random.default_rng(1).integers(0, fmt.levels, trace.experts.shape).astype(np.uint8)
    w = Workload(arch, trace, fmt, batch=2)
    budget = (13 if per_layer else 9) * sum(fmt.resident_bytes)

    def bundle():
        return build_policies(w, budget, cache=cache, allocator=allocator, prefetch=prefetch)
    sim_tl = Simulator(make_device(workers=1), w, bundle()).run()
    run = execute(strip_experts(tiny_model()), store, bundle(), torch.tensor([[1, 2, 3]]), 0, trace=trace,
                  batch=2, decompress_workers=1, quiet=True)
    assert len(sim_tl.decisions()) > 10 and sim_tl.of("cache", "evict")
    assert run.timeline.decisions() == sim_tl.decisions()
