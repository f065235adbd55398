"""Memory tiers and placement (issue 26, items 2 and 3): hand-computed timelines of a host RAM level
and of CPU-placed experts, each placement policy's decisions on a tiny trace, the error texts, and
the invariants over random runs."""
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY, make_device, make_trace
from devices.tiers import CpuProfile, Link, Tier
from devices.units import ConfigError
from policies import PREFETCHERS, build_policies, caches_for, load_item
from policies.base import Demand, Key
from policies.bundle import workload_routings
from policies.cost import CostModel
from policies.tiers import HOST, STORAGE, attach_tiers
from sim.replay import replay_policies
from sim.tiers import TieredSimulator
from timeline.tiers import HOST_CACHE
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.workload import Workload

EXPERT = 192          # bytes of one TINY expert in bf16
LOAD = 0.02 + 0.1     # storage: latency + 192 B at 1920 B/s
COPY = 0.005 + 0.02   # link: latency + 192 B at 9600 B/s
GPU = 0.1             # one expert on the accelerator: 192 B at 1920 B/s
DENSE = 0.075         # attention 64 + router 8 params = 144 B at 1920 B/s
KV = 16 / 1920        # attention's context term per cached token (K and V: 2 x 1 head x 4 x 2 B at 1920 B/s)
CPU = 0.04            # one expert on the CPU: 192 B at 4800 B/s


def tiered_device(cpu_bw=4800.0, cpu=True):
    d = make_device(mem_bw=1920.0)
    tiers = (Tier("gpu", d.memory_bytes, Link("host-ram", "gpu", 9600.0, 0.005, 1)), Tier("host-ram", 10 ** 10))
    return replace(d, tiers=tiers, cpu=CpuProfile(4, cpu_bw, 1e18) if cpu else None)


ONE = replace(TINY, name="tiny-1", layers=1)     # one MoE layer of two experts


def bundle(trace, budget, host_budget, placement="gpu-only", device=None, batch=1, host_cache="lru",
           placement_options=None, cache="lru", model=TINY):
    device = device or tiered_device()
    fmt = make_format("bf16", model.expert_shapes)
    w = Workload(model, trace, fmt, batch=batch)
    cost = CostModel.build(device, model, fmt)
    p = build_policies(w, budget, cache=cache, cost=cost)
    attach_tiers(p, host_budget, host_cache, placement=placement, placement_options=placement_options)
    return device, w, p, cost


def run(trace, budget, host_budget, **kw):
    device, w, p, cost = bundle(trace, budget, host_budget, **kw)
    return TieredSimulator(device, w, p, cost=cost).run()


def timed(tl):
    return sorted((e.resource, e.kind, round(e.start, 9), round(e.end, 9), e.layer, e.expert)
                  for e in tl.events if not e.resource.startswith("cache"))


def expect(events):
    return sorted((r, k, round(a, 9), round(b, 9), la, ex) for r, k, a, b, la, ex in events)


LINK = "link:host-ram>gpu"


