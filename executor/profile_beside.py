"""`moelab profile`'s co-run figures (compute.measured.host.beside; issue 24): how much the main
thread's operations and the background tasks slow each other down when they run side by side on
the profile's cores, measured directly as the executor runs them, not fitted to any executor run.

For each background kind (a load of a format's parts stored raw, through the executor's own load
path: an ExpertRuntime's I/O pool, the read with its checksum, the callback filling the expert
memory; a decompression task of a codec on its decompression pool, with its callback) and each
main-thread operation the structural model knows (an expert call per format, level and token
count; the dense part, prefill and decode, per token count; the decision path), 1 and then 2
background threads loop the task back to back (each waits for its task: 1 or 2 in flight on the
pools) while the main thread loops the operation for
about `window` seconds. Each side's time per operation there, over its time alone just before,
is its slowdown; the median of REPEATS readings. `alone`: the background task's slowdown with 2
threads at once and no main-thread work (1 thread: 1 by definition).

The two background kinds slow each other too, which a main-thread co-run does not carry: on this
project's 2-vCPU VM a zstd decompression task's event (the worker's decode) took 90 us alone and
188 us beside two threads loading zip's raw parts, and in a validation run its tasks that
overlapped reads took a median 190-270 us against 52-85 us. Per codec, `across`: a decompression
thread looping beside 1 and then 2 read threads, and a read thread beside 1 and then 2
decompression threads, each side's slowdown against its one thread alone, no main-thread work.
`rate`: the raw bytes per second of its task's event alone on the pool (what the executor's
timeline times: 90 us where the same chunks decoded inline on the main thread took 62 us), the
work the co-run slowdowns apply to.

sim/host_beside.py charges them. They hold for the executor's thread counts (its read and
decompression pools have 2 workers each) and the switch interval it runs at (Python's default).
"""
from __future__ import annotations

import itertools
import statistics
import threading
import time
from concurrent.futures import Future

import torch

from devices.profile import measured_key
from executor.io import BlobReader, DecompressPool, IOWorkers
from executor.profile_gil import _decision, call_ops, dense_ops, operation_lines
from executor.runtime import ExpertRuntime, StepInfo, _Sequencer
from executor.zipcodec import ZipEncoder
from policies import build_online_policies
from policies.base import Key
from workloads.formats import make_format

REPEATS = 3
WORKERS = (1, 2)
# a co-run's window per reading (full, quick profile): the lock changes hands at the 5 ms switch
# interval when both threads want it, so a window of a few intervals reads 2x or 10x by chance
# (with 0.03 s windows a zip call beside one decompression read 2.3x in one quiet profile and
# 10x in a hand-timed 0.3 s co-run)
BESIDE_WINDOW_S = {False: 0.25, True: 0.15}


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


