"""Issue 24 item 2: `--cores N` pins the whole process (threads it has and threads it starts: the
executor's I/O and decompression workers, torch's pool) and sets torch's threads to match; a
busy host is refused unless --force; the profile records the cores and the load it saw. Pinning
runs in a subprocess (never this one)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir(),
                                reason="needs Linux's sched_setaffinity")


def run_py(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pin_cores_pins_every_thread_now_and_later():
    """Threads alive before pinning (torch's pool, a waiting thread) and after (a DecompressPool's
    workers, a thread pool's) all end up on the first CPU; torch runs 1 thread."""
    got = run_py("""
        import json, os, threading
        from concurrent.futures import ThreadPoolExecutor
        import torch
        torch.set_num_threads(2)
        torch.randn(256, 256) @ torch.randn(256, 256)        # start torch's pool first
        stop = threading.Event()
        early = threading.Thread(target=stop.wait)
        early.start()

        def affinity():
            out = {}
            for tid in os.listdir("/proc/self/task"):
                try:
                    out[tid] = sorted(os.sched_getaffinity(int(tid)))
                except ProcessLookupError:
                    pass
            return out
        from experiments.cli.host_cmds import pin_cores
        allowed = sorted(os.sched_getaffinity(0))
        cpus = pin_cores(1)
        from executor.io import DecompressPool
        with DecompressPool(2) as pool:
            workers = [pool.submit(lambda: sorted(os.sched_getaffinity(0))).result().value for _ in range(4)]
        with ThreadPoolExecutor(2) as ex:
            later = ex.submit(lambda: sorted(os.sched_getaffinity(0))).result()
        torch.randn(256, 256) @ torch.randn(256, 256)
        threads = affinity()
        stop.set(); early.join()
        print(json.dumps({"allowed": allowed, "cpus": cpus, "threads": threads, "workers": workers, "later": later,
                          "torch": torch.get_num_threads(), "n_threads": len(threads)}))
    """)
    first = [got["allowed"][0]]
    assert got["cpus"] == first and got["later"] == first and all(w == first for w in got["workers"])
    assert got["n_threads"] >= 2 and all(a == first for a in got["threads"].values()), got["threads"]
    assert got["torch"] == 1


def test_profile_cores_pins_before_measuring_and_records_it(tmp_path):
    """`moelab profile --cores 1`: what measure_host sees is a process on one CPU with one torch
    thread, and the provenance line (written by the real measure_host's helper) says so."""
    got = run_py(f"""
        import json, os
        import experiments.calibrate as cal
        seen = {{}}
        def fake(model_dir=None, **kw):
            from executor.profile_host import host_torch_threads
            import torch
            host = {{"cpus": sorted(os.sched_getaffinity(0)), "torch_device": kw["torch_device"],
                    "load": (0.1, 0.2, 0.3), "load_end": (0.4, 0.5, 0.6)}}
            seen.update(affinity=host["cpus"], threads=host_torch_threads(), torch=torch.get_num_threads(),
                        line=cal.host_line(host, host_torch_threads()))
            raise KeyboardInterrupt
        cal.measure_host = fake
        from experiments.cli import main
        rc = main(["profile", "--cores", "1", "--force", "--quick", "--out", "{tmp_path / 'p.yaml'}"])
        print(json.dumps(dict(seen, rc=rc)))
    """)
    assert got["rc"] == 130 and len(got["affinity"]) == 1 and got["threads"] == 1 and got["torch"] == 1
    assert got["line"].startswith(f"# cores: 1 of {os.cpu_count()} (CPUs {got['affinity'][0]};")
    assert "torch device cpu, torch threads 1" in got["line"] and "at start 0.10/0.20/0.30" in got["line"]
    from experiments.validate import profile_cores
    (tmp_path / "p.yaml").write_text(got["line"] + "\nname: x\n")
    assert profile_cores(tmp_path / "p.yaml") == (1, "cpu")


def test_too_many_cores_is_refused_by_name(tmp_path, capsys):
    n = len(os.sched_getaffinity(0))
    assert main(["profile", "--cores", str(n + 1), "--force", "--out", str(tmp_path / "p.yaml")]) == 2
    assert f"--cores {n + 1}" in capsys.readouterr().err
    assert sorted(os.sched_getaffinity(0)) and len(os.sched_getaffinity(0)) == n        # this process untouched


@pytest.fixture
def busy(monkeypatch):
    """A host with 2 cores and a load average of 3: busy."""
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.5, 2.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    calls = []

    def fake(*a, **kw):
        calls.append(kw)
        raise KeyboardInterrupt
    import experiments.calibrate
    monkeypatch.setattr(experiments.calibrate, "measure_host", fake)
    return calls


def test_profile_refuses_a_busy_host_unless_forced(busy, tmp_path, capsys):
    out = str(tmp_path / "p.yaml")
    assert main(["profile", "--quick", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "busy" in err and "load average 3.0 on 2 cores" in err and "--force" in err and not busy
    assert main(["profile", "--quick", "--force", "--out", out]) == 130          # measured (the fake stops it)
    assert len(busy) == 1 and "measuring anyway (--force)" in capsys.readouterr().err


def test_validate_refuses_a_busy_host_unless_forced(busy, tmp_path, capsys, monkeypatch):
    import experiments.validate
    started = []
    monkeypatch.setattr(experiments.validate, "Validator", lambda *a, **kw: started.append(kw) or 1 / 0)
    out = tmp_path / "val"
    assert main(["validate", "--quick", "--out", str(out), "--profile", str(tmp_path / "none.yaml")]) == 2
    assert "busy" in capsys.readouterr().err and not busy and not started and not out.exists()
    # forced: the missing profile is measured first (the fake stops there)
    assert main(["validate", "--quick", "--force", "--out", str(out), "--profile", str(tmp_path / "none.yaml")]) == 130
    assert len(busy) == 1


def test_a_quiet_host_is_measured(monkeypatch, busy, tmp_path):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.5, 0.6))
    assert main(["profile", "--quick", "--out", str(tmp_path / "p.yaml")]) == 130 and len(busy) == 1


def test_validate_refuses_a_profile_or_a_folder_of_other_cores(tmp_path):
    from devices.units import ConfigError
    from experiments.validate import check_profile_host, keep_host
    host = {"cores": 2, "cpus": [0, 1], "torch_device": "cpu", "torch_threads": 1, "load": [0.1, 0.1, 0.1]}
    profile = tmp_path / "p.yaml"
    profile.write_text("# cores: 1 of 2 (CPUs 0; os.sched_setaffinity, the whole process), torch device cpu, "
                       "torch threads 1; load average\n")
    with pytest.raises(ConfigError, match="measured on 1 cores .* --cores 2"):
        check_profile_host(profile, host)
    profile.write_text("# cores: not recorded\n")
    check_profile_host(profile, host)                                       # an older profile: no check
    keep_host(tmp_path / "host.json", host)
    keep_host(tmp_path / "host.json", dict(host, load=[2.0, 2.0, 2.0]))     # the same cores: fine
    with pytest.raises(ConfigError, match="give another --out"):
        keep_host(tmp_path / "host.json", dict(host, cores=1, cpus=[0]))


def test_a_quick_profile_says_so_and_validate_warns_of_it(tmp_path, capsys):
    """A `--quick` profile carries its `# samples: quick` line; validation.md and `moelab validate` say a
    quick profile is no ground for a validation; a full profile gets neither."""
    from types import SimpleNamespace
    from experiments.calibrate import QUICK_LINE, host_line
    from experiments.validate import profile_is_quick, write_report
    host = {"cpus": [0], "torch_device": "cpu", "load": (0.1, 0.2, 0.3), "load_end": (0.4, 0.5, 0.6)}
    quick, full = tmp_path / "quick.yaml", tmp_path / "full.yaml"
    quick.write_text(host_line(host, 1) + QUICK_LINE + "\nname: x\n")
    full.write_text(host_line(host, 1) + "\nname: x\n")
    assert profile_is_quick(quick) and not profile_is_quick(full) and not profile_is_quick(tmp_path / "none")
    for path, expected in ((quick, True), (full, False)):
        out = tmp_path / path.stem
        out.mkdir()
        write_report(out, [], SimpleNamespace(path=str(path), name="x"))
        assert ("taken with `moelab profile --quick`" in (out / "validation.md").read_text()) is expected
    assert main(["validate", "--force", "--profile", str(quick), "--quick", "--out", str(tmp_path / "v"),
                 "--model-dir", str(tmp_path / "missing")]) == 2
    assert "was taken with `moelab profile --quick`" in capsys.readouterr().err


def test_the_speed_probe_round_trips_and_the_report_sets_runs_against_the_profile(tmp_path):
    """The profile's `# probe:` line (one probe per stage) reads back as their median, with their range
    and spread; validation.md's drift is each run's probe over that, less 1 (median, min, max), by hand."""
    import json
    from types import SimpleNamespace
    from executor.host_probe import drift, probe, probe_line, profile_probe, spread
    from experiments.validate import write_report
    got = probe()
    assert set(got) == {"python", "torch"} and all(v > 0 for v in got.values())
    stages = [{"python": 0.010, "torch": 0.004}, {"python": 0.011, "torch": 0.005}, {"python": 0.012, "torch": 0.006}]
    assert spread(stages) == pytest.approx(0.5)                     # torch 6 / 4 ms
    line = probe_line(stages)
    assert "python 11.00 ms, torch 5.00 ms (median of 3" in line and "python 10.00-12.00 ms" in line
    assert "moved 50%" in line
    path = tmp_path / "p.yaml"
    path.write_text(line + "\nname: x\n")
    ref = profile_probe(path)
    assert ref == pytest.approx({"python": 0.011, "torch": 0.005})
    runs = [{"python": 0.011, "torch": 0.005}, {"python": 0.0121, "torch": 0.006}, {"python": 0.0099, "torch": 0.0045}]
    d = drift(runs + [None], ref)
    assert d["python"] == pytest.approx((0.0, -0.1, 0.1)) and d["torch"] == pytest.approx((0.0, -0.1, 0.2))
    assert drift([], ref) is None and drift(runs, None) is None and profile_probe(tmp_path / "none") is None
    out = tmp_path / "v"
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps({"key": ["k", i], "run": {"probe": p}}) + "\n"
                                            for i, p in enumerate(runs)))
    write_report(out, [], SimpleNamespace(path=str(path), name="x"))
    assert "python +0% (range -10% to +10%); torch +0% (range -10% to +20%)" in (out / "validation.md").read_text()


