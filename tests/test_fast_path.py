"""Issue 20 item 4: the fused loops (sim/fast.py) equal the engine running the policy objects.

A hypothesis property test over random traces, budgets, batches, queue depths, levels and
measured host costs: for every bundle a fused loop takes (fixed level + FIFO scheduler + LRU,
FIFO or LFU + no prefetch or the oracle, bf16 or mwq), the fused run's timeline is the engine's
event for event (so its decisions are too), and its metrics-only run gives the same metrics bit
for bit. The run function picks the loop only where this holds, and `--no-fast-path` forces the
general path."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import make_device, make_trace
from devices.profile import load_device
from experiments.cli import main
from policies import build_policies
from policies.cost import CostModel
from sim.engine import Simulator
from sim.fast import fused_for, run_fused
from timeline.events import Timeline
from timeline.metrics import compute_metrics
from workloads.catalog import ModelArch
from workloads.formats import level_bits, make_format
from workloads.workload import Workload

# a host profile with the executor's own costs (decision path, gap, step) but no contention: the
# fused loops charge them as the engine does
MEASURED = """
name: measured-no-contention
description: "hand-made measured profile"
memory: 8GB          # test
expert_budget: 1GB   # test
default_storage: disk
storage:
  disk: {read_bandwidth: 3MB/s, latency: 1ms, queue_depth: 2}   # test
compute:
  memory_bandwidth: 10GB/s  # test
  flops: 100GFLOPS          # test
  overhead: 20us            # test
  measured:
    model: prop
    tokens: [1, 4]
    experts:
      bf16: [[10ms, 16ms]]
      mwq-int2-4: [[3ms, 5ms], [4ms, 6ms], [5ms, 8ms]]
    dense: {prefill: [2ms, 5ms], decode: [1ms, 4ms]}
    step: {prefill: [7ms, 7ms], decode: [3ms, 6ms]}
    decision_overhead: 0.5ms
    load_overhead: 0.25ms
    compute_gap: 0.1ms
decompress:
  workers: 1
  throughput: {lz4: 1GB/s}   # test
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "m.yaml"
    path.write_text(MEASURED)
    return load_device(str(path))


def arch(layers, experts, k):
    return ModelArch("prop", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)


def runs(device, w, budget, **bundle):
    """(the engine's timeline, the fused timeline, the engine's metrics-only and the fused one's)."""
    cost = CostModel.build(device, w.model, w.fmt)
    out = []
    for fused, events in ((False, True), (True, True), (False, False), (True, False)):
        sim = Simulator(device, w, build_policies(w, budget, cost=cost, **bundle), cost=cost)
        assert fused_for(sim)
        out.append(run_fused(sim, events=events) if fused else sim.run(events=events))
    return out


@st.composite
def cases(draw):
    m = arch(draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 2)))
    tokens = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    ex = np.stack([np.stack([rng.choice(m.experts, m.top_k, replace=False) for _ in range(m.layers)])
                   for _ in range(tokens)])
    trace = make_trace(ex, prompt=rng.random(tokens) < 0.3, request_ids=rng.integers(0, 3, tokens),
                       num_experts=m.experts)
    fmt = draw(st.sampled_from(["bf16", "mwq"]))
    fmt = make_format(fmt, m.expert_shapes, **({"b1": 2, "bK": 4} if fmt == "mwq" else {}))
    level = draw(st.integers(0, fmt.levels - 1))
    w = Workload(m, trace, fmt, batch=draw(st.integers(1, 3)))
    # from the smallest budget that runs to room for every expert
    budget = (min(m.experts, m.top_k * w.batch * 3) + draw(st.integers(0, m.experts * m.layers))) * \
        fmt.level_bytes(level)
    bundle = {"cache": draw(st.sampled_from(["lru", "lfu", "fifo"])), "prefetch": draw(st.sampled_from(["none", "oracle"])),
              "allocator_options": {"level": level},
              "scheduler_options": {"order": draw(st.sampled_from(["router", "expert-id"]))}}
    device = draw(st.sampled_from(["roofline", "measured"]))
    qd = draw(st.integers(1, 3))
    return device, qd, w, budget, bundle


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_fused_loop_equals_the_policy_objects(measured, case):
    device, qd, w, budget, bundle = case
    device = make_device(queue_depth=qd, latency=0.02 * (qd - 1)) if device == "roofline" else measured
    try:
        engine, fused, engine_only, fused_only = runs(device, w, budget, **bundle)
    except Exception as e:          # a budget below the minimum: both refuse it alike (checked below)
        assert "minimum" in str(e)
        return
    assert fused.events == engine.events and fused.meta == engine.meta
    assert fused.decisions() == engine.decisions()
    bits = level_bits(w.fmt)
    m = json.dumps(compute_metrics(Timeline(engine.events, engine.meta), bits))     # from the events alone
    assert json.dumps(compute_metrics(fused_only, bits)) == m == json.dumps(compute_metrics(engine_only, bits))
    assert json.dumps(compute_metrics(fused, bits)) == m == json.dumps(compute_metrics(engine, bits))
    assert not fused_only.events and fused_only.meta == engine.meta


