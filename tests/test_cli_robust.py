"""Issue 19: runs that survive closed pipes, flags refused rather than ignored, offline bounds not
deployed, a tour whose runs all run, and messages that name the real problem."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "olmoe-1b-7b", "--tokens", "3", "--budget", "4GB"]


def test_a_closed_stdout_never_loses_the_run(tmp_path):
    """`moelab simulate ... | true`: the outputs are written before anything is printed."""
    out = tmp_path / "run"
    cmd = f"{sys.executable} -m experiments.cli simulate {' '.join(SMALL)} --out {out} | true; " \
          f"echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0", done.stderr
    assert (out / "metrics.json").stat().st_size > 100 and (out / "timeline.json").exists()
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv,says", [
    (["simulate", "--ladder", "v2", *SMALL], "--ladder v2: only mwq and copies have a ladder"),
    (["simulate", "--codec", "zstd", *SMALL], "--codec zstd: only zip has a codec"),
    (["simulate", "--option", "top_k=2", *SMALL], "--option: importer options need a trace file"),
    (["store", "build", "--codec", "zstd"], "codec zstd: only zip has a codec"),
    (["simulate", "--budget", "-1GB", *SMALL[:4]], "--budget -1GB: a negative value is not allowed"),
    (["execute", "--device", "raspberry-pi-5-8gb"], "execute runs on this host and has no --device: --throttle"),
])
def test_ignored_flags_are_refused_with_the_reason(tmp_path, capsys, argv, says):
    assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] != "store" else
                [*argv, "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error:") and err.count("\n") == 1, err


def test_a_trace_routed_top4_is_refused_on_a_top2_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(8)[:4] for _ in range(32)]) for _ in range(6)]).astype(np.int32)
    np.save(tmp_path / "top4.npy", ids)
    assert main(["simulate", "--trace", str(tmp_path / "top4.npy"), "--model", "mixtral-8x7b",
                 "--out", str(tmp_path / "o")]) == 2
    assert "routes each token to 4 experts, model mixtral-8x7b to 2" in capsys.readouterr().err


def test_an_empty_grid_is_refused(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("grid: {}\n")
    assert main(["sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "r.csv")]) == 2
    assert "an empty grid gives no runs" in capsys.readouterr().err


def test_check_runs_the_checks_the_run_does(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("grid: {format: [{name: zip, codec: nope}]}\n")
    assert main(["sweep", str(tmp_path / "g.yaml"), "--check"]) == 2
    assert "grid.format[0]: format: codec: unknown codec 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def offline_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    (d / "g.yaml").write_text("tokens: 4\ngrid: {model: [olmoe-1b-7b], policy: [belady, lru], budget: [1GB, 2GB]}\n")
    assert main(["sweep", str(d / "g.yaml"), "--out", str(d / "r.csv"), "--jobs", "1", "--quiet"]) == 0
    return d / "r.csv"


def test_pick_refuses_offline_bounds_unless_asked(offline_results, tmp_path, capsys):
    assert main(["pick", str(offline_results), "--metric", "hit_ratio", "--where", "policy=belady",
                 "--out", str(tmp_path / "p.yaml")]) == 2
    assert "offline bound" in capsys.readouterr().err
    assert main(["pick", str(offline_results), "--metric", "hit_ratio", "--out", str(tmp_path / "p.yaml")]) == 0
    assert "picked lru" in capsys.readouterr().out            # belady's hit ratio is higher, but not deployable
    assert main(["pick", str(offline_results), "--metric", "hit_ratio", "--allow-offline",
                 "--out", str(tmp_path / "q.yaml")]) == 0
    assert "picked belady" in capsys.readouterr().out


def test_pick_where_names_an_unknown_column(offline_results, tmp_path, capsys):
    assert main(["pick", str(offline_results), "--where", "nosuch=1", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--where nosuch: no column 'nosuch'" in capsys.readouterr().err


def test_gantt_draws_the_first_row_that_ran(tmp_path):
    """The first row of this grid is below the minimum budget: the plot takes the first that ran."""
    (tmp_path / "g.yaml").write_text("tokens: 4\ngrid: {model: [olmoe-1b-7b], budget: [1MB, 2GB]}\n")
    assert main(["sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "r.csv"), "--jobs", "1", "--quiet"]) == 0
    assert main(["plot", str(tmp_path / "r.csv"), "--kind", "gantt", "--out", str(tmp_path / "g"), "--quiet"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 5000


def test_budget_axis_uses_the_unit_that_fits():
    from experiments.plots import budget_unit
    assert budget_unit([{"budget_bytes": "2000000"}, {"budget_bytes": "4000000"}]) == ("MB", 1e6)
    assert budget_unit([{"budget_bytes": "3000000000"}]) == ("GB", 1e9)


def test_the_tour_grid_runs_every_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "record", "--requests", "4", "--tokens", "16", "--out", "runs/real.npz", "--quiet"]) == 0
    from experiments.sweep import read_results
    assert main(["sweep", str(ROOT / "experiments/grids/tour.yaml"), "--out", "t.csv", "--jobs", "1",
                 "--quiet"]) == 0
    rows = read_results(tmp_path / "t.csv")
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}


def test_execute_warns_on_a_busy_host(tmp_path, capsys, monkeypatch):
    import experiments.cli.host_cmds as host
    monkeypatch.setattr(host.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert main(["execute", "--tokens", "2", "--out", str(tmp_path / "e"), "--store", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert "warning: the host is busy" in capsys.readouterr().err


def test_executor_gantt_window_starts_after_warm_up(tmp_path, monkeypatch):
    """Step 0 of an executor run is warm-up (one-off first-call costs): the detail window skips it,
    and says so; the summary marks the window with lines, not a tint over the lanes."""
    import timeline.gantt as g
    from timeline.events import Event, Timeline
    steps = [{"step": i, "group": 0, "prefill": i == 0, "tokens": 1, "new_tokens": 1} for i in range(6)]
    events = [Event("compute", "expert", i * 1.0, i + (0.9 if i else 50.0), 0, 0, 0, 0, i, 1) for i in range(6)]
    titles = []
    monkeypatch.setattr(g.plt.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    g.gantt(Timeline(events=events, meta={"engine": "executor", "steps": steps}), tmp_path / "e.png")
    assert "steps 1-4" in titles[0] and "after step 0, the warm-up" in titles[0]
    titles.clear()
    g.gantt(Timeline(events=events, meta={"engine": "sim", "steps": steps}), tmp_path / "s.png")
    assert "steps 0-3" in titles[0] and "warm-up" not in titles[0]


def test_the_two_minute_tour_runs_verbatim(tmp_path, monkeypatch):
    """Every command of the README's two-minute tour, as written (continued lines joined), exits 0."""
    import shlex
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tour:two-minute -->")[1].split("```bash")[1].split("```")[0]
    lines = [line.split("  #")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith("moelab ")]
    assert len(commands) >= 12
    (tmp_path / "experiments" / "examples").mkdir(parents=True)
    (tmp_path / "experiments/examples/routing.jsonl").write_text((ROOT / "experiments/examples/routing.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        assert main(shlex.split(cmd)[1:]) == 0, cmd


def test_a_forced_format_the_file_contradicts_is_refused(tmp_path, capsys):
    """`trace import routing.jsonl --format csv` read JSON lines as a CSV table (garbage, exit 0)."""
    src = ROOT / "experiments/examples/routing.jsonl"
    assert main(["trace", "import", str(src), "--format", "csv", "--option", "top_k=2",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "a .jsonl file is jsonl, not csv" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_every_policy_that_reads_the_runs_future_is_an_offline_bound():
    """pick's refusal comes from the classes' own `offline` flag: belady, static-hot, the oracle
    prefetcher and static-importance (ranked by the run's own trace counts) are bounds; a row using
    any of them, in any role, is offline."""
    from experiments.pick import offline
    from policies.registry import offline_names
    assert offline_names() == {"allocator": ("static-importance",), "scheduler": (),
                               "cache": ("static-hot", "belady"), "prefetch": ("oracle",)}
    assert offline({"cache": "lru", "allocator": "static-importance", "prefetch": "none"})
    assert not offline({"cache": "lru", "allocator": "fixed", "prefetch": "last-use", "scheduler": "fifo"})
