"""The SimPy engine: one run = (device, workload, policy bundle) -> timeline.

A SimPy process walks the batch steps and, in each, the MoE layers. At a layer it
waits for the dense part (attention, router, shared experts), then asks the policies
for their decisions, hands the plan to the storage channel, the decompression workers
and the compute queue (FIFO servers, sim/servers.py), and sleeps until the layer's
last expert is computed. Everything the engine did is an Event on the timeline.

With a host's measured profile (compute.measured, `moelab profile`), the engine also charges
what the executor's own code costs: the decision path at every decision point (its loads
leave one by one as it issues them, and computes wait for it to end), the runtime's own gap
between two expert calls of a layer, after each step's last layer the step's work outside the
layers (output head, sampling), and the contention of the executor's threads for the cores: the
main thread's work (expert calls, dense parts) runs slower while reads or decompressions are in
flight (a fluid model: its speed changes at each read's or decompression's start and end;
`_main_thread`). All are 0 for the bundled roofline profiles (policies/cost.py).
"""
from __future__ import annotations

from dataclasses import astuple
from functools import partial

import simpy
from tqdm import tqdm

from devices.profile import DeviceProfile, StorageProfile
from policies import Policies, Routing
from policies.bundle import step_predictions
from policies.bundle import PLAN
from policies.cost import CostModel
from sim.servers import FifoServer, StorageChannel
from timeline.events import Event, Timeline
from workloads.workload import Workload

_event = partial(tuple.__new__, Event)   # Event from a full 10-tuple: a third of Event(...)'s cost
STALL_ROUNDS = 3        # fixed-point rounds of read stall <-> compute timing (measured hosts only)


def _stalled_end(start: float, work: float, busy, stall: float) -> float:
    """When a read of `work` seconds begun at `start` ends if it runs at 1 - stall of its speed
    during the main thread's `busy` spans (disjoint) and at full speed outside them."""
    t = start
    for a, b in sorted(busy):
        if b <= t:
            continue
        if a > t:
            if t + work <= a:
                return t + work
            work -= a - t
            t = a
        if t + work / (1 - stall) <= b:
            return t + work / (1 - stall)
        work -= (b - t) * (1 - stall)
        t = b
    return t + work


