"""Issue 13: measured host profiles (schema, interpolation, the simulator's use of them),
`moelab profile`, `moelab validate` and pick's fidelity line. No wall-clock assertions."""
import dataclasses

import pytest

from conftest import TINY, make_device, make_trace
from devices.profile import MeasuredTables, interpolate, load_device
from devices.units import ConfigError
from policies import build_policies
from policies.cost import CostModel
from sim.engine import Simulator
from workloads.formats import make_format
from workloads.workload import Workload

MEASURED = """
name: measured-test
description: "hand-made measured profile"
memory: 8GB          # test
expert_budget: 1GB   # test
default_storage: disk
storage:
  disk:
    read_bandwidth: 1MB/s   # test
    latency: 1ms            # test
    queue_depth: 1          # test
compute:
  memory_bandwidth: 10GB/s  # test
  flops: 100GFLOPS          # test
  overhead: 20us            # test
  measured:
    model: tiny
    tokens: [1, 4]
    experts:
      bf16:
        - [10ms, 16ms]
    dense:
      prefill: [2ms, 5ms]
      decode: [1ms, 4ms]
    step:
      prefill: [7ms, 7ms]
      decode: [3ms, 6ms]
    decision_overhead: 0.5ms
    load_overhead: 0.25ms
decompress:
  workers: 1
  throughput:
    lz4: 1GB/s   # test
"""


@pytest.fixture
def measured(tmp_path):
    path = tmp_path / "measured.yaml"
    path.write_text(MEASURED)
    return load_device(str(path))


def test_interpolation_by_hand():
    xs, ys = (1, 4, 16), (10.0, 16.0, 40.0)
    assert interpolate(xs, ys, 1) == 10.0
    assert interpolate(xs, ys, 0) == 10.0                    # below the table: its first value
    assert interpolate(xs, ys, 2) == pytest.approx(12.0)     # 10 + 6 * 1/3
    assert interpolate(xs, ys, 10) == pytest.approx(28.0)    # 16 + 24 * 6/12
    assert interpolate(xs, ys, 28) == pytest.approx(64.0)    # the last segment extended
    assert interpolate((3,), (5.0,), 9) == 5.0


def test_measured_profile_loads_and_the_cost_model_reads_it(measured):
    m = measured.compute.measured
    assert isinstance(m, MeasuredTables) and m.model == "tiny" and m.tokens == (1, 4)
    cost = CostModel.build(measured, TINY, make_format("bf16", TINY.expert_shapes))
    assert cost.expert_seconds(0, 2) == pytest.approx(0.012)
    assert cost.dense_seconds(2, prefill=True) == pytest.approx(0.003)
    assert cost.dense_seconds(2) == pytest.approx(0.002)
    assert cost.step_seconds(4) == pytest.approx(0.006)
    assert cost.decision_seconds(3) == pytest.approx(0.00125)
    # another model keeps the roofline and pays no executor overheads
    other = dataclasses.replace(TINY, name="other")
    rc = CostModel.build(measured, other, make_format("bf16", TINY.expert_shapes))
    assert rc.decision_seconds(3) == 0.0 and rc.step_seconds(1) == 0.0
    assert rc.expert_seconds(0, 1) == pytest.approx(20e-6 + 192 / 10e9)
    assert "decision point" in measured.describe()


@pytest.mark.parametrize("bad,match", [
    ("    tokens: [4, 1]", r"compute\.measured\.tokens: expected increasing"),
    ("    decision_overhead: 5", r"compute\.measured\.decision_overhead: expected a number with a unit"),
    ("        - [10ms]", r"compute\.measured\.experts\.bf16\[0\]: expected a list of 2 durations"),
])
def test_measured_errors_name_the_key(tmp_path, bad, match):
    key = bad.split(":")[0] if ":" in bad else "        - [10ms, 16ms]"
    lines = [bad if line.startswith(key) else line for line in MEASURED.splitlines()]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=match):
        load_device(str(path))


