"""ZipMoE's cache as its released code runs it (mode=released) and where moelab corrects it
(mode=corrected): one hand-made scenario per released behaviour, each with the outcome of both
modes worked out by hand (policies/zipmoe.py's docstring lists the behaviours); the released
planner's math and its plan trace; the released budget mapping; and no online policy reading the
routing of the run it serves.

The scenarios run one layer of five experts (test_zipmoe.hand_bundle: exact pool slots, a dock of
one expert, loads in router order); `use(p, e, n)` is one step of n tokens all routed to e. A step
with more tokens than the one before begins a new batch (the rank counts restart)."""
import numpy as np
import pytest

from conftest import make_device
from devices.units import ConfigError
from policies import Routing, build_online_policies, build_policies
from policies.base import PolicyContext
from policies.cost import CostModel
from policies.registry import CACHES
from policies.zipmoe import ZipMoECache
from policies.zipmoe_plan import plan_split, request_counts
from policies.zipmoe_released import (MEMORY_MAP, coverage_to_weight, released_budget, released_plan,
                                      released_rank_dist, released_scale_to_k, released_slots)
from test_zipmoe import ONE, hand_bundle, tiers, use
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.trace import RoutingTrace
from workloads.workload import Workload

MODES = ("released", "corrected")


def outcome(scenario, mode):
    return scenario(mode)


# -- the tier rules, one behaviour a scenario: {mode: final tiers} ------------------------------------
def promotion(mode):
    """1 full + 1 SM slot, margin 0 (T_N = 1, T_S = 2). e0 full; e1 (rank 0, full taken) SM-only; e1
    again: rank 0, no full slot free and its own SM slot is not free either -> NORMAL, evicting e0."""
    p = hand_bundle(1, 1, margin=0.0, mode=mode)
    for e in (0, 1, 1):
        use(p, e)
    return tiers(p)


def stale_free_slot_test(mode):
    """2 full + 1 SM. e0 full (one full slot left). Then one step with e1 and e2: both rank 0.
    Released: both see the free full slot (the test is made once, at enqueue) -> both NORMAL; e1
    takes the slot, e2 evicts e0. Corrected: e1 takes the slot, so e2 finds the SM slot."""
    p = hand_bundle(2, 1, margin=0.0, mode=mode)
    use(p, 0)
    p.decide(0, Routing(np.array([[1], [2]]), np.ones((2, 1), np.float32)))
    p.finish(0)
    return tiers(p)


def full_hit_stays_full(mode):
    """1 full + 3 SM (T_N = 1, T_S = 4). e0 full; a new batch: e1, e2 (3 tokens each) SM-only; e0
    again: rank 2, which the rule would send to an SM slot; a full hit stays full."""
    p = hand_bundle(1, 3, margin=0.0, mode=mode)
    use(p, 0)
    use(p, 1, 3)
    use(p, 2, 3)
    use(p, 0)
    return tiers(p)


def sm_hits_earn_no_credit(mode):
    """1 full + 2 SM (T_N = 1, T_S = 3). e0 full (10 tokens, rank 0 from then on); e2 then e1 SM-only
    (rank 1; e2 takes SM slot 1, e1 slot 0); e1 hit twice, stays SM-only (rank 1, nothing free).
    e3 (rank 2) needs an SM victim: released, e1 never earned a count (1, as e2) and the tie goes to
    the lowest slot, e1's; corrected, e1 has 3 and e2 goes."""
    p = hand_bundle(1, 2, margin=0.0, mode=mode)
    use(p, 0, 10)
    for e in (2, 1, 1, 1, 3):
        use(p, e)
    return tiers(p)


def promotion_restarts_the_count(mode):
    """2 full + 1 SM (T_N = 2, T_S = 3). e0 full (slot 1), e2 full (slot 0) and hit (count 2); e1
    SM-only (rank 1). A new batch: e1 with 5 tokens, rank 0 -> promoted, evicting e0 (count 1).
    e4 then takes the SM slot e1 gave back. e3 needs a full victim: released, e1's count restarted
    at 1 (e2 has 2); corrected, e1 kept its 1 + 5."""
    p = hand_bundle(2, 1, margin=0.0, mode=mode)
    for e, n in ((0, 1), (2, 1), (2, 1), (1, 1), (1, 5), (4, 1), (3, 1)):
        use(p, e, n)
    return tiers(p)


