"""`moelab profile`'s figures for the structural host model (compute.measured.host; issue 24 item 1):
per operation the executor runs, the share of its time alone holding the interpreter lock and the
cores it keeps busy, by a direct micro-measurement on the cores the profile runs on (`--cores`), not
fitted to any run of the executor.

- cpu: the process's CPU seconds over wall seconds while the operation runs alone, repeatedly (its
  torch threads counted; nothing else of the profiler runs then).
- lock: the operation runs repeatedly while a pure-Python counter spins in another thread, on two
  cores (the counter's thread may use a second CPU even when the profile runs on one: on one core
  the counter would also take the core and tell nothing). The counter always wants the lock, and the
  interpreter hands it over every switch interval: while the operation needs the lock the two
  alternate (each gets half), while it runs without it the counter runs alone. Over n operations of
  T seconds alone holding the lock for l T, the window lasts (1 + l) n T and the counter works n T
  of it; so its rate against its rate alone, r = 1 / (1 + l), gives l = 1 / r - 1. The switch
  interval is lowered while it spins (SWITCH_S), so that alternation is fine-grained.

A check, recorded in the profile's comment: the estimator read on a pure-Python loop (should give 1)
and on SHA-256 of a large buffer (hashlib releases the lock: should give 0). The estimator assumes
the counter has a core whenever it holds the lock: on a loaded host it also waits for a core and
every busy operation reads as holding the lock longer; the check shows how much.

Operations: an expert call (ExpertRuntime._compute) per format key, level and token count; the dense
part (a forward of the model with its experts stubbed out: attention, norms, router, the output
head) per token count, prefill (batch 1 x n) and decode (batch n); the decision path (the bundle's
decide and finish per layer); a read of a format's blob on the executor's I/O workers (submit,
BlobReader.read with its checksum, the future); a decompression task per codec, with its rate alone.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import sys
import threading
import time

import torch

from devices.profile import measured_key
from executor.encoders import get_encoder, resident_part
from executor.execute import _set_numba_threads, strip_experts
from executor.io import BlobReader, IOWorkers
from executor.runtime import ExpertRuntime, StepInfo
from executor.train import load_trained
from executor.zipcodec import ZipEncoder
from policies import Routing, build_online_policies, build_policies
from policies.base import Key
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

SWITCH_S = 5e-5         # the interpreter's switch interval while the counter spins


def best_time(fn, repeats: int) -> float:
    """The best of `repeats` timed calls of `fn` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Counter:
    """A pure-Python counter spinning in its own thread: how much lock it gets."""

    def __init__(self):
        self.n, self.stop, self.pause, self.thread = 0, threading.Event(), threading.Event(), None

    def _spin(self):
        n = 0
        stop, paused = self.stop.is_set, self.pause.is_set
        while not stop():
            if paused():                    # blocks without the lock while an operation runs alone
                time.sleep(0.001)
                continue
            for _ in range(100):
                n += 1
            self.n = n

    def __enter__(self):
        if self.thread is None:                     # started once (host_figures starts it early)
            self.saved = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_S)
            self.thread = threading.Thread(target=self._spin, daemon=True)
            self.thread.start()
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        sys.setswitchinterval(self.saved)

    def rate(self, seconds: float) -> float:
        """Counts per second while the main thread sleeps."""
        n0, t0 = self.n, time.perf_counter()
        time.sleep(seconds)
        return (self.n - n0) / (time.perf_counter() - t0)


def shares(fn, window: float, counter: Counter, repeats: int = 3) -> tuple[float, float, float]:
    """(lock, cpu, seconds alone) of the operation `fn` (one call): its runs alone for about `window`
    seconds, then `repeats` times its lock share beside the spinning `counter` (paused while it runs
    alone), each against the counter's rate alone just before and after; the median of those."""
    fn()                                                    # warm-up
    counter.pause.set()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < window or n < 3:
        fn()
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    counter.pause.clear()
    locks = []
    rate = counter.rate(window / 4)
    for _ in range(repeats):
        n0, t1 = counter.n, time.perf_counter()
        for _ in range(n):
            fn()
        spun, spent = counter.n - n0, time.perf_counter() - t1
        after = counter.rate(window / 4)
        r = spun / ((rate + after) / 2) / spent             # its rate beside the operation / alone
        locks.append(min(1.0, max(0.0, 1.0 / max(r, 1e-9) - 1.0)))
        rate = after
    lock = float(statistics.median(locks))
    return lock, max(lock, cpu / wall), wall / n


def two_cores():
    """CPUs for the counter's thread: the process's, plus one more when it has only one."""
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(mine) != 1 or (os.cpu_count() or 1) < 2:
        return None
    return {mine[0], next(c for c in range(os.cpu_count()) if c != mine[0])}


