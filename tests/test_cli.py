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
    # a part prefetched for the decision point that uses it is coverage, not a demand hit:
    # the oracle hides the misses' latency, it does not remove them
    assert runs["none"]["prefetch_coverage"] == 0 < runs["oracle"]["prefetch_coverage"]
    assert runs["oracle"]["hit_ratio"] < runs["none"]["hit_ratio"] + runs["oracle"]["prefetch_coverage"] - 0.5
    assert runs["oracle"]["hit_ratio"] + runs["oracle"]["prefetch_coverage"] > 0.95
    assert runs["oracle"]["bytes_read"] >= runs["none"]["bytes_read"]
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
    ex[..., 1] = 1                         # two distinct experts per token (repeats are refused on load)
    ex[2, 5, 1] = 8
    RoutingTrace(ex, np.ones_like(ex, dtype=np.float32) / 2, None, None).save(tmp_path / "bad.npz")
    assert main(["simulate", "--trace", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert "token 2, layer 5" in err and "out of range" in err


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


# -- issue 9: errors where there were tracebacks or silence ---------------------------------
def _no_cuda():
    import torch
    return not torch.cuda.is_available()


@pytest.mark.parametrize("argv, needle", [
    (["simulate", "--budget", "1e400", *SMALL], "--budget"),
    (["simulate", "--budget", "0", *SMALL], "--budget"),
    (["simulate", "--budget", "100GB", *SMALL], "memory"),              # the device has 64 GB
    (["simulate", "--tokens", "0", "--model", "olmoe-1b-7b"], "--tokens"),
    (["simulate", "--codec", "lz4", *SMALL], "--codec"),                   # bf16 has no codec
    (["simulate", "--trace", "t.npz", "--tokens", "5"], "--tokens"),
    (["simulate", "--scheduler", "hebf-typo", *SMALL], "fifo"),
    (["execute", "--batch", "0"], "--batch"),
    (["execute", "--batch", "-1"], "--batch"),
    (["execute", "--tokens", "-5"], "--tokens"),
    (["execute", "--tokens", "0"], "--tokens"),
    (["execute", "--io-concurrency", "0"], "--io-concurrency"),
    (["execute", "--decompress-workers", "0"], "--decompress-workers"),
    (["execute", "--codec", "zstd"], "--codec"),
    (["execute", "--trace", "t.npz", "--tokens", "8"], "--tokens"),
    (["replay", "--trace", "t.npz", "--capacities", "abc"], "--capacities"),
    (["replay", "--trace", "t.npz", "--capacities", "0,-5"], "--capacities"),
    (["trace", "import", "x.jsonl", "--option", "experts_field", "--out", "y.npz"], "KEY=VALUE"),
    (["simulate", "--option", "top_k", *SMALL], "KEY=VALUE"),
    (["train", "--out", "runs/never", "--minutes", "-1"], "--minutes"),
    (["train", "--out", "/proc/moelab-not-writable", "--minutes", "0.01"], "--out"),
    (["devices", "show"], "NAME"),
])
def test_bad_input_is_one_clear_line_issue9(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not _no_cuda(), reason="this torch has CUDA")
def test_cuda_without_a_cuda_build_is_refused(tmp_path, capsys):
    assert main(["execute", "--torch-device", "cuda", "--store", str(tmp_path / "store")]) == 2
    assert "--torch-device cuda" in capsys.readouterr().err and not (tmp_path / "store").exists()


@pytest.mark.parametrize("option", [["--policy", "arc"], ["--prefetch", "psychic"], ["--scheduler", "x"]])
def test_unknown_policy_names_are_refused_before_a_store_is_built(tmp_path, capsys, option):
    assert main(["execute", *option, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err or "unknown cache 'arc'; known: on-demand" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "e").exists()


def test_out_that_is_a_file_or_holds_other_files_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import sim.engine
    ran = []
    monkeypatch.setattr(sim.engine.Simulator, "run", lambda *a, **k: ran.append(1))
    (tmp_path / "file").write_text("mine")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    for out, needle in ((tmp_path / "file", "is a file"), (tmp_path / "home", "notes.txt"),
                        (tmp_path / "file" / "sub", "is a file, not a folder")):
        assert main(["simulate", *SMALL, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
    for out in ("file", "t.npz/x"):
        assert main(["trace", "synth", "--quiet", "--out", str(tmp_path / out / "t.npz" if out == "file"
                                                                else tmp_path / "home")]) == 2
    assert not ran and (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "mine"


def test_train_checks_its_out_folder_before_training(tmp_path, capsys, monkeypatch):
    import executor.train
    monkeypatch.setattr(executor.train, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    (tmp_path / "f").write_text("x")
    assert main(["train", "--out", str(tmp_path / "f"), "--minutes", "0.01"]) == 2
    assert "--out" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import experiments.cli.info_cmds as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert main(["models"]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err


def _jsonl_trace(path, layers=16, tokens=3, k=8):
    lines = [json.dumps({"layer": layer, "token_idx": t, "topk_ids": [(t + layer + j) % 64 for j in range(k)]})
             for t in range(tokens) for layer in range(layers)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_takes_importer_options(tmp_path, capsys):
    trace = _jsonl_trace(tmp_path / "r.jsonl")
    base = ["simulate", "--quiet", "--model", "olmoe-1b-7b", "--budget", "2GB", "--trace", str(trace)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "experts_field" in err and "--option KEY=VALUE" in err
    assert main([*base, "--option", "experts_field=topk_ids", "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["generated_tokens"] == 3


# -- issue 9: metrics ---------------------------------------------------------------------------
def _strict_json(path):
    def bad(c):
        raise AssertionError(f"{path} holds {c}: not valid JSON")
    return json.loads(Path(path).read_text(), parse_constant=bad)


@pytest.mark.parametrize("tokens, batch", [(1, 1), (1, 3), (5, 2)])
def test_tokens_are_new_tokens_per_request(tmp_path, tokens, batch):
    out = tmp_path / "s"
    assert main(["simulate", "--quiet", "--model", "olmoe-1b-7b", "--budget", "2GB", "--tokens", str(tokens),
                 "--batch", str(batch), "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["generated_tokens"] == tokens * batch
    if tokens == 1:                                   # the prefill alone: no TPOT, null not NaN
        assert m["tpot_s_mean"] is None and m["tpot_s_p99"] is None


def test_execute_counts_tokens_like_simulate(tmp_path):
    out = tmp_path / "e"
    assert main(["execute", "--quiet", "--tokens", "2", "--batch", "2", "--store", str(tmp_path / "store"),
                 "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["generated_tokens"] == 2 * 2 and m["bits_per_weight"] == 16
    assert m["text"][0] != m["text"][1]                # two requests, two prompts


def test_mwq_states_its_precision(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--format", "mwq", "--budget", "2GB", "--out", str(tmp_path)]) == 0
    assert "4.00 bits per weight" in capsys.readouterr().out          # ladder v1 at its top level: INT4
    assert _strict_json(tmp_path / "metrics.json")["bits_per_weight"] == 4


def test_ttft_per_request_and_what_the_mean_covers(tmp_path):
    trace = tmp_path / "t.npz"
    assert main(["trace", "synth", "--quiet", "--model", "olmoe-1b-7b", "--requests", "4", "--tokens", "3",
                 "--prompt", "4", "--out", str(trace)]) == 0
    out = tmp_path / "s"
    assert main(["simulate", "--quiet", "--trace", str(trace), "--batch", "2", "--budget", "2GB",
                 "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    per = m["ttft_s_per_request"]
    assert len(per) == 4 and per[0] == per[1] == m["ttft_s_cold"] and per[2] == per[3] == m["ttft_s_warm"]
    assert m["ttft_s"] == pytest.approx(sum(per) / 4) and m["generated_tokens"] == 4 * 3


# -- issue 9: outputs ---------------------------------------------------------------------------
def test_outputs_replace_a_previous_run_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["simulate", *SMALL, "--quiet", "--budget", "2GB", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import timeline.gantt

    def broken(*a, **k):
        raise KeyboardInterrupt                      # killed while drawing the chart
    monkeypatch.setattr(timeline.gantt, "gantt", broken)
    assert main(["simulate", *SMALL, "--quiet", "--budget", "3GB", "--out", str(out)]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # the old run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]          # no temporary folder left
    monkeypatch.undo()
    assert main(["simulate", *SMALL, "--quiet", "--budget", "3GB", "--out", str(out)]) == 0
    assert _strict_json(out / "metrics.json")["budget_bytes"] == 3e9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_too_big_for_memory_is_refused_up_front(capsys, monkeypatch):
    import experiments.run as run
    monkeypatch.setattr(run, "available_memory", lambda: 8 * 10**9)
    assert main(["simulate", "--tokens", "10000000", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "GB" in err and "available" in err


# -- issue 9: newcomer details ------------------------------------------------------------------
def _subcommands():
    return [["simulate"], ["replay"], ["devices"], ["models"], ["policies"], ["trace", "stats"], ["trace", "synth"],
            ["trace", "import"], ["trace", "record"], ["train"], ["store", "build"], ["execute"]]


@pytest.mark.parametrize("cmd", _subcommands(), ids=" ".join)
def test_help_shows_defaults_and_units(cmd, capsys):
    with pytest.raises(SystemExit):
        main([*cmd, "--help"])
    out = capsys.readouterr().out
    if cmd in (["simulate"], ["execute"]):
        assert "10^9" in out and "2^30" in out and "(default: 1)" in out
    if cmd in (["simulate"], ["execute"], ["replay"], ["trace", "synth"], ["train"]):
        assert "(default:" in out
    if cmd == ["trace", "import"]:
        for option in ("experts_field", "request_field", "top_k", "num_experts"):
            assert option in out


def test_record_names_its_model_and_distinct_prompts(tmp_path, capsys):
    import numpy as np
    from workloads.trace import RoutingTrace
    trace = tmp_path / "real.npz"
    assert main(["trace", "record", "--quiet", "--requests", "3", "--tokens", "2", "--out", str(trace)]) == 0
    t = RoutingTrace.load(trace)
    assert t.metadata["model"] == "tiny-moe" and t.metadata["arch"]["experts"] == 16
    rows = [t.experts[t.request_ids == r][t.prompt[t.request_ids == r]] for r in range(3)]
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])
    # simulate takes the model from the trace
    assert main(["simulate", "--quiet", "--trace", str(trace), "--batch", "3", "--budget", "2.5MB",
                 "--out", str(tmp_path / "s")]) == 0
    m = _strict_json(tmp_path / "s" / "metrics.json")
    assert m["model"] == "tiny-moe" and m["generated_tokens"] == 3 * 2


def test_a_zero_hit_ratio_says_why(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--budget", "1GB", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "hit ratio 0: the budget holds 79 experts, fewer than the 128" in out
    assert main(["simulate", *SMALL, "--budget", "2GB", "--out", str(tmp_path / "b")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_bad_throttle_device_is_refused_before_a_store_is_built(tmp_path, capsys):
    assert main(["execute", "--throttle", "jetson-nano-1gb", "--store", str(tmp_path / "store")]) == 2
    assert "jetson-nano-1gb" in capsys.readouterr().err and not (tmp_path / "store").exists()
