"""Issue 24 item 3: the validation's statistics (experiments/validate_stats.py) on synthetic rows
with known answers, and validate's extra repeats for noisy configurations (a fake executor)."""
import numpy as np
import pytest

from experiments.validate_stats import (bootstrap_ci, format_stats, rank_agreement, rank_for_pick, rank_groups,
                                        rank_stats, report_sections, speed_points, summary_lines, tpot_points,
                                        within_2sigma)


def row(pred, meas, sd=0.0, runs=3, fmt="bf16", cache="lru", prefetch="none", share=0.5, batch=1, throttle="",
        budget=1000):
    return {"throttle": throttle, "format": fmt, "cache": cache, "prefetch": prefetch, "budget_share": str(share),
            "batch": str(batch), "budget_bytes": str(budget), "repeats": str(runs), "status": "ok",
            "pred_tpot_s_mean": str(pred), "meas_tpot_s_mean": str(meas), "sd_tpot_s_mean": str(sd),
            "decisions_identical": "True"}


def test_bias_is_the_median_signed_error_and_abs_error_its_size():
    """Errors -10%, 0, +5%, +10%, +20%: bias (median) +5%; |error| median 10%, max 20%."""
    rows = [row(1 + e, 1.0, sd=0.1) for e in (-0.1, 0.0, 0.05, 0.1, 0.2)]
    rows.append(dict(row(1.0, 1.0), status="skipped: budget"))             # not counted
    (s,) = format_stats(rows)
    assert (s["throttle"], s["format"], s["configs"]) == ("none", "bf16", 5)
    assert s["bias"] == pytest.approx(0.05)
    assert s["abs_median"] == pytest.approx(0.1) and s["abs_max"] == pytest.approx(0.2)
    assert s["spread"] == pytest.approx(0.1) and s["identical"] == 5
    lo, hi = s["bias_ci"]
    assert -0.1 <= lo <= 0.05 <= hi <= 0.2
    assert format_stats(rows)[0]["bias_ci"] == (lo, hi)                     # seeded: the same interval


def test_stats_are_per_regime_and_format():
    rows = [row(1.1, 1.0), row(1.3, 1.0, fmt="zip"), row(0.8, 1.0, throttle="raspberry-pi-5-8gb:microsd")]
    got = {(s["throttle"], s["format"]): round(s["bias"], 6) for s in format_stats(rows)}
    assert got == {("none", "bf16"): 0.1, ("none", "zip"): 0.3, ("raspberry-pi-5-8gb:microsd", "bf16"): -0.2}


def test_the_bootstrap_interval_covers_the_true_median_about_95_percent():
    """300 samples of 40 errors from N(+4%, 10%): the 95% interval of the median contains +4% in
    about 95% of them (the percentile bootstrap of a median: 88-99% here)."""
    gen = np.random.default_rng(7)
    hits = 0
    for i in range(300):
        lo, hi = bootstrap_ci(gen.normal(0.04, 0.1, 40), n_boot=500, seed=i)
        hits += lo <= 0.04 <= hi
    assert 0.88 <= hits / 300 <= 0.99
    assert bootstrap_ci([]) is None and bootstrap_ci([0.3]) == (0.3, 0.3)


def test_within_two_sigma_of_the_executors_runs():
    """measured 1.0, sd 0.1: a prediction of 1.19 lies within 2 sigma, 1.21 does not; a
    configuration with one run has no sigma and is left out."""
    p = tpot_points([row(1.19, 1.0, sd=0.1), row(1.21, 1.0, sd=0.1), row(0.5, 1.0, runs=1)])
    assert [within_2sigma(x) for x in p] == [True, False, None]
    s = format_stats([row(1.19, 1.0, sd=0.1), row(1.21, 1.0, sd=0.1), row(0.5, 1.0, runs=1)])[0]
    assert (s["within"], s["with_sigma"]) == (1, 2)


