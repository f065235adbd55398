"""The SimPy engine: one run = (device, workload, policy bundle) -> timeline.

A SimPy process walks the batch steps and, in each, the MoE layers. At a layer it
waits for the dense part (attention, router, shared experts), then asks the policies
for their decisions, hands the plan to the storage channel, the decompression workers
and the compute queue (FIFO servers, sim/servers.py), and sleeps until the layer's
last expert is computed. Everything the engine did is an Event on the timeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import simpy
from tqdm import tqdm

from devices.profile import DeviceProfile, StorageProfile
from devices.units import ConfigError, format_size
from policies import (Allocator, BudgetError, CachePolicy, PolicyContext, Prefetcher, Routing, Scheduler,
                      make_allocator, make_cache, make_prefetcher, make_scheduler, needed_keys)
from sim.servers import FifoServer, StorageChannel
from sim.timeline import Event, Timeline
from workloads.batching import Step, batch_steps
from workloads.catalog import ModelArch
from workloads.formats import ExpertFormat
from workloads.stats import popularity
from workloads.trace import RoutingTrace

_event = partial(tuple.__new__, Event)   # Event from a full 10-tuple: a third of Event(...)'s cost


@dataclass
class Workload:
    model: ModelArch
    trace: RoutingTrace
    fmt: ExpertFormat
    batch: int = 1
    steps: list[Step] = field(init=False)

    def __post_init__(self):
        self.trace.validate(self.model.layers, self.model.experts, self.trace.metadata.get("path", "trace"))
        self.steps = batch_steps(self.trace, self.batch)

    def routing(self, step: Step, layer: int) -> Routing:
        return Routing(self.trace.experts[step.tokens, layer], self.trace.scores[step.tokens, layer])

    def access_sequence(self, allocator: Allocator) -> list[list]:
        """Needed keys at every decision point, in engine order (what offline policies see)."""
        return [needed_keys(allocator.allocate(layer, self.routing(step, layer)), self.fmt)
                for step in self.steps for layer in range(self.model.layers)]


@dataclass
class Policies:
    allocator: Allocator
    scheduler: Scheduler
    cache: CachePolicy
    prefetcher: Prefetcher | None = None


def build_policies(workload: Workload, budget: int, cache: str = "lru", scheduler: str = "fifo",
                   allocator: str = "fixed", prefetch: str = "none", **allocator_options) -> Policies:
    """Build a policy bundle by name, checking the budget can run the workload at all."""
    fmt, model = workload.fmt, workload.model
    base = PolicyContext(fmt, model.layers, model.experts, budget)
    alloc = make_allocator(allocator, base, **allocator_options)
    future = workload.access_sequence(make_allocator(allocator, base, **allocator_options))
    lowest = fmt.level_bytes(0)
    minimum = max((len({k.expert for k in keys}) for keys in future), default=0) * lowest
    if budget < minimum:
        raise BudgetError(f"budget {format_size(budget)} is below the minimum this workload can run with: "
                          f"{format_size(minimum)} ({minimum} B = the largest single-layer demand, "
                          f"{minimum // max(lowest, 1)} experts at the lowest precision)")
    ctx = PolicyContext(fmt, model.layers, model.experts, budget, future=future,
                        popularity=popularity(workload.trace, model.experts))
    return Policies(alloc, make_scheduler(scheduler, ctx), make_cache(cache, ctx), make_prefetcher(prefetch, ctx))


def build_online_policies(model: ModelArch, fmt: ExpertFormat, budget: int, cache: str = "lru",
                          scheduler: str = "fifo", allocator: str = "fixed", prefetch: str = "none") -> Policies:
    """A policy bundle for routing not known in advance (a real router): no access sequence,
    so offline policies (belady, static-hot) refuse. The budget must hold one decode step."""
    minimum = min(model.experts, model.top_k) * fmt.level_bytes(0)
    if budget < minimum:
        raise BudgetError(f"budget {format_size(budget)} is below the minimum of one decode step: "
                          f"{format_size(minimum)} ({model.top_k} experts at the lowest precision)")
    ctx = PolicyContext(fmt, model.layers, model.experts, budget)
    return Policies(make_allocator(allocator, ctx), make_scheduler(scheduler, ctx), make_cache(cache, ctx),
                    make_prefetcher(prefetch, ctx))


class Simulator:
    def __init__(self, device: DeviceProfile, workload: Workload, policies: Policies,
                 storage: StorageProfile | None = None):
        self.device = device
        self.storage = storage or device.storage_option(None)
        self.w = workload
        self.p = policies
        fmt = workload.fmt
        codec = getattr(fmt, "codec", None)
        self.decompress_rate = None
        if any(fmt.decompress_bytes):
            if codec not in device.decompress_throughput:
                raise ConfigError(f"{device.path or device.name}: decompress_throughput has no entry for codec "
                                  f"{codec!r}; known: {', '.join(device.decompress_throughput)}")
            self.decompress_rate = device.decompress_throughput[codec]
        self._dense_cache: dict[int, float] = {}
        self._compute_cache: dict[tuple[int, int], float] = {}
        self.pending: dict = {}          # prefetched key -> when its load is ready

    def dense_seconds(self, tokens: int) -> float:
        """Attention, router and shared experts of one layer for `tokens` tokens (roofline)."""
        t = self._dense_cache.get(tokens)
        if t is None:
            m = self.w.model
            t = self._dense_cache[tokens] = self.device.expert_time(
                m.dense_params_per_layer * m.dtype_bytes, m.dense_params_per_layer, tokens)
        return t

    def expert_seconds(self, level: int, tokens: int) -> float:
        key = (level, tokens)
        t = self._compute_cache.get(key)
        if t is None:
            fmt = self.w.fmt
            t = self._compute_cache[key] = self.device.expert_time(fmt.level_sizes[level], fmt.params, tokens)
        return t

    def run(self, quiet: bool = True) -> Timeline:
        env = simpy.Environment()
        self.timeline = Timeline(meta=self._meta())
        self.io = StorageChannel(self.storage.read_bandwidth, self.storage.latency, self.storage.queue_depth)
        self.decomp = FifoServer(self.device.decompress_workers)
        with tqdm(total=len(self.w.steps), disable=quiet, desc="simulate", unit="step", mininterval=0.5) as bar:
            env.process(self._decode(env, bar))
            env.run()
        self.timeline.meta["peak_expert_bytes"] = self.p.cache.peak
        return self.timeline

    def _meta(self) -> dict:
        w = self.w
        return {"engine": "sim", "device": self.device.name, "storage": self.storage.name,
                "model": w.model.name, "format": w.fmt.name, "level_parts": list(w.fmt.level_parts),
                "batch": w.batch,
                "budget_bytes": self.p.cache.capacity, "cache": self.p.cache.name,
                "scheduler": self.p.scheduler.name, "allocator": self.p.allocator.name,
                "prefetcher": self.p.prefetcher.name if self.p.prefetcher else "none",
                "steps": [{"step": s.index, "group": s.group, "prefill": s.prefill,
                           "tokens": int(len(s.tokens)), "new_tokens": s.new_tokens} for s in self.w.steps]}

    def _decode(self, env: simpy.Environment, bar):
        trace, layers = self.w.trace, self.w.model.layers
        add, layer_fn, timeout = self.timeline.events.append, self._layer, env.timeout
        for step in self.w.steps:
            # [layers, tokens, k], so a layer's routing is a cheap view
            experts = trace.experts[step.tokens].transpose(1, 0, 2)
            scores = trace.scores[step.tokens].transpose(1, 0, 2)
            n, s = len(step.tokens), step.index
            t_dense = self.dense_seconds(n)
            # The layers of a step are a chain (each needs the previous one's output) and this is
            # the only process, so the step's timeline is computed layer by layer from the
            # servers' state and the clock advances once per step: one SimPy wake-up per token
            # instead of one per layer (the simulator's speed is a requirement; see sim/benchmark.py).
            t = env.now
            for layer in range(layers):
                add(_event(("dense", "dense", t, t + t_dense, layer, -1, -1, 0, s, n)))
                t = layer_fn(t + t_dense, s, layer, Routing(experts[layer], scores[layer]))
            yield timeout(t - env.now)
            bar.update(1)

    def _layer(self, now: float, s: int, layer: int, routing: Routing) -> float:
        """Make and carry out one layer's decisions at time `now`; returns when it is done."""
        p, fmt, add = self.p, self.w.fmt, self.timeline.events.append
        sizes = fmt.resident_bytes
        demand = p.allocator.allocate(layer, routing)
        plan = p.scheduler.order(layer, demand, p.cache.resident(layer))
        keys = needed_keys(demand, fmt)
        p.cache.begin_layer(layer, keys)        # hits are not recorded: metrics derive them (sim/metrics.py)
        ready, pending = {}, self.pending
        for item in plan:
            for k in p.cache.admit(item):
                if pending:
                    pending.pop(k, None)
                add(_event(("cache", "evict", now, now, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
            key = item.key
            add(_event(("cache", "admit", now, now, layer, key.expert, key.part, item.resident_bytes, s, 0)))
            ready[key.expert, key.part] = self._load(now, item, s)
        if pending:                             # prefetched earlier: ready when its load is
            for key in keys:
                t = pending.pop(key, None)
                if t is not None and t > now:
                    ready[key.expert, key.part] = t
        if p.prefetcher is not None:
            for item, evicted in p.cache.prefetch(p.prefetcher.after_layer(layer, demand)):
                for k in evicted:
                    pending.pop(k, None)
                    add(_event(("cache", "evict", now, now, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
                key = item.key
                add(_event(("cache", "prefetch", now, now, key.layer, key.expert, key.part, item.resident_bytes, s, 0)))
                pending[key] = self._load(now, item, s)
        assert p.cache.used <= p.cache.capacity, "budget exceeded"
        # each (expert, level) computes once the parts it needs are ready, in order of readiness
        parts, level_sizes, seconds = fmt.level_parts, fmt.level_sizes, self._compute_cache
        counts = demand.counts()
        if ready:
            tasks = []
            for (expert, level), n in counts.items():
                t_ready = now
                for part in range(parts[level]):
                    t = ready.get((expert, part))
                    if t is not None and t > t_ready:
                        t_ready = t
                tasks.append((t_ready, len(tasks), expert, level, n))
            tasks.sort()
        else:      # everything was resident: compute in first-appearance order
            tasks = [(now, 0, expert, level, n) for (expert, level), n in counts.items()]
        free = now
        for t_ready, _, expert, level, n in tasks:
            start = t_ready if t_ready > free else free
            duration = seconds.get((level, n))
            free = start + (duration if duration is not None else self.expert_seconds(level, n))
            add(_event(("compute", "expert", start, free, layer, expert, level, level_sizes[level], s, n)))
        for k in p.cache.end_layer(layer):
            pending.pop(k, None)
            add(_event(("cache", "evict", free, free, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
        return free

    def _load(self, now: float, item, s: int) -> float:
        """Read (and decompress) one item issued at `now`; returns when it is ready."""
        key, add = item.key, self.timeline.events.append
        issue, done = self.io.reserve(now, item.nbytes)
        add(_event(("io", "load", issue, done, key.layer, key.expert, key.part, item.nbytes, s, 0)))
        if item.decompress_bytes:
            start, done, worker = self.decomp.reserve(done, item.decompress_bytes / self.decompress_rate)
            add(_event((f"decompress[{worker}]", "decompress", start, done, key.layer, key.expert, key.part,
                        item.decompress_bytes, s, 0)))
        return done