def host_figures(p, cores: int, formats, codecs) -> dict:
    """compute.measured.host of the HostProfiler `p` (executor/profile_host.py) on `cores` cores."""
    window = 0.02 if p.quick else 0.1
    saved = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        wide, mine = two_cores(), (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None)
        try:
            if wide:
                os.sched_setaffinity(0, wide)           # the counter's thread inherits two CPUs
        except OSError:                                 # a cpuset that allows one CPU only
            wide = None
        c = Counter().__enter__()
        if wide:
            os.sched_setaffinity(0, mine)               # the operations keep the profile's cores
        with c, torch.no_grad():
            return {"cores": cores, "reference": reference(window, c), "calls": {k: v for f in formats for k, v in [_calls(p, f, window, c)]},
                    "dense": _dense(p, window, c), "decide": list(shares(_decision(p), window, c)[:2]),
                    "read": {k: v for f in formats for k, v in [_read(p, f, window, c)]},
                    "decompress": {codec: _decompress(p, codec, window, c) for codec in codecs}}
    finally:
        torch.set_num_threads(saved)


def reference(window: float, counter) -> dict:
    """The estimator read on two operations whose lock share is known, as a check of the host's
    quiet: a pure-Python loop (1) and SHA-256 of 4 MB (0: hashlib releases the lock on large
    buffers). On a loaded host the counter also waits for a core, and the lock-free one reads high."""
    buf = bytes(4 * 2 ** 20)

    def python():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:
            pass
    return {"python": shares(python, window, counter)[0],
            "lock_free": shares(lambda: hashlib.sha256(buf).digest(), window, counter)[0]}


def call_ops(p, fmt_name: str):
    """(format key, level, token count, op) for each ExpertRuntime._compute the profile times (as
    p.experts times it: the experts resident, random hidden states), one after another."""
    store = p.store(fmt_name)
    fmt, arch = store.format, p.arch
    _set_numba_threads(fmt, p.threads)
    enc = get_encoder(fmt.name)
    rt = ExpertRuntime(store, build_online_policies(arch, fmt, 10 ** 12), activation=p.model.cfg.activation, io=None,
                       torch_device=p.torch_device)
    rt.begin_step(StepInfo(0, 0, False, 1, 1))
    with BlobReader(store) as reader:
        for k in (Key(0, e, q) for e in range(arch.experts) for q in range(fmt.n_parts)):
            rt.memory.buffers[k] = resident_part(enc, fmt, k.part, bytes(reader.read(k)))
    for level in range(fmt.levels):
        for n in p.tokens:
            dev = rt.device
            hidden = torch.randn(n, arch.d_model, device=dev)
            gates = torch.full((n, arch.top_k), 1.0 / arch.top_k, device=dev)
            ids = torch.full((n, arch.top_k), 1 % arch.experts, device=dev)
            ids[:, 0] = 0
            out = torch.zeros_like(hidden)
            yield measured_key(fmt), level, n, (lambda: rt._compute(out, hidden, ids, gates, 0, (0, level),
                                                                     list(range(n))))


def _calls(p, fmt_name: str, window: float, counter) -> tuple[str, list]:
    """(format key, per level per token count [lock, cpu]) of ExpertRuntime._compute, as p.experts times it."""
    rows: dict[int, list] = {}
    for key, level, _, op in call_ops(p, fmt_name):
        rows.setdefault(level, []).append(list(shares(op, window, counter)[:2]))
    return key, [rows[level] for level in sorted(rows)]


def dense_ops(p):
    """(phase, token count, op) of a forward of the model with its experts stubbed out (every layer's
    dense part and the output head): prefill of batch 1 x n tokens, decode of batch n; each op's
    caches are set up when it is yielded."""
    model, _, _ = load_trained(p.model_dir)
    strip_experts(model)
    model.set_expert_fn(lambda layer, h, ids, gates: torch.zeros_like(h))
    dev = torch.device(p.torch_device)
    model.to(dev)

    def forward(tokens, pos):
        out = model(tokens, pos)
        if dev.type == "cuda":          # a CUDA forward returns once launched: time its kernels too
            torch.cuda.synchronize(dev)
        return out
    for n in p.tokens:
        model.clear_caches()
        model.setup_caches(1, n + 1)
        tokens, pos = torch.zeros(1, n, dtype=torch.long, device=dev), torch.arange(n, device=dev)
        yield "prefill", n, (lambda: forward(tokens, pos))
        model.clear_caches()
        model.setup_caches(n, 2)
        tokens, pos = torch.zeros(n, 1, dtype=torch.long, device=dev), torch.tensor([0], device=dev)
        yield "decode", n, (lambda: forward(tokens, pos))
    model.clear_caches()