def test_kendalls_tau_by_hand():
    """4 configurations: the same order -> 1; reversed -> -1; one adjacent pair swapped -> (5 - 1) / 6."""
    meas = [1.0, 2.0, 3.0, 4.0]
    def group(pred):
        return tpot_points([row(p, m, cache=f"c{i}") for i, (p, m) in enumerate(zip(pred, meas))])
    assert rank_agreement(group([1, 2, 3, 4]))["tau"] == pytest.approx(1.0)
    assert rank_agreement(group([4, 3, 2, 1]))["tau"] == pytest.approx(-1.0)
    assert rank_agreement(group([2, 1, 3, 4]))["tau"] == pytest.approx(4 / 6)
    assert rank_agreement(group([1, 1, 1, 1]))["tau"] is None                  # a constant side: no tau


def test_the_simulators_best_within_the_executors_noise():
    """The simulator ranks B first (pred 9 < 10); the executor measured A at 10.0 and B at 10.5:
    not the same, 5% regret. With both sds 0.3, 0.5 <= 2 x 0.3: within noise; with 0.2, not."""
    for sd, within in ((0.3, True), (0.2, False)):
        g = rank_agreement(tpot_points([row(10, 10.0, sd, cache="A"), row(9, 10.5, sd, cache="B"),
                                        row(12, 11.0, sd, cache="C")]))
        assert (g["sim_best"], g["exec_best"], g["same"], g["within"]) == ("B/none", "A/none", False, within)
        assert g["regret"] == pytest.approx(0.05)
    g = rank_agreement(tpot_points([row(9, 10.0, cache="A"), row(10, 10.5, cache="B")]))
    assert g["same"] and g["within"] and g["regret"] == 0.0


def test_a_tie_in_prediction_counts_the_slower_measurement():
    """A and B predicted alike: the simulator cannot tell them apart, so it is held to the worse (B)."""
    g = rank_agreement(tpot_points([row(9, 10.0, cache="A"), row(9, 12.0, cache="B")]))
    assert g["sim_best"] == "B/none" and not g["same"] and g["regret"] == pytest.approx(0.2)


def test_groups_are_format_budget_batch_and_their_summary():
    """Two groups of bf16 (budget 0.3, 0.5), one of zip: the simulator right in the first, wrong
    (within noise) in the second."""
    rows = [row(1, 1.0, 0.1, share=0.3, budget=300, cache="lru"), row(2, 2.0, 0.1, share=0.3, budget=300, cache="lfu"),
            row(1, 1.1, 0.1, cache="lru"), row(2, 1.0, 0.1, cache="lfu"),
            row(1, 1.0, fmt="zip", cache="lru")]
    groups = rank_groups(rows)                          # zip's group of one offers no choice: left out
    assert [(g["format"], g["budget_share"], g["configs"]) for g in groups] == [("bf16", "0.3", 2), ("bf16", "0.5", 2)]
    s = {(x["throttle"], x["format"]): x for x in rank_stats(rows)}
    b = s["none", "bf16"]
    assert (b["groups"], b["same"], b["within"]) == (2, 1, 2)
    assert b["tau_median"] == pytest.approx(0.0) and b["tau_min"] == pytest.approx(-1.0)   # taus 1 and -1
    assert b["regret_max"] == pytest.approx(0.1)
    pick = rank_for_pick(rows, "bf16", "1", "300")
    assert pick["budget_matched"] and pick["groups"] == 1 and pick["same"] == 1
    other = rank_for_pick(rows, "bf16", 1, "123")
    assert not other["budget_matched"] and other["groups"] == 2
    assert rank_for_pick(rows, "mwq", 1) is None and rank_for_pick(rows, "zip", 1) is None


def test_summary_lines_and_report_sections_state_each_figure():
    rows = [row(1.1, 1.0, 0.1, cache="lru"), row(2.2, 2.0, 0.05, cache="lfu")]   # 0.2 > 2 x 0.05
    (line,) = summary_lines(rows)
    assert "bf16" in line and "bias +10.0%" in line and "95% CI" in line and "within the executor's 2 sigma 1/2" in line
    assert "Kendall tau median 1.00" in line and "best in 1/1" in line
    text = "\n".join(report_sections(rows))
    assert "## TPOT per format and regime" in text and "## Rank agreement per group" in text
    assert "| none | bf16 | 0.5 | 1 | 2 | 1.00 | lru/none | lru/none | True | True | 0.0% |" in text