def test_two_levels_hit_in_ram_costs_only_the_link():
    # token 0: L0->E0, L1->E1; token 1: L0->E0, L1->E0. The accelerator holds one expert (each layer
    # evicts the other's), host RAM four: step 1's L0 E0 is a miss on the GPU and a hit in RAM
    tl = run(make_trace([[[0], [1]], [[0], [0]]]), EXPERT, 4 * EXPERT)
    D, L, C, G = DENSE + KV, LOAD, COPY, GPU        # step 0 attends 1 token, step 1 two
    t1 = D + L + C + G                              # layer 0 of step 0 ends
    t2 = t1 + D + L + C + G                         # layer 1
    D1 = D + KV
    t3 = t2 + D1 + C + G                            # step 1 layer 0: a hit in RAM, only the copy
    t4 = t3 + D1 + L + C + G                        # step 1 layer 1: L1 E0 was never read
    assert timed(tl) == expect([
        ("dense", "dense", 0, D, 0, -1), ("io", "load", D, D + L, 0, 0), (LINK, "copy", D + L, D + L + C, 0, 0),
        ("compute", "expert", D + L + C, t1, 0, 0),
        ("dense", "dense", t1, t1 + D, 1, -1), ("io", "load", t1 + D, t1 + D + L, 1, 1),
        (LINK, "copy", t1 + D + L, t1 + D + L + C, 1, 1), ("compute", "expert", t1 + D + L + C, t2, 1, 1),
        ("dense", "dense", t2, t2 + D1, 0, -1), (LINK, "copy", t2 + D1, t2 + D1 + C, 0, 0),
        ("compute", "expert", t2 + D1 + C, t3, 0, 0),
        ("dense", "dense", t3, t3 + D1, 1, -1), ("io", "load", t3 + D1, t3 + D1 + L, 1, 0),
        (LINK, "copy", t3 + D1 + L, t3 + D1 + L + C, 1, 0), ("compute", "expert", t3 + D1 + L + C, t4, 1, 0)])
    f = tl.meta["tier_figures"]
    assert f["link_bytes"] == {LINK: 4 * EXPERT}
    assert (f["host_hits"], f["host_accesses"]) == (1, 4)
    assert f["host_peak_bytes"] == 3 * EXPERT
    host = [(e.kind, e.step, e.layer, e.expert) for e in tl.events if e.resource == HOST_CACHE]
    assert host == [("admit", 0, 0, 0), ("admit", 0, 1, 1), ("admit", 1, 1, 0)]


def test_a_miss_goes_through_both_queues():
    # batch 2 at one layer: two misses in both levels; the storage serves them one after the other
    # (queue depth 1), and the link copies each once its read has landed in RAM
    tl = run(make_trace([[[0]], [[1]]], request_ids=[0, 1]), 2 * EXPERT, 2 * EXPERT, batch=2, model=ONE)
    D, L, C, G = DENSE + 2 * KV, LOAD, COPY, GPU     # two requests, one token of context each
    assert timed(tl) == expect([
        ("dense", "dense", 0, D, 0, -1),
        ("io", "load", D, D + L, 0, 0), ("io", "load", D + L, D + 2 * L, 0, 1),
        (LINK, "copy", D + L, D + L + C, 0, 0), (LINK, "copy", D + 2 * L, D + 2 * L + C, 0, 1),
        ("compute", "expert", D + L + C, D + L + C + G, 0, 0),
        ("compute", "expert", D + 2 * L + C, D + 2 * L + C + G, 0, 1)])


def test_a_cpu_placed_expert_computes_at_the_cpu_roofline_beside_the_gpu():
    # hot-on-gpu, one expert per layer: at the first decision point nothing was used yet, so E0 (the
    # lower id) goes to the GPU and E1 to the CPU: E1 is read into RAM behind E0 and never copied
    tl = run(make_trace([[[0]], [[1]]], request_ids=[0, 1]), 2 * EXPERT, 2 * EXPERT, batch=2,
             model=ONE, placement="hot-on-gpu", placement_options={"per_layer": 1})
    D, L, C, G = DENSE + 2 * KV, LOAD, COPY, GPU
    assert timed(tl) == expect([
        ("dense", "dense", 0, D, 0, -1),
        ("io", "load", D, D + L, 0, 0), ("io", "load", D + L, D + 2 * L, 0, 1),
        (LINK, "copy", D + L, D + L + C, 0, 0),
        ("compute", "expert", D + L + C, D + L + C + G, 0, 0),      # [0.237, 0.337]
        ("cpu", "expert", D + 2 * L, D + 2 * L + CPU, 0, 1)])        # [0.332, 0.372]: overlaps the GPU's
    assert tl.meta["tier_figures"]["cpu_tokens"] == 1
    assert not any(e.resource == "cache" and e.expert == 1 for e in tl.events)   # never in the GPU's cache


