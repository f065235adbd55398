"""The executor with a host RAM level and CPU placement (issue 26, item 4): it carries a tiered
Decision out (Decision.tiers, policies/tiers.py) as the simulator models it (sim/tiers.py).

- Host RAM is a real pool of part buffers (an ExpertMemory under the host level's budget): the host
  level's admissions and evictions are the Decision's, never re-decided here. A part read from
  storage (and decompressed, if its format says so) lands in a buffer this level owns: a pinned
  tensor (`pin_memory()`) when the torch device is CUDA, else a plain copy; the read buffer goes
  back to the reader's pool at once. A prefetch the host level did not keep passes through such a
  buffer without being counted there (the simulator's "passes through RAM without staying").
- The link: one thread copying parts up to the accelerator's expert pool, FIFO in the order parts
  reach host RAM (a part found there is submitted at once). On CUDA each copy is issued on its own
  `torch.cuda.Stream` with non_blocking=True from the pinned buffer, and an event recorded after
  it; the link thread waits on the event (for the copy's real end on the timeline), the compute
  stream waits on it before decoding. On a CPU-only host the copy is a plain copy into a buffer of
  the expert pool: the two levels are the same memory, so what this measures is the structure's
  own overhead (an extra memcpy per load), and the decisions are the two-level ones.
- CPU-placed experts compute on a thread pool (concurrent.futures, one worker: the simulator's one
  CPU server, each call using torch's intra-op threads) from the host level's buffers, each once
  its parts are in host RAM (in order of readiness); their outputs, weighted by the gates, are
  moved to the accelerator and added to the layer's output after its own computes (in submission
  order: a deterministic sum).
- With a throttle (a tiered profile: --throttle rtx-3060-laptop-6gb) each copy takes at least the
  profile's link time (a StorageThrottle on the link's figures); CPU computes run at this host's
  real speed (no CPU throttle).

The timeline gets the simulator's lanes: `link:<lower>><upper>` (kind copy), `cpu` (kind expert),
`cache:host-ram` (the host level's admit / prefetch / evict), reads on `io`.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from devices.units import ConfigError
from executor.io import StorageThrottle, _FifoPool
from executor.model import accumulate_expert
from executor.runtime import ExpertMemory, ExpertRuntime
from policies import Key
from policies.bundle import PLAN
from policies.tiers import STORAGE
from timeline.tiers import HOST_CACHE, tier_figures


@dataclass(frozen=True)
class Copied:
    key: Key
    tensor: torch.Tensor      # the part's bytes in the accelerator's expert pool
    event: object             # torch.cuda.Event the compute waits on (None on CPU)
    t_start: float
    t_end: float


class LinkWorkers(_FifoPool):
    """One thread copying host buffers up the link, in submission order."""

    def __init__(self, device: torch.device, throttle: StorageThrottle | None = None):
        self.device, self.throttle = device, throttle
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        super().__init__(1, "link")

    def submit(self, key: Key, src: torch.Tensor) -> Future:
        return self._put(key, src)

    def _run(self, worker: int, key: Key, src: torch.Tensor) -> Copied:
        t_start = time.perf_counter()
        done = self.throttle.reserve(t_start, src.numel()) if self.throttle else None
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):     # allocated on the copy stream: the compute records its use
                dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            event.synchronize()                  # this thread waits for the DMA; the main thread does not
        else:
            dst = src.clone()
        if done is not None:
            wait = done - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        return Copied(key, dst, event, t_start, time.perf_counter())


def link_throttle(link) -> StorageThrottle:
    """A virtual clock holding each copy to a profile link's latency, bandwidth and queue depth."""
    return StorageThrottle(link.bandwidth, link.latency, link.queue_depth)


def owned(data, pin: bool, copy: bool) -> torch.Tensor:
    """A part's resident bytes as a uint8 tensor the host level owns: pinned (a copy) for CUDA, else a
    copy when `data` lives in a recycled read buffer, else `data` itself (a decompressed array)."""
    t = torch.from_numpy(data.view(np.uint8).reshape(-1)) if isinstance(data, np.ndarray) else \
        torch.frombuffer(data, dtype=torch.uint8)
    if pin:
        return t.pin_memory()
    return t.clone() if copy else t


