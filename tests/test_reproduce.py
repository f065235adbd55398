"""`moelab reproduce d2moe`: resumable runs under both cost profiles, the report's comparisons, its
wall time, and its figures."""
import csv

import pytest

import experiments.d2moe_runs as runs
from experiments.d2moe_runs import Run
from experiments.reproduce_d2moe import reproduce

LLAMA = "llama-moe-3.5b"


@pytest.fixture
def small(monkeypatch):
    """A few 32-request runs of 4 tokens under both profiles: enough for every table of the report."""
    monkeypatch.setattr(runs, "TOKENS", 4)
    grid = []
    for p in runs.PROFILES:
        grid += [Run("env2", LLAMA, s, 32, b, p) for s in ("d2moe", "d2moe-hebf", "d2moe-mwq", "edgemoe")
                 for b in (400, 1600)]
        grid += [Run("env2", LLAMA, "d2moe", 32, 1600, p, levels="capacity"),
                 Run("env2", LLAMA, "d2moe-hebf", 32, 1600, p, cache="layer-lru"),
                 Run("env2", LLAMA, "d2moe-mwq", 32, 800, p), Run("env2", LLAMA, "d2moe-hebf", 32, 800, p),
                 Run("env2", LLAMA, "d2moe", 32, 800, p, skew=3.0), Run("env2", LLAMA, "edgemoe", 32, 800, p, skew=3.0)]
    grid += [Run("env1", "mixtral-8x7b", "hold-in-memory", 32, None),
             Run("env2", LLAMA, "d2moe", 32, 400, storage="host-ram")]
    monkeypatch.setattr(runs, "grid", lambda: grid)
    return grid


def test_a_run_is_a_run_spec_under_its_profile_with_router_levels():
    from experiments.d2moe_levels import shares_option
    spec = runs.run_spec(Run("env1", LLAMA, "d2moe", 32, 800, "paper-impl"))
    assert spec.device == "rtx-3060-laptop-6gb-d2moe-impl" and spec.format.name == "mwq"
    assert spec.policy.allocator.name == "shares" and list(spec.policy.allocator.opts["shares"]) == \
        pytest.approx(shares_option()["shares"])
    assert (spec.policy.scheduler.name, spec.policy.cache.name) == ("hebf", "d2moe-budget")
    assert (spec.skew, spec.locality, spec.requests, spec.tokens) == (1.0, 0.6, 32, 129)
    rank = runs.run_spec(Run("env1", LLAMA, "d2moe", 32, 800, levels="capacity"))
    assert rank.policy.preset == "d2moe" and rank.policy.allocator.name == "capacity"
    assert runs.run_spec(Run("env1", LLAMA, "d2moe-hebf", 32, 800, cache="layer-lru")).policy.cache.name == "layer-lru"
    assert runs.run_spec(Run("env1", LLAMA, "edgemoe", 32, 800)).policy.preset == "edgemoe"
    with pytest.raises(AssertionError):
        Run("env1", LLAMA, "edgemoe", 32, 800, levels="capacity")     # no levels to choose


def test_the_grid_has_both_profiles_the_axes_and_the_baselines():
    g = runs.grid()
    per = {p: [r for r in g if r.profile == p] for p in runs.PROFILES}
    assert len(per["roofline"]) == len(per["paper-impl"]) == len(set(g)) // 2
    axes = {(r.skew, r.locality, r.requests) for r in per["roofline"]
            if r.system == "d2moe-hebf" and r.budget_mb == 800 and r.env == "env2"}
    assert axes >= {(s, l, n) for s, l in runs.GENERATORS for n in runs.ABLATION_REQUESTS}
    assert any(r.levels == "capacity" for r in g) and any(r.cache == "layer-lru" for r in g)
    assert g[0].requests == 32 and g[-1].requests == 4                 # the expensive runs first


