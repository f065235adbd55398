"""The executor's runtime: the model's experts come from an on-disk store, on demand,
under the same policy objects the simulator drives (DESIGN.md).

`ExpertRuntime` is the model's expert_fn. At each MoE layer it
  1. turns the router's output into a Routing and asks allocator -> scheduler -> cache,
     exactly as sim/engine.py does (same calls, same order, so same decisions);
  2. reserves the admitted bytes in the expert memory pool (never above the budget),
     drops what the cache evicted;
  3. submits the plan to the I/O workers in order; parts that carry a decompression task
     go on to the decompression pool when their read completes;
  4. asks the prefetcher (if any) for the next decision point's keys and submits the ones
     the cache admits behind the plan;
  5. computes each (expert, level) as soon as the parts it needs are resident (read here or
     prefetched earlier), hits first;
  6. tells the cache the layer is over (tiering may drop parts) and frees them.
Everything lands on a Timeline with the simulator's vocabulary; times are seconds since
the run started (time.perf_counter).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from executor.io import BufferPool, DecompressPool, IOWorkers
from executor.model import accumulate_expert
from executor.store import Store, get_encoder
from policies import Key, Routing, needed_keys
from sim.engine import Policies
from sim.timeline import Event, Timeline


class ExpertMemory:
    """The expert memory pool: resident part buffers and the bytes reserved for loads in
    flight. Tracked bytes never exceed the budget (checked on every reservation)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.reserved: dict[Key, int] = {}
        self.buffers: dict[Key, object] = {}
        self.owned: dict[Key, memoryview] = {}   # key -> the pooled read buffer its data is in
        self.pool = BufferPool()
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def reserve(self, key: Key, nbytes: int) -> None:
        if self.used + nbytes > self.budget:
            raise AssertionError(f"expert memory over budget: {self.used} + {nbytes} > {self.budget} B ({key})")
        with self._lock:
            self.reserved[key] = nbytes
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def fill(self, key: Key, data, buf=None) -> None:
        """A read (or decompression) landed; called on worker threads. `buf`: the pooled read
        buffer `data` lives in, given back to the pool when the part leaves."""
        with self._lock:
            if key in self.reserved:        # not evicted while in flight
                self.buffers[key] = data
                if buf is not None:
                    self.owned[key] = buf
                return
        if buf is not None:
            self.pool.give(buf)

    def release(self, key: Key) -> None:
        with self._lock:
            self.used -= self.reserved.pop(key)
            self.buffers.pop(key, None)
            buf = self.owned.pop(key, None)
        if buf is not None:
            self.pool.give(buf)


@dataclass
class StepInfo:
    index: int
    group: int
    prefill: bool
    tokens: int
    new_tokens: int