class Simulator:
    def __init__(self, device: DeviceProfile, workload: Workload, policies: Policies,
                 storage: StorageProfile | None = None, cost: CostModel | None = None):
        self.device = device
        self.storage = storage or device.storage_option(None)
        self.w = workload
        self.p = policies
        # the simulator is timed by the same cost model the policies plan with (the run function
        # builds it once and hands it to both)
        self.cost = cost or CostModel.build(device, workload.model, workload.fmt, self.storage)
        self.decompress_rate = self.cost.decompress_rate() if any(workload.fmt.decompress_bytes) else None
        self.pending: dict = {}          # prefetched key -> when its load is ready
        self.contention = self.cost.contention()
        self.contends = any(astuple(self.contention))
        # a read's stall is the host's own read path: a throttled run's reads sleep to their
        # device's times, whatever the main thread does
        own = device.storage.get(self.storage.name) == self.storage
        self.stall = self.contention.stall if own else 0.0
        # likewise a throttled read contends for the cores only while the host reads it (then its
        # thread sleeps to its device's time): as long as a read of the host's own storage takes
        host = device.storage_option(None)
        self.host_read = None if own else (host.latency, host.read_bandwidth)
        self.in_flight: list[tuple[float, float, bool]] = []   # (start, end, is decompression) not yet past
        # the executor's own costs (measured host profiles; all 0 for roofline profiles), per layer
        self.decide_base = self.cost.decision_seconds(0)
        self.decide_per_load = self.cost.decision_seconds(1) - self.decide_base
        self.gap = self.cost.compute_gap()

    def dense_seconds(self, tokens: int, prefill: bool = False) -> float:
        return self.cost.dense_seconds(tokens, prefill)

    def expert_seconds(self, level: int, tokens: int) -> float:
        return self.cost.expert_seconds(level, tokens)

    def run(self, quiet: bool = True) -> Timeline:
        env = simpy.Environment()
        self.timeline = Timeline(meta=self._meta())
        self.io = StorageChannel(self.storage.read_bandwidth, self.storage.latency, self.storage.queue_depth)
        self.decomp = FifoServer(self.device.decompress_workers)
        with tqdm(total=len(self.w.steps), disable=quiet, desc="simulate", unit="step", mininterval=0.5) as bar:
            env.process(self._decode(env, bar))
            env.run()
        self.timeline.meta["peak_expert_bytes"] = self.p.cache.peak
        self.timeline.meta["policy_report"] = self.p.report()
        return self.timeline

    def _meta(self) -> dict:
        w = self.w
        return {"engine": "sim", "device": self.device.name, "storage": self.storage.name,
                "model": w.model.name, "format": w.fmt.name,
                "level_parts": [list(parts) for parts in w.fmt.level_parts], "batch": w.batch,
                "budget_bytes": self.p.cache.capacity, **self.p.names(),
                "steps": [{"step": s.index, "group": s.group, "prefill": s.prefill,
                           "tokens": int(len(s.tokens)), "new_tokens": s.new_tokens} for s in self.w.steps]}

    def _decode(self, env: simpy.Environment, bar):
        layers = self.w.model.layers
        add, layer_fn, timeout = self.timeline.events.append, self._layer, env.timeout
        for step in self.w.steps:
            experts, scores, levels = self.w.routing_arrays(step)
            pred = step_predictions(self.w, step)          # gate lookahead recorded with the trace
            n, s = len(step.tokens), step.index
            t_dense = self.dense_seconds(n, step.prefill)
            # The layers of a step are a chain (each needs the previous one's output) and this is
            # the only process, so the step's timeline is computed layer by layer from the
            # servers' state and the clock advances once per step: one SimPy wake-up per token
            # instead of one per layer (the simulator's speed is a requirement; see sim/benchmark.py).
            t = env.now
            for layer in range(layers):
                end = self._main_thread(t, t_dense + self.contention.dense) if self.contends else t + t_dense
                add(_event(("dense", "dense", t, end, layer, -1, -1, 0, s, n)))
                t = layer_fn(end, s, layer, Routing(experts[layer], scores[layer],
                                                            None if levels is None else levels[layer],
                                                            None if pred is None else (pred[0][layer], pred[1][layer])))
            t += self.cost.step_seconds(n, step.prefill)       # output head, sampling: no event
            yield timeout(t - env.now)
            bar.update(1)

    def _layer(self, now: float, s: int, layer: int, routing: Routing) -> float:
        """Carry out one decision point at time `now`; returns when its last compute ends."""
        d = self.p.decide(layer, routing)
        fmt, add, pending = self.w.fmt, self.timeline.events.append, self.pending
        sizes = fmt.resident_bytes
        for item, kind, evicted in d.loads:      # the cache's records, at the decision point
            for k in evicted:
                if pending:
                    pending.pop(k, None)
                add(_event(("cache", "evict", now, now, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
            key = item.key
            add(_event(("cache", kind, now, now, key.layer, key.expert, key.part, item.resident_bytes, s, 0)))
        assert self.p.cache.used <= self.p.cache.capacity, "budget exceeded"
        stretch = None
        if self.stall and d.loads:
            # a read runs slower while the main thread works (measured hosts): its end depends on
            # the computes, which depend on when reads end. A few rounds from the same server state,
            # each read's end taken from the main thread's work of the round before
            state = self._servers()
            stretch = [0.0] * len(d.loads)
            for _ in range(STALL_ROUNDS):
                reads, _, computes, path_end, _ = self._plan(now, d, stretch)
                busy = [(now, path_end)] + [(a, b) for a, b, *_ in computes]
                stretch = [_stalled_end(a, b - x - a, busy, self.stall) - (b - x)
                           for (a, b), x in zip(reads, stretch)]
                self._servers(state)
        reads, decs, computes, _, spans = self._plan(now, d, stretch)
        for (item, kind, _), (issue, done) in zip(d.loads, reads):
            key = item.key
            add(_event(("io", "load", issue, done, key.layer, key.expert, key.part, item.nbytes, s, 0)))
            if kind is not PLAN and not item.decompress_bytes:
                pending[key] = done
        for i, start, done, worker in decs:
            item, kind, _ = d.loads[i]
            key = item.key
            add(_event((f"decompress[{worker}]", "decompress", start, done, key.layer, key.expert, key.part,
                        item.decompress_bytes, s, 0)))
            if kind is not PLAN:
                pending[key] = done
        if pending:                             # prefetched earlier: used now
            for key in d.keys:
                pending.pop(key, None)
        if spans is not None:                   # reads and decompressions not past yet
            self.in_flight = spans
        level_sizes, free = fmt.level_sizes, now
        for start, free, expert, level, n in computes:
            add(_event(("compute", "expert", start, free, layer, expert, level, level_sizes[level], s, n)))
        for k in self.p.finish(layer):
            pending.pop(k, None)
            add(_event(("cache", "evict", free, free, k.layer, k.expert, k.part, sizes[k.part], s, 0)))
        return free

    def _plan(self, now: float, d, stretch: list[float] | None):
        """When the decision's reads, decompressions and computes happen if carried out at `now`
        (reserving the storage and the decompression workers): (reads [(issue, done)] in load order,
        decompressions [(load index, start, done, worker)], computes [(start, end, expert, level,
        tokens)], the end of the decision path, the reads and decompressions in flight from `now` on
        as _main_thread takes them, None without contention). `stretch`: what each read gains on the
        main thread's work (None: nothing)."""
        fmt = self.w.fmt
        # the decision path's own cost (0 without measured tables): each load leaves as it is
        # issued, the computes wait for the whole path
        per_load = self.decide_per_load
        issue_at = now + self.decide_base
        ready, prefetched, reads, tasks = {}, {}, [], []
        for i, (item, kind, _) in enumerate(d.loads):
            issue_at += per_load
            issue, done = self.io.reserve(issue_at, item.nbytes, stretch[i] if stretch else 0.0)
            reads.append((issue, done))
            key = item.key
            if item.decompress_bytes:
                tasks.append((i, item, done))
            elif kind is PLAN:
                ready[key.expert, key.part] = done
            else:
                prefetched[key] = done
        decs = self._decompress(tasks, d.decompress_order) if tasks else []
        for i, _, done, _ in decs:
            item, kind, _ = d.loads[i]
            if kind is PLAN:
                ready[item.key.expert, item.key.part] = done
            else:
                prefetched[item.key] = done
        pending = self.pending
        if pending or prefetched:               # prefetched: ready when its load is
            for key in d.keys:
                t = prefetched.get(key, pending.get(key))
                if t is not None and t > now:
                    ready[key.expert, key.part] = t
        parts, seconds = fmt.level_parts, self.cost.expert_seconds
        counts = d.demand.counts()
        if d.compute_order is not None:         # the scheduler's order, each once it is ready
            tasks = []
            for pair in d.compute_order:
                expert, level = pair
                tasks.append((max([now, *(ready.get((expert, p), now) for p in parts[level])]), 0, expert, level,
                               counts[pair]))
        elif ready:                             # in order of readiness
            tasks = []
            for (expert, level), n in counts.items():
                t_ready = now
                for part in parts[level]:
                    t = ready.get((expert, part))
                    if t is not None and t > t_ready:
                        t_ready = t
                tasks.append((t_ready, len(tasks), expert, level, n))
            tasks.sort()
        else:      # everything was resident: compute in first-appearance order
            tasks = [(now, 0, expert, level, n) for (expert, level), n in counts.items()]
        path_end = free = now + self.decide_base + per_load * len(d.loads)
        spans = None
        if self.contends:                       # reads and decompressions in flight meanwhile
            spans = [x for x in self.in_flight if x[1] > now] + self._spans(d, reads, decs)
        computes, gap, first, call = [], self.gap, True, self.contention.call
        for t_ready, _, expert, level, n in tasks:
            if not first:
                free += gap
            first = False
            start = t_ready if t_ready > free else free
            free = self._main_thread(start, seconds(level, n) + call, spans) if spans is not None \
                else start + seconds(level, n)
            computes.append((start, free, expert, level, n))
        return reads, decs, computes, path_end, spans

    def _decompress(self, tasks, order) -> list[tuple[int, float, float, int]]:
        """Decompression tasks [(load index, item, read done)] go to the workers in `order` (default:
        load order), each once its read is done and the tasks before it have started: one FIFO
        queue. Returns [(load index, start, done, worker)]."""
        if order is not None:
            rank = {key: i for i, key in enumerate(order)}
            tasks = sorted(tasks, key=lambda t: rank.get(t[1].key, len(rank)))
        out, last_start = [], 0.0
        for i, item, read_done in tasks:
            start, done, worker = self.decomp.reserve(max(read_done, last_start),
                                                      item.decompress_bytes / self.decompress_rate)
            last_start = start
            out.append((i, start, done, worker))
        return out

    def _spans(self, d, reads, decs) -> list[tuple[float, float, bool]]:
        """(start, end, is decompression) of the decision's reads and decompressions, as long as
        each takes the host's cores (a throttled read: only its host read, see __init__)."""
        if self.host_read is None:
            spans = [(a, b, False) for a, b in reads]
        else:
            latency, bandwidth = self.host_read
            spans = [(a, min(b, a + latency + item.nbytes / bandwidth), False)
                     for (a, b), (item, _, _) in zip(reads, d.loads)]
        return spans + [(a, b, True) for _, a, b, _ in decs]

    def _servers(self, state=None):
        """The storage's and decompression workers' state (free times), or restore it from `state`."""
        io, dec = self.io, self.decomp
        if state is None:
            return io.slots.free[:], io.wire.free[:], dec.free[:]
        io.slots.free[:], io.wire.free[:], dec.free[:] = state

    def _main_thread(self, start: float, work: float, spans=None) -> float:
        """When `work` seconds of the main thread's work (at full speed) begun at `start` end: it runs
        at the measured contention's rate while reads / decompressions are in flight (the executor's
        worker threads share the cores with it), its speed changing at each of their starts and ends."""
        spans = [x for x in (self.in_flight if spans is None else spans) if x[1] > start]
        rate_of, t = self.contention.rate, start
        while True:
            reading = decompressing = False
            change = float("inf")               # the next start or end of a read / decompression
            for b, e, is_dec in spans:
                if b <= t < e:
                    if is_dec:
                        decompressing = True
                    else:
                        reading = True
                    if e < change:
                        change = e
                elif t < b < change:
                    change = b
            rate = rate_of(reading, decompressing)
            if t + work / rate <= change:
                return t + work / rate
            work -= (change - t) * rate
            t = change
