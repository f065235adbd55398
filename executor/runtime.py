"""The executor's runtime: the model's experts come from an on-disk store, on demand,
under the same policy objects the simulator drives (DESIGN.md).

`ExpertRuntime` is the model's expert_fn. At each MoE layer it
  1. turns the router's output into a Routing and asks the decision point
     (`Policies.decide`, policies/bundle.py: the very call the simulator makes);
  2. carries the Decision out: for each load, in order, drops what its admission evicted,
     reserves its bytes in the expert memory pool (never above the budget) and sends it to
     the I/O workers; parts that carry a decompression task go on to the decompression pool
     when their read completes (in the scheduler's order, if it sets one);
  3. computes each (expert, level) as soon as the parts it needs are resident (read here or
     prefetched earlier), hits first, or in the scheduler's compute order if it sets one;
  4. ends the layer (`Policies.finish`: tiering may drop parts) and frees what it dropped.
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

from executor.encoders import get_encoder
from executor.io import BufferPool, DecompressPool, IOWorkers
from executor.model import accumulate_expert
from executor.store import Store
from policies import Key, Policies, Routing
from timeline.events import Event, Timeline


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
                 decompress: DecompressPool | None = None, meta: dict | None = None, level_fn=None,
                 predict_fn=None):
        """level_fn(layer, hidden [tokens, d], ids [tokens, k], gates [tokens, k]) -> uint8 numpy
        levels [tokens, k]: a bit-width router run on the real hidden state (D²MoE's dual
        routing); its levels reach the allocator as Routing.levels (the trace-levels allocator).
        predict_fn(layer, hidden, ids, gates) -> (ids [tokens, P], probabilities [tokens, P]) numpy:
        the next layer's router on this hidden state (gate lookahead); reaches the prefetcher as
        Routing.predicted."""
        self.store, self.p = store, policies
        self.fmt = store.format
        self.encoder = get_encoder(self.fmt.name)
        self.activation, self.device, self.dtype = activation, torch.device(torch_device), dtype
        self.io, self.decompress = io, decompress
        self.memory = ExpertMemory(policies.cache.capacity)
        self.timeline = Timeline(meta=dict(meta or {}, engine="executor", steps=[],
                                           level_parts=[list(p) for p in self.fmt.level_parts]))
        self.t0 = time.perf_counter()
        self.step: StepInfo | None = None
        self.last = 0.0                     # when the previous layer's experts finished
        self.loading: dict[Key, Future] = {}  # admitted key -> resolves once it is resident
        self.levels = None                  # forced levels of this step [tokens, layers, k], from a trace
        self.level_fn = level_fn
        self.predicted = None               # forced predictions of this step (ids, probs) [tokens, layers, P]
        self.predict_fn = predict_fn
        self.sequencer = _Sequencer(None)
        self.group_logits: list[torch.Tensor] = []   # each group's last step's logits (executor/execute.py)

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
        for k in self.p.begin_step(step.index):      # the shared KV mode: the expert cache yields
            self._evict(k, self.last, step.index)

    def _add(self, *fields) -> None:
        self.timeline.events.append(Event(*fields))

    # -- the expert_fn -------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        s = self.step.index
        now = self.now()
        self._add("dense", "dense", self.last, now, layer, -1, -1, 0, s, hidden.shape[0])
        if self.levels is not None:             # forced from a trace
            levels = self.levels[:, layer]
        elif self.level_fn is not None:         # a bit-width router's choice, from the hidden state
            levels = self.level_fn(layer, hidden, ids, gates)
        else:
            levels = None
        if self.predicted is not None:          # recorded with the trace
            predicted = (self.predicted[0][:, layer], self.predicted[1][:, layer])
        else:
            predicted = self.predict_fn(layer, hidden, ids, gates) if self.predict_fn is not None else None
        d = self.p.decide(layer, Routing(ids.cpu().numpy(), gates.float().cpu().numpy(), levels, predicted))
        self.sequencer = _Sequencer(d.decompress_order)
        self._issue(d, now, s)
        side = self._begin_side(d, hidden, ids, gates)      # a second compute place (executor/tiers.py)
        out = self._accelerator(d, layer, hidden, ids, gates)
        if side is not None:
            self._join_side(out, side)
        end = self.now()
        self._finish(layer, end, s)
        self.last = self.now()
        return out

    def _issue(self, d, now: float, s: int) -> None:
        """Carry the decision's loads out, in storage order: plan, then prefetches."""
        for item, kind, evicted in d.loads:
            for k in evicted:
                self._evict(k, now, s)
            self._admit(kind, item, now, s)

    def _begin_side(self, d, hidden, ids, gates):
        """One level: every expert computes here (executor/tiers.py adds the CPU's share)."""
        return None

    def _join_side(self, out, side) -> None:
        """Add the side's outputs into `out`: called only for a side _begin_side returned (a subclass
        that returns one joins it; one level has none)."""
        raise NotImplementedError

    def _finish(self, layer: int, end: float, s: int) -> None:
        for k in self.p.finish(layer):
            self._evict(k, end, s)

    def close(self) -> None:
        """The run ended: what the runtime adds to the timeline's meta, its pools stopped."""

    def _accelerator(self, d, layer: int, hidden, ids, gates) -> torch.Tensor:
        """Compute each (expert, level) of the decision once every part it needs is resident."""
        fmt = self.fmt
        rows = d.rows()                         # (expert, level) -> token rows
        resident = self.memory.buffers
        waiting = {pair: {k for k in (Key(layer, pair[0], q) for q in fmt.level_parts[pair[1]])
                          if k not in resident} for pair in rows}
        out = torch.zeros_like(hidden)
        if d.compute_order is not None:               # the scheduler's order, each once it is ready
            for pair in d.compute_order:
                for key in waiting.pop(pair):
                    self.loading[key].result()       # re-raises a failed read or decode
                self._compute(out, hidden, ids, gates, layer, pair, rows.pop(pair))
            waiting = {}
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

    def _load(self, key: Key, s: int, fill=None) -> Future:
        """Read one part, decompress it if its format says so, and hand it to `fill(key, data, buf)`
        (default: into the memory pool; `buf`: the pooled read buffer `data` lives in, or None). The
        returned future resolves to what `fill` returns (the key) once the part is resident. Runs on
        the worker threads' callbacks, so the main thread only waits for what it computes."""
        ready: Future = Future()
        fmt, t0, memory, sequencer = self.fmt, self.t0, self.memory, self.sequencer
        fill = fill or self._fill
        buf = memory.pool.take(self.io.reader.buffer_size(key))

        def decompressed(f: Future) -> None:
            try:
                r = f.result()
                memory.pool.give(buf)               # the decompressed part is a new array
                self._add(f"decompress[{r.worker}]", "decompress", r.t_start - t0, r.t_end - t0, key.layer,
                          key.expert, key.part, fmt.decompress_bytes[key.part], s)
                ready.set_result(fill(key, r.value, None))
            except BaseException as e:          # the computing thread sees it on `ready`
                ready.set_exception(e)

        def read(f: Future) -> None:
            try:
                r = f.result()
                self._add("io", "load", r.t_start - t0, r.t_end - t0, key.layer, key.expert, key.part,
                          len(r.data), s)
                if fmt.decompress_bytes[key.part]:
                    sequencer.read_done(key, lambda: self.decompress.submit(
                        self.encoder.decompress_part, key.part, r.data, fmt, tag=key).add_done_callback(decompressed))
                else:
                    ready.set_result(fill(key, r.data, buf))
            except BaseException as e:
                ready.set_exception(e)

        self.io.submit(key, buf).add_done_callback(read)
        return ready

    def _fill(self, key: Key, data, buf) -> Key:
        self.memory.fill(key, data, buf)
        return key

    def _weights(self, layer: int, expert: int, level: int) -> dict:
        """The (expert, level)'s weight matrices on the torch device, decoded from its resident parts."""
        parts = [self.memory.buffers[Key(layer, expert, q)] for q in self.fmt.level_parts[level]]
        return {k: v.to(self.device, self.dtype, non_blocking=True)
                for k, v in self.encoder.decode(parts, self.fmt, level).items()}

    def _compute(self, out, hidden, ids, gates, layer, pair, token_rows) -> None:
        expert, level = pair
        start = self.now()
        weights = self._weights(layer, expert, level)
        accumulate_expert(out, hidden, ids, gates, expert, weights, self.activation,
                          rows=torch.tensor(token_rows, device=hidden.device))
        self._add("compute", "expert", start, self.now(), layer, expert, level, self.fmt.level_bytes(level),
                  self.step.index, len(token_rows))


class _Sequencer:
    """Sends decompression tasks to the pool in a scheduler's order: a task goes once its
    read is done and every task before it in the order has gone (one FIFO queue, as the
    simulator models it). Tasks outside the order (or with no order) go as their reads land."""

    def __init__(self, order: list[Key] | None):
        self.rank = {key: i for i, key in enumerate(order)} if order else {}
        self.held: dict[int, object] = {}        # rank -> its submit call, read done, waiting its turn
        self.next = 0
        self._lock = threading.Lock()

    def read_done(self, key: Key, submit) -> None:
        rank = self.rank.get(key)
        if rank is None:
            submit()
            return
        with self._lock:                         # called on I/O worker threads
            self.held[rank] = submit
            go = []
            while self.next in self.held:
                go.append(self.held.pop(self.next))
                self.next += 1
            for fn in go:                        # submitted in order, under the lock
                fn()
