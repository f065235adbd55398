"""The SimPy engine: one run = (device, workload, policy bundle) -> timeline (or only its metrics).

A SimPy process walks the batch steps and, in each, the MoE layers. At a layer it
waits for the dense part (attention, router, shared experts), then asks the policies
for their decisions, hands the plan to the storage channel, the decompression workers
and the compute queue (FIFO servers, sim/servers.py), and sleeps until the layer's
last expert is computed. What the engine did goes to a recorder (sim/record.py): every
event (the timeline), or only what the metrics need (`run(events=False)`: sweeps and
studies, which never read the events, pay for none).

With a host's measured profile (compute.measured, `moelab profile`), the engine also charges
what the executor's own code costs: the decision path at every decision point (its loads
leave one by one as it issues them, and computes wait for it to end), the runtime's own gap
between two expert calls of a layer, and after each step's last layer the step's work outside
the layers (output head, sampling); all are 0 for the bundled roofline profiles
(policies/cost.py). How the executor's threads contend for the host's cores is a separate host
model (sim/host.py), None for roofline profiles.

The common bundles also have fused loops (sim/fast.py) proven equal to this engine; the run
function (experiments/run.py) picks one when it fits.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from itertools import repeat
from operator import itemgetter

import simpy
from tqdm import tqdm

from devices.profile import DeviceProfile, StorageProfile
from policies import Policies, Routing
from policies.bundle import PLAN, step_routings
from policies.cost import CostModel
from sim.host import HostContention
from sim.record import FigureRecorder, TimelineRecorder
from sim.servers import FifoServer, StorageChannel
from timeline.events import Timeline
from workloads.workload import Workload


_first = itemgetter(0)


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for the run: a run allocates millions of short-lived
    objects and no cycles worth collecting, and the collector's passes over them were a sixth of
    its time. Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
        self.host = HostContention.of(self.cost, device, self.storage)
        # the executor's own costs (measured host profiles; all 0 for roofline profiles), per layer
        self.decide_base = self.cost.decision_seconds(0)
        self.decide_per_load = self.cost.decision_seconds(1) - self.decide_base
        self.gap = self.cost.compute_gap()
        # a part's hand-offs between the executor's threads (measured; 0 for roofline profiles): its
        # ready -> the call that waited for it, a read's end -> its decompression on an idle worker
        self.wake, self.handoff = self.cost.handoffs()
        self.after_loads = self.cost.dense_after_loads()
        self.call_after_load = self.cost.call_after_load()
        self.loaded = False             # the last decision point loaded (its dense part pays after_loads)
        self.decides = bool(self.decide_base or self.decide_per_load)     # a decision path that costs time
        self.level_parts = workload.fmt.level_parts
        self.seconds: dict[tuple[int, int], float] = {}     # (level, tokens) -> one expert's compute

    def dense_seconds(self, tokens: int, prefill: bool = False) -> float:
        return self.cost.dense_seconds(tokens, prefill)

    def expert_seconds(self, level: int, tokens: int) -> float:
        return self.cost.expert_seconds(level, tokens)

    def run(self, quiet: bool = True, events: bool = True) -> Timeline:
        """The run's timeline, with the figures its metrics are computed from (timeline/metrics.py
        compute_metrics reads them); `events=False`: a metrics-only run, whose timeline holds no
        events, only the figures."""
        env = simpy.Environment()
        fmt = self.w.fmt
        self.rec = TimelineRecorder(fmt) if events else FigureRecorder(fmt)
        self.io = StorageChannel(self.storage.read_bandwidth, self.storage.latency, self.storage.queue_depth)
        self.decomp = FifoServer(self.device.decompress_workers)
        with gc_paused(), tqdm(total=len(self.w.steps), disable=quiet, desc="simulate", unit="step",
                                mininterval=0.5) as bar:
            env.process(self._decode(env, bar))
            env.run()
        self.timeline = self.rec.timeline(self.meta())
        self.timeline.meta["peak_expert_bytes"] = self.p.cache.peak
        self.timeline.meta["policy_report"] = self.p.report()
        return self.timeline

    def meta(self) -> dict:
        """The timeline's meta before the run (the fused loops share it)."""
        w = self.w
        return {"engine": "sim", "device": self.device.name, "storage": self.storage.name,
                "model": w.model.name, "format": w.fmt.name,
                "level_parts": [list(parts) for parts in w.fmt.level_parts], "batch": w.batch,
                "budget_bytes": self.p.cache.capacity, **self.p.names(),
                "kv_bytes_per_step": [kv.held_bytes(w.model) for kv in w.kv],
                "steps": [{"step": s.index, "group": s.group, "prefill": s.prefill,
                           "tokens": int(len(s.tokens)), "new_tokens": s.new_tokens} for s in self.w.steps]}

    def _decode(self, env: simpy.Environment, bar):
        layer_fn, timeout, host = self._layer, env.timeout, self.host
        t = env.now
        for step in self.w.steps:
            routings = step_routings(self.w, step)
            n, s = len(step.tokens), step.index
            t_dense = self.cost.layer_dense_seconds(n, step.prefill, self.w.kv[s])
            # The layers of a step are a chain (each needs the previous one's output) and this is
            # the only process, so the step's timeline is computed layer by layer from the
            # servers' state and the clock advances once per step: one SimPy wake-up per token
            # instead of one per layer (the simulator's speed is a requirement; see sim/benchmark.py).
            # (a step starts where the one before ended, not at env.now: now + (t - now) may round
            # below t, and the main thread's work is a chain)
            evicted = self.p.begin_step(s)               # shared KV mode: the expert cache yields
            if evicted:
                for k in evicted:
                    self.pending.pop(k, None)
                self.rec.evict(s, t, evicted)
            for layer, routing in enumerate(routings):
                secs = t_dense + self.after_loads if self.loaded else t_dense
                end = host.dense_end(t, secs, n, step.prefill) if host is not None else t + secs
                t = layer_fn(t, end, s, layer, n, routing)
            t += self.cost.step_seconds(n, step.prefill)       # output head, sampling: no event
            yield timeout(t - env.now)
            bar.update(1)

    def _layer(self, start: float, now: float, s: int, layer: int, n: int, routing: Routing) -> float:
        """Carry out one decision point at time `now`, after the layer's dense part of `n` tokens
        from `start`; returns when its last compute ends."""
        d = self.decide(layer, routing)
        pending, loads, cache = self.pending, d.loads, self.p.cache
        if pending and loads:                    # evicted before its prefetch was used
            for _, _, evicted in loads:
                for k in evicted:
                    pending.pop(k, None)
        assert cache.used <= cache.capacity, "budget exceeded"
        stretch = None
        if self.host is not None:
            # a read may run slower while the main thread works (measured hosts): its end depends on
            # the computes, which depend on when reads end
            stretch = self.host.stretch(now, len(loads), lambda x: self._plan(now, d, x)[:4], (self.io, self.decomp))
        reads, decs, computes, _, spans = self._plan(now, d, stretch)
        if loads and loads[-1].kind is not PLAN:    # prefetches (they come last): ready when loaded
            for (item, kind, _), (_, done) in zip(loads, reads):
                if kind is not PLAN and not item.decompress_bytes:
                    pending[item.key] = done
            for i, _, done, _ in decs:
                item, kind, _ = loads[i]
                if kind is not PLAN:
                    pending[item.key] = done
        if pending:                             # prefetched earlier: used now
            for key in d.keys:
                pending.pop(key, None)
        if spans is not None:                   # reads and decompressions not past yet
            self.host.commit(spans)
        free = computes[-1][1] if computes else now
        finished = self.p.finish(layer)
        for k in finished:
            pending.pop(k, None)
        self.rec.layer(s, layer, start, now, n, d, reads, decs, computes, finished, free)
        return free

    def decide(self, layer: int, routing: Routing):
        """The policies' decision at a decision point; notes whether it loaded (the next dense part
        pays after_loads): one place, so every engine built on this one charges it."""
        d = self.p.decide(layer, routing)
        self.loaded = bool(d.loads)
        return d

    def _plan(self, now: float, d, stretch: list[float] | None):
        """When the decision's reads, decompressions and computes happen if carried out at `now`
        (reserving the storage and the decompression workers): (reads [(issue, done)] in load order,
        decompressions [(load index, start, done, worker)], computes [(start, end, expert, level,
        tokens)] in the order they run, the end of the decision path, the reads and decompressions in
        flight from `now` on for the host model, None without one). `stretch`: what each read takes
        beyond its transfer (None: nothing). The computes run on the compute queue in the
        scheduler's order, else in order of readiness, each (expert, level) once every part it needs
        is ready, each once the one before has ended: their starts and ends both increase."""
        if d.loads:
            reads, decs, ready, prefetched = self._reads(now, d, stretch)
        else:
            reads = decs = ()
            ready, prefetched = {}, None
        pending = self.pending
        if pending or prefetched:               # prefetched: ready when its load is
            for key in d.keys:
                t = prefetched.get(key, pending.get(key)) if prefetched else pending.get(key)
                if t is not None and t > now:
                    ready[key.expert, key.part] = t
        # the decision path's own cost (0 without measured tables): the computes wait for it
        path_end = now + self.decide_base + self.decide_per_load * len(d.loads) if self.decides else now
        spans = self.host.spans(now, d.loads, reads, decs) if self.host is not None else None
        parts, counts = self.level_parts, d.demand.counts()
        if d.compute_order is not None:         # the scheduler's order, each once it is ready
            tasks = []
            for pair in d.compute_order:
                expert, level = pair
                tasks.append((max([now, *(ready.get((expert, p), now) for p in parts[level])]), pair, counts[pair]))
        elif ready:                             # in order of readiness ((expert, part) -> time; absent: resident)
            tasks = []
            for pair, n in counts.items():
                t_ready, expert = now, pair[0]
                for part in parts[pair[1]]:
                    t = ready.get((expert, part))
                    if t is not None and t > t_ready:
                        t_ready = t
                tasks.append((t_ready, pair, n))
            tasks.sort(key=_first)              # (stable: ties in first-appearance order)
        else:      # everything was resident: compute in first-appearance order (each ready now)
            tasks = zip(repeat(now), counts, counts.values())
        seconds, gap, wake, host, computes, free = self.seconds, self.gap, self.wake, self.host, [], path_end
        after_load = self.call_after_load
        for t_ready, (expert, level), n in tasks:
            if gap and computes:                # (free + 0.0 is free: no gap, no addition)
                free += gap
            start = t_ready + wake if t_ready > free else free     # it waited: woken by the part's worker
            secs = seconds.get((level, n))
            if secs is None:
                secs = seconds[level, n] = self.cost.expert_seconds(level, n)
            if after_load and ready and any((expert, p) in ready for p in parts[level]):
                secs += after_load                  # loaded at this decision point: its weights come cold
            free = host.call_end(start, secs, spans, level, n) if host is not None else start + secs
            computes.append((start, free, expert, level, n))
        return reads, decs, computes, path_end, spans

    def _reads(self, now: float, d, stretch: list[float] | None):
        """The decision's reads on the storage, in load order, each leaving as the decision path
        issues it (decide_per_load apart), and its decompressions: (reads, decompressions, when each
        planned (expert, part) is ready, when each prefetched key is)."""
        per_load, loads = self.decide_per_load, d.loads
        ready, prefetched, reads, tasks = {}, {}, [], []
        issue_at, reserve = now + self.decide_base, self.io.reserve
        for i, (item, kind, _) in enumerate(loads):
            if per_load:                        # (issue_at + 0.0 is issue_at)
                issue_at += per_load
            read = reserve(issue_at, item.nbytes, stretch[i]) if stretch else reserve(issue_at, item.nbytes)
            reads.append(read)
            done = read[1]
            key = item.key
            if item.decompress_bytes:
                tasks.append((i, item, done))
            elif kind is PLAN:
                ready[key.expert, key.part] = done
            else:
                prefetched[key] = done
        decs = self._decompress(tasks, d.decompress_order, getattr(stretch, "decompress", None)) if tasks else []
        for i, _, done, _ in decs:
            item, kind, _ = loads[i]
            if kind is PLAN:
                ready[item.key.expert, item.key.part] = done
            else:
                prefetched[item.key] = done
        return reads, decs, ready, prefetched

    def _decompress(self, tasks, order, extra=None) -> list[tuple[int, float, float, int]]:
        """Decompression tasks [(load index, item, read done)] go to the workers in `order` (default:
        load order), each once its read is done and the tasks before it have started: one FIFO
        queue. `extra`: per load index, what the host model adds to a task's time (None: nothing).
        Returns [(load index, start, done, worker)]."""
        if order is not None:
            rank = {key: i for i, key in enumerate(order)}
            tasks = sorted(tasks, key=lambda t: rank.get(t[1].key, len(rank)))
        out, last_start = [], 0.0
        for i, item, read_done in tasks:
            seconds = item.decompress_bytes / self.decompress_rate
            start, done, worker = self.decomp.reserve(max(read_done + self.handoff, last_start),
                                                      seconds if extra is None else max(0.0, seconds + extra[i]))
            last_start = start
            out.append((i, start, done, worker))
        return out
