"""The executor's runtime: the model's experts come from an on-disk store, on demand,
under the same policy objects the simulator drives (DESIGN.md).

`ExpertRuntime` is the model's expert_fn. At each MoE layer it
  1. turns the router's output into a Routing and asks allocator -> scheduler -> cache,
     exactly as sim/engine.py does (same calls, same order, so same decisions);
  2. reserves the admitted bytes in the expert memory pool (never above the budget),
     drops what the cache evicted;
  3. submits the plan to the I/O workers in order; parts that carry a decompression task
     go on to the decompression pool when their read completes;
  4. computes each (expert, level) as soon as the parts it needs are resident, hits first;
  5. tells the cache the layer is over (tiering may drop parts) and frees them.
Everything lands on a Timeline with the simulator's vocabulary; times are seconds since
the run started (time.perf_counter).
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import torch

from executor.io import DecompressPool, IOWorkers
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
        self.used = 0
        self.peak = 0

    def reserve(self, key: Key, nbytes: int) -> None:
        if self.used + nbytes > self.budget:
            raise AssertionError(f"expert memory over budget: {self.used} + {nbytes} > {self.budget} B ({key})")
        self.reserved[key] = nbytes
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def fill(self, key: Key, data) -> None:
        self.buffers[key] = data

    def release(self, key: Key) -> None:
        self.used -= self.reserved.pop(key)
        self.buffers.pop(key, None)


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
        done: queue.SimpleQueue = queue.SimpleQueue()
        for item in plan:
            for k in p.cache.admit(item):
                self.memory.release(k)
                self._add("cache", "evict", now, now, k.layer, k.expert, k.part, fmt.resident_bytes[k.part], s)
            self.memory.reserve(item.key, item.resident_bytes)
            self._add("cache", "admit", now, now, layer, item.key.expert, item.key.part, item.resident_bytes, s)
            # to storage at once, in plan order: the read overlaps the remaining admissions
            self.io.submit(item.key).add_done_callback(done.put)

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
        outstanding = len(plan)
        while outstanding:
            result = done.get().result()                      # re-raises a failed read or decode
            if hasattr(result, "key"):                        # a read finished
                key = result.key
                self._add("io", "load", result.t_start - self.t0, result.t_end - self.t0, layer, key.expert,
                          key.part, len(result.data), s)
                if fmt.decompress_bytes[key.part]:
                    self.decompress.submit(self.encoder.decompress_part, key.part, result.data, fmt,
                                           tag=key).add_done_callback(done.put)
                    continue
                self.memory.fill(key, result.data)
            else:                                             # a decompression finished
                key = result.tag
                self._add(f"decompress[{result.worker}]", "decompress", result.t_start - self.t0,
                          result.t_end - self.t0, layer, key.expert, key.part, fmt.decompress_bytes[key.part], s)
                self.memory.fill(key, result.value)
            outstanding -= 1
            for pair, need in list(waiting.items()):
                need.discard(key)
                if not need:
                    self._compute(out, hidden, ids, gates, layer, pair, rows.pop(pair))
                    del waiting[pair]
        end = self.now()
        for k in p.cache.end_layer(layer):
            self.memory.release(k)
            self._add("cache", "evict", end, end, k.layer, k.expert, k.part, fmt.resident_bytes[k.part], s)
        self.last = self.now()
        return out

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