class Loads:
    """The executor's own load path for background tasks: an ExpertRuntime on real I/O and
    decompression pools of 2 workers (the executor's defaults), so a task carries what the
    executor's workers do (the read or the decompression, its callback, the fill into the expert
    memory, the timeline event), not the bare codec or read call."""

    def __init__(self, p, fmt_name: str):
        self.store = p.store(fmt_name)
        self.fmt = self.store.format
        self.reader = BlobReader(self.store)
        self.io, self.dec = IOWorkers(self.reader, 2), DecompressPool(2)
        self.rt = ExpertRuntime(self.store, build_online_policies(p.arch, self.fmt, 10 ** 12),
                                activation=p.model.cfg.activation, io=self.io, decompress=self.dec)
        self.rt.begin_step(StepInfo(0, 0, False, 1, 1))
        self.rt.sequencer = _Sequencer(None)
        self.lock = threading.Lock()

    def __enter__(self):
        self.reader.__enter__()
        self.io.__enter__()
        self.dec.__enter__()
        return self

    def __exit__(self, *exc):
        self.dec.__exit__(*exc)
        self.io.__exit__(*exc)
        self.reader.__exit__(*exc)

    def read_task(self):
        """(format key, a load of the next of the format's parts stored raw, as the executor loads it)."""
        keys = itertools.cycle([k for k in self.store.keys() if not self.fmt.decompress_bytes[k.part]])

        def task():
            with self.lock:
                key = next(keys)
            self.rt.memory.reserve(key, self.fmt.resident_bytes[key.part])
            self.rt._load(key, 0).result()
            self.rt.memory.release(key)
        return measured_key(self.fmt), task

    def decompress_task(self, p, codec: str):
        """A decompression of the next exponent chunk of expert 0 (encoded with `codec`) on the pool,
        its callback filling the expert memory as the executor's does."""
        enc = ZipEncoder()
        fmt = make_format("zip", p.arch.expert_shapes, codec=codec, exponent_ratio=1.1)
        blobs = [(k, blob) for k, blob in enumerate(enc.encode(p.model.moe_layers[0].experts[0].weights(), fmt)) if k]
        chunks, serial = itertools.cycle(blobs), itertools.count()
        rt = self.rt

        def task():
            with self.lock:                     # a key of its own: two threads may hold the same chunk
                part, blob = next(chunks)
                key = Key(0, next(serial), part)
            rt.memory.reserve(key, fmt.resident_bytes[key.part])
            done: Future = Future()

            def decompressed(f):
                r = f.result()
                rt._add(f"decompress[{r.worker}]", "decompress", r.t_start, r.t_end, 0, 0, key.part,
                        fmt.decompress_bytes[key.part], 0)
                done.set_result(rt._fill(key, r.value, None))
            self.dec.submit(enc.decompress_part, key.part, blob, fmt, tag=key).add_done_callback(decompressed)
            done.result()
            rt.memory.release(key)
        return task


def across(dec, read, window: float) -> list[float]:
    """[a decompression's slowdown beside 1 and 2 read threads, a read's beside 1 and 2 decompression
    threads] (one thread of the kind measured, against it alone; medians of REPEATS readings)."""
    alone = {"dec": mean_time(dec, window / 2), "read": mean_time(read, window / 2)}
    got: dict = {}
    for mine, theirs, name in ((dec, read, "dec"), (read, dec, "read")):
        for k in WORKERS:
            readings = []
            for _ in range(REPEATS):
                with Background(mine, 1) as me, Background(theirs, k):
                    since = list(me.done)
                    time.sleep(window)
                    readings.append(me.per_task(window, since) / alone[name])
            got[name, k] = max(1.0, statistics.median(readings))
    return [round(got[n, k], 3) for n in ("dec", "read") for k in WORKERS]


def event_rate(loads, task, window: float) -> float:
    """Raw bytes per second of a decompression task's event alone on the pool (one thread looping);
    the runtime's timeline, which keeps every task's event, is cleared before and after."""
    loads.rt.timeline.events.clear()
    mean_time(task, window)
    events = [e for e in loads.rt.timeline.events if e.resource.startswith("decompress")]
    loads.rt.timeline.events.clear()
    return sum(e.bytes for e in events) / sum(e.end - e.start for e in events)      # bytes: the raw bytes


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
            with Loads(p, fmt_name) as loads:
                key, task = loads.read_task()
                out["read"][key] = kind_figures(p, task, [fmt_name], window)
        with Loads(p, "zip") as loads:
            _, read = loads.read_task()
            for codec in codecs:
                task = loads.decompress_task(p, codec)
                f = kind_figures(p, task, ["zip"], window)
                out["decompress"][codec] = dict(f, rate=event_rate(loads, task, window),
                                                across=across(task, read, window))
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
            lines += [f"          {name}:{tag}", f"            alone: {four(f['alone'])}{tag}"]
            if kind == "decompress":
                lines += [f"            rate: {f['rate'] / 1e6:.1f}MB/s   # {src}: its task's event alone on the pool",
                          f"            across: {four(f['across'])}   # {src}: beside 1 and 2 read threads; a read "
                          "beside 1 and 2 of it"]
            lines += operation_lines(f["calls"], f["dense"], f["decide"], four, 12, tag)
    return lines
