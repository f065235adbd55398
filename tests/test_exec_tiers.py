"""The executor carries out memory tiers and placement (issue 26, item 4): on the shipped model, a
recorded trace through `execute` and `simulate` with a two-level spec gives the same decisions
(the accelerator's admissions and evictions, the host level's, each load's source: a storage read
and a copy, or only a copy; the placement: which (expert, level)s compute on the CPU) and the same
outputs as the one-level run; both pools stay within their budgets. On this CPU-only host the host
level is carried out literally (host buffers, copies into the expert pool, a CPU thread pool); the
CUDA test checks the pinned buffers and the copy stream, and skips without CUDA."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from devices.units import ConfigError, MoelabError  # noqa: E402
from experiments.run import simulate  # noqa: E402
from experiments.run_exec import HostOptions, check_spec, execute, tier_levels  # noqa: E402
from experiments.spec import RunSpec  # noqa: E402
from timeline.tiers import HOST_CACHE  # noqa: E402

DEVICE = "rtx-3060-laptop-6gb"       # the bundled profile with a host level and a cpu: section
LINK = "link:host-ram>gpu"
EXPERT = 3 * 128 * 160 * 2           # one tiny-moe expert in bf16 (d_model 128, d_ff 160, SwiGLU)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    """The shipped model's own routing of two requests (6 prompt tokens, 6 new tokens each)."""
    from executor.record import record_routing
    from executor.train import DEFAULT_MODEL, load_trained
    model, _, _ = load_trained(DEFAULT_MODEL)
    torch.manual_seed(0)
    trace = record_routing(model, torch.randint(0, model.cfg.vocab, (2, 6)), 6, model_name=Path(DEFAULT_MODEL).name)
    return str(trace.save(tmp_path_factory.mktemp("trace") / "trace.npz"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


def spec_of(trace_path, stores, fmt="bf16", placement=None, host_budget=25 * EXPERT, budget=13 * EXPERT,
            prefetch="none", host_cache=None, tiered=True):
    doc = {"device": DEVICE, "trace": trace_path, "format": fmt, "batch": 2, "budget": budget,
           "store": str(stores / fmt), "policy": {"cache": "lru", "prefetch": prefetch}}
    if tiered:
        doc["host_budget"] = host_budget
        if placement is not None:
            doc["placement"] = placement
        if host_cache is not None:
            doc["host_cache"] = host_cache
    return RunSpec.from_doc(doc, "test")


def lane(tl, resource):
    """A lane's (kind, step, layer, expert, level or part, tokens), as a sorted multiset."""
    return sorted((e.kind, e.step, e.layer, e.expert, e.level, e.tokens) for e in tl.events if e.resource == resource)


def host_records(tl):
    """The host level's admissions and evictions, in decision order."""
    return [(e.kind, e.step, e.layer, e.expert, e.level) for e in tl.events if e.resource == HOST_CACHE]


def assert_same_decisions(ex, sim):
    a, b = ex.timeline, sim.timeline
    assert a.decisions() == b.decisions()                   # the accelerator's cache
    assert host_records(a) == host_records(b)               # the host level's
    for resource in ("io", LINK, "cpu", "compute"):         # sources (a read and a copy, or a copy) and places
        assert lane(a, resource) == lane(b, resource), resource
    for key in ("host_hit_ratio", "host_peak_bytes", "cpu_token_share", "link_bytes", "placement", "host_cache",
                "host_budget_bytes"):
        assert ex.metrics[key] == sim.metrics[key], key


def assert_within(tl, resource, budget):
    """Resident bytes replayed from a lane's cache records stay in [0, budget]."""
    held = 0
    for e in tl.events:
        if e.resource == resource:
            held += -e.bytes if e.kind == "evict" else e.bytes
            assert 0 <= held <= budget


CASES = [("bf16", {"name": "cpu-static", "options": {"layers": 2}}, "none"),
         ("bf16", "hot-on-gpu", "oracle"),
         ("bf16", None, "last-use"),                               # a host level, every expert on the GPU
         ("zip", {"name": "cpu-static", "options": {"layers": 1}}, "oracle"),
         ("mwq", "hot-on-gpu", "last-use")]


@pytest.mark.parametrize("fmt,placement,prefetch", CASES)
def test_both_engines_make_identical_decisions_and_the_same_outputs(trace_path, stores, fmt, placement, prefetch):
    spec = spec_of(trace_path, stores, fmt, placement, prefetch=prefetch)
    ex = execute(spec, HostOptions())
    sim = simulate(spec)
    assert_same_decisions(ex, sim)
    share = ex.metrics["cpu_token_share"]
    assert (share == 0) if placement is None else (0 < share < 1)        # both places compute something
    assert ex.metrics["link_bytes"][LINK] > 0 and ex.metrics["host_hit_ratio"] > 0
    one = execute(spec_of(trace_path, stores, fmt, prefetch=prefetch, tiered=False), HostOptions())
    assert torch.equal(one.run.tokens, ex.run.tokens)                 # placement does not change the math
    for a, b in zip(one.run.logits, ex.run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    budget, host_budget = spec.budget, ex.metrics["host_budget_bytes"]
    assert ex.timeline.meta["peak_expert_bytes"] <= budget and ex.metrics["host_peak_bytes"] <= host_budget
    assert_within(ex.timeline, "cache", budget)
    assert_within(ex.timeline, HOST_CACHE, host_budget)
    assert ex.metrics["host_pinned"] is False                        # a CPU host: nothing to pin


def test_a_prefetch_the_host_level_does_not_keep_passes_through(trace_path, stores):
    # host RAM holds the largest layer (12 experts) and one more: the oracle's prefetches of the next
    # layer, asked while this layer's parts are pinned, mostly pass through RAM without staying
    spec = spec_of(trace_path, stores, placement="hot-on-gpu", host_budget=13 * EXPERT, prefetch="oracle")
    ex, sim = execute(spec, HostOptions()), simulate(spec)
    assert_same_decisions(ex, sim)
    kept = {(e.step, e.layer, e.expert) for e in ex.timeline.events if e.resource == HOST_CACHE and e.kind != "evict"}
    reads = [(e.step, e.layer, e.expert) for e in ex.timeline.events if e.resource == "io"]
    assert any(r not in kept for r in reads)        # read for the accelerator, never admitted to host RAM
    assert ex.metrics["host_peak_bytes"] <= 13 * EXPERT


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.integers(12, 40), per_layer=st.integers(0, 16), cache=st.sampled_from(["lru", "lfu", "fifo"]))
def test_identical_decisions_over_host_budgets_and_placements(trace_path, stores, host, per_layer, cache):
    spec = spec_of(trace_path, stores, placement={"name": "hot-on-gpu", "options": {"per_layer": per_layer}},
                   host_budget=host * EXPERT, host_cache=cache)
    ex, sim = execute(spec, HostOptions()), simulate(spec)
    assert_same_decisions(ex, sim)
    assert_within(ex.timeline, HOST_CACHE, host * EXPERT)


def test_the_throttle_holds_copies_to_the_tiered_profiles_link(trace_path, stores):
    spec = spec_of(trace_path, stores, placement="cpu-static")
    _, link, clock = tier_levels(spec, HostOptions(throttle=DEVICE))
    assert link.resource == LINK
    assert (clock.read_bandwidth, clock.latency, clock.queue_depth) == pytest.approx((12.6e9, 10e-6, 1))  # its link
    # 126 kB: 10 us latency + 10 us at 12.6 GB/s; one copy in flight: the second waits for the first to
    # end, then pays its own latency and transfer (20 + 10 + 10 us)
    first = clock.reserve(0.0, 126_000)
    assert first == pytest.approx(20e-6) and clock.reserve(0.0, 126_000) == pytest.approx(40e-6)
    assert tier_levels(spec, HostOptions(throttle="jetson-agx-orin-64gb"))[2] is None   # one level: no link to hold


def test_the_link_worker_waits_out_the_throttles_time(monkeypatch):
    # a fake clock standing still at 0: each copy of 500 B on a 1000 B/s link with 0.1 s latency must
    # be held until 0.6 s, then the next (one in flight) until 1.2 s; on CPU the copy is a plain copy
    import types

    import executor.tiers as tiers
    from executor.io import StorageThrottle
    from policies import Key
    slept = []
    monkeypatch.setattr(tiers, "time", types.SimpleNamespace(perf_counter=lambda: 0.0, sleep=slept.append))
    src = torch.arange(500, dtype=torch.int64).to(torch.uint8)
    with tiers.LinkWorkers(torch.device("cpu"), StorageThrottle(1000.0, 0.1, 1)) as link:
        a, b = link.submit(Key(0, 1, 0), src).result(), link.submit(Key(0, 2, 0), src).result()
    assert slept == pytest.approx([0.6, 1.2])
    assert torch.equal(a.tensor, src) and a.tensor.data_ptr() != src.data_ptr() and a.event is None
    assert b.key == Key(0, 2, 0)


def test_a_throttled_tiered_run_holds_its_copies_and_decides_as_the_simulator(trace_path, stores, monkeypatch):
    import executor.tiers as tiers
    clocks, real_init = [], tiers.LinkWorkers.__init__

    def spy(self, device, throttle=None):
        clocks.append(throttle)
        real_init(self, device, throttle)

    monkeypatch.setattr(tiers.LinkWorkers, "__init__", spy)
    spec = spec_of(trace_path, stores, placement={"name": "cpu-static", "options": {"layers": 2}})
    ex, sim = execute(spec, HostOptions(throttle=DEVICE)), simulate(spec)
    assert len(clocks) == 1 and (clocks[0].read_bandwidth, clocks[0].latency) == pytest.approx((12.6e9, 10e-6))
    assert_same_decisions(ex, sim)
    assert ex.metrics["throttle"] == DEVICE
    execute(spec, HostOptions())
    assert clocks[1] is None                    # unthrottled: copies as fast as this host makes them


def test_a_one_level_device_is_refused_before_any_store_is_built(trace_path, tmp_path):
    spec = RunSpec.from_doc({"device": "jetson-agx-orin-64gb", "trace": trace_path, "host_budget": "1GB",
                             "store": str(tmp_path / "store")}, "test")
    with pytest.raises(ConfigError, match=r"host_budget: .*jetson-agx-orin-64gb.*one memory level.*devices with host "
                                          r"RAM: rtx-3060-laptop-6gb"):
        execute(spec, HostOptions())
    assert not (tmp_path / "store").exists()


def test_a_host_level_on_cuda_needs_a_format_decoded_on_the_gpu(trace_path, stores):
    with pytest.raises(MoelabError, match=r"format mwq decodes on the host only.*--format bf16, or --torch-device cpu"):
        check_spec(spec_of(trace_path, stores, "mwq", "cpu-static"), HostOptions(torch_device="cuda"))
    check_spec(spec_of(trace_path, stores, "bf16", "cpu-static"), HostOptions(torch_device="cuda"))


def test_the_cli_executes_a_tiered_spec(trace_path, stores, tmp_path):
    import json

    from experiments.cli import main
    out = tmp_path / "out"
    rc = main(["execute", "--trace", trace_path, "--batch", "2", "--budget", str(13 * EXPERT), "--store",
               str(stores / "bf16"), "--placement", "cpu-static", "--placement-option", "layers=2",
               "--host-budget", str(25 * EXPERT), "--throttle", DEVICE, "--quiet", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["placement"] == "cpu-static" and m["cpu_token_share"] == 0.5 and m["link_bytes"][LINK] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_host_level_is_pinned_and_copies_run_on_a_copy_stream(trace_path, stores, monkeypatch):
    import executor.tiers as tiers
    pinned, streams = [], []
    real_owned, real_run = tiers.owned, tiers.LinkWorkers._run

    def spy_owned(data, pin, copy):
        t = real_owned(data, pin, copy)
        pinned.append(t.is_pinned())
        return t

    def spy_run(self, worker, key, src):
        r = real_run(self, worker, key, src)
        streams.append((isinstance(self.stream, torch.cuda.Stream), r.event is not None, r.tensor.is_cuda))
        return r

    monkeypatch.setattr(tiers, "owned", spy_owned)
    monkeypatch.setattr(tiers.LinkWorkers, "_run", spy_run)
    spec = spec_of(trace_path, stores, placement={"name": "cpu-static", "options": {"layers": 2}}, prefetch="oracle")
    gpu = execute(spec, HostOptions(torch_device="cuda"))
    assert pinned and all(pinned)
    assert streams and all(s == (True, True, True) for s in streams)
    assert gpu.metrics["host_pinned"] is True
    assert_same_decisions(gpu, simulate(spec))
    cpu = execute(spec, HostOptions())
    assert torch.equal(cpu.run.tokens, gpu.run.tokens)
    for a, b in zip(cpu.run.logits, gpu.run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
