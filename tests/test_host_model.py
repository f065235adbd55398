"""Issue 24 item 1: the structural host model (sim/host_model.py) wired into the engine, and its
figures in a profile (compute.measured.host, devices/host_figures.py). Timelines worked out by hand
in the docstrings; times in microseconds. No wall-clock assertions."""
import pytest
from hypothesis import given, settings, strategies as st

from conftest import TINY, make_trace
from devices.host_figures import Share
from devices.profile import load_device
from devices.units import ConfigError
from policies import build_policies
from policies.cost import CostModel
from sim.engine import Simulator
from sim.host import HostContention
from sim.host_model import HostModel
from workloads.formats import make_format
from workloads.workload import Workload

PROFILE = """
name: host-model-test
description: "hand-made measured profile with host figures"
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
      zip:
        - [10ms, 16ms]
    dense:
      prefill: [2ms, 5ms]
      decode: [1ms, 4ms]
    step:
      prefill: [7ms, 7ms]
      decode: [3ms, 6ms]
    decision_overhead: 0ms
    load_overhead: 0ms
    contention:
      zip: {read: 0.25, decompress: 0.5, call: 1ms}
HOST
decompress:
  workers: 1
  throughput:
    lz4hc: 12KB/s   # test: 96 raw bytes in 8 ms (the engine's rate without the model)
"""

HOST = """    host:
      cores: CORES
      calls:
        zip: [[[0.5, 1.0], [0.5, 1.0]]]
      dense:
        prefill: [[1.0, 1.0], [1.0, 1.0]]
        decode: [[1.0, 1.0], [1.0, 1.0]]
      decide: [1.0, 1.0]
      read:
        zip: [0.0, 0.0]
      decompress:
        lz4hc: {share: [0.5, 1.0], rate: 24KB/s}"""


def device(tmp_path, host: str | None, cores: int = 1):
    path = tmp_path / "host.yaml"
    path.write_text(PROFILE.replace("HOST\n", "" if host is None else host.replace("CORES", str(cores)) + "\n"))
    return load_device(str(path))


def run(dev):
    """One prompt token, two layers: expert 0 then expert 1 (oracle prefetch), zip with one exponent
    chunk (SM 96 B, chunk 54 B decompressing to 96 B)."""
    fmt = make_format("zip", TINY.expert_shapes, chunks=1)
    w = Workload(TINY, make_trace([[[0], [1]]], prompt=[True], request_ids=[0]), fmt, batch=1)
    sim = Simulator(dev, w, build_policies(w, 10 ** 6, cache="lru", prefetch="oracle"))
    tl = sim.run()
    return sim, [(e.resource, e.layer, round(e.start * 1e6), round(e.end * 1e6)) for e in tl.events
                 if e.resource != "cache"]


DEC = "decompress[0]"      # the one worker


def by_time(ev):
    return sorted(ev, key=lambda e: (e[2], e[3], e[0]))


# reads (queue depth 1, no CPU of their own: read share [0, 0]) from the dense part's end at 2,000:
# layer 0's chunk (54 B: 1,054 us) then its SM bytes (96 B: 1,096 us), then the prefetch of layer 1's
# SM bytes and chunk
READS = [("io", 0, 2000, 3054), ("io", 0, 3054, 4150), ("io", 1, 4150, 5246), ("io", 1, 5246, 6300)]