def decisions(p, w):
    out = []
    for _, layer, routing in workload_routings(w):
        d = p.decide(layer, routing)
        out.append((layer, dict(d.tiers.placement), [(s.item.key, src) for s, src in zip(d.loads, d.tiers.sources)]))
        p.finish(layer)
    return out


def test_cpu_static_places_the_first_layers_on_the_cpu():
    _, w, p, _ = bundle(make_trace([[[0], [1]], [[1], [1]]]), EXPERT, 4 * EXPERT, placement="cpu-static",
                        placement_options={"layers": 1})
    got = decisions(p, w)
    assert [g[1] for g in got] == [{(0, 0): "cpu"}, {(1, 0): "gpu"}, {(1, 0): "cpu"}, {(1, 0): "gpu"}]
    assert got[1][2] == [(Key(1, 1, 0), STORAGE)] and got[3][2] == []      # L1 E1 stays on the GPU: a hit


def test_hot_on_gpu_ranks_by_the_counts_seen_so_far():
    # layer 0 asks E1, E1, E0: nothing seen -> E0 hot (E1 on the CPU); then E1 seen once -> E1 hot
    _, w, p, _ = bundle(make_trace([[[1], [0]], [[1], [0]], [[0], [0]]]), EXPERT, 4 * EXPERT,
                        placement="hot-on-gpu", placement_options={"per_layer": 1})
    layer0 = [g[1] for g in decisions(p, w) if g[0] == 0]
    assert layer0 == [{(1, 0): "cpu"}, {(1, 0): "gpu"}, {(0, 0): "cpu"}]


def test_cpu_when_faster_compares_copy_and_compute_with_the_cpu():
    # CPU at 1600 B/s: 0.12 s an expert. Not on the GPU: copy 0.025 + GPU 0.1 = 0.125 > 0.12 -> CPU;
    # on the GPU already: 0.1 < 0.12 -> GPU
    _, w, p, _ = bundle(make_trace([[[0], [0]]]), EXPERT, 4 * EXPERT, placement="cpu-when-faster",
                        device=tiered_device(cpu_bw=1600.0))
    demand = Demand(0, (((0, 0),), ((1, 0),)))
    p.cache.admit(load_item(Key(0, 1, 0), w.fmt))
    assert p.placement.place(0, demand) == {(0, 0): "cpu", (1, 0): "gpu"}


def test_decisions_agree_between_the_simulator_and_the_replay():
    """The cache-only replay carries out the same decisions the simulator does (both levels)."""
    trace = make_trace([[[0], [1]], [[1], [0]], [[0], [0]], [[1], [1]]])
    kw = dict(placement="hot-on-gpu", placement_options={"per_layer": 1}, host_cache="lfu")
    tl = run(trace, EXPERT, 2 * EXPERT, **kw)
    _, w, p, _ = bundle(trace, EXPERT, 2 * EXPERT, **kw)
    r = replay_policies(w, p)
    f = tl.meta["tier_figures"]
    assert (r["host_hits"], r["host_accesses"]) == (f["host_hits"], f["host_accesses"])
    _, w, p, _ = bundle(trace, EXPERT, 2 * EXPERT, **kw)
    gpu, host = [], []
    for step, layer, routing in workload_routings(w):
        d = p.decide(layer, routing)
        for item, kind, evicted in d.loads:
            gpu += [("evict", step.index, k.layer, k.expert, k.part) for k in evicted]
            gpu.append((kind, step.index, item.key.layer, item.key.expert, item.key.part))
        for key, kind, evicted in d.tiers.records:
            host += [("evict", step.index, k.layer, k.expert) for k in evicted] + [(kind, step.index, key.layer,
                                                                                       key.expert)]
        gpu += [("evict", step.index, k.layer, k.expert, k.part) for k in p.finish(layer)]
        host += [("evict", step.index, k.layer, k.expert) for k in p.lower.finished]
    assert tl.decisions() == gpu
    assert [(e.kind, e.step, e.layer, e.expert) for e in tl.events if e.resource == HOST_CACHE] == host