def ties_to_the_lowest_slot(mode):
    """2 full slots, no tiers, LFU. e0 (slot 1), e1 (slot 0): both count 1. e2 needs a victim: the
    lowest slot (e1, the newer; moelab before: the oldest push, e0), in both modes."""
    p = hand_bundle(2, 0, tiers=False, victim="lfu", mode=mode)
    for e in (0, 1, 2):
        use(p, e)
    return tiers(p)


def ranks_restart_each_batch(mode):
    """1 full + 1 SM (T_N = 1, T_S = 2). e0 three times (full, 3 tokens this batch); e1 (rank 1)
    SM-only. A new batch: e2 with 2 tokens, rank 0 in its batch -> NORMAL, evicting e0 (with e0's
    old 3 tokens it would rank 1 and evict e1 from the SM pool instead)."""
    p = hand_bundle(1, 1, margin=0.0, mode=mode)
    for e, n in ((0, 1), (0, 1), (0, 1), (1, 1), (2, 2)):
        use(p, e, n)
    return tiers(p)


def truncated_thresholds(mode):
    """1 full + 1 SM, margin 0.1, five experts: T_N = 1.5, T_S = 3 (released: whole slots, 1 and 3).
    e0 full (2 tokens); e1 SM-only. e2 ranks 1: released, T_N <= 1 -> an SM victim (e1); corrected,
    1 < 1.5 -> a full victim (e0)."""
    p = hand_bundle(1, 1, margin=0.1, mode=mode)
    for e, n in ((0, 2), (1, 1), (2, 1)):
        use(p, e, n)
    return tiers(p)


SCENARIOS = {
    promotion: {"released": {1: "full"}, "corrected": {1: "full"}},
    stale_free_slot_test: {"released": {1: "full", 2: "full"}, "corrected": {0: "full", 1: "full", 2: "sm"}},
    full_hit_stays_full: {"released": {0: "full", 1: "sm", 2: "sm"}, "corrected": {0: "full", 1: "sm", 2: "sm"}},
    sm_hits_earn_no_credit: {"released": {0: "full", 2: "sm", 3: "sm"}, "corrected": {0: "full", 1: "sm", 3: "sm"}},
    promotion_restarts_the_count: {"released": {2: "full", 3: "full", 4: "sm"},
                                   "corrected": {1: "full", 3: "full", 4: "sm"}},
    ties_to_the_lowest_slot: {"released": {0: "full", 2: "full"}, "corrected": {0: "full", 2: "full"}},
    ranks_restart_each_batch: {"released": {1: "sm", 2: "full"}, "corrected": {1: "sm", 2: "full"}},
    truncated_thresholds: {"released": {0: "full", 2: "sm"}, "corrected": {1: "sm", 2: "full"}},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=lambda f: f.__name__)
def test_released_behaviour_by_hand(scenario, mode):
    assert outcome(scenario, mode) == SCENARIOS[scenario][mode], scenario.__doc__


def test_counts_follow_the_slot_in_released_mode():
    # the scenario above, read in the counts: the promoted e1 restarts at 1 (released) or keeps 1 + 5
    for mode, want in (("released", 1), ("corrected", 6)):
        p = hand_bundle(2, 1, margin=0.0, mode=mode)
        for e, n in ((0, 1), (2, 1), (2, 1), (1, 1), (1, 5)):
            use(p, e, n)
        assert p.cache.tier[0, 1] == "full" and p.cache.meta[0, 1][0] == want


