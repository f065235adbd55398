"""`moelab sweep` under real signals, two writers on one results file, and files that are not
a sweep's results (issue 19, items 1, 2 and 4)."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.results import load_results
from experiments.sweep import read_results, sweep

ROOT = Path(__file__).resolve().parents[1]
HEAD = """
tokens: 32
prompt_tokens: 4
grid:
  device: [jetson-orin-nano-8gb]
  model: [olmoe-1b-7b]
  budget: [2GB]
"""
SLOW = HEAD + f"  seed: [{', '.join(map(str, range(300)))}]\n"     # ~0.1 s a run: long enough to interrupt
SMALL = HEAD + "  seed: [0, 1, 2]\n"
# six runs of ~0.1 s, then six of several seconds: a signal after the first six finds both workers
# mid-run, and a sweep that waited for its runs in flight would take seconds to stop
STALL = HEAD.replace("tokens: 32\n", "") + "  tokens: [32, 1000]\n  seed: [0, 1, 2, 3, 4, 5]\n"

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def start_sweep():
    """start_sweep(grid, out, *args): a real `moelab sweep` in its own process group (pgid = its
    pid), as from a terminal; every group started is killed at the end, whatever the test saw.
    Its stderr goes to a file (`stderr_of`): a pipe would stay open while an orphaned worker holds it."""
    started = []

    def start(grid, out, *extra):
        cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(grid), "--out", str(out), "--quiet", *extra]
        err = Path(f"{out}.{len(started)}.err")
        with open(err, "w") as f:
            started.append(subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stderr=f))
        started[-1].err = err
        return started[-1]
    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stderr_of(proc) -> str:
    return proc.err.read_text()


def wait_for_rows(out, n, proc, limit=30):
    deadline = time.time() + limit
    while len(read_results(out)) < n:
        assert proc.poll() is None and time.time() < deadline, f"no rows in time: {proc.poll()} {stderr_of(proc)}"
        time.sleep(0.05)


def alive_in_group(pgid) -> list[int]:
    """Pids of the group's processes that still run (zombies excluded: they run nothing)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()      # after "pid (comm) ": state, ppid, pgrp, ...
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def wait_group_gone(pgid, limit=5.0) -> list[int]:
    deadline = time.time() + limit
    while (left := alive_in_group(pgid)) and time.time() < deadline:
        time.sleep(0.05)
    return left


def assert_whole_unique_rows(out):
    text = out.read_text()
    rows = read_results(out)
    assert text.endswith("\n") and text.count("\n") == len(rows) + 1          # no torn row, one header
    assert len({r["config_hash"] for r in rows}) == len(rows)
    assert all(r["status"] == "ok" for r in rows)


