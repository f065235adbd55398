"""Issue 24: the measured co-run model (sim/host_beside.py; its figures compute.measured.host.beside,
devices/host_figures.py; measured by executor/profile_beside.py) and its use by sim/host_model.py
BesideModel. Timelines worked out by hand in the docstrings; no wall-clock assertions."""
import pytest
from hypothesis import given, settings, strategies as st

from devices.profile import load_device
from devices.units import ConfigError
from policies.cost import CostModel
from sim.host_beside import BackgroundTask, MainTask, run_tasks
from sim.host_model import BesideModel
from test_host_model import FREE, HOST, PROFILE, READS, DEC, TINY, by_time, random_run, run
from workloads.formats import make_format


def test_a_main_task_and_a_background_task_slow_each_other_by_hand():
    """A 1 s main task slowed 3x beside one task of kind d, which runs 2x slower beside it: both at
    once, the task's 1 s takes 2 s; by then the main task has done 2/3 s, its last 1/3 s alone: 2.333."""
    main = [MainTask(0.0, 1.0, {"d": (3.0, 5.0)}, {"d": (2.0, 4.0)})]
    assert run_tasks(main, [BackgroundTask(0.0, 1.0, "d")]) == (pytest.approx([7 / 3]), pytest.approx([2.0]))


def test_two_background_tasks_use_the_two_worker_figures_by_hand():
    """The same main task; task a (0.2 s, then asleep until 5 s) from 0, task b (0.2 s) from 0.1.
    [0, 0.1]: one task: main at 1/3 (1/30 done), a at 1/2 (0.05 done). [0.1, 0.7]: two: main at 1/5,
    each task at 1/4, so a ends its work at 0.1 + 0.15 x 4 = 0.7 (main: 1/30 + 0.12). [0.7, 0.8]: b alone
    with main: b's last 0.05 at 1/2 ends at 0.8 (main + 1/30). Main's last 0.8133 s alone: 1.6133.
    a sleeps until 5 s."""
    main = [MainTask(0.0, 1.0, {"d": (3.0, 5.0)}, {"d": (2.0, 4.0)})]
    bg = [BackgroundTask(0.0, 0.2, "d", until=5.0), BackgroundTask(0.1, 0.2, "d")]
    ends, bg_ends = run_tasks(main, bg)
    assert ends == pytest.approx([1.6133333]) and bg_ends == pytest.approx([5.0, 0.8])


def test_tasks_with_no_work_and_main_tasks_in_order():
    """A task of no work ends as it begins; main-thread tasks run one after another in their order
    (the second, ready at 0, waits for the first, ready at 1)."""
    assert run_tasks([], [BackgroundTask(0.0, 0.0, "d")]) == ([], [0.0])
    assert run_tasks([MainTask(1.0, 0.5), MainTask(0.0, 0.5)], []) == ([1.5, 2.0], [])
    alone = [BackgroundTask(0.0, 1.0, "d", alone=(1.0, 3.0)), BackgroundTask(0.0, 1.0, "d", alone=(1.0, 3.0))]
    assert run_tasks([], alone)[1] == pytest.approx([3.0, 3.0])      # two at once, no main work: 3x each


BESIDE = """
      beside:
        read:
          zip:
            alone: [1.0, 1.0]
            calls: {zip: [[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]]}
            dense: {prefill: [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], decode: [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]}
            decide: [1.0, 1.0, 1.0, 1.0]
        decompress:
          lz4hc:
            alone: [1.0, ALONE]
            calls: {zip: [[[CALL, 3.0, DEC, 2.0], [CALL, 3.0, DEC, 2.0]]]}
            dense: {prefill: [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], decode: [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]}
            decide: [1.0, 1.0, 1.0, 1.0]"""


def device(tmp_path, host: str, call=2.0, dec=1.5, alone=1.0, extra=()):
    """The co-run profile; `extra`: lines added to the lz4hc decompressions' entry (across, rate)."""
    path = tmp_path / "beside.yaml"
    beside = BESIDE.replace("CALL", str(call)).replace("DEC", str(dec)).replace("ALONE", str(alone))
    beside += "".join("\n            " + line for line in extra)
    path.write_text(PROFILE.replace("HOST\n", host.replace("CORES", "1") + beside + "\n"))
    return load_device(str(path))