class TieredRuntime(ExpertRuntime):
    """An ExpertRuntime whose bundle has a host level (Policies.lower) and maybe a placement policy."""

    def __init__(self, *args, link, link_throttle: StorageThrottle | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.p.lower is None:
            raise ValueError("TieredRuntime needs a bundle with a host level (policies/tiers.py attach_tiers)")
        if self.device.type == "cuda" and not hasattr(self.encoder, "decode_tensor"):
            raise ConfigError(f"a host level on CUDA copies parts to the GPU and decodes them there: format "
                              f"{self.fmt.name} decodes on the host only; use --format bf16 or --torch-device cpu")
        self.host = ExpertMemory(self.p.lower.cache.capacity)
        self.host_loading: dict[Key, Future] = {}    # host-admitted part -> Future of its host tensor
        self.pin = self.device.type == "cuda"
        self.link = LinkWorkers(self.device, link_throttle)
        self.link_resource = link.resource
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="cpu-expert")
        self.copy_events: dict[Key, object] = {}
        self.cpu_ready: dict[Key, Future] = {}
        self.host_hits = self.host_accesses = 0

    def now(self) -> float:
        """The compute stream's time: unlike the one-level runtime, never waits for the copy stream."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - self.t0

    # -- a decision point ---------------------------------------------------------
    def _issue(self, d, now: float, s: int) -> None:
        """The host level's records, the accelerator's admissions, then the reads (plan, CPU parts,
        prefetches: each part once) and the copies of the accelerator's loads as their parts land."""
        t, sizes = d.tiers, self.fmt.resident_bytes
        self.host_hits += t.hits
        self.host_accesses += t.accesses
        for key, kind, evicted in t.records:
            for k in evicted:
                self._host_evict(k, now, s)
            self.host.reserve(key, sizes[key.part])
            self._add(HOST_CACHE, kind, now, now, key.layer, key.expert, key.part, sizes[key.part], s)
        for item, kind, evicted in d.loads:
            for k in evicted:
                self._evict(k, now, s)
            self.memory.reserve(item.key, item.resident_bytes)
            self._add("cache", kind, now, now, item.key.layer, item.key.expert, item.key.part,
                      item.resident_bytes, s)
        srcs = list(zip(d.loads, t.sources))
        order = [(ld.item.key, src) for ld, src in srcs if ld.kind == PLAN] + list(t.cpu_parts) + \
                [(ld.item.key, src) for ld, src in srcs if ld.kind != PLAN]
        here: dict[Key, Future] = {}
        for key, src in order:
            if key in here:
                continue
            if src == STORAGE:
                kept = key in self.host.reserved
                here[key] = self._load(key, s, partial(self._to_host, kept=kept))
                if kept:
                    self.host_loading[key] = here[key]
            else:
                here[key] = self._host_data(key)
        for item, _, _ in d.loads:
            self.loading[item.key] = self._copy(item.key, here[item.key], s)
        self.cpu_ready = {key: here[key] for key, _ in t.cpu_parts}

    def _to_host(self, key: Key, data, buf, kept: bool) -> torch.Tensor:
        t = owned(data, self.pin, copy=buf is not None)
        if buf is not None:
            self.memory.pool.give(buf)
        if kept:
            self.host.fill(key, t)
        return t

    def _host_data(self, key: Key) -> Future:
        """A part in host RAM, or still on its way there (an earlier decision point's read)."""
        t = self.host.buffers.get(key)
        if t is None:
            return self.host_loading[key]
        f: Future = Future()
        f.set_result(t)
        return f

    def _copy(self, key: Key, landed: Future, s: int) -> Future:
        """Copy a part up the link once it is in host RAM; resolves to the key once it is resident above."""
        ready: Future = Future()

        def copied(f: Future) -> None:
            try:
                r = f.result()
                self._add(self.link_resource, "copy", r.t_start - self.t0, r.t_end - self.t0, key.layer,
                          key.expert, key.part, self.fmt.resident_bytes[key.part], s)
                if r.event is not None:
                    self.copy_events[key] = r.event
                self.memory.fill(key, r.tensor)
                ready.set_result(key)
            except BaseException as e:
                ready.set_exception(e)

        def up(f: Future) -> None:
            try:
                self.link.submit(key, f.result()).add_done_callback(copied)
            except BaseException as e:
                ready.set_exception(e)

        landed.add_done_callback(up)
        return ready

    def _weights(self, layer: int, expert: int, level: int) -> dict:
        keys = [Key(layer, expert, q) for q in self.fmt.level_parts[level]]
        bufs = [self.memory.buffers[k] for k in keys]
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for k, b in zip(keys, bufs):
                event = self.copy_events.get(k)
                if event is not None:
                    stream.wait_event(event)
                b.record_stream(stream)        # allocated on the copy stream, used on this one
            decoded = self.encoder.decode_tensor(bufs, self.fmt, level)
        else:
            decoded = self.encoder.decode([b.numpy() for b in bufs], self.fmt, level)
        return {k: v.to(self.device, self.dtype) for k, v in decoded.items()}

    def _evict(self, key: Key, now: float, s: int) -> None:
        super()._evict(key, now, s)
        self.copy_events.pop(key, None)

    def _host_evict(self, key: Key, now: float, s: int) -> None:
        self.host.release(key)                 # a read still in flight is dropped when it lands
        self.host_loading.pop(key, None)
        self._add(HOST_CACHE, "evict", now, now, key.layer, key.expert, key.part, self.fmt.resident_bytes[key.part], s)

    def _finish(self, layer: int, end: float, s: int) -> None:
        super()._finish(layer, end, s)
        for k in self.p.lower.finished:
            self._host_evict(k, end, s)

    # -- the CPU's share -----------------------------------------------------------
    def _begin_side(self, d, hidden, ids, gates):
        """Each CPU-placed (expert, level) to the CPU pool once its parts are in host RAM."""
        t = d.tiers
        if not t.cpu:
            return None
        x, ids, gates = hidden.to("cpu"), ids.to("cpu"), gates.to("cpu")
        parts = self.fmt.level_parts
        return [self._when_ready([self.cpu_ready[Key(d.layer, e, q)] for q in parts[lvl]],
                                 partial(self._cpu_compute, d.layer, e, lvl, rows, x, ids, gates, self.step.index))
                for (e, lvl), rows in t.cpu_rows.items()]

    def _when_ready(self, parts: list[Future], fn) -> Future:
        """fn(part tensors) on the CPU pool once every part is ready; resolves to its result."""
        out: Future = Future()
        left, lock = [len(parts)], threading.Lock()

        def ran(f: Future) -> None:
            try:
                out.set_result(f.result())
            except BaseException as e:
                out.set_exception(e)

        def one(_f: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    self.cpu.submit(fn, [p.result() for p in parts]).add_done_callback(ran)
                except BaseException as e:
                    out.set_exception(e)

        for p in parts:
            p.add_done_callback(one)
        return out

    def _cpu_compute(self, layer, expert, level, rows, x, ids, gates, s, parts) -> torch.Tensor:
        start = time.perf_counter() - self.t0
        weights = {k: v.to(x.dtype) for k, v in
                   self.encoder.decode([p.numpy() for p in parts], self.fmt, level).items()}
        y = accumulate_expert(torch.zeros_like(x), x, ids, gates, expert, weights, self.activation,
                              rows=torch.tensor(rows))
        self._add("cpu", "expert", start, time.perf_counter() - self.t0, layer, expert, level,
                  self.fmt.level_bytes(level), s, len(rows))
        return y

    def _join_side(self, out: torch.Tensor, side: list[Future]) -> None:
        for f in side:                         # re-raises a failed read or compute
            out += f.result().to(out.device)

    def close(self) -> None:
        self.link.close()
        self.cpu.shutdown()
        lower, meta = self.p.lower, self.timeline.meta
        meta["tiers"] = {"levels": [lower.name], "link": self.link_resource, "host_budget_bytes": lower.cache.capacity,
                         "host_cache": lower.cache.name,
                         "placement": self.p.placement.name if self.p.placement else "gpu-only"}
        meta["tier_figures"] = tier_figures(self.timeline.events, self.host_hits, self.host_accesses, self.host.peak)
        meta["host_pinned"] = self.pin
