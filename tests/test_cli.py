"""The `moelab` command line: outputs and clear errors (no tracebacks)."""
import json
from pathlib import Path

import pytest

from experiments.cli import main

SMALL = ["--model", "olmoe-1b-7b", "--tokens", "6", "--prompt", "3"]


def test_simulate_writes_outputs(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--budget", "2GB", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("ttft_s", "tpot_s_mean", "tpot_s_p50", "tpot_s_p99", "throughput_tok_s", "peak_expert_bytes",
                "bytes_read", "hit_ratio", "compute_bubble_fraction", "io_busy_fraction"):
        assert key in m
    assert m["peak_expert_bytes"] <= 2e9
    trace = json.loads((tmp_path / "timeline.json").read_text())
    assert trace["traceEvents"] and (tmp_path / "gantt.png").stat().st_size > 1000
    assert "TTFT" in capsys.readouterr().out


def test_oracle_prefetch_hides_loads_behind_compute(tmp_path):
    runs = {}
    for prefetch in ("none", "oracle"):
        out = tmp_path / prefetch
        assert main(["simulate", *SMALL, "--budget", "2GB", "--prefetch", prefetch, "--out", str(out), "--quiet"]) == 0
        runs[prefetch] = json.loads((out / "metrics.json").read_text())
    assert runs["none"]["prefetches"] == 0 < runs["oracle"]["prefetches"]
    assert runs["oracle"]["hit_ratio"] > runs["none"]["hit_ratio"]
    assert runs["oracle"]["makespan_s"] < runs["none"]["makespan_s"]


@pytest.mark.parametrize("argv, needle", [
    (["simulate", "--device", "jetson-nano-1gb"], "jetson-agx-orin-64gb"),
    (["simulate", "--model", "gpt-5"], "mixtral-8x7b"),
    (["simulate", "--policy", "arc", *SMALL], "lru"),
    (["simulate", "--budget", "10MB", *SMALL], "minimum"),
    (["simulate", "--budget", "ten", *SMALL], "--budget"),
    (["simulate", "--storage", "floppy"], "nvme"),
    (["simulate", "--trace", "/nonexistent.npz"], "/nonexistent.npz"),
    (["simulate", "--prefetch", "psychic", *SMALL], "last-use"),
    (["execute", "--prefetch", "oracle", "--tokens", "2"], "--trace"),
])
def test_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err


def test_trace_synth_stats_replay(tmp_path, capsys):
    path = tmp_path / "t.npz"
    assert main(["trace", "synth", "--model", "mixtral-8x7b", "--tokens", "50", "--out", str(path)]) == 0
    assert main(["trace", "stats", str(path)]) == 0
    assert main(["replay", "--trace", str(path), "--policy", "lru", "--capacities", "8,16,64,256"]) == 0
    out = capsys.readouterr().out.splitlines()
    ratios = [float(line.split()[1]) for line in out[-4:]]
    assert ratios == sorted(ratios) and ratios[-1] > 0.9     # LRU is a stack policy; 256 holds everything


def test_simulate_a_trace_with_out_of_range_expert(tmp_path, capsys):
    import numpy as np
    from workloads.trace import RoutingTrace
    ex = np.zeros((4, 32, 2), np.int32)
    ex[2, 5, 1] = 8
    RoutingTrace(ex, np.ones_like(ex, dtype=np.float32) / 2, None, None).save(tmp_path / "bad.npz")
    assert main(["simulate", "--trace", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert "token 2, layer 5" in err and "out of range" in err
    ex[..., 1] = 1                         # two distinct experts per token (repeats are refused on load)


def test_devices_and_models(capsys):
    assert main(["devices"]) == 0 and main(["devices", "show", "raspberry-pi-5-8gb"]) == 0
    assert main(["models"]) == 0 and main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "raspberry-pi-4-8gb" in out and "switch-large-128" in out and "belady" in out


def test_record_then_simulate_and_force_the_same_trace(tmp_path, capsys):
    from workloads.catalog import get_model
    model_dir = str(Path(__file__).resolve().parents[1] / "executor" / "assets" / "tiny-moe")
    trace = tmp_path / "real.npz"
    assert get_model(model_dir).experts == 16
    assert main(["trace", "record", "--quiet", "--requests", "2", "--tokens", "6", "--out", str(trace)]) == 0
    assert main(["simulate", "--quiet", "--model", model_dir, "--trace", str(trace), "--batch", "2",
                 "--budget", "2.5MB", "--out", str(tmp_path / "s")]) == 0
    assert main(["execute", "--quiet", "--trace", str(trace), "--batch", "2", "--budget", "2.5MB",
                 "--store", str(tmp_path / "store"), "--out", str(tmp_path / "e")]) == 0
    sim = json.loads((tmp_path / "s" / "metrics.json").read_text())
    ex = json.loads((tmp_path / "e" / "metrics.json").read_text())
    # the same decisions, so the same hit ratio and bytes read
    assert sim["hit_ratio"] == ex["hit_ratio"] and sim["bytes_read"] == ex["bytes_read"]
    assert ex["peak_rss_bytes"] > 0 and ex["generated_tokens"] == 2 * 6


def test_bad_batch_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "t.npz"
    assert main(["trace", "synth", "--quiet", "--tokens", "4", "--out", str(path)]) == 0
    assert main(["simulate", "--trace", str(path), "--batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch" in err and "Traceback" not in err