def test_released_basic_keeps_an_unused_sm_pool():
    # no tiers: released, the eval script's full share 0.95 (slots rounded up) and an SM pool no
    # decision uses; corrected, every byte full
    fmt = make_format("zip", ONE.expert_shapes, chunks=2)
    full = sum(fmt.resident_bytes)
    ctx = PolicyContext(fmt, 1, ONE.experts, 41 * full)
    r = ZipMoECache(ctx, tiers=False, victim="lru", dock=full)
    c = ZipMoECache(ctx, tiers=False, victim="lru", dock=full, mode="corrected")
    assert (r.full_slots, r.sm_slots) == (38, 4) and r.share == 0.95
    assert (c.full_slots, c.sm_slots) == (40, 0)
    assert released_slots(40 * full, 0.95, full, fmt.resident_bytes[0]) == (38, 4)


def test_docks_by_mode():
    # released: one dock per expert of a layer, outside the pools; corrected: one token's experts
    model = ModelArch("m", layers=2, experts=8, top_k=2, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    full = sum(fmt.resident_bytes)
    ctx = PolicyContext(fmt, 2, 8, 40 * full, cost=CostModel.build(make_device(), model, fmt))
    assert ZipMoECache(ctx, split=0.5).room == 32 * full
    assert ZipMoECache(ctx, split=0.5, mode="corrected").room == 38 * full


def test_batches_restart_where_a_group_begins():
    # 6 requests of 3 prompt + 4 generated tokens at batch 2: three groups, so three batches
    model = ModelArch("m", layers=2, experts=8, top_k=2, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    w = Workload(model, synthetic_trace(model, requests=6, prompt_len=3, output_len=4, seed=2), fmt, batch=2)
    from policies.bundle import workload_routings
    for mode in MODES:
        p = build_policies(w, 20 * sum(fmt.resident_bytes), cache="zipmoe", scheduler="zipmoe",
                           cost=CostModel.build(make_device(), model, fmt), cache_options={"mode": mode})
        for _, layer, routing in workload_routings(w):
            p.decide(layer, routing)
            p.finish(layer)
        assert p.cache.batches == 3


# -- the released planner ------------------------------------------------------------------------
def test_released_rank_distribution_by_hand():
    # 5 prompts, 1 layer, 3 experts, batches of 2 (the fifth prompt dropped): batch sums (3, 1, 0)
    # and (0, 2, 2) sorted -> (3, 1, 0) + (2, 2, 0) = (5, 3, 0) / 8
    counts = np.array([[[2, 1, 0]], [[1, 0, 0]], [[0, 1, 2]], [[0, 1, 0]], [[9, 9, 9]]], float)
    assert released_rank_dist(counts, 2) == pytest.approx([5 / 8, 3 / 8, 0])
    assert released_rank_dist(counts, 6) is None


def test_released_scaling_caps_below_one_and_odds_have_mean_one():
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    pi = released_scale_to_k(p, 3)
    assert pi.sum() == pytest.approx(3) and pi[0] == pytest.approx(1 - 1e-9) and (pi < 1).all()
    w = coverage_to_weight(pi, 3)
    assert w.mean() == pytest.approx(1.0)               # scaled after every update ...
    q = w / (1 + w)
    assert int(q.sum()) != 3                             # ... so k = int(sum p) is not the top-k


def test_released_k_is_not_the_models_top_k():
    # a DeepSeek-like rank distribution: the released k comes out far above top-6 (issue 22: 22-29)
    ranks = 1.0 / np.arange(1, 65) ** 0.8
    from policies.zipmoe_released import released_odds
    q, k = released_odds(ranks / ranks.sum(), 6)
    assert k == int(q.sum()) and k > 12


def test_released_gate_and_fall_back():
    # one layer: no share has `experts` slots in both pools -> infeasible: 0.99 (and LFU, no tiers)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    delay = lambda f, s, m: 1.0 * s + 3.0 * m        # noqa: E731
    assert released_plan(p, 1, 1, 4, 6, 2, 1, delay)[:2] == (0.99, False)
    # 3 layers of 3 experts, 10 bytes a layer, full slots of 1 byte and SM slots of 4: share s gives
    # int(10 s) full and int(2.5 (1 - s)) SM slots a layer; feasible only for 0.1 <= s < 0.3 (at most
    # 3 slots, at least one of each), so nothing may set the minimum: the plan is 0.99
    share, feasible, info = released_plan(np.array([0.5, 0.3, 0.2]), 1, 3, 3, 30, 1, 4, delay)
    assert feasible and share == 0.99 and info["shares"] and max(info["shares"]) < 0.3


def test_released_arg_min_may_lie_below_the_gate():
    # 8 layers of 8 experts, 8 bytes a layer, full slots 2 and SM slots 1: shares 0.25 .. 0.87 feasible.
    # Full hits dear, SM hits free: the curve rises with the share; some share >= 0.3 sets a minimum,
    # so the smoothed arg-min over every feasible share is returned, one below 0.3
    p = 1.0 / np.arange(1, 9)
    share, feasible, info = released_plan(p / p.sum(), 2, 8, 8, 64, 2, 1, lambda f, s, m: 3.0 * f + 1.0 * m)
    assert feasible and min(info["shares"]) == 0.25 and share < 0.3 <= max(info["shares"])


def _write_trace(path, experts_of_request, layers=1):
    """A trace file: request r chooses experts_of_request[r] (one expert a token, 4 tokens each)."""
    rows = np.array([[[e]] * layers for e in experts_of_request for _ in range(4)], np.int32)
    RoutingTrace(rows, np.ones(rows.shape, np.float32), np.repeat(np.arange(len(experts_of_request)), 4),
                 np.zeros(len(rows), bool), {"model": "m"}).save(path)
    return path


def test_plan_trace_file_is_the_plans_only_input(tmp_path):
    # two plan traces of the same shape: one concentrated (expert 0 only), one spread (all four);
    # the request counts read back, and the plans (the run's routing the same) differ
    model = ModelArch("m", layers=1, experts=4, top_k=1, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    hot = _write_trace(tmp_path / "hot.npz", [0] * 40)
    spread = _write_trace(tmp_path / "spread.npz", [0, 1, 2, 3] * 10)
    from workloads.importers import import_trace
    assert request_counts(import_trace(hot), 1, 4)[:, 0, 0].tolist() == [4.0] * 40
    fmt = make_format("zip", model.expert_shapes, chunks=2)
    cost = CostModel.build(make_device(workers=2), model, fmt)
    run = Workload(model, synthetic_trace(model, requests=2, prompt_len=2, output_len=6, seed=0), fmt)
    shares = {}
    for name, path in (("hot", hot), ("spread", spread)):
        p = build_policies(run, 12 * sum(fmt.resident_bytes), cache="zipmoe", cost=cost,
                           cache_options={"plan_trace": str(path), "planner": "corrected", "mode": "corrected"})
        from policies.bundle import workload_routings
        for _, layer, routing in workload_routings(run):
            p.decide(layer, routing)
            p.finish(layer)
        shares[name] = (p.report()["zipmoe_full_share"], p.report()["zipmoe_split_source"])
    assert all(str(tmp_path) in src for _, src in shares.values())
    assert shares["hot"] != shares["spread"]
    with pytest.raises(ConfigError, match="routes 1 layers .* 2 layers"):
        bad = PolicyContext(fmt, 2, 4, 10**6, cost=CostModel.build(make_device(), ModelArch(
            "m", layers=2, experts=4, top_k=1, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1), fmt))
        cache = ZipMoECache(bad, plan_trace=str(hot))
        cache._plan(1)


def test_corrected_planner_conditions_on_the_experts_a_step_needs():
    p = np.array([0.9, 0.6, 0.3, 0.1, 0.1])                # sums to 2: two experts a decision point
    _, info = plan_split(p, 1, 5, 100, 2, 1, lambda f, s, m: float(m), smooth=1)
    assert info["k"] == 2


# -- the budget ------------------------------------------------------------------------------------
def test_released_budget_mapping():
    # a "10 GB footprint" is 0.1 of the device's memory for the pools, the docks (64 experts) beside
    assert MEMORY_MAP[10] == 0.1 and MEMORY_MAP[20] == 0.25
    budget, dock = released_budget(64 * 10**9, 10, 64, 17_301_504)
    assert dock == 64 * 17_301_504 and budget == 6_400_000_000 + dock


# -- no online policy reads the run's own routing -------------------------------------------------------
def _shuffled(trace: RoutingTrace, cut: int, seed: int) -> RoutingTrace:
    """The trace with its routing after token `cut` shuffled (the requests and lengths kept)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([np.arange(cut), cut + rng.permutation(len(trace.experts) - cut)])
    return RoutingTrace(trace.experts[order], trace.scores[order], trace.request_ids, trace.prompt, trace.metadata)


def _decisions(workload, budget, cost, points, **bundle):
    from policies.bundle import workload_routings
    p = build_policies(workload, budget, cost=cost, **bundle)
    out = []
    for i, (_, layer, routing) in enumerate(workload_routings(workload)):
        if i == points:
            break
        d = p.decide(layer, routing)
        out.append((d.keys, d.hits, [(x.item.key, x.kind, x.evicted) for x in d.loads], d.decompress_order,
                    d.compute_order, p.finish(layer)))
    return out


def _online_caches():
    """Every registered cache an online run can build (the offline ones refuse without the future)."""
    model = ModelArch("m", layers=2, experts=8, top_k=2, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    out = []
    for name, cls in CACHES.items():
        fmt = make_format("zip" if "zip" in getattr(cls, "formats", ()) else "bf16", model.expert_shapes)
        try:
            build_online_policies(model, fmt, 40 * fmt.expert_bytes, cache=name,
                                  cost=CostModel.build(make_device(), model, fmt))
        except Exception:          # noqa: BLE001 - an offline policy (or one this shape cannot run)
            continue
        out.append(name)
    return out


BUNDLES = [("zipmoe", {"mode": m, "planner": pl}) for m in MODES for pl in MODES] + \
    [("zipmoe", {"mode": "corrected", "planner": "corrected", "plan_trace": "online", "plan_after": 2}),
     ("zipmoe", {"split": 0.6}), ("zipmoe", {"tiers": False, "victim": "lru"})]


def _joined(first: RoutingTrace, rest: RoutingTrace) -> RoutingTrace:
    return RoutingTrace(np.concatenate([first.experts, rest.experts]), np.concatenate([first.scores, rest.scores]),
                        np.concatenate([first.request_ids, rest.request_ids + first.request_ids.max() + 1]),
                        np.concatenate([first.prompt, rest.prompt]), first.metadata)


OTHERS = [(c, {}) for c in _online_caches() if c != "zipmoe"]


@pytest.mark.parametrize("cache,options", BUNDLES + OTHERS,
                         ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_shuffling_the_runs_future_changes_no_earlier_decision(cache, options):
    """The first request's decisions (21 steps, 4 layers) with three different futures: the later
    requests' routing shuffled twice, and later requests with 40-token prompts instead of 3 (the
    largest layer demand is then in the future: moelab's cache before sized its dock from it)."""
    model = ModelArch("m", layers=4, experts=16, top_k=2, d_model=16, d_ff=16, n_heads=1, n_kv_heads=1)
    zip_ = cache == "zipmoe"
    fmt = make_format("zip" if zip_ else "bf16", model.expert_shapes)
    first = synthetic_trace(model, requests=1, prompt_len=3, output_len=20, seed=5)
    rest = _joined(first, synthetic_trace(model, requests=3, prompt_len=3, output_len=8, seed=6))
    cut = 23                                      # the first request's tokens
    futures = [rest, _shuffled(rest, cut, 1), _shuffled(rest, cut, 2),
               _joined(first, synthetic_trace(model, requests=3, prompt_len=40, output_len=8, seed=6))]
    cost = CostModel.build(make_device(workers=2), model, fmt)
    bundle = {"cache": cache, "cache_options": options, "scheduler": "zipmoe" if zip_ else "fifo"}
    points = 21 * model.layers                    # the decision points before the cut
    got = [_decisions(Workload(model, t, fmt, batch=1), 32 * fmt.expert_bytes, cost, points, **bundle)
           for t in futures]
    assert len(got[0]) == points and all(g == got[0] for g in got[1:])