def test_a_call_overlapping_a_decompression_on_one_core_by_hand(tmp_path):
    """One core. The dense part holds the lock throughout (share [1, 1]) with nothing in flight: 2 ms.
    Layer 0's decompression (alone rate 24 KB/s: 4 ms, half of it held: lock 1 ms, core 2 ms, lock
    1 ms) begins at its chunk's read end, 3,054, and runs alone (the main thread waits for it): 7,054;
    the model's end replaces the engine's 8 ms at 12 KB/s. At 7,054 expert 0's call (10 ms: lock 5,
    core 5) and layer 1's decompression (its chunk was read by 6,300; the worker is free now) both
    begin; the main thread asks first and holds the lock [7,054, 12,054], alone runnable (the worker is
    blocked on the lock). Then on the one core at 1/2 each: the worker's lock 1 ms [12,054, 14,054],
    its core 2 ms [14,054, 18,054], its lock 1 ms [18,054, 20,054] (the call's kernel gets 1 + 2 + 1 =
    4 ms done), and the call's last 1 ms alone: 21,054 (14 ms of CPU from 7,054 on one core). Layer 1:
    dense [21,054, 23,054], expert 1 (ready at 20,054) [23,054, 33,054]."""
    sim, ev = run(device(tmp_path, HOST, cores=1))
    assert type(sim.host) is HostModel and sim.host.cores == 1
    assert by_time(ev) == by_time([("dense", 0, 0, 2000), *READS, (DEC, 0, 3054, 7054),
                                   ("compute", 0, 7054, 21054), (DEC, 1, 7054, 20054),
                                   ("dense", 1, 21054, 23054), ("compute", 1, 23054, 33054)])


def test_a_call_overlapping_a_decompression_on_two_cores_by_hand(tmp_path):
    """The same on two cores: nothing slows for the cores, only the lock costs, and it costs the
    worker. Layer 0's decompression [3,054, 7,054] as before. At 7,054 the call holds the lock for
    5 ms, then runs its kernel [12,054, 17,054]; layer 1's decompression waits for the lock until
    12,054, holds it 1 ms, decompresses [13,054, 15,054] on the other core, and holds it 1 ms more
    (the call is in its kernel): 16,054. Layer 1: dense [17,054, 19,054], expert 1 [19,054, 29,054]."""
    sim, ev = run(device(tmp_path, HOST, cores=2))
    assert sim.host.cores == 2
    assert by_time(ev) == by_time([("dense", 0, 0, 2000), *READS, (DEC, 0, 3054, 7054),
                                   ("compute", 0, 7054, 17054), (DEC, 1, 7054, 16054),
                                   ("dense", 1, 17054, 19054), ("compute", 1, 19054, 29054)])


def test_a_profile_without_host_figures_keeps_the_calibrated_model(tmp_path):
    """Without compute.measured.host the chooser gives today's HostContention and its numbers: the
    call of 10 ms + 1 ms (call) starts at layer 0's decompression end (3,054 + 8 ms at 12 KB/s =
    11,054) while layer 1's decompression runs [11,054, 19,054]: 8 ms at half speed (decompress 0.5:
    4 ms of work), the last 7 ms at full speed: 26,054."""
    sim, ev = run(device(tmp_path, None))
    assert type(sim.host) is HostContention
    assert (DEC, 0, 3054, 11054) in ev and (DEC, 1, 11054, 19054) in ev and ("compute", 0, 11054, 26054) in ev


def test_the_engine_calls_the_calibrated_model_as_before(tmp_path):
    """The extra arguments the structural model needs (tokens, phase, level) change nothing in the
    calibrated one: the same fluid main thread with or without them."""
    from devices.profile import Contention
    host = HostContention(Contention(read=0.5))
    host.commit([(0.0, 1.0, False)])
    assert host.dense_end(0.0, 1.0, 4, True) == host.dense_end(0.0, 1.0) == pytest.approx(1.5)
    assert host.call_end(0.0, 1.0, host.in_flight, 0, 4) == host.call_end(0.0, 1.0, host.in_flight)


