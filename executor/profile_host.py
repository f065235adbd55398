"""`moelab profile`: measure this host as the executor uses it, and write a device profile.

Every figure is measured through the executor's own code path, so the simulator timed by
the profile predicts what `moelab execute` does here:

- storage: BlobReader reads (page cache bypassed, checksum verified) of the stores' real
  blobs, one at a time, timed as the I/O workers time them; latency and bandwidth are the
  least-squares line through (size, median seconds). queue_depth: the executor's read
  concurrency (its I/O workers keep that many reads in flight); the comment gives a burst of
  reads on those workers against what the simulator's storage channel predicts for it (added
  by experiments/calibrate.py: the executor does not simulate).
- decompression: exponent chunks of the model's experts, per codec, on the executor's
  DecompressPool with its worker count while a thread computes (the executor's main thread
  computes while its workers decompress: they share the cores); raw bytes over task time.
- compute.measured.experts: ExpertRuntime._compute (decode / dequantize / re-assemble, then
  the matmuls, with its timeline record) per format and level against token count, with
  the executor's torch threads, cycling over the model's experts (means: the simulator adds
  them up), every cell timed interleaved with the others (executor/profile_experts.py).
  contention, per format: from forced executor runs with loads, how much slower the main
  thread's expert calls and dense parts run while reads / decompressions are in flight,
  and what a call / dense part costs in runs beyond its table (least squares; the share lost
  while reading and the reads' stall are then calibrated by simulation, experiments/calibrate.py,
  since the executor does not simulate); compute_gap:
  the mean gap between consecutive expert calls of a layer that loaded nothing; wake and handoff
  (the contention runs, executor/profile_timeline.py): the medians of a part's ready -> the start of
  the expert call that waited for it, and of a read's end -> its decompression's start on an idle
  worker: the hand-offs between the executor's threads (a callback, a thread woken from a queue);
  dense_after_loads: a decode dense part's mean time beyond its table after a decision point that
  loaded, less the same after one that hit (the prefetch-free contention runs); call_after_load, per
  format: the same for an expert call on an expert just loaded (calls nothing in flight overlapped).
- compute.measured.dense / step / decision_overhead / load_overhead: forced `execute` runs of
  the model, read from their timelines: the dense part of a layer (prefill: batch 1 x n
  tokens; decode: batch n), the gap between steps (output head, sampling), and the gap from a
  layer's dense end to its first compute where that compute is a hit (the decision path),
  fitted as a + b x loads issued.
- compute.memory_bandwidth / flops / overhead (the roofline, for other models): a large
  tensor copy, a matmul, and an empty torch call.

Each figure's comment says `measured: DATE on HOST, torch VERSION, COMMAND`.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from devices.atomic import atomic_write
from devices.profile import StorageProfile, interpolate, load_device, measured_key
from devices.units import format_size
from executor.host_probe import STEADY_SECONDS, probe, steadiness
from executor.execute import default_torch_threads, execute, strip_experts
from executor.io import BlobReader, DecompressPool, IOWorkers, StorageThrottle
from executor.profile_beside import BESIDE_WINDOW_S, beside_figures, beside_lines
from executor.profile_experts import expert_tables
from executor.profile_gil import best_time, host_figures, host_lines
from executor.profile_timeline import (call_excess, compute_gaps, decision_gaps, decision_line, dense_excess,
                                       handoff_samples, overlap, run_times)
from executor.model import model_arch
from executor.store_build import ensure_store
from executor.train import DEFAULT_MODEL, load_trained
from executor.zipcodec import ZipEncoder
from policies import build_policies
from timeline.metrics import step_spans
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

TOKENS = (1, 2, 4, 8, 16, 32, 64)
QUICK_TOKENS = (1, 4, 16, 64)
FORMATS = ("bf16", "mwq", "zip")
CODECS = ("lz4", "lz4hc", "zstd")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}us"


def _counts(ns) -> str:
    """Sample counts as the profile's comments write them: loaded/resident."""
    return "/".join(str(n) for n in ns)


def _median(xs) -> float:
    return float(statistics.median(xs))


def _mean(xs) -> float:
    """The mean: the simulator adds these times up, so a table must carry their mean (the
    occasional slow call included), not the typical one."""
    return float(statistics.fmean(xs))