# -- errors ---------------------------------------------------------------------------------------------
def test_a_one_level_device_refuses_a_host_level():
    from experiments.run import simulate
    from experiments.spec import RunSpec
    with pytest.raises(ConfigError, match=r"jetson-orin-nano-8gb.*one memory level.*devices with host RAM: "
                                          r"rtx-3060-laptop-6gb"):
        simulate(RunSpec.from_doc({"device": "jetson-orin-nano-8gb", "host_budget": "1GB", "tokens": 1}))


def test_cpu_placement_needs_a_cpu_section():
    _, w, p, _ = bundle(make_trace([[[0], [0]]]), EXPERT, 4 * EXPERT, device=tiered_device(cpu=False))
    with pytest.raises(ConfigError, match=r"no cpu: section \(cores, memory_bandwidth, flops\).*devices with one"):
        p.lower.cache.ctx.cost.cpu_expert_seconds(0, 1)


def test_offline_host_cache_and_small_host_budget_are_refused():
    with pytest.raises(ConfigError, match="host cache belady: .*use an online policy"):
        bundle(make_trace([[[0], [0]]]), EXPERT, 4 * EXPERT, host_cache="belady")
    with pytest.raises(ConfigError, match=r"host budget 100B is below the largest single-layer demand 192B"):
        bundle(make_trace([[[0], [0]]]), EXPERT, 100)


PROFILE = """name: t
description: "t"
memory: 6GB
expert_budget: 4GB
default_storage: nvme
storage:
  nvme: {read_bandwidth: 3.5GB/s, latency: 70us, queue_depth: 4}
compute: {memory_bandwidth: 286GB/s, flops: 12.7TFLOPS, overhead: 20us}
decompress: {workers: 6, throughput: {lz4: 2.2GB/s}}
"""


@pytest.mark.parametrize("tiers, message", [
    ("tiers: {gpu: {capacity: 4GB}}", "tiers.gpu.capacity: the first level is the accelerator's memory: must "
                                      "equal memory"),
    ("tiers: {gpu: {capacity: 6GB, link: {bandwidth: 1GB/s, latency: 1us, queue_depth: 1}}}",
     "tiers.gpu.link: the last level's link to storage is the storage option"),
    ("tiers: {gpu: {capacity: 6GB}, host-ram: {capacity: 32GB}}", "tiers.gpu.link: missing key: the link from "
                                                                  "host-ram to gpu"),
    ("tiers: {a: {capacity: 6GB}, b: {capacity: 1GB}, c: {capacity: 1GB}}", "tiers: expected a mapping of 1 to 2"),
    ("tiers: {gpu: {capacity: 6GB, link: {bandwidth: 1GB/s, latency: 1us}}, h: {capacity: 8GB}}",
     "tiers.gpu.link.queue_depth: missing key"),
    ("cpu: {cores: 8, memory_bandwidth: 38GB/s}", "cpu.flops: missing key"),
    ("cpu: {cores: 8, memory_bandwidth: 38, flops: 1TFLOPS}", "cpu.memory_bandwidth: expected a number with a unit"),
])
def test_profile_errors_name_the_key(tmp_path, tiers, message):
    from devices.profile import load_device
    path = tmp_path / "t.yaml"
    path.write_text(PROFILE + tiers + "\n")
    with pytest.raises(ConfigError, match=f"t.yaml: {message}".replace("(", r"\(")):
        load_device(str(path))


def test_spec_round_trips_and_leaves_one_level_hashes_alone():
    from experiments.spec import RunSpec
    plain = RunSpec.from_doc({"device": "rtx-3060-laptop-6gb"})
    assert "placement" not in plain.to_doc() and not plain.tiered
    assert RunSpec.from_doc({"device": "rtx-3060-laptop-6gb", "placement": "gpu-only"}) == plain
    spec = RunSpec.from_doc({"device": "rtx-3060-laptop-6gb", "placement": {"name": "cpu-static",
                                                                            "options": {"layers": 3}},
                             "host_budget": "16GB", "host_cache": "lfu"})
    assert RunSpec.from_doc(spec.to_doc()) == spec and spec.config_hash() != plain.config_hash()
    with pytest.raises(ConfigError, match="f.yaml: placement: unknown placement 'x'; known: gpu-only, cpu-static"):
        RunSpec.from_doc({"placement": "x"}, "f.yaml")