def test_host_figures_load_and_bad_ones_are_refused_by_name(tmp_path):
    m = device(tmp_path, HOST, cores=2).compute.measured
    assert m.host.cores == 2 and m.host.calls["zip"][0][1].lock == 0.5
    assert m.host.decompress["lz4hc"][1] == pytest.approx(24e3)
    for bad, words in (("zip: [0.0, 0.0]", ("read.zip", "lock <= cpu")),
                       ("cores: CORES", ("host.cores", "integer"))):
        path = tmp_path / "bad.yaml"
        text = HOST.replace("CORES", "2")
        text = text.replace(bad, bad.replace("[0.0, 0.0]", "[0.5, 0.2]").replace("CORES", "0")) if "zip" in bad \
            else text.replace("cores: 2", "cores: 0")
        path.write_text(PROFILE.replace("HOST\n", text + "\n"))
        with pytest.raises(ConfigError) as e:
            load_device(str(path))
        assert all(w in str(e.value) for w in words), str(e.value)


def test_a_format_the_host_figures_lack_is_refused_by_name(tmp_path):
    dev = device(tmp_path, HOST.replace("        zip: [0.0, 0.0]", "        bf16: [0.0, 0.0]"), cores=1)
    fmt = make_format("zip", TINY.expert_shapes, chunks=1)
    with pytest.raises(ConfigError, match="host.read has no entry for format 'zip'"):
        HostModel.of(CostModel.build(dev, TINY, fmt), dev, dev.storage_option(None))


FREE = """    host:
      cores: 64
      calls:
        zip: [[[0.0, 1.0], [0.0, 1.0]]]
      dense:
        prefill: [[0.0, 1.0], [0.0, 1.0]]
        decode: [[0.0, 1.0], [0.0, 1.0]]
      decide: [0.0, 1.0]
      read:
        zip: [0.0, 0.0]
      decompress:
        lz4hc: {share: [0.0, 1.0], rate: 12KB/s}"""


def random_run(dev, p: dict, host: bool):
    import numpy as np
    steps, batch = p["steps"], p["batch"]
    experts = np.random.default_rng(p["seed"]).integers(0, TINY.experts, size=(steps * batch, TINY.layers, 1))
    prompt = [i < batch for i in range(steps * batch)]
    fmt = make_format("zip", TINY.expert_shapes, chunks=p["chunks"])
    w = Workload(TINY, make_trace(experts, prompt=prompt, request_ids=[i % batch for i in range(steps * batch)]),
                 fmt, batch=batch)
    sim = Simulator(dev, w, build_policies(w, p["budget"], cache="lru", prefetch=p["prefetch"]))
    if not host:
        sim.host = None
    return [(e.resource, e.step, e.layer, e.expert, round(e.start, 9), round(e.end, 9)) for e in sim.run().events]


@settings(max_examples=25, deadline=None)
@given(st.fixed_dictionaries({"steps": st.integers(1, 4), "batch": st.integers(1, 2), "seed": st.integers(0, 10 ** 6),
                              "chunks": st.integers(1, 3), "budget": st.sampled_from([600, 10 ** 6]),
                              "prefetch": st.sampled_from(["none", "oracle"])}))
def test_a_host_that_never_contends_changes_nothing(tmp_path_factory, p):
    """Shares with no lock on more cores than threads, and a decompression rate alone equal to the
    profile's throughput: the structural model's timeline is the engine's without a host model."""
    dev = device(tmp_path_factory.mktemp("free"), FREE)
    assert random_run(dev, p, True) == random_run(dev, p, False)


def test_the_reduced_validation_matrix_covers_every_format():
    """`validate --reduced` (experiments/fidelity.sh): LRU and each paper's cache at half the bytes,
    batch 1 and 4, prefetch none / oracle: bf16 4, mwq 8 (lru, d2moe-budget), zip 8 (lru, zipmoe)."""
    from collections import Counter
    from experiments.validate import matrix
    rows = matrix(False, reduced=True)
    assert Counter(r["format"] for r in rows) == {"bf16": 4, "mwq": 8, "zip": 8}
    assert {r["cache"] for r in rows if r["format"] == "zip"} == {"lru", "zipmoe"}
    assert {r["budget_share"] for r in rows} == {0.5} and {r["batch"] for r in rows} == {1, 4}


