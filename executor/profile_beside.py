"""`moelab profile`'s co-run figures (compute.measured.host.beside; issue 24): how much the main
thread's operations and the background tasks slow each other down when they run side by side on
the profile's cores, measured directly as the executor runs them, not fitted to any executor run.

For each background kind (a read of a format's blobs, as an I/O worker runs it: BlobReader.read with
its checksum; a decompression task of a codec, as a decompression worker runs it) and each
main-thread operation the structural model knows (an expert call per format, level and token
count; the dense part, prefill and decode, per token count; the decision path), 1 and then 2
background threads loop the task back to back while the main thread loops the operation for
about `window` seconds. Each side's time per operation there, over its time alone just before,
is its slowdown; the median of REPEATS readings. `alone`: the background task's slowdown with 2
threads at once and no main-thread work (1 thread: 1 by definition).

sim/host_beside.py charges them. They hold for the executor's thread counts (its read and
decompression pools have 2 workers each) and the switch interval it runs at (Python's default).
"""
from __future__ import annotations

import itertools
import statistics
import threading
import time

import torch

from devices.profile import measured_key
from executor.io import BlobReader
from executor.profile_gil import _decision, call_ops, dense_ops
from executor.zipcodec import ZipEncoder
from workloads.formats import make_format

REPEATS = 3
WORKERS = (1, 2)


def mean_time(fn, window: float, least: int = 3) -> float:
    """Seconds per call of `fn` over about `window` seconds (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window or n < least:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


class Background:
    """`k` threads looping `task` back to back, counting what they finish."""

    def __init__(self, task, k: int):
        self.task, self.done, self.stop = task, [0] * k, threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(k)]

    def _loop(self, i: int) -> None:
        while not self.stop.is_set():
            self.task()
            self.done[i] += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(0.002)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def per_task(self, seconds: float, since: list[int]) -> float:
        """Seconds per task per thread over `seconds` since the counts `since`."""
        finished = sum(self.done) - sum(since)
        return seconds * len(self.done) / max(finished, 1)


def co_run(op, task, op_alone: float, task_alone: float, k: int, window: float) -> tuple[float, float]:
    """(the op's slowdown, the task's slowdown) with `k` threads looping `task` beside the op."""
    with Background(task, k) as bg:
        since = list(bg.done)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window or n < 3:
            op()
            n += 1
        wall = time.perf_counter() - t0
        theirs = bg.per_task(wall, since)
    return max(1.0, wall / n / op_alone), max(1.0, theirs / task_alone)


def slowdowns(op, task, task_alone: float, window: float) -> list[float]:
    """[op beside 1, beside 2, task beside it with 1, with 2]: medians of REPEATS readings."""
    readings = {k: [] for k in WORKERS}
    for _ in range(REPEATS):
        op_alone = mean_time(op, window / 2)
        for k in WORKERS:
            readings[k].append(co_run(op, task, op_alone, task_alone, k, window))
    mine = [statistics.median(r[0] for r in readings[k]) for k in WORKERS]
    theirs = [statistics.median(r[1] for r in readings[k]) for k in WORKERS]
    return [round(x, 3) for x in mine + theirs]


def alone_slowdown(task, task_alone: float, window: float) -> list[float]:
    """[1, the task's slowdown with 2 threads looping it and no main-thread work]."""
    got = []
    for _ in range(REPEATS):
        with Background(task, 2) as bg:
            since = list(bg.done)
            time.sleep(window)
            got.append(bg.per_task(window, since) / task_alone)
    return [1.0, round(max(1.0, statistics.median(got)), 3)]


def read_task(p, fmt_name: str):
    """(format key, a read of the next of the format's blobs with its checksum, as an I/O worker reads)."""
    store = p.store(fmt_name)
    reader = BlobReader(store)
    keys = itertools.cycle(store.keys())
    lock = threading.Lock()

    def task():
        with lock:
            key = next(keys)
        reader.read(key)
    return measured_key(store.format), task, reader


def decompress_task(p, codec: str):
    """A decompression of one exponent chunk of expert 0 (encoded with `codec`), cycling over them."""
    enc = ZipEncoder()
    fmt = make_format("zip", p.arch.expert_shapes, codec=codec, exponent_ratio=1.1)
    chunks = itertools.cycle([(k, blob) for k, blob in enumerate(enc.encode(p.model.moe_layers[0].experts[0].weights(),
                                                                           fmt)) if k])
    lock = threading.Lock()

    def task():
        with lock:
            k, blob = next(chunks)
        enc.decompress_part(k, blob, fmt)
    return task


def kind_figures(p, task, call_formats, window: float) -> dict:
    """One background kind's co-runs with every main-thread operation."""
    task_alone = mean_time(task, window / 2)
    calls: dict[str, dict[int, list]] = {}
    for fmt_name in call_formats:
        for key, level, _, op in call_ops(p, fmt_name):
            calls.setdefault(key, {}).setdefault(level, []).append(slowdowns(op, task, task_alone, window))
    dense = {"prefill": [], "decode": []}
    for phase, _, op in dense_ops(p):
        dense[phase].append(slowdowns(op, task, task_alone, window))
    return {"alone": alone_slowdown(task, task_alone, window),
            "calls": {key: [rows[level] for level in sorted(rows)] for key, rows in calls.items()},
            "dense": dense, "decide": slowdowns(_decision(p), task, task_alone, window)}


def beside_figures(p, formats, codecs, window: float) -> dict:
    """compute.measured.host.beside of the HostProfiler `p` (executor/profile_host.py)."""
    out: dict = {"read": {}, "decompress": {}}
    with torch.no_grad():
        for fmt_name in formats:
            key, task, reader = read_task(p, fmt_name)
            with reader:
                out["read"][key] = kind_figures(p, task, [fmt_name], window)
        for codec in codecs:
            out["decompress"][codec] = kind_figures(p, decompress_task(p, codec), ["zip"], window)
    return out


def beside_lines(b: dict, src: str) -> list[str]:
    """compute.measured.host.beside as YAML lines (under `host:`)."""
    def four(x):
        return "[" + ", ".join(f"{v:.3f}" for v in x) + "]"
    tag = f"   # {src}"
    lines = [f"      beside:   # {src}: [main-thread op beside 1 and 2 of them, theirs beside it with 1 and 2] "
             f"(executor/profile_beside.py)"]
    for kind in ("read", "decompress"):
        lines.append(f"        {kind}:")
        for name, f in b[kind].items():
            lines += [f"          {name}:", f"            alone: {four(f['alone'])}{tag}", "            calls:"]
            for key, rows in f["calls"].items():
                lines.append(f"              {key}:")
                lines += [f"                - [{', '.join(four(x) for x in row)}]{tag}" for row in rows]
            lines.append("            dense:")
            lines += [f"              {ph}: [{', '.join(four(x) for x in f['dense'][ph])}]{tag}"
                      for ph in ("prefill", "decode")]
            lines.append(f"            decide: {four(f['decide'])}{tag}")
    return lines