def test_runs_are_appended_and_reused_and_the_wall_time_is_stated(small, tmp_path, monkeypatch):
    text = reproduce(tmp_path, jobs=1, quiet=True)
    results = runs.load_results(tmp_path / "results.csv")
    assert len(results) == len(small) and f"{len(small)} runs simulated, 0 reused" in text and "wall time" in text
    oom = results[Run("env1", "mixtral-8x7b", "hold-in-memory", 32, None).key()]
    assert oom["status"] == "out of memory" and "expert budget" in oom["note"]
    ok = results[Run("env2", LLAMA, "d2moe", 32, 1600).key()]
    assert ok["status"] == "ok" and float(ok["throughput_tok_s"]) > 0 and float(ok["peak_expert_mb"]) <= 1600
    calls = []
    monkeypatch.setattr(runs, "_simulate_row", lambda run: calls.append(run))
    again = reproduce(tmp_path, jobs=1, quiet=True)
    assert calls == [] and f"0 runs simulated, {len(small)} reused" in again            # nothing rerun
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(small)
    for stem in ("fig10_throughput_vs_budget_roofline", "fig14_ablation_paper-impl", "fig3_layer_gantt_fifo_vs_hebf"):
        assert (tmp_path / f"{stem}.png").exists()


def test_the_profiles_differ_in_compute_only(small, tmp_path):
    results, _ = runs.run_grid(tmp_path, jobs=1, quiet=True)
    a, b = (results[Run("env2", LLAMA, "d2moe", 32, 400, p).key()] for p in runs.PROFILES)
    for key in ("bytes_read_mb", "hit_ratio", "bits_per_weight", "expert_calls", "io_busy_s"):
        assert a[key] == b[key], key                                    # the same decisions
    assert float(b["compute_busy_s"]) > float(a["compute_busy_s"])     # one token per call is slower
    assert int(b["kernel_calls"]) > int(a["kernel_calls"]) == int(a["expert_calls"])


def test_report_compares_with_the_paper_under_both_profiles(small, tmp_path):
    from experiments.d2moe_report import report
    results, _ = runs.run_grid(tmp_path, jobs=1, quiet=True)
    text = report(results, tmp_path)
    t = [float(results[Run("env2", LLAMA, "d2moe", 32, 1600, p).key()]["throughput_tok_s"]) for p in runs.PROFILES]
    assert (f"| Fig. 10(c) LLaMA-MoE Env 2, 1600 MB | 83.14 | {t[0]:.2f} | {t[0] / 83.14 - 1:+.1%} | {t[1]:.2f} | "
            f"{t[1] / 83.14 - 1:+.1%} |") in text
    from experiments.d2moe_analysis import ratios
    d = [float(results[Run("env2", LLAMA, s, 32, 1600, "paper-impl").key()]["throughput_tok_s"])
         for s in ("d2moe", "d2moe-hebf")]
    assert d[0] / d[1] in ratios(results, "d2moe", "d2moe-hebf", None, "paper-impl")
    assert (tmp_path / "report.md").read_text() == text
    for heading in ("## Cost profiles", "## Levels", "## HEBF against FIFO", "## Routing skew and batch",
                    "## +Budget against a baseline that caches", "## What limits each number"):
        assert heading in text
    # the same run with its experts in host RAM reads as fast as RAM copies
    ram, ssd = (results[Run("env2", LLAMA, "d2moe", 32, 400, storage=s).key()] for s in ("host-ram", ""))
    assert ram["bytes_read_mb"] == ssd["bytes_read_mb"]
    assert float(ram["throughput_tok_s"]) > float(ssd["throughput_tok_s"])


def test_an_older_results_file_is_set_aside_not_mixed(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("env,model,system,requests,budget_mb,status\nenv1,m,d2moe-mwq,32,800,ok\n")
    assert runs.retire_old_results(path) == tmp_path / "results.old-1.csv" and not path.exists()
    path.write_text(",".join(runs.FIELDS) + "\n" + ",".join(str(runs.VERSION) if f == "version" else "1"
                                                           for f in runs.FIELDS) + "\n")
    assert runs.retire_old_results(path) is None and len(runs.load_results(path)) == 1


def test_storage_bound_by_hand():
    from experiments.d2moe_bounds import needed_read_per_step, storage_bound
    # Mixtral at 32 requests: 256 experts active (1 - 0.75^32 of each), INT2 = 49.545 MB; 1600 MB holds 32
    b = storage_bound("mixtral-8x7b", 1600, 32, 3.5e9)
    assert b["held"] == 32 and b["active"] == pytest.approx(256 * (1 - 0.75 ** 32))
    assert b["tok_s"] == pytest.approx(32 / ((b["active"] - 32) * b["int2_bytes"] / 3.5e9))
    assert b["tok_s"] == pytest.approx(10.1, abs=0.05)
    assert needed_read_per_step(66.45, 32, 3.5e9) == pytest.approx(32 / 66.45 * 3.5e9)