def test_simulator_charges_the_measured_terms_by_hand(measured):
    """One request: a 1-token prefill step then one decode step, top-1 over 2 layers; the
    2nd step hits both experts. Expert bytes 192 at 1 MB/s = 0.192 ms + 1 ms latency."""
    trace = make_trace([[[0], [1]], [[0], [1]]], prompt=[True, False], request_ids=[0, 0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(measured, w, build_policies(w, 10 ** 6, cache="lru")).run()
    ev = [(e.resource, e.kind, round(e.start * 1e6), round(e.end * 1e6), e.step, e.layer)
          for e in tl.events if e.resource != "cache"]
    read = 1000 + 192
    # step 0: dense 2 ms (prefill, 1 token); decision 0.5 ms; the load leaves after its 0.25 ms
    l0_io = 2000 + 500 + 250
    l0_end = l0_io + read + 10000
    l1_dense = l0_end + 2000
    l1_io = l1_dense + 750
    l1_end = l1_io + read + 10000
    s1 = l1_end + 7000                                          # the prefill step's own 7 ms
    s1_l0 = s1 + 1000 + 500                                     # decode dense 1 ms; all hits
    s1_end = s1_l0 + 10000 + 1000 + 500 + 10000
    assert ev == [("dense", "dense", 0, 2000, 0, 0), ("io", "load", l0_io, l0_io + read, 0, 0),
                  ("compute", "expert", l0_io + read, l0_end, 0, 0),
                  ("dense", "dense", l0_end, l1_dense, 0, 1), ("io", "load", l1_io, l1_io + read, 0, 1),
                  ("compute", "expert", l1_io + read, l1_end, 0, 1),
                  ("dense", "dense", s1, s1 + 1000, 1, 0), ("compute", "expert", s1_l0, s1_l0 + 10000, 1, 0),
                  ("dense", "dense", s1_l0 + 10000, s1_l0 + 11000, 1, 1),
                  ("compute", "expert", s1_l0 + 11500, s1_end, 1, 1)]


def test_roofline_profiles_are_unchanged():
    """Bundled profiles have no measured tables: no decision or step costs."""
    d = load_device("raspberry-pi-5-8gb")
    assert d.compute.measured is None
    cost = CostModel.build(d, TINY, make_format("bf16", TINY.expert_shapes))
    assert cost.decision_seconds(5) == 0.0 and cost.step_seconds(1, True) == 0.0
    dev = make_device()
    assert CostModel.build(dev, TINY, make_format("bf16", TINY.expert_shapes)).dense_seconds(3) > 0


@pytest.fixture(scope="module")
def host_profile(tmp_path_factory):
    """`moelab profile --quick` on the bundled model, loaded back by the strict loader. Its co-runs in
    short windows: what is checked here is that they are written and read back, not their values."""
    from executor import profile_beside
    from executor.profile_host import write_profile
    from experiments.calibrate import measure_host
    root = tmp_path_factory.mktemp("profile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(profile_beside.BESIDE_WINDOW_S, True, 0.005)
        m = measure_host(store_root=root / "stores", quick=True, quiet=True)
    return write_profile(root / "host.yaml", m, "moelab profile --quick"), root


def test_profile_writes_a_loadable_measured_profile(host_profile):
    device, root = host_profile
    text = (root / "host.yaml").read_text()
    assert "measured: " in text and "torch " in text and "`moelab profile --quick`" in text
    m = device.compute.measured
    assert m.model == "tiny-moe" and set(m.experts) == {"bf16", "mwq-int2-4", "zip"}
    assert len(m.experts["mwq-int2-4"]) == 3 and all(len(r) == len(m.tokens) for r in m.experts["zip"])
    assert m.wake > 0 and m.handoff > 0       # the contention runs' hand-offs (they wait for reads)
    assert m.dense_after_loads >= 0
    s = device.storage_option(None)
    assert s.name == "disk" and s.read_bandwidth > 0 and s.queue_depth >= 1
    assert set(device.decompress_throughput) == {"lz4", "lz4hc", "zstd"}
    beside = m.host.beside                    # the co-runs, per background kind
    assert set(beside["read"]) == {"bf16", "mwq-int2-4", "zip"} and set(beside["decompress"]) == {"lz4", "lz4hc", "zstd"}
    assert beside["decompress"]["lz4hc"].calls["zip"][0][0][0] >= 1.0
    for line in text.splitlines():            # every figure carries its source
        if any(line.strip().startswith(k) for k in ("read_bandwidth", "latency", "memory_bandwidth", "flops",
                                                      "decision_overhead", "lz4:", "zstd:")):
            assert "# measured: " in line, line


def test_validate_quick_writes_three_outputs_with_identical_decisions(host_profile, tmp_path):
    from experiments.validate import Validator, read_rows, summary
    device, root = host_profile
    out = tmp_path / "val"
    rows = Validator(out, device.path, quick=True, repeats=1, store_root=root / "stores", quiet=True,
                     tokens=4).run()
    assert {p.name for p in out.iterdir()} >= {"validation.csv", "validation.md", "validation.png", "trace.npz"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["decisions_identical"] == "True" for r in ok)
    assert all(r["pred_hit_ratio"] == r["meas_hit_ratio"] for r in ok)        # same decisions, same hits
    assert summary(rows)[0]["identical"] == len(ok)
    n = len(read_rows(out / "validation.csv"))                                # resumable: nothing to redo
    Validator(out, device.path, quick=True, repeats=1, store_root=root / "stores", quiet=True, tokens=4).run()
    assert len(read_rows(out / "validation.csv")) == n


def test_validate_runs_repeats_in_passes_and_keeps_every_run(host_profile, tmp_path, monkeypatch):
    """Repeats come in passes over the matrix (a configuration's runs lie apart in time); each run
    is kept in runs.jsonl as it ends, so a crash loses at most the run in progress: the rerun
    executes only what is missing and the rows take the kept runs (here a fake executor whose
    TPOT is the call's number)."""
    from experiments.validate import Validator, read_rows, read_runs, row_key
    device, root = host_profile
    out = tmp_path / "val"
    calls = []

    def fake(self, cfg, trace, decisions):
        calls.append(row_key(dict(cfg, throttle="")))
        n = len(calls)
        if n == 5:                                  # the host dies during the 5th run
            raise KeyboardInterrupt
        return {"metrics": {"ttft_s": 0.01, "tpot_s_mean": n * 1e-3, "throughput_tok_s": 1.0, "hit_ratio": 0.5},
                "busy": {"io": 0.0, "decompress": 0.0, "compute": 0.0}, "same": True}
    monkeypatch.setattr(Validator, "execute_once", fake)
    v = dict(quick=True, repeats=2, store_root=root / "stores", quiet=True, tokens=4)
    with pytest.raises(KeyboardInterrupt):
        Validator(out, device.path, **v).run()
    first_pass = calls[:4]
    assert len(read_runs(out / "runs.jsonl")) == 4 and not (out / "validation.csv").exists()
    rows = Validator(out, device.path, **v).run()
    n_cfg = len(rows)
    assert len(set(first_pass)) == 4                          # pass 1: every configuration once...
    assert calls[4] == calls[5]                                # ... the crashed run redone first
    assert calls[5 + n_cfg - 4:] == first_pass + calls[5:5 + n_cfg - 4]   # pass 2: the same order again
    assert len(calls) == 2 * n_cfg + 1
    by_key = {row_key(r): r for r in read_rows(out / "validation.csv")}
    k0 = first_pass[0]
    # config 0's runs: call 1 (pass 1) and call n_cfg + 2 (pass 2, after the crash's redo)
    assert by_key[k0]["runs_tpot_s_mean"] == f"{1e-3:.6g};{(n_cfg + 2) * 1e-3:.6g}"


def test_pick_prints_the_validated_error_of_its_class(tmp_path):
    from experiments.cli.study_cmds import fidelity_line
    from experiments.validate import append_row
    path = tmp_path / "validation.csv"
    assert "no host validation results yet" in fidelity_line({"format": "bf16", "policy": "lru", "batch": "1"}, path)
    for cache, err in (("lru", 0.02), ("lru", -0.06), ("fifo", 0.5)):
        append_row(path, {"throttle": "", "format": "bf16", "cache": cache, "budget_share": 0.5, "batch": 1,
                          "prefetch": "none", "err_tpot_s_mean": err, "decisions_identical": True, "status": "ok"})
    line = fidelity_line({"format": "bf16", "policy": "lru", "batch": "1"}, path)
    assert "2 validated configurations" in line and "median 4.0%" in line and "max 6.0%" in line
    assert "no validated configuration" in fidelity_line({"format": "zip", "policy": "lru", "batch": "1"}, path)


def test_an_expert_call_runs_slower_while_a_read_is_in_flight_by_hand(tmp_path):
    """Oracle prefetch: layer 0 loads expert 0 and prefetches layer 1's expert 1 behind it. That
    read is in flight for the first 1,192 us of expert 0's call, which runs at half speed then
    (contention read 0.5) and costs 0.1 ms more than its table (call); the next dense part, with
    nothing in flight, costs its table plus 0.2 ms (dense)."""
    path = tmp_path / "m.yaml"
    path.write_text(MEASURED.replace("    load_overhead: 0.25ms", "    load_overhead: 0.25ms\n"
                                     "    contention:\n      bf16: {read: 0.5, call: 0.1ms, dense: 0.2ms}"))
    device = load_device(str(path))
    assert device.compute.measured.contention["bf16"].read == 0.5
    trace = make_trace([[[0], [1]]], prompt=[True], request_ids=[0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(device, w, build_policies(w, 10 ** 6, cache="lru", prefetch="oracle")).run()
    ev = [(e.resource, round(e.start * 1e6), round(e.end * 1e6)) for e in tl.events if e.resource != "cache"]
    read = 1000 + 192
    dense0 = 2000 + 200                                        # its table + dense
    plan_done = dense0 + 500 + 250 + read                      # issued after the decision path and its 1st load
    prefetch_done = plan_done + read                           # queue depth 1: behind the plan's read
    # 10 ms + 0.1 ms of work: 1,192 us at half speed (596 us of work), the rest at full speed
    call_end = prefetch_done + (10000 + 100 - read // 2)
    assert ev == [("dense", 0, dense0), ("io", dense0 + 750, plan_done), ("io", plan_done, prefetch_done),
                  ("compute", plan_done, call_end), ("dense", call_end, call_end + 2200),
                  ("compute", call_end + 2700, call_end + 2700 + 10100)]


def test_a_throttled_read_contends_only_while_the_host_reads_it_by_hand(tmp_path):
    """Under a throttle (another device's storage) the executor reads at the host's speed and then
    sleeps to the device's time: the main thread is slowed (read 0.5) only for as long as the host's
    own storage takes (1,192 us here), not for the throttled read's 10,192 us; reads do not stall."""
    from devices.profile import StorageProfile
    path = tmp_path / "m.yaml"
    path.write_text(MEASURED.replace("    load_overhead: 0.25ms", "    load_overhead: 0.25ms\n"
                                     "    contention:\n      bf16: {read: 0.5, stall: 0.5}"))
    slow = StorageProfile(name="sd", read_bandwidth=1e6, latency=0.01, queue_depth=1)
    trace = make_trace([[[0], [1]]], prompt=[True], request_ids=[0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(load_device(str(path)), w, build_policies(w, 10 ** 6, cache="lru", prefetch="oracle"),
                   storage=slow).run()
    ev = [(e.resource, round(e.start * 1e6), round(e.end * 1e6)) for e in tl.events if e.resource != "cache"]
    read = 10000 + 192
    plan_done = 2000 + 750 + read
    call_end = plan_done + 10000 + 1192 // 2          # half speed for the prefetch's host read
    assert ev[:4] == [("dense", 0, 2000), ("io", 2750, plan_done), ("io", plan_done, plan_done + read),
                      ("compute", plan_done, call_end)]


def test_reads_run_slower_while_the_main_thread_works_by_hand(tmp_path):
    """Two loads, queue depth 1, each read 1,192 us alone; a read runs at half speed (stall 0.5)
    while the main thread works. Read 0 (issued at 2,750) spends 250 us inside the decision path
    (ends at 3,000): 125 us done there, so it ends at 3,000 + 1,067 = 4,067. Read 1 then starts and
    runs entirely inside expert 0's call (4,067 - 14,067): 2 x 1,192 us."""
    path = tmp_path / "m.yaml"
    path.write_text(MEASURED.replace("    load_overhead: 0.25ms", "    load_overhead: 0.25ms\n"
                                     "    contention:\n      bf16: {stall: 0.5}"))
    trace = make_trace([[[0, 1]]], prompt=[True], request_ids=[0])
    arch = dataclasses.replace(TINY, top_k=2, layers=1)
    w = Workload(arch, trace, make_format("bf16", arch.expert_shapes), batch=1)
    tl = Simulator(load_device(str(path)), w, build_policies(w, 10 ** 6, cache="lru")).run()
    ev = [(e.resource, round(e.start * 1e6), round(e.end * 1e6)) for e in tl.events if e.resource != "cache"]
    assert ev == [("dense", 0, 2000), ("io", 2750, 4067), ("io", 4067, 4067 + 2 * 1192),
                  ("compute", 4067, 14067), ("compute", 14067, 24067)]


def test_the_main_thread_fluid_model_by_hand():
    """A read in flight over [0, 1) s and a decompression over [0.5, 2) s, the main thread losing
    half its speed to reads and a quarter to decompressions: 1.5 s of work begun at 0 gets
    0.25 s done by 0.5, 0.125 more by 1, 0.75 more by 2, and the last 0.375 s at full speed."""
    from devices.profile import Contention
    from sim.host import HostContention
    host = HostContention(Contention(read=0.5, decompress=0.25))
    host.commit([(0.0, 1.0, False), (0.5, 2.0, True)])
    assert host.main_thread(0.0, 1.5, host.in_flight) == pytest.approx(2.375)
    assert host.main_thread(2.5, 1.0, host.in_flight) == pytest.approx(3.5)     # nothing in flight then
    assert host.main_thread(0.0, 0.2, host.in_flight) == pytest.approx(0.4)     # ends inside the first span


def test_roofline_profiles_have_no_host_model():
    from sim.host import HostContention
    d = load_device("raspberry-pi-5-8gb")
    cost = CostModel.build(d, TINY, make_format("bf16", TINY.expert_shapes))
    assert HostContention.of(cost, d, d.storage_option(None)) is None


def test_old_interference_keys_and_bad_contention_are_refused_by_name(tmp_path):
    path = tmp_path / "m.yaml"
    for extra, words in (("    read_interference: 90us", ("read_interference", "contention", "moelab profile")),
                         ("    contention:\n      bf16: {read: 1.5}", ("contention.bf16.read", "0 <= x < 1")),
                         ("    contention:\n      bf16: {read: 0.6, decompress: 0.5}", ("below 1",)),
                         ("    contention:\n      bf16: {reads: 0.5}", ("contention.bf16.reads", "did you mean")),
                         ("    contention:\n      bf16: {call: 5}", ("contention.bf16.call", "unit"))):
        path.write_text(MEASURED.replace("    load_overhead: 0.25ms", "    load_overhead: 0.25ms\n" + extra))
        with pytest.raises(ConfigError) as e:
            load_device(str(path))
        assert all(w in str(e.value) for w in words), str(e.value)


def test_the_gap_between_expert_calls_by_hand(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MEASURED.replace("    load_overhead: 0.25ms", "    load_overhead: 0.25ms\n    compute_gap: 0.1ms"))
    trace = make_trace([[[0, 1], [0, 1]]], prompt=[True], request_ids=[0])
    arch = dataclasses.replace(TINY, top_k=2)
    w = Workload(arch, trace, make_format("bf16", arch.expert_shapes), batch=1)
    tl = Simulator(load_device(str(path)), w, build_policies(w, 10 ** 6, cache="lru")).run()
    calls = [(round(e.start * 1e6), round(e.end * 1e6)) for e in tl.of("compute") if e.layer == 0]
    first_ready = 2000 + 500 + 250 + 1192
    second_ready = first_ready + 1192                           # queue depth 1: one read after the other
    assert calls == [(first_ready, first_ready + 10000), (first_ready + 10100, first_ready + 20100)]
    assert second_ready < first_ready + 10100


def test_profile_and_validate_warn_on_a_busy_host():
    from experiments.cli.host_cmds import busy_host_warning
    assert busy_host_warning(load=0.3, cores=2) is None
    w = busy_host_warning(load=2.3, cores=2)
    assert "busy" in w and "2.3" in w and "quiet host" in w


def test_profile_throttle_holds_the_forced_runs_reads_to_the_device(host_profile):
    """profile --throttle: the forced runs read at the throttled device's speed (each read at least
    its latency + size / bandwidth), so their figures are measured in that regime."""
    from executor.profile_host import HostProfiler
    _, root = host_profile
    p = HostProfiler(None, root / "stores", quick=True, quiet=True, throttle="raspberry-pi-5-8gb:microsd")
    sd = p.throttled
    assert sd.name == "microsd"
    reads = list(p._run(1, 2, 2, budget_share=0.3).of("io"))
    assert reads and all(e.end - e.start >= 0.99 * (sd.latency + e.bytes / sd.read_bandwidth) for e in reads)


def test_profile_refuses_a_wrong_throttle_before_measuring(capsys):
    from experiments.cli import main
    assert main(["profile", "--quick", "--throttle", "raspberry-pi-5-8gb:floppy", "--out", "/tmp/never.yaml"]) == 2
    assert "floppy" in capsys.readouterr().err
