"""Energy in the simulator (timeline/energy.py): a hand-computed tiny timeline, the counter track,
metrics-only runs against full timelines, null energy with its reason, the sweep's columns, the
energy plot's Pareto front and `pick --metric energy_per_token`."""
import json

import pytest

from devices.units import ConfigError
from experiments.pick import pick
from experiments.plots import pareto_front, plot
from experiments.run import simulate
from experiments.spec import RunSpec
from experiments.sweep import METRIC_FIELDS, run_config
from timeline.energy import Powers, energy_metrics, power_track, track_energy
from timeline.events import Event, Timeline
from workloads.formats import FormatSpec

# two resources busy: compute [0, 1) s, storage [0.5, 2) s; board 1 W; compute 10 W busy / 0 idle;
# storage 2 W busy / 0.5 W idle; memory and decompression draw nothing
TINY = Timeline([Event("compute", "expert", 0.0, 1.0, 0, 0, 0, 100, 0, 1),
                 Event("io", "load", 0.5, 2.0, 0, 1, 0, 100, 0, 0)],
                {"level_parts": [[0]], "steps": [{"step": 0, "group": 0, "prefill": True, "tokens": 1, "new_tokens": 1}]})
POWERS = Powers(board=1.0, compute=(10.0, 0.0), memory=(0.0, 0.0), decompress=(0.0, 0.0), storage=(2.0, 0.5))


def test_hand_computed_energy_of_a_tiny_timeline():
    # board 1 W x 2 s = 2 J; compute 10 W x 1 s = 10 J; storage 2 W x 1.5 s + 0.5 W x 0.5 s = 3.25 J
    m = energy_metrics(TINY, POWERS, tokens=2)
    assert m["energy_j"] == pytest.approx(15.25)
    assert m["energy_per_token_j"] == pytest.approx(7.625)
    assert m["average_power_w"] == pytest.approx(15.25 / 2)
    assert m["energy_share_compute"] == pytest.approx(10 / 15.25)
    assert m["energy_share_storage"] == pytest.approx(3.25 / 15.25)
    assert m["energy_share_board"] == pytest.approx(2 / 15.25)
    assert m["energy_idle_share"] == pytest.approx((2 + 0.25) / 15.25)
    assert m["energy_reason"] is None


def test_power_track_integrates_to_the_energy_and_is_a_counter_track():
    track = power_track(TINY, POWERS)
    assert track_energy(track) == pytest.approx(15.25)
    assert [p[0] for p in track["points"]] == [0.0, 0.5, 1.0, 2.0]
    assert track["points"][1][1:] == [1.0, 10.0, 0.0, 0.0, 2.0]
    plain = TINY.chrome_trace()
    tl = Timeline(TINY.events, dict(TINY.meta, power_track=track))
    trace = tl.chrome_trace()
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert len(counters) == 4 and counters[1]["args"]["compute"] == 10.0 and counters[1]["ts"] == 0.5e6
    assert [e for e in trace["traceEvents"] if e["ph"] != "C"] == plain["traceEvents"]   # the lanes unchanged
    assert "power_track" not in trace["otherData"]


def test_no_powers_is_null_with_the_reason():
    m = energy_metrics(TINY, None, 1, "no power figures for x")
    assert m["energy_j"] is None and m["energy_per_token_j"] is None and m["energy_reason"] == "no power figures for x"


ZIP = RunSpec(device="jetson-orin-nano-8gb", model="olmoe-1b-7b", format=FormatSpec("zip", codec="lz4"), tokens=6,
              power_mode="15W")


def test_simulate_reports_energy_and_a_metrics_only_run_agrees():
    full = simulate(ZIP, timeline=True)
    lean = simulate(ZIP, timeline=False)
    m = full.metrics
    assert m["power_mode"] == "15W" and m["energy_reason"] is None
    for key in ("energy_j", "energy_per_token_j", "average_power_w", "energy_share_decompress", "energy_share_storage"):
        assert lean.metrics[key] == pytest.approx(m[key], rel=1e-12), key
    assert m["energy_per_token_j"] == pytest.approx(m["energy_j"] / m["generated_tokens"])
    assert m["average_power_w"] == pytest.approx(m["energy_j"] / m["makespan_s"])
    assert sum(m[f"energy_share_{r}"] for r in ("board", "compute", "memory", "decompress", "storage")) == \
        pytest.approx(1.0)
    assert m["energy_share_decompress"] > 0 and m["energy_share_storage"] > 0
    assert track_energy(full.timeline.meta["power_track"]) == pytest.approx(m["energy_j"], rel=1e-9)
    json.dumps(full.timeline.chrome_trace())                  # the counter track is plain JSON