# -- invariants -----------------------------------------------------------------------------------------
HOST_CACHES = ["lru", "lfu", "fifo", "on-demand", "layered-lru", "d2moe-budget"]


@st.composite
def cases(draw):
    import numpy as np
    layers, experts = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    k, tokens, batch = draw(st.integers(1, min(2, experts))), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    fmt = draw(st.sampled_from(["bf16", "mwq", "zip"]))
    return dict(layers=layers, experts=experts, k=k, ex=ex, req=rng.integers(0, 3, tokens),
                prompt=rng.random(tokens) < 0.3, batch=batch, fmt=fmt,
                allocator=draw(st.sampled_from(["fixed", "gate-score"] if fmt == "mwq" else ["fixed"])),
                cache=draw(st.sampled_from(sorted(caches_for(fmt)))), prefetch=draw(st.sampled_from(sorted(PREFETCHERS))),
                host_cache=draw(st.sampled_from(HOST_CACHES)), extra=draw(st.integers(0, 4)),
                host_extra=draw(st.integers(0, 6)), cpu_bw=draw(st.sampled_from([1600.0, 4800.0, 1e6])),
                placement=draw(st.sampled_from(["gpu-only", "cpu-static", "cpu-when-faster", "hot-on-gpu"])))


def tiered_run(c):
    model = ModelArch("prop", layers=c["layers"], experts=c["experts"], top_k=c["k"], d_model=128, d_ff=128,
                      n_heads=1, n_kv_heads=1)
    fmt = make_format(c["fmt"], model.expert_shapes, **{"mwq": {"b1": 2, "bK": 4}, "zip": {"chunks": 2}}.get(c["fmt"], {}))
    trace = make_trace(c["ex"], prompt=c["prompt"], request_ids=c["req"], num_experts=c["experts"])
    w = Workload(model, trace, fmt, batch=c["batch"])
    top = fmt.level_bytes(fmt.levels - 1)
    budget, host_budget = (c["experts"] + c["extra"]) * top, (c["experts"] + c["host_extra"]) * top
    device = tiered_device(cpu_bw=c["cpu_bw"])
    cost = CostModel.build(device, model, fmt)
    p = build_policies(w, budget, cache=c["cache"], prefetch=c["prefetch"], allocator=c["allocator"], cost=cost)
    attach_tiers(p, host_budget, c["host_cache"], placement=c["placement"])
    return TieredSimulator(device, w, p, cost=cost).run(), w, fmt, budget, host_budget