def test_at_the_profiles_speed_only_the_runs_taken_at_it_count():
    """Runs 1, 2, 3, 4 ms, the 1st and 3rd at the profile's speed: measured 2 ms (their median), sigma
    1.414 ms, 2 runs; predicted 2.2 ms: +10%, within 2 sigma. Rows without flags, with no run at the
    speed, or whose flags do not match their runs are left out; over all runs that row's error is
    2.2 / 2.5 - 1 = -12%."""
    at = dict(row(2.2e-3, 2.5e-3, sd=1.29e-3, runs=4), runs_tpot_s_mean="0.001;0.002;0.003;0.004",
              runs_at_profile_speed="1;0;1;0")
    none_at = dict(row(1.0, 1.0), runs_tpot_s_mean="1;1;1", runs_at_profile_speed="0;0;0")
    unflagged = dict(row(1.0, 1.0), runs_tpot_s_mean="1;1;1")
    torn = dict(row(1.0, 1.0), runs_tpot_s_mean="1;1;1", runs_at_profile_speed="1;1")
    (p,) = speed_points([at, none_at, unflagged, torn])
    assert p["meas"] == pytest.approx(2e-3) and p["runs"] == 2 and p["sd"] == pytest.approx(2 ** 0.5 * 1e-3)
    assert within_2sigma(p) is True
    (s,) = format_stats([at, none_at, unflagged, torn], at_speed=True)
    assert (s["configs"], s["runs"], s["within"], s["with_sigma"]) == (1, 2, 1, 1)
    assert s["bias"] == pytest.approx(0.1)
    assert format_stats([at], at_speed=False)[0]["bias"] == pytest.approx(2.2 / 2.5 - 1)
    assert format_stats([unflagged], at_speed=True) == []
    lines = summary_lines([at])
    assert len(lines) == 2 and lines[1].startswith("  at the profile's speed (2 of 4 runs): 1 configurations")
    assert "TPOT bias +10.0%" in lines[1] and "within their 2 sigma 1/1" in lines[1]
    text = "\n".join(report_sections([at]))
    assert "### At the profile's speed" in text and "| none | bf16 | 2 | 1 | +10.0% " in text
    assert "### At the profile's speed" not in "\n".join(report_sections([unflagged]))
    assert len(summary_lines([unflagged])) == 1


# -- validate: more runs for a noisy configuration -----------------------------------------------
PROFILE = """
name: tiny-host
description: "hand-made measured profile of tiny-moe"
memory: 8GB          # test
expert_budget: 1GB   # test
default_storage: disk
storage:
  disk:
    read_bandwidth: 500MB/s   # test
    latency: 50us             # test
    queue_depth: 2            # test
compute:
  memory_bandwidth: 10GB/s  # test
  flops: 100GFLOPS          # test
  overhead: 20us            # test
  measured:
    model: tiny-moe
    tokens: [1, 4]
    experts:
      bf16:
        - [100us, 160us]
      zip:
        - [150us, 210us]
    dense:
      prefill: [200us, 500us]
      decode: [100us, 400us]
    step:
      prefill: [70us, 70us]
      decode: [30us, 60us]
    decision_overhead: 50us
    load_overhead: 25us
decompress:
  workers: 2
  throughput:
    lz4: 1GB/s   # test
    lz4hc: 1GB/s   # test
    zstd: 1GB/s   # test
"""


