"""D²MoE's own decisions: bit allocators, HEBF and the budget rule, by hand-made cases, and
identical in both engines."""
import numpy as np
import pytest
import torch

from conftest import make_device
from devices.kernels import Kernel
from executor.execute import execute, strip_experts
from executor.model import model_arch
from executor.store_build import ensure_store
from policies import Demand, Key, PolicyContext, Routing, build_policies, load_item
from policies.allocators import Capacity, GateScore, ResidentFirst, Shares
from policies.cache import BudgetRule
from policies.schedulers import HEBF, FifoScheduler
from sim.engine import Simulator
from test_executor import tiny_model
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

MODEL = ModelArch("m", layers=2, experts=4, top_k=2, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
V1 = make_format("mwq", MODEL.expert_shapes, b1=2, bK=4)


def ctx(capacity=10**9, fmt=V1, layers=2):
    return PolicyContext(fmt, layers, 4, capacity)


def order(plan):
    return [(k.expert, k.part) for k in (item.key for item in plan)]


# -- HEBF ---------------------------------------------------------------------------------------
# Worked example (V1, levels 0..2 = INT2..INT4). Tokens of one step at layer 0:
#   expert A=0: 1 token at INT2, 2 tokens at INT3;  expert B=1: 3 tokens at INT4;  expert C=2: 2 at INT2.
# Queues: A [INT2, INT3], B [INT4], C [INT2].
# exact counts:      A2=1, A3=2, B4=3, C2=2 -> heads A2(1) B4(3) C2(2): B4 (planes 0,1,2),
#                    then A2(1) C2(2): C2 (plane 0), then A2 (plane 0), then A3 (plane 1).
# cumulative counts: A2=3 (all of A's tokens need its base), A3=2, B4=3, C2=2 -> heads A2(3) B4(3)
#                    C2(2): tie, A first in router order -> A2; then A3(2) B4(3) C2(2): B4; then
#                    A3(2) C2(2): A3 (router order), then C2.
DEMAND = Demand(0, ((0, 0), (1, 2)), )
DEMAND = Demand(0, (((0, 0), (1, 2)), ((0, 1), (1, 2)), ((0, 1), (1, 2)), ((2, 0), (3, 0)), ((2, 0), (3, 0))))


def test_hebf_worked_example():
    resident = {Key(0, 3, 0)}                 # expert 3's base plane is resident: never loaded
    assert order(HEBF(ctx()).order(0, DEMAND, resident)) == [(1, 0), (1, 1), (1, 2), (2, 0), (0, 0), (0, 1)]
    assert order(HEBF(ctx(), count="cumulative").order(0, DEMAND, resident)) == \
        [(0, 0), (1, 0), (1, 1), (1, 2), (0, 1), (2, 0)]
    assert order(FifoScheduler(ctx()).order(0, DEMAND, resident)) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_hebf_with_per_width_copies_loads_each_level_its_own_part():
    copies = make_format("copies", MODEL.expert_shapes, b1=2, bK=4)
    # expert 0: 1 token INT2, 2 tokens INT4 -> both copies; INT4 is hotter but comes second in its queue
    d = Demand(0, (((0, 0),), ((0, 2),), ((0, 2),)))
    assert order(HEBF(ctx(fmt=copies)).order(0, d, set())) == [(0, 0), (0, 2)]


def test_hebf_bad_option():
    with pytest.raises(Exception, match="count must be 'exact' or 'cumulative'"):
        HEBF(ctx(), count="hottest")


# -- FIFO's orders ---------------------------------------------------------------------------------
# Token 0 selects expert 2 at INT3 and expert 0 at INT2; token 1 expert 1 at INT4 and expert 2 at
# INT2. Router order (first appearance): 2, 0, 1; expert-ID order: 0, 1, 2; each expert's planes
# ascending (MWQ: the planes of its highest level). Expert 1's base plane is resident.
ROUTED = Demand(0, (((2, 1), (0, 0)), ((1, 2), (2, 0))))


def test_fifo_loads_in_router_or_expert_id_order():
    resident = {Key(0, 1, 0)}
    assert order(FifoScheduler(ctx()).order(0, ROUTED, resident)) == [(2, 0), (2, 1), (0, 0), (1, 1), (1, 2)]
    assert order(FifoScheduler(ctx(), order="expert-id").order(0, ROUTED, resident)) == \
        [(0, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    # zip: an expert's exponent chunks (parts 1-3, each with a decompression task) before its SM bytes
    z = make_format("zip", MODEL.expert_shapes)
    assert order(FifoScheduler(ctx(fmt=z), order="expert-id").order(0, Demand(0, (((2, 0), (0, 0)),)), set())) == \
        [(0, 1), (0, 2), (0, 3), (0, 0), (2, 1), (2, 2), (2, 3), (2, 0)]


def test_fifo_bad_order_and_the_presets_that_load_in_expert_id_order():
    from devices.units import ConfigError
    from policies.presets import get_preset
    with pytest.raises(ConfigError, match="fifo: order must be 'router' or 'expert-id', got 'hottest'"):
        FifoScheduler(ctx(), order="hottest")
    w = Workload(MODEL, synthetic_trace(MODEL, requests=1, prompt_len=0, output_len=2, seed=0), V1)
    with pytest.raises(ConfigError, match="order: must be one of router, expert-id"):
        build_policies(w, 10**9, scheduler_options={"order": "id"})
    for name in ("d2moe-mwq", "d2moe-router", "matryoshka-free"):
        assert build_policies(w, 10**9, **get_preset(name).bundle.kwargs()).scheduler.by_id


# -- the flow-shop bound of reproduce d2moe ------------------------------------------------------------
def test_flow_shop_bound_by_hand():
    from experiments.d2moe_bounds import flow_shop_bound
    from timeline.events import Event

    def io(t0, t1, layer, expert, part, nbytes):
        return Event("io", "load", t0, t1, layer, expert, part, nbytes, 0)

    def comp(t0, t1, layer, expert, level):
        return Event("compute", "expert", t0, t1, layer, expert, level, 0, 0)
    # no latency, 100 B/s; levels as MWQ V1's: level 1 needs parts 0 and 1
    parts = ((0,), (0, 1), (0, 1, 2))
    events = [
        # layer 0: reads E1 (200 B, 0-2 s) then E0 (100 B, 2-3 s); computes E1 2-6 s, E0 6-7 s.
        # actual 7 s. Bound: reads 3 s + shortest waiting compute 1 s = 4 s; computes 5 s + the
        # shortest read one waits for (E0: 1 s) = 6 s -> 6 s
        io(0, 2, 0, 1, 0, 200), io(2, 3, 0, 0, 0, 100), comp(2, 6, 0, 1, 0), comp(6, 7, 0, 0, 0),
        # layer 1 (starts at 10 s): E2 resident (computes 10-11 s); E3 at level 1 reads parts 0 and 1
        # (100 B each, 10-11 s, 11-12 s), computes 12-13 s. actual 3 s. Bound: reads 2 s + 1 s = 3 s;
        # computes 2 s + nothing (E2 waits for no read) = 2 s -> 3 s
        comp(10, 11, 1, 2, 0), io(10, 11, 1, 3, 0, 100), io(11, 12, 1, 3, 1, 100), comp(12, 13, 1, 3, 1),
        # a cache record and a dense part are not the flow shop's
        Event("cache", "admit", 10, 10, 1, 3, 0, 100, 0), Event("dense", "dense", 9, 10, 1, -1, -1, 0, 0),
    ]
    assert flow_shop_bound(events, parts, 0.0, 100.0) == pytest.approx((10.0, 9.0))
    # a 0.5 s latency: layer 0's second bound becomes 5 + 0.5 + 1 = 6.5 s
    assert flow_shop_bound(events, parts, 0.5, 100.0) == pytest.approx((10.0, 9.5))


# -- the budget rule (Algorithm 2) -----------------------------------------------------------------
def test_budget_rule_frees_the_previous_layers_highest_planes_first():
    base, plane = V1.resident_bytes[0], V1.resident_bytes[1]
    # room for layer 0's two INT4 experts plus one more INT4 expert
    cache = BudgetRule(ctx(capacity=3 * (base + 2 * plane)))

    def visit(layer, experts):
        keys = [Key(layer, e, p) for e in experts for p in range(3)]
        cache.begin_layer(layer, keys)
        evicted = []
        for k in keys:
            if k not in cache.sizes:
                evicted += cache.admit(load_item(k, V1))
        cache.end_layer(layer)
        return evicted

    assert visit(0, [0, 1]) == []
    assert visit(1, [0]) == []
    assert visit(0, [0]) == []                # layer 0 expert 0 used twice, expert 1 once
    # layer 1 needs experts 2 and 3 (two whole experts): first its own expert 0, which it did not ask
    # for (needed again only a full cycle on), then layer 0 (the previous layer): expert 1's top
    # plane (used less), expert 0's top plane, then the INT3 planes, then the base planes
    ev = visit(1, [2, 3])
    order = [Key(1, 0, 2), Key(1, 0, 1), Key(1, 0, 0), Key(0, 1, 2), Key(0, 0, 2), Key(0, 1, 1), Key(0, 0, 1),
             Key(0, 1, 0), Key(0, 0, 0)]
    assert len(ev) >= 5 and ev == order[:len(ev)]
    assert cache.used <= cache.capacity


def test_budget_rule_evicts_the_current_layers_unasked_experts_before_the_previous_layer():
    base, plane = V1.resident_bytes[0], V1.resident_bytes[1]
    cache = BudgetRule(ctx(capacity=2 * (base + 2 * plane)))
    for layer, e in ((1, 0), (0, 1)):            # layer 1 expert 0, then layer 0 expert 1
        keys = [Key(layer, e, p) for p in range(3)]
        cache.begin_layer(layer, keys)
        for k in keys:
            cache.admit(load_item(k, V1))
        cache.end_layer(layer)
    keys = [Key(0, 2, p) for p in range(3)]      # layer 0 again, now expert 2
    cache.begin_layer(0, keys)
    assert cache.admit(load_item(keys[0], V1)) == [Key(0, 1, 2), Key(0, 1, 1)]   # not layer 1's expert


# -- allocators ------------------------------------------------------------------------------------
def routing(experts, scores):
    return Routing(np.array(experts), np.array(scores, dtype=np.float32))


def test_gate_score_levels():
    a = GateScore(ctx())
    d = a.allocate(0, routing([[0, 1], [2, 3], [1, 0]], [[0.7, 0.3], [0.9, 0.1], [0.5, 0.5]]))
    assert d.per_token == (((0, 2), (1, 1)), ((2, 2), (3, 0)), ((1, 2), (0, 2)))
    b = GateScore(ctx(), thresholds="0.05,0.4", top1_highest="false")
    assert b.allocate(0, routing([[0, 1]], [[0.7, 0.3]])).per_token == (((0, 2), (1, 1)),)
    with pytest.raises(Exception, match="thresholds needs 2 values"):
        GateScore(ctx(), thresholds="0.5")


def test_capacity_ranks_an_experts_tokens_by_gate_score():
    a = Capacity(ctx())                                           # V1: 0.3 / 0.4 / 0.3
    scores = [0.91, 0.55, 0.12, 0.83, 0.35, 0.74, 0.66, 0.27, 0.48, 0.19]
    d = a.allocate(0, routing([[0]] * 10, [[s] for s in scores]))
    got = [token[0][1] for token in d.per_token]
    ranked = np.argsort(scores)[::-1]
    want = np.empty(10, int)
    want[ranked[:3]], want[ranked[3:7]], want[ranked[7:]] = 2, 1, 0
    assert got == want.tolist()
    assert a.allocate(0, routing([[1]], [[0.5]])).per_token == (((1, 1),),)      # a lone token: INT3
    with pytest.raises(Exception, match="summing to 1"):
        Capacity(ctx(), capacities="0.5,0.4,0.3")


def test_shares_draws_levels_from_a_seeded_hash_of_the_token_and_counts_steps():
    rng = np.random.default_rng(0)
    steps = [[rng.permuted(np.tile(np.arange(4), (64, 1)), axis=1)[:, :2] for _ in range(2)] for _ in range(40)]

    def run(**options):
        a, out = Shares(ctx(), **options), []
        for layers in steps:
            for layer, experts in enumerate(layers):
                out.append(a.allocate(layer, routing(experts, np.ones(experts.shape))).per_token)
        return a, out
    a, first = run(shares="0.25,0.45,0.3")
    assert a.step == len(steps) - 1 and run(shares="0.25,0.45,0.3")[1] == first       # deterministic
    assert run(shares="0.25,0.45,0.3", seed=1)[1] != first
    levels = np.array([lv for d in first for token in d for _, lv in token])
    assert np.bincount(levels, minlength=3) / levels.size == pytest.approx([0.25, 0.45, 0.3], abs=0.02)
    # a step is counted whenever the layer does not increase: the same routing at another step differs
    b = Shares(ctx(), shares="0.25,0.45,0.3")
    r = routing(steps[0][0], np.ones((64, 2)))
    assert b.allocate(0, r).per_token != b.allocate(0, r).per_token
    assert Shares(ctx(), shares="0.5,0.5,0").levels_used() == (0, 1)
    for bad in ("0.5,0.6,0.3", "0.5,0.5"):
        with pytest.raises(Exception, match="summing to 1"):
            Shares(ctx(), shares=bad)
    with pytest.raises(Exception, match="group must be a probability"):
        Shares(ctx(), group=1.5)


def test_shares_group_keeps_the_shares_and_needs_the_top_level_as_the_formula_says():
    from experiments.d2moe_levels import top_need
    rng = np.random.default_rng(1)
    shares, group = (0.25, 0.45, 0.3), 0.75
    a = Shares(PolicyContext(V1, 1, 16, 10**9), shares=list(shares), group=group)
    levels, need, sizes = [], [], []
    for _ in range(400):
        experts = rng.integers(0, 16, size=(24, 1))            # 24 tokens over 16 experts, top-1
        d = a.allocate(0, routing(experts, np.ones(experts.shape)))
        lv = np.array([token[0][1] for token in d.per_token])
        levels += lv.tolist()
        for e in np.unique(experts):
            g = lv[experts[:, 0] == e]
            need.append((g == 2).any())
            sizes.append(len(g))
    assert np.bincount(levels, minlength=3) / len(levels) == pytest.approx(shares, abs=0.02)
    assert np.mean(need) == pytest.approx(top_need(sizes, shares[2], group), abs=0.02)
    assert top_need(sizes, shares[2], group) < top_need(sizes, shares[2], 0.0)
    assert top_need([1, 5], 0.3, 0.0) == pytest.approx((0.3 + 1 - 0.7 ** 5) / 2)        # independent draws
    assert top_need([5], 0.3, 1.0) == pytest.approx(0.3)                                # one draw per group


def test_the_pinned_router_shares_are_the_shipped_routers():
    """A small re-measurement (4 requests x 16 tokens) agrees with the pinned 32 x 64 one to sampling noise."""
    from experiments.d2moe_levels import ROUTER_SHARES, measure_router_shares, shares_option
    got = measure_router_shares(requests=4, tokens=16)
    assert got == pytest.approx(ROUTER_SHARES["v1"], abs=0.05) and sum(got) == pytest.approx(1, abs=1e-3)
    assert sum(shares_option()["shares"]) == pytest.approx(1, abs=1e-6)


def test_resident_first_uses_a_resident_lower_level_and_counts_it():
    from policies.cache import LRU
    cache = LRU(ctx())
    cache.begin_layer(0, [Key(0, 0, 0)])
    cache.admit(load_item(Key(0, 0, 0), V1))                       # expert 0 resident at INT2
    cache.end_layer(0)
    for max_drop, want in ((1, ((0, 1), (1, 2))), (0, ((0, 2), (1, 2)))):
        a = ResidentFirst(ctx(), base="fixed", max_drop=max_drop)   # fixed: INT4 for everyone
        a.cache = cache
        d = a.allocate(0, routing([[0, 1]], [[0.6, 0.4]]))
        assert d.per_token == (want,) if max_drop == 0 else d.per_token == (((0, 2), (1, 2)),)
    a = ResidentFirst(ctx(), base="fixed", level=1, max_drop=1)    # INT3 asked, INT2 resident
    a.cache = cache
    assert a.allocate(0, routing([[0, 1]], [[0.6, 0.4]])).per_token == (((0, 0), (1, 1)),)
    assert a.report() == {"resident_first_asked": 2, "resident_first_substituted": 1,
                          "resident_first_fraction": 0.5}


def test_unknown_allocator_option_names_the_known_ones():
    w = Workload(MODEL, synthetic_trace(MODEL, requests=1, prompt_len=0, output_len=2, seed=0), V1)
    with pytest.raises(Exception, match="capacity: unknown option 'caps'; options: capacities"):
        build_policies(w, 10**9, allocator="capacity", allocator_options={"caps": "1"})


# -- both engines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mwq_store(tmp_path_factory):
    return ensure_store(tiny_model(), tmp_path_factory.mktemp("mwq"), "mwq", quiet=True)


@pytest.mark.parametrize("allocator,options", [("gate-score", {}), ("capacity", {}),
                                               ("shares", {"shares": "0.25,0.45,0.3", "group": 0.7}),
                                               ("resident-first", {"base": "capacity", "max_drop": 2})])
@pytest.mark.parametrize("cache", ["d2moe-budget", "lru"])
def test_d2moe_policies_make_the_same_decisions_in_both_engines(mwq_store, allocator, options, cache):
    fmt, arch = mwq_store.format, model_arch(tiny_model())
    trace = synthetic_trace(arch, requests=4, prompt_len=3, output_len=5, skew=1.0, locality=0.4, seed=7)
    w = Workload(arch, trace, fmt, batch=4)
    budget = 6 * fmt.expert_bytes

    def bundle():
        return build_policies(w, budget, cache=cache, scheduler="hebf", allocator=allocator, allocator_options=options)
    sim_tl = Simulator(make_device(), w, bundle()).run()
    p = bundle()
    run = execute(strip_experts(tiny_model()), mwq_store, p, torch.tensor([[1, 2, 3]]), 0, trace=trace, batch=4,
                  quiet=True)
    assert len(sim_tl.decisions()) > 10 and run.timeline.decisions() == sim_tl.decisions()
    assert len({e.level for e in sim_tl.of("compute")}) > 1            # mixed levels
    key = lambda e: (e.step, e.layer, e.expert, e.level, e.tokens)      # noqa: E731
    assert sorted(map(key, run.timeline.of("compute"))) == sorted(map(key, sim_tl.of("compute")))
    assert run.timeline.meta["policy_report"] == sim_tl.meta["policy_report"]
    if allocator == "resident-first" and cache == "d2moe-budget":   # it leaves lower planes resident
        assert sim_tl.meta["policy_report"]["resident_first_substituted"] > 0


@pytest.mark.parametrize("kernel", [None, Kernel(tokens_per_call=1), Kernel(tokens_per_call=2, dequant="once"),
                                    Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=100.0, gemm_from=3)])
def test_both_engines_decide_alike_under_each_kernel_and_the_simulator_charges_it(mwq_store, kernel):
    from dataclasses import replace
    from policies.cost import CostModel
    fmt, arch = mwq_store.format, model_arch(tiny_model())
    trace = synthetic_trace(arch, requests=4, prompt_len=3, output_len=5, skew=1.0, locality=0.4, seed=7)
    w = Workload(arch, trace, fmt, batch=4)
    dev = make_device(overhead=1e-4)
    dev = replace(dev, compute=replace(dev.compute, kernels={} if kernel is None else {"mwq": kernel}))
    cost = CostModel.build(dev, arch, fmt)

    def bundle():
        return build_policies(w, 6 * fmt.expert_bytes, cache="d2moe-budget", scheduler="hebf", allocator="shares",
                              allocator_options={"shares": "0.25,0.45,0.3"}, cost=cost)
    sim_tl = Simulator(dev, w, bundle(), cost=cost).run()
    run = execute(strip_experts(tiny_model()), mwq_store, bundle(), torch.tensor([[1, 2, 3]]), 0, trace=trace,
                  batch=4, quiet=True)
    assert len(sim_tl.decisions()) > 10 and run.timeline.decisions() == sim_tl.decisions()
    computes = sim_tl.of("compute")
    assert len({e.tokens for e in computes}) > 1
    for e in computes:                          # every call timed by the kernel's cost
        assert e.end - e.start == pytest.approx(cost.expert_seconds(e.level, e.tokens))
    if kernel is not None and kernel.tokens_per_call == 1 and not kernel.gemm_from:
        e = max(computes, key=lambda e: e.tokens)
        assert cost.expert_seconds(e.level, e.tokens) == pytest.approx(e.tokens * cost.expert_seconds(e.level, 1))


def test_a_non_numeric_option_is_a_clear_error():
    w = Workload(MODEL, synthetic_trace(MODEL, requests=1, prompt_len=0, output_len=2, seed=0), V1)
    with pytest.raises(Exception, match=r"fixed: option level: expected a whole number, got 'x'"):
        build_policies(w, 10**9, allocator="fixed", allocator_options={"level": "x"})


def test_the_simulator_charges_the_dequantization_the_executor_does():
    from conftest import make_device
    from policies.cost import CostModel
    device = make_device()
    bf16, mwq = make_format("bf16", MODEL.expert_shapes), V1
    bw = device.compute.memory_bandwidth
    assert CostModel.build(device, MODEL, bf16).expert_seconds(0, 1) == pytest.approx(
        device.expert_time(bf16.level_sizes[0], bf16.params, 1))
    for level in range(mwq.levels):    # packed planes read, BF16 written, BF16 read back by the matmul
        assert CostModel.build(device, MODEL, mwq).expert_seconds(level, 1) == pytest.approx(
            device.expert_time(mwq.level_sizes[level], mwq.params, 1) + 4 * mwq.params / bw)
