"""ZipMoE's policies (policies/zipmoe.py): the tier rule and its transitions, the victim rules,
PlanCache's statistics and distributions, the Type-I/II scheduler and its (3 - 1/L) bound, the
read order that lets decompression overlap the raw reads, and both engines making the same
decisions with outputs equal to BF16's."""
import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import assert_within_budget, make_device, make_trace, requested
from devices.units import ConfigError
from executor.execute import execute, strip_experts
from executor.model import model_arch
from executor.store_build import ensure_store
from policies import Policies, Routing, build_policies
from policies.allocators import FixedLevel
from policies.base import Key, PolicyContext
from policies.cost import CostModel
from policies.schedulers import FifoScheduler
from policies.zipmoe import (EVICT, NORMAL, SMCACHE, RankStats, ZipMoECache, conditional_poisson_weights,
                             cp_inclusion, plan_split, poisson_binomial, proactive_decision)
from policies.zipmoe_schedule import ZipMoEScheduler, bound_makespan, dispatch, zipmoe_makespan
from sim.engine import Simulator
from test_executor import tiny_model
from workloads.catalog import ModelArch, get_model
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

ONE = ModelArch("z", layers=1, experts=5, top_k=1, d_model=8, d_ff=8, n_heads=1, n_kv_heads=1)


def hand_bundle(slots_full: int, slots_sm: int, **options) -> Policies:
    """One layer, five experts, zip with 2 chunks; a dock of one expert and pools of exactly
    the given slots (without tiers: the full ones; the released mode's unused SM pool aside).
    Loads in router order (FIFO), so the released mode registers tiers in router order too."""
    fmt = make_format("zip", ONE.expert_shapes, chunks=2)
    full, sm = sum(fmt.resident_bytes), fmt.resident_bytes[0]
    budget = full + slots_full * full + slots_sm * sm
    ctx = PolicyContext(fmt, 1, ONE.experts, budget)
    share = 1.0 if options.get("tiers") is False else slots_full * full / (slots_full * full + slots_sm * sm)
    options = {"split": min(share + 1e-9, 0.99), "margin": 0.0, "dock": full, **options}
    if options.get("tiers") is False:
        options.pop("split")
    cache = ZipMoECache(ctx, **options)
    assert cache.full_slots == slots_full and (options.get("tiers") is False or cache.sm_slots == slots_sm)
    return Policies(FixedLevel(ctx), FifoScheduler(ctx), cache)


def use(p: Policies, expert: int, tokens: int = 1) -> list[Key]:
    """One decision point of the layer: `tokens` tokens all routed to `expert`; returns what
    finishing the layer dropped."""
    p.decide(0, Routing(np.full((tokens, 1), expert), np.ones((tokens, 1), np.float32)))
    return p.finish(0)


def tiers(p: Policies) -> dict:
    return {e: t for (_, e), t in sorted(p.cache.tier.items())}


# -- ProactiveDecision ----------------------------------------------------------------------------
@pytest.mark.parametrize("rank,full_free,sm_free,want", [
    (0, True, True, (NORMAL, None)), (0, False, True, (SMCACHE, None)), (0, False, False, (NORMAL, "full")),
    (2, True, True, (SMCACHE, None)), (2, True, False, (NORMAL, None)), (2, False, False, (SMCACHE, "sm")),
    (5, True, True, (SMCACHE, None)), (5, True, False, (NORMAL, None)), (5, False, False, (EVICT, None)),
])
def test_proactive_decision_follows_the_released_rule(rank, full_free, sm_free, want):
    assert proactive_decision(rank, 1.5, 4, full_free, sm_free) == want       # T_N = 1.5, T_S = 4