def test_a_run_is_at_the_profiles_speed_when_its_probe_lies_in_the_profiles_range(tmp_path):
    """The range on the `# probe:` line reads back per kind; a run inside it for both kinds is at the
    profile's speed, one kind outside is not (the line's 10 us rounding counts as inside)."""
    from executor.host_probe import at_speed, probe_line, profile_probe_range
    stages = [{"python": 0.010, "torch": 0.004}, {"python": 0.011, "torch": 0.005}, {"python": 0.012, "torch": 0.006}]
    path = tmp_path / "p.yaml"
    path.write_text(probe_line(stages) + "\nname: x\n")
    speeds = profile_probe_range(path)
    assert speeds == {"python": pytest.approx((0.010, 0.012)), "torch": pytest.approx((0.004, 0.006))}
    assert at_speed({"python": 0.011, "torch": 0.0045}, speeds) is True
    assert at_speed({"python": 0.012004, "torch": 0.0040}, speeds) is True        # within the rounding
    assert at_speed({"python": 0.0125, "torch": 0.005}, speeds) is False          # python 4% slower than any
    assert at_speed({"python": 0.011, "torch": 0.0039}, speeds) is False          # torch faster than any
    assert at_speed(None, speeds) is None and at_speed({"python": 0.011, "torch": 0.005}, None) is None
    assert profile_probe_range(tmp_path / "none") is None