# -- 1. Ctrl-C and SIGTERM end the sweep and its workers promptly ------------------------------------
@linux_only
@pytest.mark.parametrize("sig,to_group", [(signal.SIGINT, True), (signal.SIGINT, False),
                                          (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["ctrl-c-to-group", "sigint-to-main", "kill-main", "sigterm-to-group"])
def test_a_signal_ends_the_sweep_and_its_workers_promptly(tmp_path, start_sweep, sig, to_group):
    out = tmp_path / "r.csv"
    proc = start_sweep(write(tmp_path / "g.yaml", STALL), out, "--jobs", "2")
    wait_for_rows(out, 6, proc)
    time.sleep(0.3)                                          # both workers well into a long run
    assert len(alive_in_group(proc.pid)) >= 3                # the sweep and its two workers
    t0 = time.time()
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    rc = proc.wait(timeout=15)
    took = time.time() - t0
    assert rc == 130 and took < 3, (rc, took, stderr_of(proc))
    assert wait_group_gone(proc.pid) == []                   # no worker outlives it
    assert_whole_unique_rows(out)
    assert len(read_results(out)) == 6                       # every finished run kept, no long one


@linux_only
def test_workers_die_with_a_killed_sweep(tmp_path, start_sweep):
    """Even `kill -9` of the sweep alone (no cleanup possible) leaves no worker running."""
    out = tmp_path / "r.csv"
    proc = start_sweep(write(tmp_path / "g.yaml", SLOW), out, "--jobs", "2")
    wait_for_rows(out, 3, proc)
    assert len(alive_in_group(proc.pid)) >= 3
    proc.kill()
    proc.wait(timeout=10)
    assert wait_group_gone(proc.pid) == []
    assert_whole_unique_rows(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_cancels_a_dask_sweep(tmp_path, start_sweep, sig):
    """On a cluster: exit 130 promptly, and the scheduler is left with none of the sweep's tasks."""
    from dask.distributed import LocalCluster
    out = tmp_path / "r.csv"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:        # a worker thread here, reached over TCP
        proc = start_sweep(write(tmp_path / "g.yaml", SLOW), out, "--cluster", cluster.scheduler_address)
        wait_for_rows(out, 2, proc)
        t0 = time.time()
        proc.send_signal(sig)
        rc = proc.wait(timeout=10)
        took = time.time() - t0
        assert rc == 130 and took < 5, (rc, took, stderr_of(proc))           # here it takes about 0.2 s
        deadline = time.time() + 5
        while cluster.scheduler.tasks and time.time() < deadline:
            time.sleep(0.05)
        left = {key: ts.state for key, ts in list(cluster.scheduler.tasks.items())}
        assert not left, (left, stderr_of(proc))          # what was left says where a failure came from
    assert_whole_unique_rows(out)


def test_an_interrupted_dask_sweep_cancels_its_futures(monkeypatch):
    """The futures are cancelled (not only left to the client's close) and the client closed."""
    import dask.distributed
    from experiments.pool import execute
    seen = {}

    class Future:
        def result(self):
            return {"row": 1}

    class Client:
        def __init__(self, address, timeout):
            seen["client"] = self

        def map(self, fn, todo, pure):
            self.futures = [Future() for _ in todo]
            return self.futures

        def cancel(self, futures, force=False):
            seen["cancelled"] = list(futures)

        def close(self, timeout=None):
            seen["closed"] = True

    def as_completed(futures):
        yield futures[0]
        raise KeyboardInterrupt                        # Ctrl-C while waiting for the second

    monkeypatch.setattr(dask.distributed, "Client", Client)
    monkeypatch.setattr(dask.distributed, "as_completed", as_completed)
    rows = execute(lambda c: c, [{}, {}, {}], cluster="tcp://nowhere:8786")
    assert next(rows) == {"row": 1}
    with pytest.raises(KeyboardInterrupt):
        next(rows)
    assert seen["cancelled"] == seen["client"].futures and seen["closed"]


# -- 2. one writer at a time; repeated rows read once --------------------------------------------------
def test_a_second_writer_is_refused_naming_the_first(tmp_path, start_sweep):
    grid, out = write(tmp_path / "g.yaml", SLOW), tmp_path / "same.csv"
    first = start_sweep(grid, out, "--jobs", "1")
    wait_for_rows(out, 2, first)
    second = start_sweep(grid, out, "--jobs", "1")
    assert second.wait(timeout=20) == 2
    assert stderr_of(second).strip() == (f"error: {out}: another sweep (pid {first.pid}) is writing it; wait for "
                                         f"it to finish or give another --out")
    assert first.poll() is None                              # the first runs on, untouched
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=10) == 130
    assert_whole_unique_rows(out)
    done = sweep(write(tmp_path / "small.yaml", SMALL), out, jobs=1, quiet=True)   # the lock was let go
    assert done["done_before"] + done["ran"] == 3
    assert_whole_unique_rows(out)


def test_repeated_rows_are_read_once_saying_so(tmp_path, capsys):
    """What `pick` and `plot` read (load_results): the first row of each config hash."""
    out = tmp_path / "r.csv"
    sweep(write(tmp_path / "g.yaml", SMALL), out, jobs=1, quiet=True)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines + lines[1:3]))            # as two writers once left it
    capsys.readouterr()
    rows = load_results(out)
    assert [r["config_hash"] for r in rows] == [r["config_hash"] for r in read_results(out)[:3]]
    assert len(read_results(out)) == 5                      # the resume path keeps them all
    err = capsys.readouterr().err
    assert err.strip() == f"{out}: 2 duplicate rows (a config_hash seen before) ignored; the first of each is kept"


# -- 4. files that are not a sweep's results ------------------------------------------------------------
BAD = {"binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text CSV (binary data)"),
       "other-csv": (b"name,score\nada,3\nbob,4\n",
                     "not a sweep results file (no config_hash, status, device, policy columns)"),
       "no-newline": (b"hello", "not a sweep results file (no config_hash"),
       "no-hash": (b"status,device,policy\nok,pi,lru\n", "not a sweep results file (no config_hash column)")}


@pytest.mark.parametrize("command", ["pick", "plot", "sweep"])
@pytest.mark.parametrize("kind", list(BAD))
def test_a_file_that_is_not_a_sweeps_results_is_refused_in_one_line(tmp_path, capsys, command, kind):
    data, says = BAD[kind]
    f = tmp_path / "f.csv"
    f.write_bytes(data)
    argv = {"pick": ["pick", str(f), "--out", str(tmp_path / "p.yaml")],
            "plot": ["plot", str(f), "--kind", "throughput", "--out", str(tmp_path / "plot"), "--quiet"],
            "sweep": ["sweep", str(write(tmp_path / "g.yaml", SMALL)), "--out", str(f), "--jobs", "1",
                      "--quiet"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: {says}") and err.count("\n") == 1, err
    assert f.read_bytes() == data                          # refused, never trimmed or appended to


@pytest.mark.parametrize("data,says", [(b"", "no result rows"), (b"config_hash,status,device,policy\n",
                                                                  "no result rows"),
                                       (None, "no such results file")])
def test_load_results_refuses_an_empty_or_missing_file(tmp_path, data, says):
    from devices.units import ConfigError
    f = tmp_path / "f.csv"
    if data is not None:
        f.write_bytes(data)
    with pytest.raises(ConfigError, match=f"{f}: {says}"):
        load_results(f)
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder"):
        load_results(tmp_path)