def test_tier_transitions_full_to_sm_only_to_dropped():
    # corrected mode; one full slot, two SM slots, margin 0: T_N = 1, T_S = 3 (ranks: tokens this batch)
    p = hand_bundle(1, 2, mode="corrected")
    c = p.cache
    assert use(p, 0, tokens=4) == [] and tiers(p) == {0: "full"}       # rank 0, a full slot free
    use(p, 1)
    assert tiers(p) == {0: "full", 1: "sm"}                              # rank 1: SM-only
    assert c.meta[0, 1][0] == 1                                          # a miss sets the count to 1
    use(p, 1)
    assert c.meta[0, 1][0] == 2 and tiers(p)[1] == "sm"                  # a hit adds its tokens; rank 1
    use(p, 2)                                                            # rank 2: the last SM slot
    assert tiers(p) == {0: "full", 1: "sm", 2: "sm"}
    dropped = use(p, 3)                                                  # rank 2, both full: evict SM's
    assert tiers(p) == {0: "full", 1: "sm", 3: "sm"}                     # lowest count: e2 (1 < 2)
    assert dropped == [Key(0, 3, 1), Key(0, 3, 2), Key(0, 2, 0)]         # e3's chunks; e2 dropped
    for e in (4, 4, 4, 4, 4):                                            # e4 climbs: rank 1, then 0
        use(p, e)
    assert tiers(p)[4] == "full" and 0 not in tiers(p)                   # promoted, evicting e0
    assert c.states[EVICT] == 0
    assert c.pool_used["full"] <= c.pools["full"] and c.pool_used["sm"] <= c.pools["sm"]
    assert c.used == sum(c.sizes.values()) <= c.capacity and c.pool_used["dock"] == 0


@pytest.mark.parametrize("mode,states", [("released", [NORMAL, NORMAL]), ("corrected", [NORMAL, EVICT])])
def test_a_layer_with_nothing_unlocked_to_evict_caches_nothing(mode, states):
    p = hand_bundle(1, 0, tiers=False, mode=mode)      # one full slot, every expert full
    use(p, 0)
    p.decide(0, Routing(np.array([[1], [2]]), np.ones((2, 1), np.float32)))   # two new experts, one slot
    # e1 evicts e0; e2 finds nothing unlocked (corrected: at its decision; released: when it registers)
    assert [s for _, s in p.cache.decisions] == states
    p.finish(0)
    assert tiers(p) == {1: "full"}


@pytest.mark.parametrize("victim,first,second", [("lru", 0, 2), ("lfu", 2, 3), ("tw-lfu", 2, 3), ("fifo", 0, 1),
                                                 ("marking", 0, 2)])
def test_victim_rules(victim, first, second):
    # corrected mode (both modes break ties on the lowest slot); three full slots: e0 takes slot 2,
    # e1 slot 1, e2 slot 0 (free slots go from the top). e3 evicts `first` (LFU: every count 1, so
    # slot 0) and takes its slot; e1 is used again; e4 evicts `second` (LFU: e0 and e3 at 1, e3 lower)
    p = hand_bundle(3, 0, tiers=False, victim=victim, mode="corrected")
    for e in (0, 1, 2):
        use(p, e)
    assert use(p, 3) == [Key(0, first, p) for p in range(3)]
    use(p, 1)
    assert use(p, 4) == [Key(0, second, p) for p in range(3)]


def test_zip_policies_refuse_other_formats():
    fmt = make_format("bf16", ONE.expert_shapes)
    ctx = PolicyContext(fmt, 1, 5, 10**6)
    with pytest.raises(ConfigError, match="the zipmoe cache needs --format zip .*this run is --format bf16"):
        ZipMoECache(ctx)
    with pytest.raises(ConfigError, match="zipmoe scheduler needs --format zip"):
        ZipMoEScheduler(ctx)
    zctx = PolicyContext(make_format("zip", ONE.expert_shapes), 1, 5, 10**6)
    with pytest.raises(ConfigError, match="victim must be one of tw-lfu, lru, lfu, fifo, marking; got 'lifo'"):
        ZipMoECache(zctx, victim="lifo", split=0.5)
    with pytest.raises(ConfigError, match="split must be 'plan' or a share"):
        ZipMoECache(zctx, split=1.5)