def test_steadiness_counts_the_slices_that_ran_at_a_reduced_speed(monkeypatch):
    """A slice at >= 1.3x the fast slices (their 10th percentile) ran slow: by hand, then on a host
    whose slices are 1 ms three times in four and 2.5 ms the fourth (sleeps in place of the loop)."""
    import time
    import executor.host_probe as hp
    assert hp.slow_share([1.0] * 9 + [1.3]) == pytest.approx(0.1)
    assert hp.slow_share([1.0] * 9 + [1.29]) == 0.0
    # one lucky fast slice is not the reference (its minimum would make 19 of 20 slow)
    assert hp.slow_share([0.5] + [1.0] * 18 + [1.4]) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        hp.slow_share([])
    n = iter(range(10 ** 6))
    monkeypatch.setattr(hp, "_slice", lambda: time.sleep(0.0025 if next(n) % 4 == 3 else 0.001))
    got = hp.steadiness(0.4)
    assert got["slices"] >= 40 and got["slow_share"] == pytest.approx(0.25, abs=0.03)
    assert 0.001 <= got["slice"] < 0.0025


def test_steadiness_round_trips_through_the_profile_and_the_report(tmp_path):
    """The profile's `# steadiness:` line reads back as the readings' mean; validation.md sets the
    validation's readings beside it; the warning fires above UNSTEADY_LIMIT only."""
    from types import SimpleNamespace
    from executor.host_probe import UNSTEADY_LIMIT, profile_steadiness, steadiness_line, unsteady_warning
    from experiments.validate import host_steadiness, write_report
    readings = [{"slow_share": 0.02, "slice": 6e-4, "slices": 3000}, {"slow_share": 0.10, "slice": 6e-4, "slices": 3000}]
    line = steadiness_line(readings)
    assert line.startswith("# steadiness: 6.0% of 10000-iteration Python slices ran >= 1.3x") and "2.0%, 10.0%" in line
    path = tmp_path / "p.yaml"
    path.write_text("# probe: x\n" + line + "\nname: x\n")
    assert profile_steadiness(path) == pytest.approx(0.06) and profile_steadiness(tmp_path / "none") is None
    assert unsteady_warning(readings, "it was profiled").startswith("warning: this host ran 6% of the time")
    assert unsteady_warning([{"slow_share": UNSTEADY_LIMIT}], "x") is None
    host = {"cores": 2, "cpus": [0, 1], "torch_device": "cpu", "torch_threads": 1, "load": [0.1, 0.1, 0.1],
            "steadiness": [{"slow_share": 0.01, "slice": 6e-4, "slices": 800}]}
    text = host_steadiness(host, path)
    assert "during this validation: 1.0% of" in text and text.endswith("while profiled: 6.0%.")
    assert host_steadiness({}, tmp_path / "none").endswith("not timed; while profiled: not recorded.")
    out = tmp_path / "v"
    out.mkdir()
    write_report(out, [], SimpleNamespace(path=str(path), name="x"), host)
    assert text in (out / "validation.md").read_text()
