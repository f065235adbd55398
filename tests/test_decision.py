"""The one decision point (policies/bundle.py) and what the papers need from it: both engines
carry out the same Decisions, event for event, for mixed levels, non-prefix levels, a
two-pool cache, a token-weighted cache, an allocator that reads residency and a scheduler
that orders decompression and computes."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import assert_within_budget, make_device, make_trace, requested
from executor.execute import execute, strip_experts
from executor.model import model_arch
from executor.store_build import ensure_store
from policies import (ALLOCATORS, CACHES, SCHEDULERS, Allocator, BudgetError, Demand, build_policies, caches_for,
                      needed_keys)
from policies.cache import LFU, LRU, _LazyHeap
from policies.cost import CostModel
from policies.schedulers import FifoScheduler
from sim.engine import Simulator
from timeline.metrics import compute_metrics
from sim.replay import FAST, replay_capacities, replay_policies, unit_groups
from test_executor import tiny_model
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload


# -- small policies, each using one thing the papers need from the interface ------------------
class TwoPoolLRU(LRU):
    """ZipMoE-like pools: sign+mantissa parts (part 0) in one pool, exponent chunks in another."""
    name = "test-two-pool"

    def __init__(self, ctx):
        super().__init__(ctx)
        sm = ctx.capacity_bytes * 6 // 10
        self.pools = {"sm": sm, "exp": ctx.capacity_bytes - sm}
        self.pool_used = {"sm": 0, "exp": 0}

    def pool(self, key):
        return "sm" if key.part == 0 else "exp"


class TokenWeighted(LFU):
    """Eviction by the tokens that asked for a key since it came in: needs the demand."""
    name = "test-token-weighted"

    def begin_layer(self, layer, keys, demand=None):
        self.tokens = {}
        for (expert, _), n in demand.counts().items():
            self.tokens[expert] = self.tokens.get(expert, 0) + n
        return super().begin_layer(layer, keys, demand)

    def _touch(self, key):
        self.freq[key] += self.tokens.get(key.expert, 1)
        self.heap.push(key, self.freq[key])

    def _insert(self, key):
        self.freq[key] = self.tokens.get(key.expert, 1)   # a prefetch: 1
        self.heap.push(key, self.freq[key])


class Reverse(FifoScheduler):
    """Loads in router order; decompression tasks in reverse; computes most tokens first."""
    name = "test-reverse"

    def decompress_order(self, layer, loads):
        return [item.key for item in reversed(loads) if item.decompress_bytes]

    def compute_order(self, layer, demand, loads):
        counts = demand.counts()
        return sorted(counts, key=lambda pair: (-counts[pair], pair))


class ResidentOrSplit(Allocator):
    """A token's first expert at the top level, the others at level 0 (mixed levels per
    expert in a batch), unless some level of the expert is fully resident: then that one."""
    name = "test-resident"
    reads_cache = True

    def allocate(self, layer, routing):
        fmt, sizes = self.fmt, self.cache.sizes
        per_token = []
        for row in routing.experts.tolist():
            token = []
            for slot, e in enumerate(row):
                have = [lvl for lvl in range(fmt.levels)
                        if all((layer, e, p) in sizes for p in fmt.parts_of(lvl))]
                token.append((e, have[-1] if have else (fmt.levels - 1 if slot == 0 else 0)))
            per_token.append(tuple(token))
        return Demand(layer, tuple(per_token))


@pytest.fixture
def registered(monkeypatch):
    for table, cls in ((CACHES, TwoPoolLRU), (CACHES, TokenWeighted), (SCHEDULERS, Reverse),
                       (ALLOCATORS, ResidentOrSplit)):
        monkeypatch.setitem(table, cls.name, cls)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {name: ensure_store(tiny_model(), root / name, name, quiet=True) for name in ("mwq", "copies", "zip")}


def leveled_trace(arch, fmt, seed):
    trace = synthetic_trace(arch, requests=2, prompt_len=3, output_len=5, skew=1.0, locality=0.5, seed=seed)
    rng = np.random.default_rng(seed)
    trace.levels = rng.integers(0, fmt.levels, trace.experts.shape).astype(np.uint8)
    return trace


def computes_in_order(tl):
    """Per (step, layer), the (expert, level, tokens) of each compute in start order."""
    out = {}
    for e in sorted(tl.of("compute"), key=lambda e: (e.step, e.layer, e.start)):
        out.setdefault((e.step, e.layer), []).append((e.expert, e.level, e.tokens))
    return out


def decompressions_in_order(tl):
    return [(e.step, e.layer, e.expert, e.level) for e in sorted(tl.of("decompress"), key=lambda e: e.start)]


CASES = [  # format, allocator, cache, scheduler, prefetch
    ("mwq", "trace-levels", "lru", "fifo", "none"),               # mixed levels from a trace
    ("copies", "trace-levels", "lru", "fifo", "none"),            # a level is a non-prefix part set
    ("copies", "test-resident", "lfu", "fifo", "last-use"),       # an allocator reading residency
    ("zip", "fixed", "test-two-pool", "fifo", "none"),            # two pools, one budget
    ("zip", "fixed", "lru", "test-reverse", "none"),              # decompression and compute order
    ("mwq", "trace-levels", "test-token-weighted", "test-reverse", "last-use"),   # sees the demand
]


@pytest.mark.parametrize("fmt_name,allocator,cache,scheduler,prefetch", CASES)
def test_both_engines_make_the_same_decisions(registered, stores, fmt_name, allocator, cache, scheduler, prefetch):
    store = stores[fmt_name]
    fmt, arch = store.format, model_arch(tiny_model())
    trace = leveled_trace(arch, fmt, seed=len(fmt_name) + len(cache))
    w = Workload(arch, trace, fmt, batch=2)
    budget = 7 * fmt.expert_bytes

    def bundle():
        return build_policies(w, budget, cache=cache, scheduler=scheduler, allocator=allocator, prefetch=prefetch)
    sim_tl = Simulator(make_device(workers=1), w, bundle()).run()
    run = execute(strip_experts(tiny_model()), store, bundle(), torch.tensor([[1, 2, 3]]), 0, trace=trace,
                  batch=2, decompress_workers=1, quiet=True)
    assert len(sim_tl.decisions()) > 10
    assert run.timeline.decisions() == sim_tl.decisions()
    levels = {e.level for e in sim_tl.of("compute")}
    assert allocator == "fixed" or len(levels) > 1           # the mixed-level cases really mix
    if scheduler == "test-reverse":
        assert computes_in_order(run.timeline) == computes_in_order(sim_tl)
        if fmt_name == "zip":
            assert decompressions_in_order(run.timeline) == decompressions_in_order(sim_tl)
    else:
        key = lambda e: (e.step, e.layer, e.expert, e.level, e.tokens)       # noqa: E731
        assert sorted(map(key, run.timeline.of("compute"))) == sorted(map(key, sim_tl.of("compute")))


def test_trace_levels_are_the_levels_computed(stores):
    fmt, arch = stores["copies"].format, model_arch(tiny_model())
    trace = leveled_trace(arch, fmt, seed=4)
    w = Workload(arch, trace, fmt, batch=1)
    tl = Simulator(make_device(), w, build_policies(w, 10**9, allocator="trace-levels")).run()
    want = {}
    for s in w.steps:
        for t in s.tokens:
            for layer in range(arch.layers):
                for e, lvl in zip(trace.experts[t, layer], trace.levels[t, layer]):
                    want[s.index, layer, int(e), int(lvl)] = want.get((s.index, layer, int(e), int(lvl)), 0) + 1
    got = {(e.step, e.layer, e.expert, e.level): e.tokens for e in tl.of("compute")}
    assert got == want
    # copies: each level its own part, so an expert asked at two levels loads both copies
    for e in tl.of("io"):
        assert 0 <= e.level < fmt.levels


def test_trace_levels_without_levels_is_a_clear_error():
    model = ModelArch("m", layers=2, experts=4, top_k=1, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    w = Workload(model, make_trace([[[0], [1]]]), make_format("mwq", model.expert_shapes))
    with pytest.raises(BudgetError, match="trace-levels allocator needs a level"):
        build_policies(w, 10**9, allocator="trace-levels")


def test_two_pools_never_exceed_their_capacities(registered):
    model = ModelArch("m", layers=3, experts=6, top_k=2, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    trace = synthetic_trace(model, requests=3, prompt_len=2, output_len=12, skew=0.5, locality=0.2, seed=2)
    w = Workload(model, trace, fmt, batch=1)
    budget = 10 * fmt.expert_bytes
    p = build_policies(w, budget, cache="test-two-pool")
    tl = Simulator(make_device(), w, p).run()
    used = {"sm": 0, "exp": 0}
    for e in tl.of("cache"):
        pool = "sm" if e.level == 0 else "exp"
        used[pool] += -e.bytes if e.kind == "evict" else e.bytes
        assert used[pool] <= p.cache.pools[pool] and sum(used.values()) <= budget
    assert tl.of("cache", "evict")


def test_token_weighted_cache_keeps_what_more_tokens_asked_for(registered):
    # one layer, capacity 2 experts. Step 0 (prefill, 3 tokens): experts 0 (3 tokens) and 1 (1
    # token... then 1 again); then 2 arrives: plain LFU evicts 0 (count 1 < 2), the token-weighted
    # cache evicts 1 (2 tokens < 3)
    model = ModelArch("m", layers=1, experts=4, top_k=1, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    ex = [[[0]], [[0]], [[0]], [[1]], [[1]], [[2]]]
    trace = make_trace(ex, prompt=[True, True, True, False, False, False], request_ids=[0] * 6)
    fmt = make_format("bf16", model.expert_shapes)
    w = Workload(model, trace, fmt, batch=1)
    evicted = {}
    for cache in ("lfu", "test-token-weighted"):
        tl = Simulator(make_device(), w, build_policies(w, 2 * fmt.expert_bytes, cache=cache)).run()
        evicted[cache] = [e.expert for e in tl.of("cache", "evict")]
    assert evicted == {"lfu": [0], "test-token-weighted": [1]}


def test_belady_refuses_an_allocator_that_reads_the_cache(registered):
    model = ModelArch("m", layers=2, experts=4, top_k=1, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    w = Workload(model, make_trace([[[0], [1]]]), make_format("mwq", model.expert_shapes))
    with pytest.raises(BudgetError, match="belady needs the access sequence.*'test-resident' allocator makes unknowable"):
        build_policies(w, 10**9, cache="belady", allocator="test-resident")


# -- the minimum budget follows what the allocator asks for -----------------------------------
def test_minimum_budget_is_what_the_allocator_demands():
    model = ModelArch("m", layers=2, experts=4, top_k=2, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    fmt = make_format("mwq", model.expert_shapes, b1=2, bK=4)
    w = Workload(model, make_trace([[[0, 1], [2, 3]], [[1, 2], [0, 3]]]), fmt)
    minimum = 2 * fmt.level_bytes(fmt.levels - 1)    # two experts at the fixed allocator's top level
    assert minimum > 2 * fmt.level_bytes(0)          # what the old check used
    with pytest.raises(BudgetError, match=f"\\({minimum - 0} B = the largest single-layer demand"):
        build_policies(w, minimum - 1)
    m = compute_metrics(Simulator(make_device(), w, build_policies(w, minimum)).run())
    assert m["peak_expert_bytes"] <= minimum
    low = build_policies(w, 2 * fmt.level_bytes(0), allocator="fixed", allocator_options={"level": 0})   # INT2 fits in less
    assert low.cache.capacity == 2 * fmt.level_bytes(0)


# -- the cost model ----------------------------------------------------------------------------
def test_cost_model_is_what_the_simulator_charges():
    model = ModelArch("m", layers=1, experts=2, top_k=1, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=1, exponent_ratio=0.5)
    device = make_device(workers=1)
    cost = CostModel.build(device, model, fmt)
    assert cost.read_seconds(192) == pytest.approx(0.02 + 192 / 1920)
    assert cost.decompress_seconds(96, workers=2) == pytest.approx(96 / 2000)
    assert cost.expert_seconds(0, 1) == pytest.approx(192 / 19200 + 2 * 192 / 19200)   # + re-assembly (zip)
    w = Workload(model, make_trace([[[0]]]), fmt)
    tl = Simulator(device, w, build_policies(w, 10**6, cost=cost)).run()
    (comp,) = tl.of("compute")
    assert comp.end - comp.start == pytest.approx(cost.expert_seconds(0, 1))
    (dec,) = tl.of("decompress")
    assert dec.end - dec.start == pytest.approx(cost.decompress_seconds(dec.bytes))
    p = build_policies(w, 10**6, cost=cost)
    assert p.scheduler.ctx.cost is cost and p.cache.ctx.need_cost("x") is cost
    with pytest.raises(BudgetError, match="plans with the device's costs"):
        build_policies(w, 10**6).cache.ctx.need_cost("the test planner")


# -- the executor is SimPy-free ---------------------------------------------------------------
def test_the_executor_never_imports_simpy():
    code = ("import sys, executor.runtime, executor.execute, policies.bundle; "
            "assert 'simpy' not in sys.modules and 'sim.engine' not in sys.modules, 'simpy imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    # nor lazily, inside a function (the profile's calibration simulates: experiments/calibrate.py)
    root = __import__("pathlib").Path(__file__).parents[1] / "executor"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "sim.engine" not in text and "import simpy" not in text, path


# -- replay: every registered policy, the same decisions -----------------------------------------
@st.composite
def replay_cases(draw):
    layers, experts, k = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 2))
    k = min(k, experts)
    tokens, seed = draw(st.integers(1, 25)), draw(st.integers(0, 10**6))
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                   for _ in range(tokens)])
    return layers, experts, k, ex, rng.integers(0, 3, tokens), draw(st.integers(1, 3)), \
        draw(st.sampled_from(sorted(caches_for("bf16")))), draw(st.integers(0, layers * experts))


@settings(max_examples=80, deadline=None)
@given(replay_cases())
def test_replay_gives_the_engines_hit_ratio_for_every_policy(case):
    layers, experts, k, ex, req, batch, policy, extra = case
    model = ModelArch("r", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    trace = make_trace(ex, request_ids=req, num_experts=experts)
    fmt = make_format("bf16", model.expert_shapes)
    w = Workload(model, trace, fmt, batch=batch)
    largest = max(len(keys) for keys in
                  (needed_keys(d, fmt) for d in _demands(w)))
    cap = largest + extra
    ratio = replay_capacities(w, policy, [cap])[cap]
    engine = compute_metrics(Simulator(make_device(), w, build_policies(w, cap * fmt.expert_bytes,
                                                                          cache=policy)).run())
    assert ratio == pytest.approx(engine["hit_ratio"])
    objects = replay_policies(w, build_policies(w, cap * fmt.expert_bytes, cache=policy))["hit_ratio"]
    assert objects == pytest.approx(ratio)        # the fast loops, where used, equal the policy objects
    if policy in FAST:
        groups = unit_groups(trace, w.steps)
        assert FAST[policy](groups, cap) == round(objects * sum(map(len, groups)))
    assert replay_capacities(w, policy, [largest - 1])[largest - 1] is None


def _demands(w):
    from policies.allocators import FixedLevel
    from policies.base import PolicyContext
    from policies.bundle import workload_routings
    alloc = FixedLevel(PolicyContext(w.fmt, w.model.layers, w.model.experts, 0))
    return [alloc.allocate(layer, routing) for _, layer, routing in workload_routings(w)]


def test_lazy_heap_passes_over_and_keeps_entries():
    h = _LazyHeap()
    for key, prio in (("a", 3), ("b", 1), ("c", 2)):
        h.push(key, prio)
    h.push("b", 5)                                  # b's old entry is stale now
    it = iter(h)
    assert next(it) == "c" and next(it) == "a"
    it.close()                                      # c and a go back
    h.discard("c")
    assert list(h) == ["a", "b"]


# -- invariants with mixed and non-prefix levels --------------------------------------------------
@st.composite
def leveled_cases(draw):
    layers, experts, k = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 2))
    k = min(k, experts)
    tokens, seed = draw(st.integers(1, 20)), draw(st.integers(0, 10**6))
    fmt_name = draw(st.sampled_from(["mwq", "copies"]))
    return layers, experts, k, tokens, seed, fmt_name, draw(st.integers(1, 3)), \
        draw(st.sampled_from(sorted(caches_for(fmt_name)) + ["test-two-pool", "test-token-weighted"])), \
        draw(st.sampled_from(["none", "last-use", "oracle"])), draw(st.integers(0, 2 * layers * experts))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(leveled_cases())
def test_invariants_with_levels_from_the_trace(registered, case):
    layers, experts, k, tokens, seed, fmt_name, batch, cache, prefetch, extra = case
    rng = np.random.default_rng(seed)
    model = ModelArch("p", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    fmt = make_format(fmt_name, model.expert_shapes, b1=2, bK=4)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    trace = make_trace(ex, prompt=rng.random(tokens) < 0.3, request_ids=rng.integers(0, 3, tokens),
                       num_experts=experts)
    trace.levels = rng.integers(0, fmt.levels, ex.shape).astype(np.uint8)
    w = Workload(model, trace, fmt, batch=batch)
    budget = (experts * k + extra) * max(fmt.resident_bytes)      # a layer never needs more than this
    budget = max(budget, 2 * experts * fmt.expert_bytes)
    p = build_policies(w, budget, cache=cache, allocator="trace-levels", prefetch=prefetch)
    tl = Simulator(make_device(), w, p).run()
    assert_within_budget(tl, budget)
    want = requested(w.steps, ex, trace.levels)
    assert {(e.step, e.layer, e.expert, e.level): e.tokens for e in tl.of("compute")} == want
    loads = {}
    for e in tl.of("io"):
        loads.setdefault((e.layer, e.expert, e.level), []).append(e.end)
    resident = set()
    for e in sorted(tl.events, key=lambda e: (e.start, e.resource != "cache")):
        if e.resource == "cache":
            (resident.discard if e.kind == "evict" else resident.add)((e.layer, e.expert, e.level))
        elif e.resource == "compute":       # every part of its level is resident, its load done
            for part in fmt.parts_of(e.level):
                assert (e.layer, e.expert, part) in resident
                assert any(end <= e.start + 1e-12 for end in loads[e.layer, e.expert, part])