def test_a_call_beside_a_decompression_in_the_engine_by_hand(tmp_path):
    """test_host_model's run (one prompt token, two layers, zip with one chunk) with co-runs: a zip call
    runs 2x slower beside one decompression, which runs 1.5x slower beside it; reads and dense parts
    are not slowed. The reads as there. Layer 0's decompression (96 B at the figures' 24 KB/s: 4 ms)
    runs alone from its chunk's read end: [3,054, 7,054]. At 7,054 expert 0's call (10 ms) and layer
    1's decompression (4 ms) begin: the decompression at 1/1.5 ends at 13,054, by when the call has
    done 3 ms; its last 7 ms alone: 20,054. Layer 1: dense [20,054, 22,054], expert 1 [22,054, 32,054]."""
    sim, ev = run(device(tmp_path, HOST))
    assert type(sim.host) is BesideModel
    assert by_time(ev) == by_time([("dense", 0, 0, 2000), *READS, (DEC, 0, 3054, 7054),
                                   ("compute", 0, 7054, 20054), (DEC, 1, 7054, 13054),
                                   ("dense", 1, 20054, 22054), ("compute", 1, 22054, 32054)])


def test_reads_and_decompressions_slow_each_other_by_hand():
    """No main-thread work. A decompression (1 s) 2x slower beside one read, 3x beside two; a read 1.5x
    slower beside one decompression. One of each from 0: the read at 1/1.5 ends at 1.5, by when the
    decompression has done 0.75 s at 1/2; its last 0.25 s alone: 1.75. With two reads of 0.5 s (2 at
    once: 1.2x each, times 1.5 beside it): each at 1/1.8 ends at 0.9, the decompression at 1/3 has
    done 0.3 s; its last 0.7 s alone: 1.6."""
    dec = BackgroundTask(0.0, 1.0, "decompress", cross={"read": (2.0, 3.0)})
    read = BackgroundTask(0.0, 1.0, "read", cross={"decompress": (1.5, 2.0)})
    assert run_tasks([], [dec, read])[1] == pytest.approx([1.75, 1.5])
    reads = [BackgroundTask(0.0, 0.5, "read", alone=(1.0, 1.2), cross={"decompress": (1.5, 2.0)})] * 2
    assert run_tasks([], [dec] + reads)[1] == pytest.approx([1.6, 0.9, 0.9])
    assert run_tasks([], [BackgroundTask(0.0, 1.0, "decompress", cross={"read": (2.0, 3.0)})])[1] == [1.0]


def test_a_decompression_beside_reads_in_the_engine_by_hand(tmp_path):
    """test_a_call_beside_a_decompression_in_the_engine_by_hand's run with the codec's pool rate
    (48 KB/s: 96 B in 2 ms) and `across` [2, 2, 1, 1] (a decompression 2x slower beside reads; reads
    not slowed). Layer 0's decompression from 3,054 runs beside the reads (one at a time, through
    6,300): 3,246 us at 1/2 do 1,623 us of its 2,000; the last 377 us alone: 6,677. Then expert 0's
    call (10 ms) and layer 1's decompression (2 ms; the one worker is free now) begin; the
    decompression at 1/1.5 beside the call ends at 9,677, by when the call has done 1.5 ms at 1/2;
    its last 8.5 ms alone: 18,177. Layer 1: dense [18,177, 20,177], expert 1 [20,177, 30,177]."""
    dev = device(tmp_path, HOST, extra=("across: [2.0, 2.0, 1.0, 1.0]", "rate: 48KB/s"))
    sim, ev = run(dev)
    assert sim.host.dec_rate == pytest.approx(48e3)
    assert by_time(ev) == by_time([("dense", 0, 0, 2000), *READS, (DEC, 0, 3054, 6677),
                                   ("compute", 0, 6677, 18177), (DEC, 1, 6677, 9677),
                                   ("dense", 1, 18177, 20177), ("compute", 1, 20177, 30177)])


@settings(max_examples=25, deadline=None)
@given(st.fixed_dictionaries({"steps": st.integers(1, 4), "batch": st.integers(1, 2), "seed": st.integers(0, 10 ** 6),
                              "chunks": st.integers(1, 3), "budget": st.sampled_from([600, 10 ** 6]),
                              "prefetch": st.sampled_from(["none", "oracle"])}))
def test_co_runs_that_slow_nothing_change_nothing(tmp_path_factory, p):
    """Every slowdown 1 and a decompression rate alone equal to the profile's throughput: the co-run
    model's timeline is the engine's without a host model."""
    dev = device(tmp_path_factory.mktemp("free"), FREE.replace("cores: 64", "cores: CORES"), call=1.0, dec=1.0)
    assert type(HostModelOf(dev)) is BesideModel
    assert random_run(dev, p, True) == random_run(dev, p, False)


def HostModelOf(dev):
    from sim.host_model import HostModel
    fmt = make_format("zip", TINY.expert_shapes, chunks=1)
    return HostModel.of(CostModel.build(dev, TINY, fmt), dev, dev.storage_option(None))


