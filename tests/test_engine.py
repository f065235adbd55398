"""The SimPy engine against hand-computed timelines, and its invariants."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import TINY, make_device, make_trace
from policies import BudgetError, PREFETCHERS, caches_for
from policies.cost import CostModel
from policies import build_policies
from sim.engine import Simulator
from workloads.workload import Workload
from timeline.metrics import compute_metrics
from workloads.catalog import ModelArch
from workloads.formats import make_format

EXPERT = 192          # bytes of one TINY expert in bf16
LOAD = 0.02 + 0.1     # latency + 192 B at 1920 B/s
COMPUTE = 0.01        # 192 B at 19200 B/s
DENSE = 0.0075        # attention 64 + router 8 params = 144 B at 19200 B/s
KV = 16 / 19200       # attention's context term: one cached token's K and V in a layer (2 x 1 head x 4 x 2 B)
                      #   read at 19200 B/s per token of context (its flops at 1e18 FLOP/s are negligible)


def dense(context: int) -> float:
    """A decode step's dense part per layer at `context` tokens (the step's own included)."""
    return DENSE + context * KV


def run(trace, budget, policy="lru", model=TINY, fmt=None, batch=1, device=None, prefetch="none"):
    fmt = fmt or make_format("bf16", model.expert_shapes)
    w = Workload(model, trace, fmt, batch=batch)
    p = build_policies(w, budget, cache=policy, prefetch=prefetch)
    return Simulator(device or make_device(), w, p).run()


def timed(tl):
    return [(e.resource, e.kind, round(e.start, 9), round(e.end, 9), e.layer, e.expert)
            for e in tl.events if e.resource != "cache"]


def test_hand_computed_timeline():
    # token 0: L0->E0, L1->E1; token 1: L0->E0, L1->E0; budget = 2 experts, LRU
    tl = run(make_trace([[[0], [1]], [[0], [0]]]), 2 * EXPERT)
    t = 0.0
    expected = []
    def ev(res, kind, dur, layer, expert):
        nonlocal t
        expected.append((res, kind, round(t, 9), round(t + dur, 9), layer, expert))
        t += dur
    ev("dense", "dense", dense(1), 0, -1); ev("io", "load", LOAD, 0, 0); ev("compute", "expert", COMPUTE, 0, 0)
    ev("dense", "dense", dense(1), 1, -1); ev("io", "load", LOAD, 1, 1); ev("compute", "expert", COMPUTE, 1, 1)
    step0 = t
    ev("dense", "dense", dense(2), 0, -1); ev("compute", "expert", COMPUTE, 0, 0)          # hit
    ev("dense", "dense", dense(2), 1, -1); ev("io", "load", LOAD, 1, 0); ev("compute", "expert", COMPUTE, 1, 0)
    assert timed(tl) == expected
    # LRU evicts (L1, E1): (L0, E0) was used more recently
    assert ("evict", 1, 1, 1, 0) in tl.decisions()
    m = compute_metrics(tl)
    assert m["ttft_s"] == pytest.approx(step0)
    assert m["tpot_s_mean"] == pytest.approx(t - step0)
    assert m["hit_ratio"] == pytest.approx(0.25)
    assert m["bytes_read"] == 3 * EXPERT
    assert m["peak_expert_bytes"] == 2 * EXPERT
    assert m["throughput_tok_s"] == pytest.approx(2 / t)


def test_hand_computed_timeline_with_oracle_prefetch():
    # the same trace and budget, but each decision point also loads what the next one needs,
    # behind its own plan: layer 1's load overlaps layer 0's compute and layer 1's dense part
    D, E, L, C = dense(1), dense(2), LOAD, COMPUTE           # step 0's dense part, step 1's
    tl = run(make_trace([[[0], [1]], [[0], [0]]]), 2 * EXPERT, prefetch="oracle")
    X = D + 2 * L + C                                           # step 1 starts
    expected = [("dense", "dense", 0, D, 0, -1), ("io", "load", D, D + L, 0, 0),
                ("io", "load", D + L, D + 2 * L, 1, 1),                   # prefetch for (step 0, layer 1)
                ("compute", "expert", D + L, D + L + C, 0, 0),
                ("dense", "dense", D + L + C, 2 * D + L + C, 1, -1),
                ("compute", "expert", D + 2 * L, X, 1, 1),                 # waits for its prefetch
                ("dense", "dense", X, X + E, 0, -1),
                ("io", "load", X + E, X + E + L, 1, 0),                    # prefetch for (step 1, layer 1)
                ("compute", "expert", X + E, X + E + C, 0, 0),
                ("dense", "dense", X + E + C, X + 2 * E + C, 1, -1),
                ("compute", "expert", X + E + L, X + E + L + C, 1, 0)]
    assert timed(tl) == [(r, k, round(a, 9), round(b, 9), la, ex) for r, k, a, b, la, ex in expected]
    # the second prefetch evicts (L1, E1), never the pinned (L0, E0) of its own decision point
    assert [d for d in tl.decisions() if d[0] != "admit"] == [
        ("prefetch", 0, 1, 1, 0), ("evict", 1, 1, 1, 0), ("prefetch", 1, 1, 0, 0)]
    m = compute_metrics(tl)
    # four accesses: one demand load (s0 L0 E0), two parts prefetched for the decision point
    # that used them (coverage, not hits), one part resident before its layer asked (s1 L0 E0)
    assert m["accesses"] == 4 and m["admits"] == 1
    assert m["hit_ratio"] == pytest.approx(0.25) and m["prefetch_coverage"] == pytest.approx(0.5)
    assert m["prefetch_waste_bytes"] == 0
    assert m["prefetches"] == 2 and m["bytes_read"] == 3 * EXPERT
    assert m["peak_expert_bytes"] == 2 * EXPERT
    assert m["makespan_s"] == pytest.approx(D + E + 3 * L + 2 * C)   # 2D + 2E + 3L + 4C without prefetch


def test_prefetch_never_evicts_what_its_decision_point_pins():
    # budget = one expert: the oracle cannot prefetch layer 1's expert while layer 0's is pinned
    tl = run(make_trace([[[0], [1]], [[0], [0]]]), EXPERT, prefetch="oracle")
    assert not tl.of("cache", "prefetch")
    assert [(e.layer, e.expert) for e in tl.of("io")] == [(0, 0), (1, 1), (0, 0), (1, 0)]


def test_io_overlaps_compute_within_a_layer():
    # top-2 at one layer: the second load runs while the first expert computes
    model = ModelArch("tiny2", layers=1, experts=2, top_k=2, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    tl = run(make_trace([[[0, 1]]]), 2 * EXPERT, model=model)
    loads = [(round(e.start, 9), round(e.end, 9)) for e in tl.of("io")]
    comps = [(round(e.start, 9), round(e.end, 9)) for e in tl.of("compute")]
    d = dense(1)  # a 2-expert router: the same dense size as TINY's
    assert loads == [(round(d, 9), round(d + LOAD, 9)), (round(d + LOAD, 9), round(d + 2 * LOAD, 9))]
    assert comps == [(round(d + LOAD, 9), round(d + LOAD + COMPUTE, 9)),
                     (round(d + 2 * LOAD, 9), round(d + 2 * LOAD + COMPUTE, 9))]


def test_queue_depth_overlaps_latency():
    # QD 2: the second request's latency overlaps the first transfer
    model = ModelArch("tiny2", layers=1, experts=2, top_k=2, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    tl = run(make_trace([[[0, 1]]]), 2 * EXPERT, model=model, device=make_device(queue_depth=2))
    ends = [round(e.end - tl.of("dense")[0].end, 9) for e in tl.of("io")]
    assert ends == [round(LOAD, 9), round(LOAD + 0.1, 9)]


def test_zip_format_decompresses_on_workers():
    fmt = make_format("zip", TINY.expert_shapes, chunks=2, exponent_ratio=0.5)
    tl = run(make_trace([[[0], [1]]]), 2 * fmt.expert_bytes, fmt=fmt)
    dec = tl.of("decompress")
    assert len(dec) == 2 * 2                                   # 2 chunks per expert, 2 experts
    assert {e.resource for e in dec} <= {"decompress[0]", "decompress[1]"}
    for e in dec:                                              # raw chunk bytes at 1000 B/s
        assert e.end - e.start == pytest.approx(e.bytes / 1000.0)
    # compute starts only after every chunk of its expert is decompressed
    for c in tl.of("compute"):
        last = max(e.end for e in dec if (e.layer, e.expert) == (c.layer, c.expert))
        assert c.start >= last - 1e-12


def test_budget_below_minimum_states_it():
    model = ModelArch("tiny2", layers=1, experts=2, top_k=2, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    with pytest.raises(BudgetError, match=r"minimum .*384 B"):
        run(make_trace([[[0, 1]]]), EXPERT, model=model)


def test_prefill_loads_union_and_ttft_counts_it():
    prompt = np.array([True, True, False])
    tl = run(make_trace([[[0], [0]], [[1], [0]], [[1], [1]]], prompt=prompt), 4 * EXPERT)
    steps = tl.meta["steps"]
    assert [s["prefill"] for s in steps] == [True, False]
    pre = [e for e in tl.of("compute") if e.step == 0]
    assert sorted((e.layer, e.expert, e.tokens) for e in pre) == [(0, 0, 1), (0, 1, 1), (1, 0, 2)]


# -- properties --------------------------------------------------------------------------
@st.composite
def cases(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 5))
    k = draw(st.integers(1, min(2, experts)))
    tokens = draw(st.integers(1, 8))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                   for _ in range(tokens)])
    req = rng.integers(0, 3, tokens)
    prompt = rng.random(tokens) < 0.3
    fmt = draw(st.sampled_from(["bf16", "mwq", "zip"]))
    extra = draw(st.integers(0, experts * layers))
    policy = draw(st.sampled_from(sorted(caches_for(fmt))))
    prefetch = draw(st.sampled_from(sorted(PREFETCHERS)))
    return layers, experts, k, ex, req, prompt, batch, fmt, extra, policy, prefetch


@settings(max_examples=60, deadline=None)
@given(cases())
def test_invariants(case):
    layers, experts, k, ex, req, prompt, batch, fmt_name, extra, policy, prefetch = case
    model = ModelArch("prop", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128,
                      n_heads=1, n_kv_heads=1)
    opts = {"mwq": {"b1": 2, "bK": 4}, "zip": {"chunks": 2}}.get(fmt_name, {})
    fmt = make_format(fmt_name, model.expert_shapes, **opts)
    trace = make_trace(ex, prompt=prompt, request_ids=req, num_experts=experts)
    w = Workload(model, trace, fmt, batch=batch)
    budget = (experts + extra) * fmt.level_bytes(fmt.levels - 1)   # at least any layer's demand
    cost = CostModel.build(make_device(), model, fmt)     # planning caches (zipmoe) read it
    tl1 = Simulator(make_device(), w, build_policies(w, budget, cache=policy, prefetch=prefetch, cost=cost)).run()
    # budget never exceeded, at any decision
    mem = 0
    for e in tl1.events:
        if e.resource == "cache":
            mem += -e.bytes if e.kind == "evict" else e.bytes
            assert 0 <= mem <= budget
    # every requested (step, layer, expert) computed, for exactly its tokens
    wanted = {}
    for s in w.steps:
        for layer in range(layers):
            for e in ex[s.tokens, layer].ravel():
                wanted[s.index, layer, int(e)] = wanted.get((s.index, layer, int(e)), 0) + 1
    got = {}
    for e in tl1.of("compute"):
        got[e.step, e.layer, e.expert] = got.get((e.step, e.layer, e.expert), 0) + e.tokens
    assert got == wanted
    # a compute never starts before the latest load of each part it needs has finished (a load
    # issued for it at its own decision point, or prefetched at an earlier one)
    loads = {}
    for e in tl1.of("io"):
        loads.setdefault((e.layer, e.expert, e.level), []).append((e.start, e.end))
    for e in tl1.of("compute"):
        for part in fmt.level_parts[e.level]:
            issued = [end for start, end in loads[e.layer, e.expert, part] if start <= e.start + 1e-12]
            assert issued and e.start >= issued[-1] - 1e-12
    # deterministic: the same inputs give the same timeline
    tl2 = Simulator(make_device(), w, build_policies(w, budget, cache=policy, prefetch=prefetch, cost=cost)).run()
    assert tl1.events == tl2.events


@pytest.mark.parametrize("recorded", [False, True])
def test_a_steps_routings_are_its_layers_views(recorded):
    """policies/bundle.py step_routings (what the engine hands each decision point): layer l's routing
    is layer l of the step's arrays, with the trace's levels and gate-lookahead predictions where it
    records them and None where it does not."""
    from policies.bundle import step_routings
    from test_metrics_only import model, trace
    from workloads.trace import RoutingTrace
    arch = model(layers=3, experts=5, k=2)
    fmt = make_format("mwq", arch.expert_shapes, b1=2, bK=4)
    t = trace(np.random.default_rng(1), arch, fmt, 6)
    if not recorded:
        t = RoutingTrace(t.experts, t.scores, t.request_ids, t.prompt, t.metadata)
    w = Workload(arch, t, fmt, batch=2)
    for step in w.steps:
        routings = step_routings(w, step)
        assert len(routings) == arch.layers
        for layer, r in enumerate(routings):
            assert np.array_equal(r.experts, t.experts[step.tokens, layer])
            assert np.array_equal(r.scores, t.scores[step.tokens, layer])
            if recorded:
                assert np.array_equal(r.levels, t.levels[step.tokens, layer])
                assert np.array_equal(r.predicted[0], t.predicted[step.tokens, layer])
                assert np.array_equal(r.predicted[1], t.predicted_scores[step.tokens, layer])
            else:
                assert r.levels is None and r.predicted is None