def test_the_profilers_host_lines_load_back(tmp_path):
    """executor/profile_gil.py host_lines writes what devices/host_figures.py reads: every figure with
    its provenance, the values to three decimals, the rate in MB/s."""
    from executor.profile_gil import host_lines
    h = {"cores": 3, "reference": {"python": 0.97, "lock_free": 0.04},
         "calls": {"zip": [[[0.25, 1.5], [0.1234, 0.5]]]},
         "dense": {"prefill": [[1.0, 1.0], [0.5, 1.0]], "decode": [[0.75, 1.0], [0.5, 2.0]]},
         "decide": [0.9, 0.95], "read": {"zip": [0.05, 0.25]},
         "decompress": {"lz4hc": {"share": [0.02, 1.0], "rate": 1.234e9}}}
    lines = host_lines(h, "measured: test")
    figures = [line for line in lines if line.strip().startswith(("cores", "-", "prefill", "decode", "decide",
                                                                    "zip: [", "lz4hc"))]
    assert len(figures) == 7 and all("# measured: test" in line for line in figures)
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.replace("HOST\n", "\n".join(lines) + "\n"))
    f = load_device(str(path)).compute.measured.host
    assert f.cores == 3 and f.calls["zip"][0][1].lock == pytest.approx(0.123) and f.calls["zip"][0][0].cpu == 1.5
    assert f.dense_decode[1].cpu == 2.0 and f.decide.lock == 0.9 and f.read["zip"].cpu == 0.25
    assert f.decompress["lz4hc"][0].lock == 0.02 and f.decompress["lz4hc"][1] == pytest.approx(1.2e9, rel=0.03)
    assert "0.97 (should be 1)" in lines[0] and "0.04 (should be 0" in lines[0]


def test_operations_from_extreme_shares_by_hand():
    """Shares as a noisy profile may give them: held throughout with CPU beyond it (lock 1, cpu 1.2)
    is a held part of its whole time (nothing lock-free to run the rest in); cpu below lock's time
    (a read: lock 0.2, cpu 0.5 of 1 s) is half held, the device's wait, 0.3 s on a core, half held."""
    from sim.host_model import main_op, worker_op
    from sim.host_servers import Segment
    assert main_op(0.0, 1.0, Share(1.0, 1.2)).segments == (Segment("lock", 1.0),)
    assert worker_op(0.0, 1.0, Share(1.0, 1.2)).segments == (Segment("lock", 0.5), Segment("lock", 0.5))
    assert worker_op(0.0, 1.0, Share(0.2, 0.5)).segments == pytest.approx(
        (Segment("lock", 0.1), Segment("wait", 0.5), Segment("core", 0.3), Segment("lock", 0.1)))
    assert main_op(0.0, 1.0, Share(0.5, 1.5)).segments == (Segment("lock", 0.5), Segment("core", 0.5, 2.0))


def test_shares_extrapolated_past_the_table_stay_shares(tmp_path):
    """Calls' shares [0.5, 1.0] at 1 token and [0.5, 1.0] at 4, dense decode [0.75, 1.0] then [0.5, 2.0]:
    at 16 tokens the dense line extrapolates to lock 0.5 - 0.25 x 4 = -0.5 and cpu 2 + 4 = 6: held to
    lock 0, cpu 6; at 2 tokens it interpolates: lock 2/3, cpu 4/3."""
    dev = device(tmp_path, HOST.replace("decode: [[1.0, 1.0], [1.0, 1.0]]", "decode: [[0.75, 1.0], [0.5, 2.0]]"))
    fmt = make_format("zip", TINY.expert_shapes, chunks=1)
    model = HostModel.of(CostModel.build(dev, TINY, fmt), dev, dev.storage_option(None))
    assert model._share(model.f.dense_decode, 16) == Share(0.0, 6.0)
    assert model._share(model.f.dense_decode, 2) == Share(pytest.approx(2 / 3), pytest.approx(4 / 3))