@pytest.mark.parametrize("bad, message", [
    ("[CALL, 3.0, DEC, 2.0]", None),
    ("[0.5, 3.0, DEC, 2.0]", r"host\.beside\.decompress\.lz4hc\.calls\.zip\[0\]\[0\]: expected 4 slowdowns >= 1"),
    ("[CALL, 3.0, DEC]", r"expected 4 slowdowns >= 1"),
])
def test_bad_co_run_figures_are_refused_by_file_and_key(tmp_path, bad, message):
    path = tmp_path / "bad.yaml"
    beside = BESIDE.replace("[[[CALL, 3.0, DEC, 2.0], [CALL", f"[[{bad}, [CALL", 1)
    text = PROFILE.replace("HOST\n", HOST.replace("CORES", "1") + beside.replace("CALL", "2.0").replace("DEC", "1.5")
                           .replace("ALONE", "1.0") + "\n")
    path.write_text(text)
    if message is None:
        assert load_device(str(path)).compute.measured.host.beside["decompress"]["lz4hc"].calls["zip"][0][0][0] == 2.0
        return
    with pytest.raises(ConfigError, match=message) as e:
        load_device(str(path))
    assert "bad.yaml" in str(e.value)


def test_a_codec_the_co_runs_lack_is_refused_by_name(tmp_path):
    """The lock and core shares have zstd, the co-runs only lz4hc: a zstd run is refused naming them."""
    host = HOST + "\n        zstd: {share: [0.5, 1.0], rate: 24KB/s}"
    dev = device(tmp_path, host)
    fmt = make_format("zip", TINY.expert_shapes, chunks=1, codec="zstd")
    from sim.host_model import HostModel
    with pytest.raises(ConfigError, match=r"host\.beside\.decompress has no entry for codec 'zstd' \(has: lz4hc\)"):
        HostModel.of(CostModel.build(dev, TINY, fmt), dev, dev.storage_option(None))


def test_the_profilers_beside_lines_load_back(tmp_path):
    """executor/profile_beside.py beside_lines writes what devices/host_figures.py reads."""
    from executor.profile_beside import beside_lines
    row = lambda s: [[s, s + 1, 1.0, 1.25]] * 2                          # noqa: E731
    kind = {"alone": [1.0, 1.5], "calls": {"zip": [row(2.0)]}, "dense": {"prefill": row(1.0), "decode": row(1.5)},
            "decide": [1.0, 1.0, 30.0, 40.0]}
    dec = dict(kind, rate=2.3e8, across=[2.0, 2.5, 1.75, 2.25])
    lines = beside_lines({"read": {"zip": kind}, "decompress": {"lz4hc": dec}}, "measured: test")
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.replace("HOST\n", HOST.replace("CORES", "2") + "\n" + "\n".join(lines) + "\n"))
    b = load_device(str(path)).compute.measured.host.beside
    assert b["read"]["zip"].alone == (1.0, 1.5) and b["decompress"]["lz4hc"].calls["zip"][0][1] == (2.0, 3.0, 1.0, 1.25)
    assert b["read"]["zip"].dense_decode[0] == (1.5, 2.5, 1.0, 1.25) and b["decompress"]["lz4hc"].decide[3] == 40.0
    assert b["decompress"]["lz4hc"].rate == 2.3e8 and b["decompress"]["lz4hc"].across == (2.0, 2.5, 1.75, 2.25)
    assert b["read"]["zip"].rate is None and b["read"]["zip"].across is None


@pytest.mark.parametrize("extra, message", [
    ("across: [2.0, 2.0, 1.0]", r"host\.beside\.decompress\.lz4hc\.across: expected 4 slowdowns >= 1"),
    ("across: [0.9, 2.0, 1.0, 1.0]", r"lz4hc\.across: expected 4 slowdowns >= 1 \(it beside 1 and 2 read threads"),
    ("rate: 48", r"host\.beside\.decompress\.lz4hc\.rate: expected a number with a unit"),
    ("acros: [2.0, 2.0, 1.0, 1.0]", r"host\.beside\.decompress\.lz4hc\.acros: unknown key \(did you mean 'across'\?\)"),
])
def test_bad_across_and_rate_are_refused_by_file_and_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        device(tmp_path, HOST, extra=(extra,))
    assert "beside.yaml" in str(e.value)


def test_a_read_kind_has_no_across(tmp_path):
    """across and rate belong to a codec's decompressions; under a format's reads they are refused."""
    path = tmp_path / "p.yaml"
    beside = BESIDE.replace("CALL", "2.0").replace("DEC", "1.5").replace("ALONE", "1.0").replace(
        "            alone: [1.0, 1.0]\n", "            alone: [1.0, 1.0]\n            across: [1.0, 1.0, 1.0, 1.0]\n", 1)
    path.write_text(PROFILE.replace("HOST\n", HOST.replace("CORES", "1") + beside + "\n"))
    with pytest.raises(ConfigError, match=r"host\.beside\.read\.zip\.across: unknown key"):
        load_device(str(path))
