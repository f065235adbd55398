"""`moelab reproduce d2moe`: resumable runs, the report's comparisons, and its figures."""
import csv

import pytest

import experiments.reproduce_d2moe as rep


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(rep, "TOKENS", 4)
    monkeypatch.setattr(rep, "REQUESTS", 4)
    monkeypatch.setattr(rep, "BUDGETS_MB", (400, 1600))
    runs = [rep.Run("env2", "llama-moe-3.5b", s, 4, b) for s in ("d2moe", "d2moe-hebf", "edgemoe") for b in (400, 1600)]
    runs.append(rep.Run("env1", "mixtral-8x7b", "hold-in-memory", 4, None))
    runs.append(rep.Run("env2", "llama-moe-3.5b", "d2moe", 4, 400, storage="host-ram"))
    monkeypatch.setattr(rep, "grid", lambda: runs)
    return runs


def test_runs_are_appended_and_reused(small, tmp_path, monkeypatch):
    results = rep.run_grid(tmp_path, jobs=1, quiet=True)
    assert len(results) == len(small)
    oom = results["env1", "mixtral-8x7b", "hold-in-memory", "4", "all", "1", ""]
    assert oom["status"] == "out of memory" and "expert budget" in oom["note"]
    ok = results["env2", "llama-moe-3.5b", "d2moe", "4", "1600", "1", ""]
    assert ok["status"] == "ok" and float(ok["throughput_tok_s"]) > 0 and float(ok["peak_expert_mb"]) <= 1600
    calls = []
    monkeypatch.setattr(rep, "_simulate_row", lambda run: calls.append(run))
    assert rep.run_grid(tmp_path, jobs=1, quiet=True) == results and calls == []     # nothing rerun
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(small)


def test_report_compares_with_the_paper(small, tmp_path):
    results = rep.run_grid(tmp_path, jobs=1, quiet=True)
    text = rep.report(results, tmp_path)
    a = float(results["env2", "llama-moe-3.5b", "d2moe", "4", "1600", "1", ""]["throughput_tok_s"])
    assert f"| Fig. 10(c) LLaMA-MoE Env 2, 1600 MB | 83.14 | {a:.2f} | {a / 83.14:.2f} |" in text
    b = float(results["env2", "llama-moe-3.5b", "d2moe-hebf", "4", "1600", "1", ""]["throughput_tok_s"])
    assert rep.ratios(results, "d2moe", "d2moe-hebf", None) == pytest.approx(
        [float(results["env2", "llama-moe-3.5b", "d2moe", "4", str(x), "1", ""]["throughput_tok_s"]) /
         float(results["env2", "llama-moe-3.5b", "d2moe-hebf", "4", str(x), "1", ""]["throughput_tok_s"]) for x in (400, 1600)])
    assert a / b == pytest.approx(rep.ratios(results, "d2moe", "d2moe-hebf", None)[1])
    assert (tmp_path / "report.md").read_text() == text
    # the same run with its experts in host RAM (the storage option) reads as fast as RAM copies
    ram = results["env2", "llama-moe-3.5b", "d2moe", "4", "400", "1", "host-ram"]
    ssd = results["env2", "llama-moe-3.5b", "d2moe", "4", "400", "1", ""]
    assert ram["bytes_read_mb"] == ssd["bytes_read_mb"]                       # the same decisions
    assert float(ram["throughput_tok_s"]) > float(ssd["throughput_tok_s"])
    assert "at most 10.1 tok/s" in text                                       # the SSD's bound on Mixtral