def test_a_cpu_part_the_prefetcher_also_wants_is_read_once_before_its_compute():
    # found once: the CPU share's part (L0 E1), admitted to host RAM at this decision point, was also
    # taken for "already in RAM" by the GPU prefetch of the same key, so the CPU computed unread
    import numpy as np
    case = dict(layers=1, experts=2, k=1, ex=np.array([[[1]], [[1]]]), req=np.array([1, 0]),
                prompt=np.array([True, True]), batch=1, fmt="bf16", allocator="fixed", cache="belady",
                prefetch="next-layer-all", host_cache="on-demand", extra=0, host_extra=0, cpu_bw=1600.0,
                placement="cpu-static")
    tl = tiered_run(case)[0]
    step0 = [e for e in tl.events if e.step == 0]
    read = [e for e in step0 if e.resource == "io" and e.expert == 1]
    cpu = [e for e in step0 if e.resource == "cpu"]
    assert len(read) == 1 and cpu[0].start == read[0].end
    check_invariants(case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_budgets_hold_each_row_computes_once_and_the_run_ends(c):
    check_invariants(c)


def check_invariants(c):
    tl, w, fmt, budget, host_budget = tiered_run(c)
    for resource, cap in (("cache", budget), (HOST_CACHE, host_budget)):     # every level, every event
        used = 0
        for e in tl.events:
            if e.resource == resource:
                used += -e.bytes if e.kind == "evict" else e.bytes
                assert 0 <= used <= cap, (resource, used, cap)
    wanted, got, seen = {}, {}, set()
    for s in w.steps:
        for layer in range(c["layers"]):
            for e in c["ex"][s.tokens, layer].ravel():
                wanted[s.index, layer, int(e)] = wanted.get((s.index, layer, int(e)), 0) + 1
    for e in tl.events:
        if e.resource in ("compute", "cpu"):
            key = (e.step, e.layer, e.expert, e.level)
            assert key not in seen, f"{key} computed twice (on the GPU and the CPU, or twice on one)"
            seen.add(key)
            got[e.step, e.layer, e.expert] = got.get((e.step, e.layer, e.expert), 0) + e.tokens
    assert got == wanted                         # each token's (expert, level) exactly once
    # a GPU compute starts after the copies of its parts, a CPU one after their reads into RAM
    arrived: dict = {}
    for e in tl.events:
        if e.resource.startswith(("link:", "io", "decompress")):
            arrived.setdefault((e.resource.startswith("link:"), e.layer, e.expert, e.level), []).append(e)
    for e in tl.events:
        if e.resource in ("compute", "cpu"):
            for part in fmt.level_parts[e.level]:
                events = arrived.get((e.resource == "compute", e.layer, e.expert, part), [])
                before = [a.end for a in events if a.start <= e.start + 1e-12]
                assert not events or e.start >= before[-1] - 1e-12
    ended = {e.step for e in tl.events if e.resource == "dense"}
    assert {s["step"] for s in tl.meta["steps"]} == ended            # the run ends: every step ran
    assert tiered_run(c)[0].events == tl.events                      # deterministic


def test_metrics_only_run_gives_the_same_metrics():
    """A tiered run without events (sweeps, studies) reports what the run with its timeline reports."""
    from experiments.run import simulate
    from experiments.spec import RunSpec
    spec = RunSpec.from_doc({"device": "rtx-3060-laptop-6gb", "model": "olmoe-1b-7b", "tokens": 3, "budget": "1GB",
                             "host_budget": "2GB", "placement": "hot-on-gpu", "prompt_tokens": 2})
    full, lean = simulate(spec).metrics, simulate(spec, timeline=False).metrics
    assert full == lean
    assert 0 < full["cpu_token_share"] < 1 and full["link_bytes"]["link:host-ram>gpu"] > 0
    assert full["bytes_read"] > 0 and full["host_budget_bytes"] == 2 * 10 ** 9


def test_a_one_level_run_has_no_tier_keys():
    from experiments.run import simulate
    from experiments.spec import RunSpec
    m = simulate(RunSpec.from_doc({"device": "rtx-3060-laptop-6gb", "model": "olmoe-1b-7b", "tokens": 2}),
                 timeline=False).metrics
    assert not {"link_bytes", "host_hit_ratio", "cpu_token_share", "placement"} & set(m)


def test_a_sweep_row_records_the_host_level_and_its_spec_reads_back(tmp_path):
    """A grid over placement: each row records the placement, the host budget and cache and the host
    metrics, and the row's spec (what `pick` writes) is the run's own."""
    import csv
    from experiments.spec import RunSpec, row_spec
    from experiments.sweep import load_grid, sweep
    grid = tmp_path / "g.yaml"
    grid.write_text("tokens: 2\ndevice: rtx-3060-laptop-6gb\nmodel: olmoe-1b-7b\nbudget: 1GB\nhost_budget: 8GB\n"
                    "grid:\n  placement: [gpu-only, {name: cpu-static, options: {layers: 4}}]\n")
    specs = load_grid(grid)
    sweep(grid, tmp_path / "r.csv", quiet=True)
    rows = sorted(csv.DictReader(open(tmp_path / "r.csv")), key=lambda r: r["placement"])   # gpu-only: ""
    assert sorted(map(row_spec, rows), key=RunSpec.config_hash) == sorted(specs, key=RunSpec.config_hash)
    assert [float(r["cpu_token_share"]) for r in rows] == [0.0, 0.25]       # 4 of olmoe's 16 layers
    assert all(r["host_budget"] == "8000000000" and r["host_hit_ratio"] for r in rows)


def test_cli_flags_state_the_tier_keys(tmp_path, capsys):
    import json
    from experiments.cli import main
    assert main(["simulate", "--device", "rtx-3060-laptop-6gb", "--model", "olmoe-1b-7b", "--tokens", "2", "--quiet",
                 "--budget", "1GB", "--placement", "cpu-static", "--placement-option", "layers=4", "--host-cache",
                 "lfu", "--host-budget", "8GB", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["placement"], m["host_cache"], m["host_budget_bytes"]) == ("cpu-static", "lfu", 8 * 10 ** 9)
    assert 0 < m["cpu_token_share"] < 1          # 4 of olmoe's 16 layers on the CPU
    assert "host level" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["simulate", "--device", "jetson-orin-nano-8gb", "--placement", "cpu-static"], "placement: "),
    (["simulate", "--placement", "cpu-fast"], "--placement"),
    (["simulate", "--placement-option", "layers=2"], "--placement-option needs --placement NAME"),
    (["simulate", "--device", "rtx-3060-laptop-6gb", "--placement", "cpu-static", "--placement-option", "x=1"],
     "--placement-option: cpu-static: unknown option 'x'"),
    (["simulate", "--device", "rtx-3060-laptop-6gb", "--host-budget", "64GB"], "more than"),
    (["execute", "--host-budget", "1GB"], "jetson-agx-orin-64gb' has one memory level"),   # the default device
    (["execute", "--throttle", "rtx-3060-laptop-6gb", "--host-budget", "1GB", "--format", "mwq", "--torch-device",
      "cuda"], "format mwq decodes on the host only"),
])
def test_bad_tier_input_is_one_clear_line(argv, needle, capsys):
    from experiments.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err