class HostProfiler:
    def __init__(self, model_dir=None, store_root="runs/stores", quick: bool = False, quiet: bool = False,
                 io_concurrency: int = 2, decompress_workers: int = 2, throttle: str | None = None,
                 torch_device: str = "cpu"):
        self.model_dir = Path(model_dir or DEFAULT_MODEL)
        self.name = self.model_dir.name
        self.model, _, _ = load_trained(self.model_dir)
        self.arch = model_arch(self.model, self.name)
        self.store_root = Path(store_root)
        self.quick, self.quiet = quick, quiet
        self.tokens = QUICK_TOKENS if quick else TOKENS
        self.repeats = 3 if quick else 9
        self.io_concurrency, self.decompress_workers = io_concurrency, decompress_workers
        self.torch_device = torch_device
        self.threads = host_torch_threads(torch_device)
        self.stores = {}
        # format key -> [(format, run config, measured (call, read, run) seconds)]: what
        # experiments/calibrate.py reproduces by simulation (the executor does not simulate)
        self.calibration_runs: dict = {}
        self.handoffs: tuple[list, list] = ([], [])      # the forced runs' (wakes, handoffs): handoff_samples
        self.dense_excess: tuple[list, list] = ([], [])  # (after loads, after hits): dense_excess
        # the forced runs' reads held to a device's storage (profile --throttle): the runs' figures
        # (dense, steps, decision path, contention) are then measured in that regime
        self.throttle = throttle
        self.throttled = None
        if throttle:
            dev, _, opt = throttle.partition(":")
            self.throttled = load_device(dev).storage_option(opt or None)

    # -- stores -----------------------------------------------------------------------
    def store(self, fmt_name: str):
        if fmt_name not in self.stores:
            model, _, _ = load_trained(self.model_dir)
            self.stores[fmt_name] = ensure_store(model, self.store_root / f"{self.name}-{fmt_name}", fmt_name,
                                                 quiet=True)
        return self.stores[fmt_name]

    # -- storage --------------------------------------------------------------------------
    def storage(self) -> dict:
        """Latency and bandwidth from single reads of every blob size the stores hold."""
        samples: dict[int, list[float]] = {}
        burst = None
        for fmt_name in FORMATS:
            store = self.store(fmt_name)
            keys = store.keys()
            with BlobReader(store) as reader, IOWorkers(reader, 1) as io:
                mode = reader.mode
                for i in range(self.repeats * 8):
                    key = keys[(i * 7919) % len(keys)]
                    r = io.submit(key).result()
                    samples.setdefault(len(r.data), []).append(r.t_end - r.t_start)
            if fmt_name == "bf16":
                burst = self._burst(store, keys)
        sizes = sorted(samples)
        med = [_median(samples[s]) for s in sizes]
        slope, intercept = np.polyfit(sizes, med, 1) if len(sizes) > 1 else (med[0] / sizes[0], 0.0)
        bandwidth = 1.0 / slope if slope > 0 else sizes[-1] / med[-1]
        latency = max(0.0, float(intercept))
        # the executor keeps io_concurrency reads in flight: that is the depth the device sees (a fit
        # on a burst's makespan could not tell 1 from 2 here: they differ by a few latencies)
        qd = self.io_concurrency
        return {"read_bandwidth": bandwidth, "latency": latency, "queue_depth": qd, "mode": mode,
                "table": list(zip(sizes, med)), "burst": burst}

    def _burst(self, store, keys) -> dict:
        """(bytes per read, reads, makespan) of a burst of reads on the executor's I/O workers."""
        n = 16 if self.quick else 48
        spans = []
        with BlobReader(store) as reader, IOWorkers(reader, self.io_concurrency) as io:
            for rep in range(self.repeats):
                futs = [io.submit(keys[(rep * n + i) % len(keys)]) for i in range(n)]
                rs = [f.result() for f in futs]
                spans.append(max(r.t_end for r in rs) - min(r.t_start for r in rs))
        return {"bytes": store.format.expert_bytes, "reads": n, "seconds": _median(spans)}

    # -- decompression -----------------------------------------------------------------
    def decompression(self) -> dict:
        """Raw bytes/s per worker per codec, on the executor's pool with its worker count."""
        enc = ZipEncoder()
        experts = [(i, j, e.weights()) for i, layer in enumerate(self.model.moe_layers)
                   for j, e in enumerate(layer.experts)][: 8 if self.quick else 24]
        stop = threading.Event()
        a = torch.randn(64, self.arch.d_model)
        b = torch.randn(self.arch.d_model, self.arch.d_ff)

        def compute():            # the executor's main thread computes while its workers decompress
            torch.set_num_threads(self.threads)
            while not stop.is_set():
                a @ b
        busy = threading.Thread(target=compute)
        busy.start()
        try:
            return self._decompression(enc, experts)
        finally:
            stop.set()
            busy.join()

    def _decompression(self, enc, experts) -> dict:
        rates = {}
        for codec in CODECS:
            fmt = make_format("zip", self.arch.expert_shapes, codec=codec, exponent_ratio=1.1)
            chunks = [(k, blob) for _, _, w in experts for k, blob in enumerate(enc.encode(w, fmt)) if k > 0]
            per_worker = []
            with DecompressPool(self.decompress_workers) as pool:
                for _ in range(self.repeats):
                    futs = [pool.submit(enc.decompress_part, k, blob, fmt) for k, blob in chunks]
                    rs = [f.result() for f in futs]
                    per_worker += [r.value.size / (r.t_end - r.t_start) for r in rs]
            rates[codec] = len(per_worker) / sum(1.0 / r for r in per_worker)   # bytes over summed time
        return rates

    # -- expert compute ---------------------------------------------------------------------
    def experts(self, bar=None) -> dict:
        """Seconds of ExpertRuntime._compute per format key, level and token count, every cell timed
        interleaved with the others (executor/profile_experts.py)."""
        return expert_tables(self, FORMATS, bar)

    def contention(self, tables: dict, dense: dict, bar=None) -> dict:
        """Per format, how the executor's threads share the cores (compute.measured.contention): least
        squares over the expert calls and dense parts of forced executor runs with loads (batch 1 and
        4, with and without oracle prefetch, so that reads overlap dense parts too) of each one's time
        beyond its table against the time reads / decompressions were in flight during it:
        extra = call or dense + read x (time reading) + decompress x (time decompressing), the fluid
        model the simulator runs (sim/engine.py _main_thread)."""
        out = {}
        for fmt_name, share in (("bf16", 0.3), ("mwq", 0.5), ("zip", 0.5)):
            fmt = self.store(fmt_name).format
            table = tables[measured_key(fmt)]
            rows, extra, calls = [], [], ([], [])
            prompt, output = (8, 12) if self.quick else (16, 24)
            for batch, prefetch, budget in ((1, "none", share), (4, "none", 0.75), (1, "oracle", 0.75),
                                            (4, "oracle", share)):
                for rep in range(1 if self.quick else 2):
                    cfg = dict(requests=batch, prompt=prompt, output=output, budget_share=budget, seed=30 + rep,
                               fmt_name=fmt_name, prefetch=prefetch)
                    tl = self._run(**cfg)
                    reads = [(e.start, e.end) for e in tl.of("io")]
                    decs = [(e.start, e.end) for e in tl.events if e.resource.startswith("decompress")]
                    self.calibration_runs.setdefault(measured_key(fmt), []).append((fmt, cfg, run_times(tl)))
                    for samples, got in zip(self.handoffs, handoff_samples(tl, self.decompress_workers)):
                        samples += got
                    if prefetch == "none":          # no read overlaps a dense part
                        for samples, got in zip(self.dense_excess, dense_excess(tl, self.tokens,
                                                                                 dense["dense"]["decode"])):
                            samples += got
                        for samples, got in zip(calls, call_excess(tl, self.tokens, table)):
                            samples += got
                    prefill = {s["step"] for s in tl.meta["steps"] if s["prefill"]}
                    for e in tl.events:
                        if e.resource == "compute":
                            base, kind = interpolate(self.tokens, table[e.level], e.tokens), (1.0, 0.0)
                        elif e.resource == "dense" and e.step not in prefill and e.step > 1:
                            base = interpolate(self.tokens, dense["dense"]["decode"], e.tokens)
                            kind = (0.0, 1.0)
                        else:
                            continue
                        rows.append([*kind, overlap(e.start, e.end, reads),
                                     overlap(e.start, e.end, decs)])
                        extra.append(e.end - e.start - base)
                if bar is not None:
                    bar.update(1)
            call, dense_x, read, dec = _robust_fit(np.array(rows, float), np.array(extra))
            out[measured_key(fmt)] = {"read": read, "decompress": dec, "call": max(0.0, call),
                                      "dense": max(0.0, dense_x), "stall": 0.0, "samples": len(extra),
                                      "after_load": after_loads(*calls), "after_load_samples": [len(c) for c in calls]}
        return out

    # -- dense, steps and the decision path: real forced runs ---------------------------
    def _run(self, requests: int, prompt: int, output: int, budget_share: float = 1.0, seed: int = 0,
             fmt_name: str = "bf16", prefetch: str = "none"):
        store = self.store(fmt_name)
        model, _, _ = load_trained(self.model_dir)
        strip_experts(model)
        trace = synthetic_trace(self.arch, requests=requests, prompt_len=prompt, output_len=output, seed=seed)
        w = Workload(self.arch, trace, store.format, batch=requests)
        total = self.arch.layers * self.arch.experts * store.format.level_bytes(store.format.levels - 1)
        budget = int(total * budget_share)
        pol = build_policies(w, budget, cache="lru", prefetch=prefetch)
        throttle = StorageThrottle.from_profile(self.throttled) if self.throttled else None
        return execute(model, store, pol, torch.zeros(requests, prompt, dtype=torch.long), 0, trace=trace,
                       batch=requests, quiet=True, throttle=throttle, torch_device=self.torch_device,
                       torch_threads=self.threads).timeline

    def dense_and_steps(self, bar=None) -> dict:
        dense = {"prefill": [], "decode": []}
        step = {"prefill": [], "decode": []}
        decisions = []                                  # (loads issued, gap to a first compute that hit)
        call_gaps = []                                  # between consecutive expert calls, nothing loading
        reps = 2 if self.quick else 3
        for n in self.tokens:
            pre_d, dec_d, pre_s, dec_s = [], [], [], []
            for rep in range(reps):
                # prefill of n tokens (batch 1), then decode steps of batch n
                for tl, batch in ((self._run(1, n, 3, seed=rep), 1), (self._run(n, 2, 5 if self.quick else 8,
                                                                                  seed=rep), n)):
                    info = {s["step"]: s for s in tl.meta["steps"]}
                    spans = step_spans(tl)
                    for e in tl.of("dense"):
                        (pre_d if info[e.step]["prefill"] else dec_d).append((e.step, e.end - e.start, batch))
                    for s in sorted(spans)[:-1]:
                        gap = spans[s + 1][0] - spans[s][1]
                        (pre_s if info[s]["prefill"] else dec_s).append((gap, batch))
                    decisions += decision_gaps(tl)
                    call_gaps += compute_gaps(tl)
            # prefill of batch 1 x n tokens; decode at batch n (skip the cold first decode step)
            pre_dense = [t for _, t, b in pre_d if b == 1]
            dec_dense = [t for s, t, b in dec_d if b == n and s > 1]
            dense["prefill"].append(_mean(pre_dense))
            dense["decode"].append(_mean(dec_dense))
            step["prefill"].append(_mean([g for g, b in pre_s if b == 1]))
            step["decode"].append(_mean([g for g, b in dec_s if b == n]))
            if bar is not None:
                bar.update(1)
        a, b = decision_line(decisions) or (float(np.median([g for _, g in decisions])), 0.0)
        return {"dense": dense, "step": step, "compute_gap": _mean(call_gaps) if call_gaps else 0.0,
                "decision_overhead": max(0.0, float(a)),
                "load_overhead": max(0.0, float(b)), "decision_points": len(decisions)}

    def decision_runs(self, bar=None) -> list:
        """Decision points with loads and a hit computed first: runs under a quarter budget."""
        out = []
        for rep in range(2 if self.quick else 4):
            out += decision_gaps(self._run(1, 8, 24, budget_share=0.3, seed=10 + rep))
            out += decision_gaps(self._run(4, 8, 12, budget_share=0.5, seed=20 + rep))
            if bar is not None:
                bar.update(1)
        return out

    # -- roofline figures ------------------------------------------------------------------
    def roofline(self) -> dict:
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        dev = torch.device(self.torch_device)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        try:
            a = torch.empty(32 * 2 ** 20 // 4, device=dev)
            b = torch.empty_like(a)
            copy = best_time(lambda: (b.copy_(a), sync()), self.repeats)
            m = torch.randn(512, 512, device=dev)
            mm = best_time(lambda: (m @ m, sync()), self.repeats)
            x = torch.zeros(1, device=dev)
            call = best_time(lambda: (x.add_(0), sync()), self.repeats * 20)
        finally:
            torch.set_num_threads(saved)
        return {"memory_bandwidth": 2 * a.numel() * 4 / copy, "flops": 2 * 512 ** 3 / mm, "overhead": call}


def _robust_fit(a: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(call, dense, read, decompress) of y ~ a @ coef: least squares with a soft-L1 loss (a stall of
    the host, e.g. another process taking a core, must not drag the fit), the extra costs >= 0 and
    the shares of speed lost within [0, 0.9] each, their sum below 0.95 (the main thread never stops)."""
    from scipy.optimize import least_squares
    fit = least_squares(lambda c: a @ c - y, x0=[0.0, 0.0, 0.1, 0.1], loss="soft_l1", f_scale=50e-6,
                        bounds=([0.0, 0.0, 0.0, 0.0], [np.inf, np.inf, 0.9, 0.9]), x_scale=[1e-5, 1e-5, 0.1, 0.1])
    call, dense, read, dec = (float(c) if a[:, i].any() else 0.0 for i, c in enumerate(fit.x))   # no data: 0
    if read + dec > 0.95:
        read, dec = 0.95 * read / (read + dec), 0.95 * dec / (read + dec)
    return call, dense, read, dec


def measure(model_dir=None, store_root="runs/stores", quick: bool = False, quiet: bool = False,
            io_concurrency: int = 2, decompress_workers: int = 2, throttle: str | None = None,
            torch_device: str = "cpu") -> dict:
    """Every figure the executor measures (the dict profile_yaml writes), contention.read and .stall
    still 0 and no storage.burst.predicted: experiments/calibrate.py measure_host adds them by
    simulation."""
    p = HostProfiler(model_dir, store_root, quick, quiet, io_concurrency, decompress_workers, throttle, torch_device)
    probes: list[dict] = []
    steady_s = STEADY_SECONDS[quick]
    steady = [steadiness(steady_s)]             # whether the host's speed flips (executor/host_probe.py)
    n_expert = sum(1 if f != "mwq" else 3 for f in FORMATS) * len(p.tokens)
    with tqdm(total=3 + n_expert + len(p.tokens) + (2 if quick else 4) + 1 + 12, disable=quiet, desc="profile",
              unit="task") as bar:
        def stage(name: str) -> None:      # the host's speed as each stage begins (executor/host_probe.py)
            bar.set_postfix_str(name)
            probes.append(probe())
        stage("stores")
        for f in FORMATS:
            p.store(f)
        bar.update(1)
        stage("storage")
        storage, _ = p.storage(), bar.update(1)
        stage("decompression")
        rates, _ = p.decompression(), bar.update(1)
        stage("experts")
        experts = p.experts(bar)
        host = host_figures(p, usable_cpus(), FORMATS, CODECS)      # the structural host model's shares
        stage("co-runs")
        host["beside"] = beside_figures(p, FORMATS, CODECS, BESIDE_WINDOW_S[p.quick])
        stage("dense, steps, decisions")
        dense = p.dense_and_steps(bar)
        stage("contention")
        contention = p.contention(experts, dense, bar)
        stage("decisions")
        extra = p.decision_runs(bar)
        roof, _ = p.roofline(), bar.update(1)
        probes.append(probe())
        steady.append(steadiness(steady_s))
    # refit the decision path with the loaded runs' points too
    line = decision_line(extra) if extra else None
    if line:
        dense["decision_overhead"], dense["load_overhead"] = max(0.0, line[0]), max(0.0, line[1])
        dense["decision_points"] = len(extra)
    m = {"model": p.name, "tokens": list(p.tokens), "storage": storage, "decompress": rates,
         "contention": contention, "host_figures": host, "decompress_workers": decompress_workers, "experts": experts, "roofline": roof,
         **dense, "torch_threads": p.threads, "throttle": throttle, "torch_device": torch_device,
         "wake": _median(p.handoffs[0]) if p.handoffs[0] else 0.0, "wakes": len(p.handoffs[0]),
         "handoff": _median(p.handoffs[1]) if p.handoffs[1] else 0.0, "handoff_samples": len(p.handoffs[1]),
         "dense_after_loads": after_loads(*p.dense_excess), "dense_after_samples": [len(x) for x in p.dense_excess],
         "probes": probes, "steadiness": steady}
    # contention.read and .stall are found by simulation (experiments/calibrate.py) from these runs
    m["calibration"] = {"arch": p.arch, "storage": p.throttled, "runs": p.calibration_runs,
                        "model_dir": str(p.model_dir), "stores": {k: str(st.path) for k, st in p.stores.items()}}
    return m


def after_loads(after: list[float], clean: list[float]) -> float:
    """An operation's extra after loads (a dense part after a decision point that loaded, a call on an
    expert just loaded): its mean excess over its table then less its mean otherwise in the same runs
    (what drifts with the run cancels), at least 0; with under 10 of the others, the excess alone."""
    if not after:
        return 0.0
    base = _mean(clean) if len(clean) >= 10 else 0.0
    return max(0.0, _mean(after) - base)


def host_torch_threads(torch_device: str = "cpu") -> int:
    """default_torch_threads's rule (all cores but one) on the cores this process may use (`--cores N`)."""
    return max(1, usable_cpus() - 1) if torch_device == "cpu" else default_torch_threads(torch_device)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_name() -> str:
    return socket.gethostname() or platform.node() or "host"


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 10 ** 9


def profile_yaml(m: dict, command: str) -> str:
    """The profile as YAML text in the shipped schema, every figure with its provenance."""
    date = datetime.date.today().isoformat()
    src = f"measured: {date} on {host_name()}, torch {torch.__version__}, `{command}`"
    mem = memory_bytes()
    s, r = m["storage"], m["roofline"]
    table = ", ".join(f"{format_size(b)} {t * 1e6:.0f}us" for b, t in s["table"])
    burst = s["burst"]
    lines = [
        f"# {host_name()}: measured by `moelab profile` (executor/profile_host.py) for model {m['model']},",
        f"# torch threads {m['torch_threads']}, {os.cpu_count()} CPUs. Every figure: {src}",
        m.get("provenance", "# cores: not recorded"),   # the cores and the load (experiments/calibrate.py)
        f"name: host-{host_name()}",
        f'description: "{host_name()}: {usable_cpus()} of {os.cpu_count()} CPUs, measured host '
        f'(executor on {m.get("torch_device", "cpu")})'
        + (f"; forced runs with reads throttled to {m['throttle']}" if m.get("throttle") else "") + '"',
        f"memory: {mem}B          # {src} (physical pages)",
        f"expert_budget: {mem // 2}B   # estimate: half of the measured memory",
        "default_storage: disk",
        "storage:",
        "  disk:",
        f'    description: "this host\'s disk, {s["mode"]} reads with checksums (the executor\'s BlobReader)"',
        f"    read_bandwidth: {s['read_bandwidth'] / 1e6:.1f}MB/s   # {src}: least-squares line through median "
        f"single-read times ({table})",
        f"    latency: {_us(s['latency'])}   # {src}: the same line's intercept",
        f"    queue_depth: {s['queue_depth']}   # {src}: the executor's read concurrency; a burst of "
        f"{burst['reads']} {format_size(burst['bytes'])} reads on its I/O workers took {burst['seconds'] * 1e3:.2f} ms"
        + (f", this storage predicts {burst['predicted'] * 1e3:.2f} ms" if "predicted" in burst else ""),
        "compute:",
        f"  memory_bandwidth: {r['memory_bandwidth'] / 1e9:.2f}GB/s   # {src}: 32 MiB tensor copy, best run",
        f"  flops: {r['flops'] / 1e9:.2f}GFLOPS   # {src}: 512x512 float32 matmul, best run",
        f"  overhead: {_us(r['overhead'])}   # {src}: an empty torch call, best run",
        "  measured:",
        f"    model: {m['model']}   # the model these tables time",
        f"    tokens: {list(m['tokens'])}",
        f"    experts:   # {src}: ExpertRuntime._compute, mean over the model's experts (the simulator adds them up)",
    ]
    for key, rows in m["experts"].items():
        lines.append(f"      {key}:")
        for row in rows:
            lines.append(f"        - [{', '.join(_us(t) for t in row)}]")
    lines.append(f"    dense:   # {src}: forced executor runs, mean dense event (prefill batch 1; decode batch n)")
    for phase in ("prefill", "decode"):
        lines.append(f"      {phase}: [{', '.join(_us(t) for t in m['dense'][phase])}]")
    lines.append(f"    step:   # {src}: forced executor runs, mean gap between steps")
    for phase in ("prefill", "decode"):
        lines.append(f"      {phase}: [{', '.join(_us(t) for t in m['step'][phase])}]")
    lines += [
        f"    decision_overhead: {_us(m['decision_overhead'])}   # {src}: dense end -> first compute at "
        f"{m['decision_points']} decision points whose first compute hit, line a + b x loads: a",
        f"    load_overhead: {_us(m['load_overhead'])}   # {src}: the same line: b",
        f"    compute_gap: {_us(m['compute_gap'])}   # {src}: forced executor runs, mean gap between consecutive "
        f"expert calls of a layer that loaded nothing",
        *handoff_lines(m, src),
        f"    contention:   # {src}: forced executor runs with loads per format, least squares of each expert "
        f"call's and dense part's time beyond its table on the time reads / decompressions were in flight in it",
    ]
    for key, c in m["contention"].items():
        lines.append(f"      {key}: {{read: {c['read']:.3f}, decompress: {c['decompress']:.3f}, "
                     f"call: {_us(c['call'])}, dense: {_us(c['dense'])}, stall: {c['stall']:.2f}}}   "
                     f"# {c['samples']} samples; read, stall: calibrated by simulation")
    lines += host_lines(m["host_figures"], src) if m.get("host_figures") else []
    lines += beside_lines(m["host_figures"]["beside"], src) if (m.get("host_figures") or {}).get("beside") else []
    lines += [
        "decompress:",
        f"  workers: {m['decompress_workers']}   # the executor's decompression workers (execute "
        f"--decompress-workers default)",
        "  throughput:",
    ]
    for codec, rate in m["decompress"].items():
        lines.append(f"    {codec}: {rate / 1e6:.1f}MB/s   # {src}: exponent chunks of the model's experts on "
                     f"{m['decompress_workers']} workers while the main thread computes, raw bytes over task time")
    return "\n".join(lines) + "\n"


def handoff_lines(m: dict, src: str) -> list:
    """The profile's hand-off and after-load figures (executor/profile_timeline.py), as YAML lines under `measured:`."""
    return [
        f"    wake: {_us(m['wake'])}   # {src}: the contention runs, median of a part's ready (read or "
        f"decompression end) -> the start of the expert call that waited for it ({m['wakes']} calls)",
        f"    handoff: {_us(m['handoff'])}   # {src}: the contention runs, median of a read's end -> its "
        f"decompression's start on an idle worker ({m['handoff_samples']} decompressions)",
        f"    dense_after_loads: {_us(m['dense_after_loads'])}   # {src}: the contention runs without "
        f"prefetch, mean decode dense part beyond its table after a decision point that loaded less the same after "
        f"one that hit ({_counts(m['dense_after_samples'])} parts)",
        f"    call_after_load:   # {src}: the contention runs without prefetch, mean expert call beyond its table "
        f"when its expert was loaded at its decision point less the same when it was resident (calls no read or "
        f"decompression overlapped)",
        *(f"      {key}: {_us(c['after_load'])}   # {_counts(c['after_load_samples'])} calls"
          for key, c in m["contention"].items()),
    ]


def write_profile(path, m: dict, command: str):
    """Write the profile atomically and load it back with the strict loader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, profile_yaml(m, command))
    return load_device(str(path))


def host_storage(profile) -> StorageProfile:
    return profile.storage_option(None)