class ExpertRuntime:
    def __init__(self, store: Store, policies: Policies, *, activation: str = "silu",
                 torch_device: str = "cpu", dtype: torch.dtype = torch.float32, io: IOWorkers,
                 decompress: DecompressPool | None = None, meta: dict | None = None):
        self.store, self.p = store, policies
        self.fmt = store.format
        self.encoder = get_encoder(self.fmt.name)
        self.activation, self.device, self.dtype = activation, torch.device(torch_device), dtype
        self.io, self.decompress = io, decompress
        self.memory = ExpertMemory(policies.cache.capacity)
        self.timeline = Timeline(meta=dict(meta or {}, engine="executor", steps=[],
                                           level_parts=list(self.fmt.level_parts)))
        self.t0 = time.perf_counter()
        self.step: StepInfo | None = None
        self.last = 0.0                     # when the previous layer's experts finished
        self.loading: dict[Key, Future] = {}  # admitted key -> resolves once it is resident

    # -- clock and steps ---------------------------------------------------------
    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0

    def begin_step(self, step: StepInfo) -> None:
        self.step = step
        self.timeline.meta["steps"].append(dict(step=step.index, group=step.group, prefill=step.prefill,
                                                tokens=step.tokens, new_tokens=step.new_tokens))
        self.last = self.now()

    def _add(self, *fields) -> None:
        self.timeline.events.append(Event(*fields))

    # -- the expert_fn -------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        p, fmt, s = self.p, self.fmt, self.step.index
        now = self.now()
        self._add("dense", "dense", self.last, now, layer, -1, -1, 0, s, hidden.shape[0])
        demand = p.allocator.allocate(layer, Routing(ids.cpu().numpy(), gates.float().cpu().numpy()))
        plan = p.scheduler.order(layer, demand, p.cache.resident(layer))
        keys = needed_keys(demand, fmt)
        p.cache.begin_layer(layer, keys)        # hits are derived by the metrics, as for the simulator
        for item in plan:
            for k in p.cache.admit(item):
                self._evict(k, now, s)
            self._admit("admit", item, now, s)
        if p.prefetcher is not None:            # behind the plan on the storage queue, as in the simulator
            for item, evicted in p.cache.prefetch(p.prefetcher.after_layer(layer, demand)):
                for k in evicted:
                    self._evict(k, now, s)
                self._admit("prefetch", item, now, s)

        # (expert, level) -> token rows; computed once every part it needs is resident
        rows: dict[tuple[int, int], list[int]] = {}
        for t, token in enumerate(demand.per_token):
            for pair in token:
                rows.setdefault(pair, []).append(t)
        resident = self.memory.buffers
        waiting = {pair: {k for k in (Key(layer, pair[0], q) for q in range(fmt.parts_for_level(pair[1])))
                          if k not in resident} for pair in rows}
        out = torch.zeros_like(hidden)
        for pair in [pr for pr, need in waiting.items() if not need]:      # hits first, router order
            self._compute(out, hidden, ids, gates, layer, pair, rows.pop(pair))
            del waiting[pair]
        done: queue.SimpleQueue = queue.SimpleQueue()
        for key in set().union(*waiting.values()):     # loads of this plan, or prefetched earlier
            self.loading[key].add_done_callback(done.put)
        while waiting:
            key = done.get().result()                  # re-raises a failed read or decode
            for pair, need in list(waiting.items()):
                need.discard(key)
                if not need:
                    self._compute(out, hidden, ids, gates, layer, pair, rows.pop(pair))
                    del waiting[pair]
        end = self.now()
        for k in p.cache.end_layer(layer):
            self._evict(k, end, s)
        self.last = self.now()
        return out

    def _admit(self, kind: str, item, now: float, s: int) -> None:
        """Reserve the item's bytes and send it to storage at once, in decision order: the
        read overlaps the remaining decisions and computes."""
        key = item.key
        self.memory.reserve(key, item.resident_bytes)
        self._add("cache", kind, now, now, key.layer, key.expert, key.part, item.resident_bytes, s)
        self.loading[key] = self._load(key, s)

    def _evict(self, key: Key, now: float, s: int) -> None:
        self.memory.release(key)                # a read still in flight is dropped when it lands
        self.loading.pop(key, None)
        self._add("cache", "evict", now, now, key.layer, key.expert, key.part, self.fmt.resident_bytes[key.part], s)

    def _load(self, key: Key, s: int) -> Future:
        """Read one part, decompress it if its format says so, and put it in the memory pool.
        The returned future resolves to the key once the part is resident. Runs on the
        worker threads' callbacks, so the main thread only waits for what it computes."""
        ready: Future = Future()
        fmt, t0, memory = self.fmt, self.t0, self.memory
        buf = memory.pool.take(self.io.reader.buffer_size(key))

        def decompressed(f: Future) -> None:
            try:
                r = f.result()
                memory.pool.give(buf)               # the decompressed part is a new array
                self._add(f"decompress[{r.worker}]", "decompress", r.t_start - t0, r.t_end - t0, key.layer,
                          key.expert, key.part, fmt.decompress_bytes[key.part], s)
                memory.fill(key, r.value)
                ready.set_result(key)
            except BaseException as e:          # the computing thread sees it on `ready`
                ready.set_exception(e)

        def read(f: Future) -> None:
            try:
                r = f.result()
                self._add("io", "load", r.t_start - t0, r.t_end - t0, key.layer, key.expert, key.part,
                          len(r.data), s)
                if fmt.decompress_bytes[key.part]:
                    self.decompress.submit(self.encoder.decompress_part, key.part, r.data, fmt,
                                           tag=key).add_done_callback(decompressed)
                else:
                    memory.fill(key, r.data, buf)
                    ready.set_result(key)
            except BaseException as e:
                ready.set_exception(e)

        self.io.submit(key, buf).add_done_callback(read)
        return ready

    def _compute(self, out, hidden, ids, gates, layer, pair, token_rows) -> None:
        expert, level = pair
        start = self.now()
        parts = [self.memory.buffers[Key(layer, expert, q)] for q in range(self.fmt.parts_for_level(level))]
        weights = {k: v.to(self.device, self.dtype, non_blocking=True)
                   for k, v in self.encoder.decode(parts, self.fmt, level).items()}
        accumulate_expert(out, hidden, ids, gates, expert, weights, self.activation,
                          rows=torch.tensor(token_rows, device=hidden.device))
        self._add("compute", "expert", start, self.now(), layer, expert, level, self.fmt.level_bytes(level),
                  self.step.index, len(token_rows))