def test_a_hand_computed_case_and_the_oracle():
    """tests/test_engine.py's hand-computed oracle run, fused: the same events."""
    from conftest import TINY
    w = Workload(TINY, make_trace([[[0], [1]], [[0], [0]]]), make_format("bf16", TINY.expert_shapes))
    engine, fused, _, fused_only = runs(make_device(), w, 2 * 192, cache="lru", prefetch="oracle")
    assert fused.events == engine.events and len(engine.events) > 10
    m = compute_metrics(fused_only)
    assert m["prefetch_coverage"] == pytest.approx(0.5) and m["admits"] == 1


@pytest.mark.parametrize("change", ["scheduler", "cache", "prefetch", "format", "allocator", "contention",
                                    "on-demand", "wake", "dense_after_loads"])
def test_the_fused_loop_is_picked_only_for_the_bundles_it_covers(change, tmp_path):
    m = arch(2, 4, 2)
    fmt = make_format("zip" if change == "format" else "bf16", m.expert_shapes)
    ex = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
    w = Workload(m, make_trace(ex, num_experts=4), fmt)
    bundle = {"scheduler": {"scheduler": "hebf"}, "cache": {"cache": "belady"}, "prefetch": {"prefetch": "last-use"},
              "allocator": {"allocator": "gate-score"}, "on-demand": {"cache": "on-demand"}}.get(change, {})
    device = make_device()
    if change in ("contention", "wake", "dense_after_loads"):
        path = tmp_path / "c.yaml"
        extra = {"contention": "    contention:\n      bf16: {read: 0.2}", "wake": "    wake: 30us"}.get(
            change, "    dense_after_loads: 30us")
        path.write_text(MEASURED.replace("    compute_gap: 0.1ms", "    compute_gap: 0.1ms\n" + extra))
        device = load_device(str(path))
    sim = Simulator(device, w, build_policies(w, 10 ** 6, **bundle))
    assert not fused_for(sim)
    assert fused_for(Simulator(make_device(), w, build_policies(w, 10 ** 6))) or change == "format"


def test_simulate_and_the_cli_force_the_general_path_to_compare(tmp_path):
    from experiments.run import simulate
    from experiments.spec import RunSpec
    spec = RunSpec(model="olmoe-1b-7b", tokens=6, prompt_tokens=3, budget=2 * 10 ** 9)
    for timeline in (False, True):
        a, b = simulate(spec, timeline=timeline), simulate(spec, timeline=timeline, fast_path=False)
        assert json.dumps(a.metrics) == json.dumps(b.metrics)
        assert timeline is False or a.timeline.events == b.timeline.events
    small = ["--model", "olmoe-1b-7b", "--tokens", "6", "--prompt", "3", "--budget", "2GB", "--quiet"]
    assert main(["simulate", *small, "--out", str(tmp_path / "fast")]) == 0
    assert main(["simulate", *small, "--no-fast-path", "--out", str(tmp_path / "general")]) == 0
    for name in ("metrics.json", "timeline.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "general" / name).read_bytes()


@settings(max_examples=60, deadline=None)
@given(cases())
def test_the_fixed_level_minimum_counted_on_the_trace_equals_the_walk(case):
    """build_policies' budget check counts a fixed-level run's largest demand on the trace
    (policies/bundle.py _largest_fixed_demand) instead of walking the allocator."""
    from policies.allocators import FixedLevel
    from policies.base import PolicyContext, largest_layer_demand
    from policies.bundle import access_sequence, largest_demand
    _, _, w, _, bundle = case
    alloc = FixedLevel(PolicyContext(w.fmt, w.model.layers, w.model.experts, 0), **bundle["allocator_options"])
    assert largest_demand(w, alloc) == largest_layer_demand(access_sequence(w, alloc), w.fmt)
