"""Issue 20 item 2: a metrics-only run (Simulator.run(events=False), sim/record.py FigureRecorder)
records no events, and its metrics equal those computed from the full timeline's events bit for
bit (as are those of a run with a timeline, which carries the figures too): for
every registered cache, scheduler, allocator and prefetcher, on every format, on roofline and
measured host profiles, and on random traces, budgets and batches."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import make_device
from devices.profile import load_device
from devices.units import MoelabError
from policies import ALLOCATORS, PREFETCHERS, SCHEDULERS, build_policies, caches_for
from policies.cost import CostModel
from sim.engine import Simulator
from sim.record import Union
from timeline.events import Timeline
from timeline.metrics import busy_time, compute_metrics
from workloads.catalog import ModelArch
from workloads.formats import level_bits, make_format
from workloads.trace import RoutingTrace
from workloads.workload import Workload

FORMATS = {"bf16": {}, "mwq": {"b1": 2, "bK": 4}, "zip": {"chunks": 2}, "copies": {"b1": 2, "bK": 4}}
MEASURED = """
name: measured-contention
description: "hand-made measured profile with contention"
memory: 8GB          # test
expert_budget: 1GB   # test
default_storage: disk
storage:
  disk: {read_bandwidth: 2MB/s, latency: 1ms, queue_depth: 2}   # test
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
      zip: [[11ms, 17ms]]
    dense: {prefill: [2ms, 5ms], decode: [1ms, 4ms]}
    step: {prefill: [7ms, 7ms], decode: [3ms, 6ms]}
    decision_overhead: 0.5ms
    load_overhead: 0.25ms
    compute_gap: 0.1ms
    contention:
      bf16: {read: 0.3, decompress: 0.1, call: 0.1ms, dense: 0.2ms, stall: 0.4}
      mwq-int2-4: {read: 0.3, call: 0.1ms, stall: 0.2}
      zip: {read: 0.2, decompress: 0.3, dense: 0.1ms, stall: 0.3}
decompress:
  workers: 2
  throughput: {lz4: 1GB/s, lz4hc: 1GB/s, zstd: 1GB/s}   # test