# -- PlanCache -------------------------------------------------------------------------------------
def test_conditional_poisson_weights_give_the_inclusion_probabilities():
    pi = np.array([1.0, 0.9, 0.6, 0.25, 0.15, 0.1, 0.0])     # sums to 3
    w = conditional_poisson_weights(pi, 3)
    assert np.isinf(w[0]) and w[-1] == 0
    assert cp_inclusion(w[1:-1], 2) == pytest.approx(pi[1:-1], abs=1e-8)
    # by enumeration: Bernoulli(w/(1+w)) conditioned on exactly 2 of the free ranks
    q = w[1:-1] / (1 + w[1:-1])
    incl, total = np.zeros(5), 0.0
    for bits in itertools.product((0, 1), repeat=5):
        if sum(bits) == 2:
            pr = np.prod([qi if b else 1 - qi for qi, b in zip(q, bits)])
            total += pr
            incl += pr * np.array(bits)
    assert incl / total == pytest.approx(pi[1:-1], abs=1e-8)


def test_poisson_binomial_is_the_distribution_of_the_sum():
    p = [0.1, 0.5, 0.8]
    want = np.zeros(4)
    for bits in itertools.product((0, 1), repeat=3):
        want[sum(bits)] += np.prod([q if b else 1 - q for q, b in zip(p, bits)])
    assert poisson_binomial(p) == pytest.approx(want)


