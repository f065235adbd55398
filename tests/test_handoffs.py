"""Issue 24: the hand-offs between the executor's threads, measured by `moelab profile` and charged
by the simulator (compute.measured.wake / handoff). Timelines worked out by hand; times in
microseconds. No wall-clock assertions."""
import pytest

from conftest import TINY, make_trace
from devices.profile import load_device
from devices.units import ConfigError
from executor.profile_timeline import handoff_samples
from policies import build_policies
from sim.engine import Simulator
from test_fidelity import MEASURED
from test_host_model import PROFILE
from timeline.events import Event, Timeline
from workloads.formats import make_format
from workloads.workload import Workload


def profile(tmp_path, text: str, extra: str):
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("    load_overhead: ", extra + "    load_overhead: ", 1))
    return load_device(str(path))


def test_a_call_that_waited_for_its_read_starts_a_wake_after_it_by_hand(tmp_path):
    """test_fidelity's hand timeline with wake 100 us: a prefill step then a decode step, top-1 over 2
    layers, 192-byte experts at 1 MB/s + 1 ms latency. Each prefill call waits for its read and starts
    100 us after it; the decode step's calls hit (no wait, no wake)."""
    dev = profile(tmp_path, MEASURED, "    wake: 100us\n")
    assert dev.compute.measured.wake == pytest.approx(100e-6)
    trace = make_trace([[[0], [1]], [[0], [1]]], prompt=[True, False], request_ids=[0, 0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(dev, w, build_policies(w, 10 ** 6, cache="lru")).run()
    ev = [(e.resource, round(e.start * 1e6), round(e.end * 1e6), e.step, e.layer)
          for e in tl.events if e.resource != "cache"]
    read, wake = 1000 + 192, 100
    l0_io = 2000 + 500 + 250                     # dense 2 ms, decision 0.5 ms, the load after 0.25 ms
    l0_call = l0_io + read + wake
    l1_dense = l0_call + 10000
    l1_io = l1_dense + 2000 + 750
    l1_call = l1_io + read + wake
    s1 = l1_call + 10000 + 7000                   # the prefill step's own 7 ms
    s1_l0 = s1 + 1000 + 500                       # decode dense 1 ms, decision 0.5 ms; hits
    assert ev == [("dense", 0, 2000, 0, 0), ("io", l0_io, l0_io + read, 0, 0),
                  ("compute", l0_call, l0_call + 10000, 0, 0),
                  ("dense", l1_dense, l1_dense + 2000, 0, 1), ("io", l1_io, l1_io + read, 0, 1),
                  ("compute", l1_call, l1_call + 10000, 0, 1),
                  ("dense", s1, s1 + 1000, 1, 0), ("compute", s1_l0, s1_l0 + 10000, 1, 0),
                  ("dense", s1_l0 + 10000, s1_l0 + 11000, 1, 1),
                  ("compute", s1_l0 + 11500, s1_l0 + 21500, 1, 1)]


def decompressions(dev):
    fmt = make_format("zip", TINY.expert_shapes, chunks=1)
    w = Workload(TINY, make_trace([[[0], [1]]], prompt=[True], request_ids=[0]), fmt, batch=1)
    tl = Simulator(dev, w, build_policies(w, 10 ** 6, cache="lru")).run()
    reads = {(e.layer, e.level): e.end for e in tl.of("io")}
    return [(round(e.start * 1e6), round(reads[e.layer, e.level] * 1e6)) for e in tl.of("decompress")]


def test_a_decompression_starts_a_handoff_after_its_read_by_hand(tmp_path):
    """The host-model test's zip profile without host figures or contention: one worker, each
    decompression's worker idle when its read ends (the reads of a layer are 1 ms apart, a task 8 ms
    long: the 2nd layer's task follows the 1st's), so the first starts `handoff` after its read."""
    text = PROFILE.replace("HOST\n", "").replace("    contention:\n      zip: {read: 0.25, decompress: 0.5, "
                                                  "call: 1ms}\n", "")
    plain = decompressions(profile(tmp_path, text, ""))
    handed = decompressions(profile(tmp_path, text, "    handoff: 200us\n"))
    assert plain[0][0] == plain[0][1] and handed[0][0] == handed[0][1] + 200
    assert all(start >= read + 200 for start, read in handed)


def test_the_profiler_reads_wakes_and_handoffs_off_a_timeline_by_hand():
    ev = [Event("io", "load", 0, 100e-6, 0, 0, 0), Event("compute", "expert", 100e-6, 200e-6, 0, 0, 0, step=0),
          Event("io", "load", 50e-6, 250e-6, 0, 1, 0), Event("compute", "expert", 300e-6, 400e-6, 0, 1, 0, step=0),
          Event("io", "load", 100e-6, 150e-6, 0, 2, 0), Event("compute", "expert", 400e-6, 500e-6, 0, 2, 0, step=0),
          Event("io", "load", 0, 100e-6, 0, 3, 1), Event("decompress[0]", "decompress", 160e-6, 200e-6, 0, 3, 1),
          Event("io", "load", 0, 170e-6, 0, 4, 1), Event("decompress[1]", "decompress", 180e-6, 220e-6, 0, 4, 1)]
    tl = Timeline(ev, {"level_parts": [[0]]})
    # the first call of the layer is not counted (it waits for the decision path too); the 2nd waited
    # for its read (ready 250 after the call before it ended at 200): 50; the 3rd's was resident
    wakes, handoffs = handoff_samples(tl, workers=2)
    assert wakes == pytest.approx([50e-6])
    # expert 3's read ends at 100 with no decompression running: 60; expert 4's at 170 with one running
    # (of 2 workers): 10; with one worker that one queued and is not counted
    assert sorted(handoffs) == pytest.approx([10e-6, 60e-6])
    assert handoff_samples(tl, workers=1)[1] == pytest.approx([60e-6])


def test_a_bad_wake_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"compute\.measured\.wake: expected a number with a unit"):
        profile(tmp_path, MEASURED, "    wake: 5\n")
    assert "to wake for a part" in profile(tmp_path, MEASURED, "    wake: 5us\n").describe()


def test_a_dense_part_after_a_decision_that_loaded_pays_its_extra_by_hand(tmp_path):
    """The same two steps with dense_after_loads 300 us: the prefill step's 2nd dense part follows a
    layer that loaded, and so does the decode step's 1st (after the prefill's last layer, which
    loaded); the decode step's 2nd follows a hit and takes its table's 1 ms."""
    dev = profile(tmp_path, MEASURED, "    dense_after_loads: 300us\n")
    trace = make_trace([[[0], [1]], [[0], [1]]], prompt=[True, False], request_ids=[0, 0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(dev, w, build_policies(w, 10 ** 6, cache="lru")).run()
    dense = [round((e.end - e.start) * 1e6) for e in tl.of("dense")]
    assert dense == [2000, 2000 + 300, 1000 + 300, 1000]


def test_the_profiler_reads_the_dense_extra_after_loads_by_hand():
    from executor.profile_host import after_loads
    from executor.profile_timeline import dense_excess
    steps = [{"step": s, "prefill": s == 0} for s in range(4)]
    ev = [Event("cache", "admit", 0, 0, 0, 0, 0, step=2),                       # step 2 layer 0 loaded
          Event("dense", "dense", 0, 500e-6, 0, step=1, tokens=1),             # step 1: left out (cold)
          Event("dense", "dense", 0, 400e-6, 0, step=2, tokens=1),             # after step 1's layer 1: a hit
          Event("dense", "dense", 0, 450e-6, 1, step=2, tokens=1),             # after step 2's layer 0: loaded
          Event("dense", "dense", 0, 410e-6, 0, step=3, tokens=4)]             # after step 2's layer 1: a hit
    after, clean = dense_excess(Timeline(ev, {"steps": steps}), (1, 4), (400e-6, 420e-6))
    assert after == pytest.approx([50e-6]) and clean == pytest.approx([0.0, -10e-6])
    assert after_loads(after, clean) == pytest.approx(50e-6)               # under 10 after hits: vs the table
    assert after_loads([50e-6] * 3, [10e-6] * 10) == pytest.approx(40e-6)
    assert after_loads([5e-6], [10e-6] * 10) == 0.0 and after_loads([], []) == 0.0


def test_a_call_on_an_expert_just_loaded_pays_its_extra_by_hand(tmp_path):
    """The same two steps with call_after_load 400 us for bf16: the prefill step's calls are on experts
    loaded at their decision points (10 ms + 0.4 ms each); the decode step's hit (10 ms)."""
    dev = profile(tmp_path, MEASURED, "    call_after_load: {bf16: 400us}\n")
    trace = make_trace([[[0], [1]], [[0], [1]]], prompt=[True, False], request_ids=[0, 0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    tl = Simulator(dev, w, build_policies(w, 10 ** 6, cache="lru")).run()
    assert [round((e.end - e.start) * 1e6) for e in tl.of("compute")] == [10400, 10400, 10000, 10000]
    with pytest.raises(ConfigError, match=r"compute\.measured\.call_after_load\.bf16: expected a number"):
        profile(tmp_path, MEASURED, "    call_after_load: {bf16: 4}\n")


def test_the_profiler_reads_the_call_extra_after_a_load_by_hand():
    from executor.profile_timeline import call_excess
    ev = [Event("cache", "admit", 0, 0, 0, 1, 0, step=2),
          Event("io", "load", 0, 90e-6, 0, 1, 0, step=2),
          Event("compute", "expert", 100e-6, 250e-6, 0, 1, 0, step=2, tokens=1),   # loaded: +50 over 100
          Event("compute", "expert", 250e-6, 360e-6, 0, 2, 0, step=2, tokens=1),   # resident: +10
          Event("io", "load", 370e-6, 500e-6, 1, 3, 0, step=2),
          Event("compute", "expert", 380e-6, 600e-6, 0, 3, 0, step=2, tokens=1),   # a read overlapped it: out
          Event("compute", "expert", 0, 300e-6, 0, 1, 0, step=1, tokens=1)]        # step 1: out (cold)
    fresh, resident = call_excess(Timeline(ev, {}), (1, 4), [(100e-6, 200e-6)])
    assert fresh == pytest.approx([50e-6]) and resident == pytest.approx([10e-6])


def test_the_tiered_engine_charges_the_dense_extra_after_loads_too(tmp_path):
    """The same two steps on the host-RAM engine (sim/tiers.py), whose decision points go through the
    engine's one `decide`: the same dense parts as the one-level engine's."""
    from dataclasses import replace
    from policies.tiers import attach_tiers
    from sim.tiers import TieredSimulator
    from test_tiers import tiered_device
    dev = profile(tmp_path, MEASURED, "    dense_after_loads: 300us\n")
    dev = replace(tiered_device(), compute=dev.compute)
    trace = make_trace([[[0], [1]], [[0], [1]]], prompt=[True, False], request_ids=[0, 0])
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    p = build_policies(w, 10 ** 6, cache="lru")
    attach_tiers(p, 10 ** 6, "lru")
    tl = TieredSimulator(dev, w, p).run()
    assert [round((e.end - e.start) * 1e6) for e in tl.of("dense")] == [2000, 2000 + 300, 1000 + 300, 1000]