"""


def model(layers=3, experts=5, k=2):
    return ModelArch("prop", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)


def trace(rng, arch, fmt, tokens):
    """Random routing with a level per (token, slot) and gate-lookahead predictions recorded, so
    that trace-levels and the lookahead prefetchers run too."""
    ex = np.stack([np.stack([rng.choice(arch.experts, arch.top_k, replace=False) for _ in range(arch.layers)])
                   for _ in range(tokens)])
    pred = rng.integers(-1, arch.experts, (tokens, arch.layers, 3))
    return RoutingTrace(ex, rng.random(ex.shape), rng.integers(0, 3, tokens), rng.random(tokens) < 0.3,
                        {"experts": arch.experts}, levels=rng.integers(0, fmt.levels, ex.shape),
                        predicted=pred, predicted_scores=rng.random(pred.shape))


def same_metrics(device, w, budget, storage=None, **bundle) -> bool | None:
    """Whether both runs of one bundle give the same metrics (None: the bundle refuses the case,
    before running or, the same way in both, while running)."""
    cost = CostModel.build(device, w.model, w.fmt, storage)
    runs, errors = [], []
    for events in (True, False):
        try:
            p = build_policies(w, budget, cost=cost, **bundle)
        except MoelabError:
            return None
        try:
            tl = Simulator(device, w, p, storage, cost=cost).run(events=events)
        except MoelabError as e:       # (a policy that cannot carry a case out: e.g. d2moe-budget's prefetch)
            errors.append(str(e))
            continue
        assert events or not tl.events
        runs.append((compute_metrics(tl, level_bits(w.fmt)), tl))
    if errors:
        assert len(errors) == 2 and errors[0] == errors[1], errors
        return None
    (with_figures, tl), (only, tl_only) = runs
    assert tl.meta == tl_only.meta
    # the metrics from the events alone (timeline/metrics.py figures_of), as the executor's are
    full = compute_metrics(Timeline(tl.events, tl.meta), level_bits(w.fmt))
    assert json.dumps(with_figures) == json.dumps(full)
    # bit for bit: the JSON text (floats written exactly) and the values themselves
    assert json.dumps(full) == json.dumps(only), {k: (full[k], only[k]) for k in full if full[k] != only[k]}
    return True


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_every_registered_policy_on_every_format(fmt_name):
    rng = np.random.default_rng(7)
    arch = model()
    fmt = make_format(fmt_name, arch.expert_shapes, **FORMATS[fmt_name])
    w = Workload(arch, trace(rng, arch, fmt, 12), fmt, batch=2)
    budget = (arch.experts + 2) * fmt.level_bytes(fmt.levels - 1)
    devices = [(make_device(queue_depth=2), None)]
    ran = []
    for cache in sorted(caches_for(fmt_name)):
        for prefetch in sorted(PREFETCHERS):
            ran.append(same_metrics(devices[0][0], w, budget, cache=cache, prefetch=prefetch))
    for scheduler in sorted(SCHEDULERS):
        for allocator in sorted(ALLOCATORS):
            ran.append(same_metrics(devices[0][0], w, budget, cache="lru", prefetch="last-use", scheduler=scheduler,
                                    allocator=allocator))
    assert ran.count(True) >= len(caches_for(fmt_name)) * len(PREFETCHERS) // 2


def test_measured_profiles_with_contention_and_a_throttle(tmp_path):
    from devices.profile import StorageProfile
    path = tmp_path / "m.yaml"
    path.write_text(MEASURED)
    device = load_device(str(path))
    slow = StorageProfile(name="sd", read_bandwidth=1e6, latency=0.003, queue_depth=2)
    rng = np.random.default_rng(3)
    arch = model()
    for fmt_name in ("bf16", "mwq", "zip"):
        fmt = make_format(fmt_name, arch.expert_shapes, **FORMATS[fmt_name])
        w = Workload(arch, trace(rng, arch, fmt, 10), fmt, batch=2)
        budget = (arch.experts + 1) * fmt.level_bytes(fmt.levels - 1)
        for cache in ("lru", "lfu", "zipmoe" if fmt_name == "zip" else "belady"):
            for prefetch in ("none", "oracle", "next-layer-all"):
                for storage in (None, slow):
                    assert same_metrics(device, w, budget, storage, cache=cache, prefetch=prefetch)


@st.composite
def cases(draw):
    fmt_name = draw(st.sampled_from(sorted(FORMATS)))
    arch = model(draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 2)))
    fmt = make_format(fmt_name, arch.expert_shapes, **FORMATS[fmt_name])
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    w = Workload(arch, trace(rng, arch, fmt, draw(st.integers(1, 10))), fmt, batch=draw(st.integers(1, 3)))
    budget = (arch.experts + draw(st.integers(0, arch.experts * arch.layers))) * fmt.level_bytes(fmt.levels - 1)
    bundle = {"cache": draw(st.sampled_from(sorted(caches_for(fmt_name)))),
              "prefetch": draw(st.sampled_from(sorted(PREFETCHERS))),
              "scheduler": draw(st.sampled_from(sorted(SCHEDULERS))),
              "allocator": draw(st.sampled_from(["fixed", "fixed", "capacity", "gate-score", "trace-levels"]))}
    device = make_device(queue_depth=draw(st.integers(1, 3)), workers=draw(st.integers(1, 3)))
    return device, w, budget, bundle


@settings(max_examples=80, deadline=None)
@given(cases())
def test_metrics_only_equals_the_timeline_on_random_runs(case):
    device, w, budget, bundle = case
    same_metrics(device, w, budget, **bundle)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=0, max_size=25),
       st.booleans())
def test_the_union_of_intervals_as_busy_time_computes_it(raw, in_order):
    intervals = [(a / 4, (a + d) / 4) for a, d in raw]
    if in_order:
        intervals.sort(key=lambda x: x[0])
    u = Union()
    for a, b in intervals:
        u.add(a, b)
    assert u.length() == busy_time(intervals)