def test_validate_adds_runs_where_the_spread_is_large(tmp_path, monkeypatch):
    """repeats 2, max 4, spread limit 15%: the first configuration's two runs (1 ms, 2 ms: spread
    47%) get two more; the others' (constant) do not. A rerun decides the same and runs nothing."""
    from experiments.validate import Validator, read_rows, read_runs, row_key
    profile = tmp_path / "host.yaml"
    profile.write_text(PROFILE)
    calls = []
    first = []

    def fake(self, cfg, trace, decisions):
        key = row_key(dict(cfg, throttle=""))
        first.append(key) if not first else None
        calls.append(key)
        n = sum(k == key for k in calls)
        tpot = (1e-3 if n % 2 else 2e-3) if key == first[0] else 1e-3
        return {"metrics": {"ttft_s": 0.01, "tpot_s_mean": tpot, "throughput_tok_s": 1.0, "hit_ratio": 0.5},
                "busy": {"io": 0.0, "decompress": 0.0, "compute": 0.0}, "same": True}
    monkeypatch.setattr(Validator, "execute_once", fake)
    v = dict(quick=True, repeats=2, max_repeats=4, spread_limit=0.15, store_root=tmp_path / "stores", quiet=True,
             tokens=4)
    rows = Validator(tmp_path / "val", profile, **v).run()
    ok = [r for r in rows if r["status"] == "ok"]
    runs = read_runs(tmp_path / "val" / "runs.jsonl")
    assert len(runs[first[0]]) == 4 and all(len(rs) == 2 for k, rs in runs.items() if k != first[0])
    assert len(calls) == 2 * len(ok) + 2 and calls[-2:] == [first[0]] * 2           # the extra passes come last
    by_key = {row_key(r): r for r in ok}
    assert by_key[first[0]]["repeats"] == "4" and by_key[first[0]]["runs_tpot_s_mean"] == "0.001;0.002;0.001;0.002"
    assert {r["repeats"] for k, r in by_key.items() if k != first[0]} == {"2"}
    assert "## Rank agreement per group" in (tmp_path / "val" / "validation.md").read_text()
    n = len(calls)
    Validator(tmp_path / "val", profile, **v).run()
    assert len(calls) == n and len(read_rows(tmp_path / "val" / "validation.csv")) == len(rows)


def test_validate_marks_each_run_taken_at_the_profiles_speed(tmp_path, monkeypatch):
    """Each run's probe (taken as it ends) against the profile's range: in, out, in -> "1;0;1" beside the
    runs' TPOTs; a profile without a probe line marks none."""
    import experiments.validate as validate
    from executor.host_probe import probe_line
    from experiments.validate import Validator
    profile = tmp_path / "host.yaml"
    profile.write_text(probe_line([{"python": 0.010, "torch": 0.004}, {"python": 0.012, "torch": 0.006}]) + PROFILE)
    probes = iter([{"python": 0.011, "torch": 0.005}, {"python": 0.020, "torch": 0.005}] * 100)
    monkeypatch.setattr(validate, "probe", lambda: next(probes))

    def fake(self, cfg, trace, decisions):
        return {"metrics": {"ttft_s": 0.01, "tpot_s_mean": 1e-3, "throughput_tok_s": 1.0, "hit_ratio": 0.5},
                "busy": {"io": 0.0, "decompress": 0.0, "compute": 0.0}, "same": True}
    monkeypatch.setattr(Validator, "execute_once", fake)
    v = dict(quick=True, repeats=3, store_root=tmp_path / "stores", quiet=True, tokens=4)
    ok = [r for r in Validator(tmp_path / "val", profile, **v).run() if r["status"] == "ok"]
    n = len(ok)          # pass 1 alternates in, out, ...; pass 2 starts where pass 1 left off
    expect = [";".join(str(1 - (i + p * n) % 2) for p in range(3)) for i in range(n)]
    assert [r["runs_at_profile_speed"] for r in ok] == expect
    assert "### At the profile's speed" in (tmp_path / "val" / "validation.md").read_text()
    profile.write_text(PROFILE)
    ok = [r for r in Validator(tmp_path / "val2", profile, **v).run() if r["status"] == "ok"]
    assert {r["runs_at_profile_speed"] for r in ok} == {""}


def test_max_repeats_below_repeats_is_refused(tmp_path):
    from devices.units import ConfigError
    from experiments.validate import Validator
    profile = tmp_path / "host.yaml"
    profile.write_text(PROFILE)
    with pytest.raises(ConfigError, match="--max-repeats 1 must be >= --repeats 3"):
        Validator(tmp_path / "val", profile, quick=True, repeats=3, max_repeats=1, quiet=True)