def _dense(p, window: float, counter) -> dict:
    """Per token count, [lock, cpu] of the dense part, prefill and decode (dense_ops)."""
    out = {"prefill": [], "decode": []}
    for phase, _, op in dense_ops(p):
        out[phase].append(list(shares(op, window, counter)[:2]))
    return out


def _decision(p):
    """One decision point per call (the bundle's decide and finish), cycling over a synthetic trace."""
    store = p.store("bf16")
    trace = synthetic_trace(p.arch, requests=1, prompt_len=4, output_len=32, seed=0)
    w = Workload(p.arch, trace, store.format, batch=1)
    pol = build_policies(w, int(p.arch.layers * p.arch.experts * store.format.expert_bytes * 0.5), cache="lru")
    points = []
    for step in w.steps:
        experts, scores, _ = w.routing_arrays(step)
        points += [(layer, Routing(experts[layer], scores[layer], None, None)) for layer in range(p.arch.layers)]
    cycle = itertools.cycle(points)

    def decide():
        layer, routing = next(cycle)
        pol.decide(layer, routing)
        pol.finish(layer)
    return decide


def _read(p, fmt_name: str, window: float, counter) -> tuple[str, list]:
    """(format key, [lock, cpu]) of a read of the format's blobs on the executor's I/O workers."""
    store = p.store(fmt_name)
    keys = itertools.cycle(store.keys())
    with BlobReader(store) as reader, IOWorkers(reader, 1) as io:
        share = shares(lambda: io.submit(next(keys)).result(), window, counter)
    return measured_key(store.format), list(share[:2])


def _decompress(p, codec: str, window: float, counter) -> dict:
    """{share: [lock, cpu], rate: raw bytes/s alone} of the exponent chunks of one expert per codec."""
    enc = ZipEncoder()
    fmt = make_format("zip", p.arch.expert_shapes, codec=codec, exponent_ratio=1.1)
    chunks = [(k, blob) for k, blob in enumerate(enc.encode(p.model.moe_layers[0].experts[0].weights(), fmt)) if k]
    raw = sum(enc.decompress_part(k, blob, fmt).size for k, blob in chunks)
    lock, cpu, seconds = shares(lambda: [enc.decompress_part(k, blob, fmt) for k, blob in chunks], window, counter)
    return {"share": [lock, cpu], "rate": raw / seconds}


def operation_lines(calls: dict, dense: dict, decide, figure, indent: int, tag: str) -> list[str]:
    """The per-operation figures as YAML lines at `indent`: calls per format key (a row per level),
    dense prefill and decode, the decision path; `figure` writes one entry, `tag` its provenance."""
    pad = " " * indent
    lines = [f"{pad}calls:"]
    for key, rows in calls.items():
        lines.append(f"{pad}  {key}:")
        lines += [f"{pad}    - [{', '.join(figure(x) for x in row)}]{tag}" for row in rows]
    lines.append(f"{pad}dense:")
    lines += [f"{pad}  {phase}: [{', '.join(figure(x) for x in dense[phase])}]{tag}" for phase in ("prefill", "decode")]
    return lines + [f"{pad}decide: {figure(decide)}{tag}"]


def host_lines(h: dict, src: str) -> list[str]:
    """compute.measured.host as YAML lines (under `measured:`), every figure with its provenance."""
    def pair(x):
        return f"[{x[0]:.3f}, {x[1]:.3f}]"
    tag = f"   # {src}"
    ref = h.get("reference", {})
    lines = [f"    host:   # {src}: [lock, cpu] per operation alone (executor/profile_gil.py): lock from a "
             f"spinning Python counter's rate beside it against alone, cpu its CPU time over wall time; the "
             f"lock estimate of a pure-Python loop {ref.get('python', float('nan')):.2f} (should be 1), of a "
             f"lock-free SHA-256 {ref.get('lock_free', float('nan')):.2f} (should be 0: higher on a loaded host)",
             f"      cores: {h['cores']}   # {src}: the cores it was measured on (os.sched_setaffinity)"]
    lines += operation_lines(h["calls"], h["dense"], h["decide"], pair, 6, tag)
    lines.append("      read:")
    lines += [f"        {key}: {pair(x)}{tag}" for key, x in h["read"].items()]
    lines.append("      decompress:")
    lines += [f"        {codec}: {{share: {pair(x['share'])}, rate: {x['rate'] / 1e6:.1f}MB/s}}{tag}"
              for codec, x in h["decompress"].items()]
    return lines