def test_plan_split_takes_the_expectation_over_conditioned_hits():
    # 2 layers, 2 ranks, k = 1: rank 0 is needed 3 times in 4. Pools of 2 full + 2 SM slots
    # (1 + 1 per layer) are the only feasible split of 6 bytes: rank 0 full, rank 1 SM-only, so
    # E[delay] = 0.75 delay(full hit) + 0.25 delay(SM hit) = 0.25 x 10
    delay = lambda full, sm, miss: 10.0 * sm + 100.0 * miss        # noqa: E731
    share, curve = plan_split(np.array([0.75, 0.25]), layers=2, experts=2, pool_bytes=6, full_slot=2, sm_slot=1,
                              delay=delay, smooth=1)
    assert curve["k"] == 1 and curve["shares"] and curve["delay"] == pytest.approx([2.5] * len(curve["delay"]))
    assert int(share * 6 // 2) == 2
    # a share is feasible only with >= `experts` slots in both pools and <= `experts` per layer
    assert plan_split(np.array([0.75, 0.25]), 2, 2, 5, 2, 1, delay)[0] is None


def test_plan_split_prefers_full_slots_for_hot_ranks():
    # 4 layers, 4 ranks, k = 2 (ranks 0, 1 nearly always). 30 bytes: 10-13 full slots are
    # feasible (2 or 3 per layer, the rest SM-only); with an SM hit dearer than a full one the
    # most full slots per layer win
    p = np.array([0.99, 0.99, 0.01, 0.01])
    delay = lambda full, sm, miss: 1.0 * sm + 3.0 * miss           # noqa: E731
    share, curve = plan_split(p, layers=4, experts=4, pool_bytes=30, full_slot=2, sm_slot=1, delay=delay, smooth=1)
    assert sorted({int(s * 30 // 2) for s in curve["shares"]}) == [10, 11, 12, 13]
    assert min(curve["delay"]) == curve["delay"][curve["shares"].index(share)] < max(curve["delay"])
    assert int(share * 30 // 2) // 4 == 3


def test_rank_stats_sort_each_window():
    s = RankStats(layers=1, experts=3, window=2)
    s.add(0, [2])
    s.add(0, [2, 0])           # window 1: counts (1, 0, 2) -> sorted 2, 1, 0 over 2 points
    s.add(0, [1])              # partial window: (0, 1, 0) over 1 point
    assert s.inclusion() == pytest.approx([(1 + 1) / 2, (0.5 + 0) / 2, 0])


def zip_workload(model, requests=3, batch=1, tokens=20, seed=0, prompt=4):
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    trace = synthetic_trace(model, requests=requests, prompt_len=prompt, output_len=tokens, seed=seed)
    return Workload(model, trace, fmt, batch=batch)


def test_plan_from_a_plan_trace_or_online(tmp_path):
    # 4 layers of 8 experts; a dock of 8 experts beside pools of 24 expert-halves (16 + 8 per layer)
    model = ModelArch("m", layers=4, experts=8, top_k=2, d_model=64, d_ff=64, n_heads=1, n_kv_heads=1)
    w = zip_workload(model, tokens=40)
    cost = CostModel.build(make_device(workers=2), model, w.fmt)
    budget = 32 * sum(w.fmt.resident_bytes)
    for mode in ("released", "corrected"):
        p = build_policies(w, budget, cache="zipmoe", scheduler="zipmoe", cost=cost,
                           cache_options={"mode": mode, "dock": 8 * sum(w.fmt.resident_bytes)})
        before = p.report()["zipmoe_full_share"]
        assert before == (0.6 if mode == "released" else 0.5) and "not planned" in p.report()["zipmoe_split_source"]
        from policies.bundle import workload_routings
        for i, (step, layer, routing) in enumerate(workload_routings(w)):
            p.decide(layer, routing)
            p.finish(layer)
            if step.index == 1:                                  # planned at the second step: batch 1
                break
        rep = p.report()
        assert f"{mode} planner, default plan trace, batch 1" in rep["zipmoe_split_source"], rep
        assert 0 < rep["zipmoe_full_share"] < 1 or "fall-back" in rep["zipmoe_split_source"]
    from policies import build_online_policies
    on = build_online_policies(model, w.fmt, budget, cache="zipmoe", cost=cost,
                               cache_options={"plan_after": 3, "plan_trace": "online", "planner": "corrected"})
    assert on.report()["zipmoe_full_share"] == 0.6 and "not planned" in on.report()["zipmoe_split_source"]
    from policies.bundle import workload_routings
    for i, (_, layer, routing) in enumerate(workload_routings(w)):
        on.decide(layer, routing)
        on.finish(layer)
        if i == 3 * model.layers - 1:
            assert on.report()["zipmoe_full_share"] == 0.6       # not yet planned
    assert not on.cache.pending and ("online" in on.report()["zipmoe_split_source"])
    with pytest.raises(ConfigError, match="plan_trace nowhere.npz: no such file"):
        ZipMoECache(PolicyContext(w.fmt, 4, 8, budget, cost=cost), plan_trace="nowhere.npz")
    # a Switch model falls back to LFU, every expert full (the released code)
    sw = get_model("switch-large-128")
    ws = zip_workload(sw, requests=1, tokens=3)
    ps = build_policies(ws, 4 * 10**9, cache="zipmoe", cost=CostModel.build(make_device(), sw, ws.fmt))
    for _, layer, routing in workload_routings(ws):
        ps.decide(layer, routing)
        ps.finish(layer)
    assert "LFU fall-back (a Switch model)" in ps.report()["zipmoe_split_source"]
    assert ps.cache.victim == "lfu" and not ps.cache.tiers and ps.report()["zipmoe_full_share"] == 0.99


# -- the scheduler and its bound ----------------------------------------------------------------------
def test_dispatch_interleaves_type_i_and_type_ii():
    # t_sm = t_dec = 1, L = 2, K = 2. a: IO 1, ops 2, Compute 1 <= 1 -> d (the hottest Type-II):
    # ops 4, Compute 2 > 1. b: IO 2, ops 6, Compute 3 > 2. Type-I empty: the rest, hottest first.
    order = dispatch([("a", 5), ("b", 1)], [("c", 2), ("d", 9), ("e", 1)], 1.0, 1.0, 2, 2)
    assert order == ["a", "d", "b", "c", "e"]


def test_scheduler_reads_each_tasks_chunks_before_its_sm_bytes():
    model = ModelArch("m", layers=1, experts=4, top_k=2, d_model=8, d_ff=8, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    ctx = PolicyContext(fmt, 1, 4, 10**6, cost=CostModel.build(make_device(workers=1), model, fmt))
    s = ZipMoEScheduler(ctx)
    from policies.base import Demand
    demand = Demand(0, (((0, 0), (1, 0)), ((1, 0), (2, 0))))       # e1: 2 tokens; e0, e2: 1
    resident = {Key(0, 2, 0)}                                      # e2's SM bytes cached: Type-II
    plan = s.order(0, demand, resident)
    # Type-I heap: e1 (2), e0 (1); Type-II: e2. IO = t_sm after e1, Compute = floor(2/1) t_dec:
    # 2 x 0.096 s <= 0.02 + 192 / 1920 s? no -> e0 next (the same), then e2
    assert [(k.expert, k.part) for k in (i.key for i in plan)] == [(1, 1), (1, 2), (1, 0), (0, 1), (0, 2), (0, 0),
                                                                    (2, 1), (2, 2)]
    assert s.decompress_order(0, plan) == [i.key for i in plan if i.key.part > 0]


def brute_force_optimum(sm, compute, workers, chunks, t_dec):
    """Every SM read order x every sequence of the workers' ops; the GPU takes ready tasks
    earliest-ready first (optimal for one machine with release times)."""
    n = len(sm)
    type1 = [j for j in range(n) if sm[j] > 0]
    best = math.inf
    seqs = set(itertools.permutations([j for j in range(n) for _ in range(chunks)]))
    for io in itertools.permutations(type1):
        for ops in seqs:
            ready = [0.0] * n
            t = 0.0
            for j in io:
                t += sm[j]
                ready[j] = t
            for i, j in enumerate(ops):
                ready[j] = max(ready[j], (i // workers + 1) * t_dec)
            best = min(best, bound_makespan(sm, compute, io, ops, workers, t_dec, ready))
    return best


def random_instance(rng: random.Random):
    n, workers, chunks = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 2)
    if n == 4 and chunks == 2:
        n = 3
    t_sm, t_dec = rng.uniform(0.1, 2.0), rng.uniform(0.1, 2.0)
    sm = [t_sm if rng.random() < 0.6 else 0.0 for _ in range(n)]
    compute = [rng.uniform(0.01, 2.0) for _ in range(n)]
    tokens = [rng.randint(1, 8) for _ in range(n)]
    return sm, compute, tokens, workers, chunks, t_dec


def test_makespan_is_within_three_minus_one_over_l_of_the_optimum():
    rng = random.Random(11)
    worst, seen = 0.0, 0
    for _ in range(1000):
        sm, compute, tokens, workers, chunks, t_dec = random_instance(rng)
        alg = zipmoe_makespan(sm, compute, tokens, workers, chunks, t_dec)
        opt = brute_force_optimum(sm, compute, workers, chunks, t_dec)
        assert opt <= alg + 1e-9                               # the brute force finds the best
        assert alg <= (3 - 1 / workers) * opt + 1e-9
        worst = max(worst, alg / opt)
        seen += 1
    assert seen == 1000 and worst > 1.0                         # instances where the order matters


def test_bound_model_by_hand():
    # two Type-I tasks (SM 1 s), one worker, one chunk of 1 s each, computes 1 s and 3 s
    # order a, b: reads end 1, 2; chunks end 1, 2; GPU: a 1-2, b 2-5
    assert bound_makespan([1, 1], [1, 3], [0, 1], [0, 1], 1, 1.0, [0, 1]) == 5
    # b first: b 1-4, a 4-5
    assert bound_makespan([1, 1], [1, 3], [1, 0], [1, 0], 1, 1.0, [1, 0]) == 5
    assert bound_makespan([0, 0], [1, 1], [], [0, 0, 1, 1], 2, 1.0, [0, 1]) == 3   # Type-II only


# -- the read order: decompression overlaps the raw reads ----------------------------------------
def test_exponent_chunks_are_read_first_so_decompression_overlaps():
    # one expert, 96 weights: SM 96 B, 1 chunk of 16 + 48 B; 1920 B/s, 0.02 s latency, QD 1;
    # decompress 96 raw bytes at 1000 B/s on one worker
    model = ModelArch("m", layers=1, experts=2, top_k=1, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=1, exponent_ratio=0.5)
    w = Workload(model, make_trace([[[0]]]), fmt)
    device = make_device(workers=1)
    for sched in ("fifo", "zipmoe"):
        tl = Simulator(device, w, build_policies(w, 10**6, scheduler=sched, cost=CostModel.build(device, model, fmt))).run()
        io = sorted(tl.of("io"), key=lambda e: e.start)
        assert [e.level for e in io] == [1, 0]                   # the chunk first
        t0 = tl.of("dense")[0].end                                   # the layer's decision point
        chunk_done = t0 + 0.02 + 64 / 1920
        (dec,) = tl.of("decompress")
        assert dec.start == pytest.approx(chunk_done) and dec.end == pytest.approx(chunk_done + 0.096)
        sm_done = chunk_done + 0.02 + 96 / 1920
        (comp,) = tl.of("compute")
        assert comp.start == pytest.approx(max(sm_done, dec.end))   # both overlap: max, not sum


# -- both engines, real decompression, bit-identical outputs -------------------------------------
@pytest.fixture(scope="module")
def zip_store(tmp_path_factory):
    return ensure_store(tiny_model(), tmp_path_factory.mktemp("zipstore"), "zip", quiet=True)


# the released variants, as options of the one cache (no per-value registrations)
VARIANTS = {"zipmoe": {}, "zipmoe-corrected": {"mode": "corrected"}, "zipmoe-fixed": {"split": 0.5},
            "zipmoe-fixed-corrected": {"split": 0.5, "mode": "corrected"}, "zipmoe-tw-lfu": {"tiers": False},
            "zipmoe-marking": {"victim": "marking", "tiers": False}, "zipmoe-lru": {"victim": "lru", "tiers": False},
            "zipmoe-fifo": {"victim": "fifo", "tiers": False}}


@pytest.mark.parametrize("cache", ["zipmoe", "zipmoe-corrected", "zipmoe-fixed", "zipmoe-fixed-corrected",
                                   "zipmoe-marking", "zipmoe-lru"])
def test_both_engines_make_the_same_zipmoe_decisions(zip_store, cache):
    fmt, arch = zip_store.format, model_arch(tiny_model())
    trace = synthetic_trace(arch, requests=3, prompt_len=3, output_len=6, skew=1.0, seed=3)
    w = Workload(arch, trace, fmt, batch=2)
    cost = CostModel.build(make_device(workers=2), arch, fmt)
    budget = 16 * sum(fmt.resident_bytes)       # room for the plan's pools beside a prefill's dock

    def bundle():
        return build_policies(w, budget, cache="zipmoe", scheduler="zipmoe", cost=cost, cache_options=VARIANTS[cache])
    sim_tl = Simulator(make_device(workers=2), w, bundle()).run()
    run = execute(strip_experts(tiny_model()), zip_store, bundle(), torch.tensor([[1, 2, 3]]), 0, trace=trace,
                  batch=2, decompress_workers=2, quiet=True)
    assert len(sim_tl.decisions()) > 20
    assert run.timeline.decisions() == sim_tl.decisions()
    order = lambda tl: [(e.step, e.layer, e.expert, e.level) for e in sorted(tl.of("decompress"),   # noqa: E731
                                                                             key=lambda e: e.start)]
    per_layer = lambda o: sorted(o)                                                                 # noqa: E731
    assert per_layer(order(run.timeline)) == per_layer(order(sim_tl))
    if cache.startswith(("zipmoe-fixed", "zipmoe-corrected")) or cache == "zipmoe":
        assert any(e.kind == "evict" and e.level > 0 for e in sim_tl.of("cache"))   # chunks dropped, SM kept
        rep = run.timeline.meta["policy_report"]
        assert rep == sim_tl.meta["policy_report"]


def test_executor_outputs_equal_bf16_bit_for_bit(zip_store, tmp_path):
    model = tiny_model()
    arch = model_arch(model)
    prompt = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]])
    logits = {}
    for name, store, cache, sched in (("bf16", ensure_store(model, tmp_path / "bf16", quiet=True), "lru", "fifo"),
                                      ("zip", zip_store, "zipmoe", "zipmoe")):
        fmt = store.format
        from policies import build_online_policies
        pol = build_online_policies(arch, fmt, 8 * fmt.expert_bytes, cache=cache, scheduler=sched,
                                    cost=CostModel.build(make_device(), arch, fmt),
                                    cache_options={"plan_after": 2} if name == "zip" else None)
        runner = strip_experts(tiny_model())
        seen = []
        forward = runner.forward

        def spy(tokens, input_pos=None, forward=forward, seen=seen):
            out = forward(tokens, input_pos)
            seen.append(out.detach().clone())
            return out
        runner.forward = spy
        run = execute(runner, store, pol, prompt, 6, batch=2, decompress_workers=2, quiet=True)
        logits[name] = (seen, run.tokens)
        if name == "zip":
            assert run.timeline.of("decompress") and pol.report()["zipmoe_decisions_normal"] > 0
    (a, ta), (b, tb) = logits["bf16"], logits["zip"]
    assert torch.equal(ta, tb) and len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- invariants ----------------------------------------------------------------------------------------
@st.composite
def cases(draw):
    layers, experts, k = draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(1, 3))
    k = min(k, experts)
    return (layers, experts, k, draw(st.integers(1, 16)), draw(st.integers(0, 10**6)), draw(st.integers(1, 3)),
            draw(st.sampled_from(["zipmoe", "zipmoe-corrected", "zipmoe-fixed", "zipmoe-fixed-corrected",
                                  "zipmoe-tw-lfu", "zipmoe-marking", "zipmoe-fifo"])),
            draw(st.sampled_from(["pool", "layer"])), draw(st.sampled_from(["none", "last-use", "oracle"])),
            draw(st.integers(0, 3 * layers * experts)), draw(st.sampled_from(["zipmoe", "fifo"])))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_invariants(case):
    layers, experts, k, tokens, seed, batch, cache, thresholds, prefetch, extra, sched = case
    rng = np.random.default_rng(seed)
    model = ModelArch("p", layers=layers, experts=experts, top_k=k, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    trace = make_trace(ex, prompt=rng.random(tokens) < 0.3, request_ids=rng.integers(0, 3, tokens),
                       num_experts=experts)
    w = Workload(model, trace, fmt, batch=batch)
    budget = (experts + extra) * sum(fmt.resident_bytes)         # any layer's demand, and more
    cost = CostModel.build(make_device(workers=2), model, fmt)
    p = build_policies(w, budget, cache="zipmoe", scheduler=sched, prefetch=prefetch, cost=cost,
                       cache_options={"thresholds": thresholds, **VARIANTS[cache]})
    c = p.cache
    finish = p.finish

    def checked(layer):             # after every layer: pools, budget, tiers whole
        out = finish(layer)
        for pool in ("full", "sm"):
            assert c.pool_used[pool] <= c.pools[pool]
        assert c.used == sum(c.sizes.values()) <= c.capacity
        for (l, e), t in c.tier.items():     # full: every part in the full pool; SM-only: part 0
            pools = [c.pool_of.get(Key(l, e, q)) for q in range(fmt.n_parts)]     # in sm, chunks at
            assert pools == [t] * fmt.n_parts if t == "full" else \
                pools[0] == "sm" and set(pools[1:]) <= {None, "dock"}          # most prefetched
        for k, pool in c.pool_of.items():
            assert pool == "dock" or c.tier.get(k[:2]) == pool
        assert c.n_in["full"] * c.full_slot == c.pool_used["full"] and c.n_in["sm"] * c.sm_slot == c.pool_used["sm"]
        return out
    p.finish = checked
    tl = Simulator(make_device(workers=2), w, p).run()            # finishes: no deadlock
    assert_within_budget(tl, budget)
    want = requested(w.steps, ex)
    assert {(e.step, e.layer, e.expert): e.tokens for e in tl.of("compute")} == want


# -- presets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zipmoe", "zipmoe-c", "zipmoe-c95", "zipmoe-basic", "zipmoe-basic-lfu",
                                  "zipmoe-basic-fifo", "bf16-lru", "moe-infinity", "deepspeed", "accelerate"])
def test_zipmoe_presets_run(name):
    from policies.presets import get_preset
    model = ModelArch("m", layers=2, experts=8, top_k=2, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    preset = get_preset(name)
    fmt = preset.format.make(model.expert_shapes)
    w = Workload(model, synthetic_trace(model, requests=2, prompt_len=3, output_len=5, seed=1), fmt, batch=2)
    p = build_policies(w, 16 * fmt.expert_bytes, cost=CostModel.build(make_device(), model, fmt),
                       **preset.bundle.kwargs())
    tl = Simulator(make_device(), w, p).run()
    read = {(e.layer, e.expert) for e in tl.of("io")}
    if name == "deepspeed":          # every expert of every layer streamed
        assert read == {(layer, e) for layer in range(2) for e in range(8)}
    assert tl.of("compute")


# -- the reproduction ---------------------------------------------------------------------------------
def test_reproduction_resumes_and_reports_the_published_numbers(tmp_path, monkeypatch):
    import experiments.reproduce_zipmoe as rz
    monkeypatch.setattr(rz, "TRACES", tmp_path / "traces")
    monkeypatch.setattr(rz, "PROMPTS", {1: 2})
    runs = [rz.Run("qwen1.5-moe-a2.7b", s, m, 1, 3, 5, 2) for s, m in (("zipmoe", "released"), ("zipmoe", "corrected"),
                                                                      ("bf16-lru", "-"))]
    monkeypatch.setattr(rz, "grid", lambda: runs)
    monkeypatch.setattr(rz, "planner_shares", lambda: [])
    text = rz.reproduce(tmp_path, jobs=1, quiet=True)
    rows = rz.load_results(tmp_path / "results.csv")
    assert set(rows) == {r.key() for r in runs} and all(r["status"] == "ok" for r in rows.values())
    assert "| qwen1.5-moe-a2.7b | +C+P (PlanCache) | 7.79 |" in text and "585.96" in text
    assert "released planner" in rows[runs[0].key()]["split_source"]
    assert "corrected planner" in rows[runs[1].key()]["split_source"]
    assert (tmp_path / "table1.png").exists() and (tmp_path / "footprint_sweep.pdf").exists()
    before = (tmp_path / "results.csv").read_text()
    rz.reproduce(tmp_path, jobs=1, quiet=True)                    # everything reused: nothing appended
    assert (tmp_path / "results.csv").read_text() == before
    spec = rz.run_spec(runs[0])
    assert spec.policy.cache.opts["mode"] == "released" and spec.policy.cache.opts["plan_trace"].endswith(".npz")
    from policies.zipmoe_released import released_budget
    assert spec.budget == released_budget(64 * 10**9, 5, 60, 2 * 3 * 1408 * 2048)[0]


def test_released_workload_warm_up_eos_and_padded_rows():
    import experiments.reproduce_zipmoe as rz
    model = get_model("qwen1.5-moe-a2.7b")
    lengths, generated = rz.request_lengths(40, 64)
    assert all(4 <= n <= 512 for n in lengths) and len(set(lengths)) > 10
    assert generated.max() == 64 and generated.min() >= 1 and (generated < 64).any()
    t = rz.released_trace(model, 4, 8, 6)
    from workloads.batching import batch_steps
    steps = batch_steps(t, 4)
    groups = sorted({s.group for s in steps})
    assert groups == [0, 1, 2]                                    # the warm-up, then ceil(6 / 4) batches
    warm = [s for s in steps if s.group == 0]
    assert warm[0].prefill and len(warm[0].tokens) == 4 * 13 and len(warm) == 10   # 13 prompt tokens, 10 new
    rows = t.experts[warm[0].tokens].reshape(4, 13, *t.experts.shape[1:])
    assert (rows == rows[:1]).all()                               # one warm-up prompt in every row
    lens, gens = rz.request_lengths(6, 8)
    for g, members in ((1, range(0, 4)), (2, range(4, 6))):
        decode = [s for s in steps if s.group == g and not s.prefill]
        assert len(decode) == max(gens[i] for i in members) - 1   # every row to its batch's longest
    assert t.metadata["counted"] == [int(x) for x in gens]
