"""`moelab sweep`, `plot` and `pick`: grids checked up front, resumable results, the same rows
on local processes and on Dask, every plot kind, and a picked bundle deployed."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.sweep import FIELDS, load_grid, read_results, sweep

ROOT = Path(__file__).resolve().parents[1]
GRID = """
tokens: 8
prompt_tokens: 4
grid:
  device: [jetson-orin-nano-8gb, raspberry-pi-5-8gb]
  model: [olmoe-1b-7b]
  policy: [lru, lfu, {preset: d2moe}, {cache: lru, prefetch: last-use}]
  budget: [2GB, 4GB]
  batch: [1, 2]
"""


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,where", [
    ("grid: {device: [jetson-orin-nano-8gb, nope]}", "grid.device[1]: device: unknown device 'nope'"),
    ("grid: {policy: [lru, {cache: lruu}]}", "grid.policy[1]: policy.cache: unknown cache"),
    ("grid: {budget: [2GB, lots]}", "grid.budget[1]: budget:"),
    ("grid: {colour: [red]}", "grid.colour: unknown axis"),
    ("runs: [{device: jetson-orin-nano-8gb, batch: 0}]", "runs[0]: batch: must be a whole number >= 1"),
    ("grid: {format: [{name: mwq, ladder: v9}]}", "grid.format[0]: format:"),
    ("grid: {policy: [{preset: d2moe, cache: lru}]}", "preset d2moe sets the whole bundle"),
    ("tokens: 0\ngrid: {batch: [1]}", "tokens: must be a whole number >= 1"),
    ("grid: {format: [{name: zip, codec: nope}]}", "grid.format[0]: format: codec: unknown codec 'nope'"),
    ("grid: {format: [{name: bf16, ladder: v2}]}", "ladder v2: only mwq and copies have a ladder"),
    ("grid: {}", "an empty grid gives no runs"),
])
def test_bad_grids_are_refused_with_the_key_path(tmp_path, text, where, capsys):
    grid = write(tmp_path / "g.yaml", text)
    assert main(["sweep", str(grid), "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert str(grid) in err and where in err
    assert not (tmp_path / "r.csv").exists()          # nothing ran


def test_grid_sample_and_list(tmp_path):
    full = load_grid(write(tmp_path / "g.yaml", GRID))
    assert len(full) == 2 * 4 * 2 * 2
    sample = load_grid(write(tmp_path / "s.yaml", GRID + "sample: {n: 5, seed: 3}\n"))
    assert len(sample) == 5 and {c.config_hash() for c in sample} <= {c.config_hash() for c in full}
    listed = load_grid(write(tmp_path / "l.yaml", "runs:\n  - {model: olmoe-1b-7b, budget: 2GB}\n"
                                                 "  - {model: olmoe-1b-7b, budget: 2GB}\n"))
    assert len(listed) == 1                              # duplicates run once


def test_a_killed_sweep_resumes_without_losing_or_repeating_rows(tmp_path):
    grid = write(tmp_path / "g.yaml", GRID)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(grid), "--out", str(out), "--jobs", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(read_results(out)) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                  # a real kill, mid-sweep
    proc.wait()
    partial = read_results(out)
    assert 5 <= len(partial) < 32
    done = sweep(grid, out, jobs=1, quiet=True)
    assert done["done_before"] == len(partial) and done["ran"] == 32 - len(partial)
    rows = read_results(out)
    assert len(rows) == 32 and len({r["config_hash"] for r in rows}) == 32
    assert all(r["status"] in ("ok", "below minimum") for r in rows)
    assert out.read_text().endswith("\n") and out.read_text().count("\n") == 33


def test_local_processes_and_a_dask_cluster_give_the_same_rows(tmp_path):
    from dask.distributed import LocalCluster
    grid = write(tmp_path / "g.yaml", GRID + "sample: {n: 6, seed: 0}\n")
    sweep(grid, tmp_path / "local.csv", jobs=2, quiet=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        sweep(grid, tmp_path / "dask.csv", cluster=cluster.scheduler_address, quiet=True)
    timing = {"wall_s"}

    def rows(name):
        return sorted(({k: v for k, v in r.items() if k not in timing} for r in read_results(tmp_path / name)),
                      key=lambda r: r["config_hash"])
    assert rows("local.csv") == rows("dask.csv") and len(rows("local.csv")) == 6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    out = d / "r.csv"
    sweep(write(d / "g.yaml", GRID), out, jobs=2, quiet=True)
    return out


def test_rows_carry_the_config_every_metric_and_the_version(results):
    rows = read_results(results)
    assert list(rows[0]) == list(FIELDS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 32 and all(float(r["throughput_tok_s"]) > 0 for r in ok)
    d2 = [r for r in ok if r["preset"] == "d2moe"]
    assert d2 and all(r["format"] == "mwq" and r["cache"] == "d2moe-budget" for r in d2)
    assert all(r["moelab_version"] and r["commit"] for r in rows)


@pytest.mark.parametrize("kind,extra", [("throughput", []), ("mrc", ["--where", "batch=1"]),
                                        ("tpot", ["--facet", "budget_bytes"]),
                                        ("speedup", ["--baseline", "lru"]), ("gantt", [])])
def test_every_plot_kind(results, tmp_path, kind, extra):
    stem = tmp_path / kind
    assert main(["plot", str(results), "--kind", kind, "--out", str(stem), "--quiet", *extra]) == 0
    for ext in ("png", "pdf"):
        assert (stem.with_suffix(f".{ext}")).stat().st_size > 5000


def test_plot_and_pick_errors(results, tmp_path, capsys):
    assert main(["plot", str(results), "--kind", "speedup", "--baseline", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--baseline: name one of the policies" in capsys.readouterr().err
    assert main(["pick", str(results), "--constraint", "tpot_s_p99<<1"]) == 2
    assert "expected COLUMN<=VALUE" in capsys.readouterr().err
    assert main(["pick", str(results), "--device", "jetson-orin-nano-8gb", "--budget", "1GB",
                 "--out", str(tmp_path / "p.yaml")]) == 2
    assert "no run meets the request" in capsys.readouterr().err


def test_pick_obeys_device_budget_and_constraints(results, tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["pick", str(results), "--device", "raspberry-pi-5-8gb", "--budget", "3GB", "--metric", "tpot",
                 "--constraint", "bits_per_weight>=16", "--out", str(out), "--quiet"]) == 0
    import yaml
    doc = yaml.safe_load(out.read_text())
    rows = [r for r in read_results(results) if r["status"] == "ok" and r["device"] == "raspberry-pi-5-8gb"
            and float(r["budget_bytes"]) <= 3e9 and float(r["bits_per_weight"]) >= 16]
    best = min(rows, key=lambda r: float(r["tpot_s_mean"]))
    assert doc["picked"]["config_hash"] == best["config_hash"] and doc["format"] == "bf16"
    assert doc["budget"] == int(float(best["budget_bytes"]))


def test_the_readme_tour_runs_and_the_picked_bundle_deploys(tmp_path, monkeypatch):
    """Every command of the README's sweep tour, as written, then: the executor ran the picked
    bundle with the decisions the simulator predicted."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tour:sweep -->")[1].split("```bash")[1].split("```")[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("moelab ")]
    assert len(commands) == 7
    (tmp_path / "experiments" / "grids").mkdir(parents=True)
    (tmp_path / "experiments" / "grids" / "tour.yaml").write_text((ROOT / "experiments/grids/tour.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        if argv[0] in ("trace", "execute", "sweep", "simulate"):
            argv.append("--quiet")
        assert main(argv) == 0, cmd
    deployed = json.loads((tmp_path / "runs/deployed/metrics.json").read_text())
    predicted = json.loads((tmp_path / "runs/predicted/metrics.json").read_text())
    for key in ("bytes_read", "loads", "hit_ratio", "generated_tokens", "bits_per_weight"):
        assert deployed[key] == predicted[key], key
    assert deployed["cache"] if "cache" in deployed else True


def test_a_missing_results_file_is_named(tmp_path, capsys):
    for cmd in (["plot", str(tmp_path / "nope.csv"), "--kind", "mrc"], ["pick", str(tmp_path / "nope.csv")]):
        assert main(cmd) == 2
        assert "nope.csv: no such results file" in capsys.readouterr().err