def test_cpu_expert_calls_read_integer_weights_packed():
    """A CPU-placed INT4 expert (llama.cpp's q4 dot products) reads its packed weights with no
    dequantization pass: overhead + max(bytes / bandwidth, 2 x params x tokens / flops); zip's
    re-assembly stays a pass per call."""
    from devices.levels import cpu_of
    from devices.profile import load_device
    from policies.cost import CostModel
    from workloads.catalog import get_model
    from workloads.formats import FormatSpec
    device, m = load_device("rtx-3060-laptop-6gb"), get_model("llama-moe-3.5b")
    cpu = cpu_of(device)
    for name, ladder in (("copies", "int4"), ("mwq", "v1")):
        fmt = FormatSpec(name, ladder=ladder).make(m.expert_shapes)
        cost = CostModel.build(device, m, fmt)
        for tokens in (1, 8):
            want = cpu.overhead + max(fmt.level_sizes[0] / cpu.memory_bandwidth, 2 * fmt.params * tokens / cpu.flops)
            assert cost.cpu_expert_seconds(0, tokens) == pytest.approx(want)
    zip_fmt = FormatSpec("zip", codec="lz4").make(m.expert_shapes)
    z = CostModel.build(device, m, zip_fmt)
    plain = cpu.overhead + max(zip_fmt.level_sizes[0] / cpu.memory_bandwidth, 2 * zip_fmt.params / cpu.flops)
    assert z.cpu_expert_seconds(0, 1) == pytest.approx(plain + z.dequant_bytes(0) / cpu.memory_bandwidth)