def test_the_reference_mode_is_the_default():
    a = simulate(RunSpec(device="jetson-orin-nano-8gb", model="olmoe-1b-7b", tokens=3), timeline=False).metrics
    b = simulate(RunSpec(device="jetson-orin-nano-8gb", model="olmoe-1b-7b", tokens=3, power_mode="maxn_super"),
                 timeline=False).metrics
    assert a["power_mode"] == b["power_mode"] == "MAXN_SUPER" and a["energy_j"] == b["energy_j"]
    assert a["makespan_s"] == b["makespan_s"]


def test_a_device_without_power_figures_has_null_energy_with_the_reason():
    m = simulate(RunSpec(device="raspberry-pi-5-8gb", model="olmoe-1b-7b", tokens=2), timeline=False).metrics
    assert m["energy_j"] is None and m["energy_per_token_j"] is None and m["average_power_w"] is None
    assert "raspberry-pi-5-8gb" in m["energy_reason"] and "devices/power" in m["energy_reason"]


def test_an_unknown_mode_is_refused_naming_the_modes():
    with pytest.raises(ConfigError, match=r"power_mode: jetson-orin-nano-8gb has no power mode '9W'; modes: "
                                          r"MAXN_SUPER, 25W, 15W, 7W"):
        simulate(RunSpec(device="jetson-orin-nano-8gb", power_mode="9W", tokens=2), timeline=False)
    with pytest.raises(ConfigError, match="no power figures"):
        simulate(RunSpec(device="raspberry-pi-5-8gb", power_mode="15W", tokens=2), timeline=False)


def test_a_sweep_row_carries_the_energy_columns():
    assert {"energy_j", "energy_per_token_j", "average_power_w", "energy_reason"} <= set(METRIC_FIELDS)
    row = run_config(RunSpec(device="jetson-agx-orin-64gb", model="olmoe-1b-7b", tokens=3, power_mode="30W"))
    assert row["status"] == "ok" and row["power_mode"] == "30W" and row["energy_per_token_j"] > 0


def test_pareto_front():
    pts = [(1.0, 1.0), (2.0, 3.0), (1.5, 0.5), (3.0, 3.0), (0.5, 0.2), (2.5, 4.0)]
    assert pareto_front(pts) == [4, 0, 1, 5]          # by energy: 0.5 J, 1 J, 2 J, 2.5 J; the others beaten


def _rows():
    rows = []
    for i, (mode, fmt, j, tps) in enumerate([("7W", "bf16", 10.0, 1.0), ("25W", "zip", 8.0, 2.0),
                                             ("MAXN_SUPER", "mwq", 9.0, 3.0), ("15W", "mwq", 12.0, 2.5)]):
        rows.append({"config_hash": f"h{i}", "status": "ok", "device": "jetson-orin-nano-8gb", "policy": "lru",
                     "cache": "lru", "scheduler": "fifo", "allocator": "fixed", "prefetch": "none",
                     "power_mode": mode, "format": fmt, "energy_per_token_j": str(j), "throughput_tok_s": str(tps),
                     "tpot_s_mean": str(1 / tps), "budget_bytes": "1000", "peak_expert_bytes": "10",
                     "energy_reason": ""})
    rows.append(dict(rows[0], config_hash="h9", device="raspberry-pi-5-8gb", power_mode="", energy_per_token_j="",
                     energy_reason="no power figures"))
    return rows


def test_plot_energy_writes_the_figure(tmp_path):
    paths = plot(_rows(), "energy", tmp_path / "energy")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_pick_energy_per_token_under_a_throughput_or_tpot_constraint():
    rows = _rows()
    assert pick(rows, "energy_per_token")["config_hash"] == "h1"
    assert pick(rows, "energy_per_token", constraints=["throughput_tok_s>=2.5"])["config_hash"] == "h2"
    assert pick(rows, "energy_per_token", constraints=["tpot_s_mean<=0.45"])["config_hash"] == "h2"
    with pytest.raises(ConfigError, match="has an energy per token.*no power figures"):
        pick(rows, "energy_per_token", device="raspberry-pi-5-8gb")
