"""The simulator with a host RAM level and CPU placement (issue 26, items 2 and 3).

The engine (sim/engine.py) with three more resources, each a FIFO server by reservation
(sim/servers.py): the link from host RAM to the accelerator (a StorageChannel: its latency, its
bandwidth, its queue depth), and the CPU (one server: a CPU-placed expert's call uses every core).

At a decision point (Policies.decide returned Decision.tiers, policies/tiers.py):
- a load whose source is storage is read on the storage queue (then decompressed, if its format
  says so) into host RAM, then copied over the link; a load found in host RAM is only copied
  (once it is there: a part an earlier decision point is still reading waits for that read);
- the copies enter the link's queue in the order their parts reach host RAM (load order among
  equals); a part is ready on the accelerator when its copy ends, and the accelerator's computes
  run as in the engine, each once its parts are ready;
- the parts of CPU-placed experts not in host RAM are read too (behind the plan's reads, before
  the prefetches'); each CPU-placed (expert, level) computes on the CPU queue once its parts are
  in host RAM and the decision path has ended, in order of readiness, in parallel with the
  accelerator's computes; the layer ends when both have ended.

The timeline gets a lane per link (`link:host-ram>gpu`, kind "copy"), one for the CPU (`cpu`, kind
"expert") and the host level's cache records (`cache:host-ram`); storage reads stay on `io`. The
fused loops (sim/fast.py) never run these (experiments/run.py).
"""
from __future__ import annotations

from devices.units import ConfigError
from policies.base import Key, load_item
from policies.bundle import PLAN
from policies.tiers import STORAGE
from sim.engine import Simulator
from sim.record import TimelineRecorder
from sim.servers import FifoServer, StorageChannel
from timeline.events import Event
from timeline.tiers import HOST_CACHE, tier_figures


class TieredSimulator(Simulator):
    """A Simulator whose bundle has a host level (Policies.lower) and maybe a placement policy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.host is not None:
            raise ConfigError("a host level or CPU placement with a measured host profile (compute.measured "
                              "contention) is not modelled; use a bundled roofline profile")
        self.link_profile = self.device.tiers[0].link
        self.ram_at: dict[Key, float] = {}     # host-resident part -> when it is in host RAM
        self.log: list[Event] = []             # the link, CPU and host-cache events (tier metrics)
        self.host_hits = self.host_accesses = 0
        self.free = 0.0                        # when the last layer ended

    def run(self, quiet: bool = True, events: bool = True):
        link = self.link_profile
        self.link = StorageChannel(link.bandwidth, link.latency, link.queue_depth)
        self.cpu = FifoServer(1)
        tl = super().run(quiet, events)
        lower = self.p.lower
        tl.meta["tiers"] = {"levels": [lower.name], "link": link.resource, "host_budget_bytes": lower.cache.capacity,
                            "host_cache": lower.cache.name,
                            "placement": self.p.placement.name if self.p.placement else "gpu-only"}
        tl.meta["tier_figures"] = tier_figures(self.log, self.host_hits, self.host_accesses, lower.cache.peak)
        return tl

    def _layer(self, start: float, now: float, s: int, layer: int, n: int, routing) -> float:
        if start < self.free:
            # a step starts at env.now, which after the step's timeout can fall an ulp short of the step's
            # end (601.955 + (1640.74 - 601.955) == 1640.7399999999998): start it at the end itself
            now, start = now + (self.free - start), self.free
        d = self.decide(layer, routing)
        pending, loads, t = self.pending, d.loads, d.tiers
        for _, _, evicted in loads:
            for k in evicted:
                pending.pop(k, None)
        for _, _, evicted in t.records:
            for k in evicted:
                self.ram_at.pop(k, None)
        cache, host = self.p.cache, self.p.lower.cache
        assert cache.used <= cache.capacity and host.used <= host.capacity, "budget exceeded"
        self.host_hits += t.hits
        self.host_accesses += t.accesses
        self.state = self._transfers(now, d)
        copies, _, computes, path_end, _ = self._plan(now, d, None)
        for (item, kind, _), (_, done) in zip(loads, copies):
            if kind is not PLAN:
                pending[item.key] = done
        if pending:
            for key in d.keys:
                pending.pop(key, None)
        cpu = self._cpu_computes(layer, path_end, t)
        free = max(computes[-1][1] if computes else now, cpu[-1][1] if cpu else now)
        finished = self.p.finish(layer)
        for k in finished:
            pending.pop(k, None)
        for k in self.p.lower.finished:
            self.ram_at.pop(k, None)
        self.rec.layer(s, layer, start, now, n, d, (), (), computes, finished, free)
        self._record(s, layer, now, d, copies, cpu, free)
        self.free = free
        return free

    def _transfers(self, now: float, d):
        """Storage reads (plan, CPU parts, prefetches), their decompressions, and the link's copies of
        the accelerator's loads: (reads [(item, issue, done)], decompressions [(read index, start,
        done, worker)], copies [(issue, done)] in load order, when each CPU part is in host RAM)."""
        t, fmt, ram_at = d.tiers, self.w.fmt, self.ram_at
        plan = [(load.item, src) for load, src in zip(d.loads, t.sources) if load.kind is PLAN]
        rest = [(load.item, src) for load, src in zip(d.loads, t.sources) if load.kind is not PLAN]
        order = plan + [(load_item(k, fmt), src) for k, src in t.cpu_parts] + rest
        issue_at, per_load, reserve = now + self.decide_base, self.decide_per_load, self.io.reserve
        reads, tasks, in_ram, seen = [], [], {}, set()
        for item, src in order:
            key = item.key
            if key in seen:                    # a part both an accelerator load and a CPU part: read once
                continue
            seen.add(key)
            issue_at += per_load
            if src == STORAGE:
                issue, done = reserve(issue_at, item.nbytes)
                reads.append((item, issue, done))
                if item.decompress_bytes:
                    tasks.append((len(reads) - 1, item, done))
                else:
                    in_ram[key] = done
            else:                              # in host RAM, or on its way there
                in_ram[key] = max(issue_at, ram_at.get(key, issue_at))
        decs = self._decompress(tasks, d.decompress_order) if tasks else []
        for i, _, done, _ in decs:
            in_ram[reads[i][0].key] = done
        for key, at in in_ram.items():
            if key in self.p.lower.cache.sizes:
                ram_at[key] = at
        jobs = sorted((in_ram[load.item.key], i) for i, load in enumerate(d.loads))
        copies = [None] * len(d.loads)
        for arrival, i in jobs:
            copies[i] = self.link.reserve(arrival, d.loads[i].item.resident_bytes)
        return reads, decs, copies, in_ram

    def _reads(self, now: float, d, stretch):
        """The engine's view (sim/engine.py _plan): a load is ready on the accelerator when its copy ends."""
        copies = self.state[2]
        ready, prefetched = {}, {}
        for (item, kind, _), (_, done) in zip(d.loads, copies):
            if kind is PLAN:
                ready[item.key.expert, item.key.part] = done
            else:
                prefetched[item.key] = done
        return copies, [], ready, prefetched

    def _cpu_computes(self, layer: int, path_end: float, t) -> list[tuple[float, float, int, int, int]]:
        """The CPU share's computes [(start, end, expert, level, tokens)], in order of readiness."""
        if not t.cpu:
            return []
        in_ram, parts = self.state[3], self.w.fmt.level_parts
        tasks = []
        for i, ((expert, level), n) in enumerate(t.cpu.items()):
            ready = max([path_end, *(in_ram.get(Key(layer, expert, p), path_end) for p in parts[level])])
            tasks.append((ready, i, expert, level, n))
        tasks.sort()
        out, seconds = [], self.cost.cpu_expert_seconds
        for ready, _, expert, level, n in tasks:
            begin, end, _ = self.cpu.reserve(ready, seconds(level, n))
            out.append((begin, end, expert, level, n))
        return out

    def _record(self, s, layer, now, d, copies, cpu, free) -> None:
        """The tier's events: host-cache records, storage reads, decompressions, copies, CPU computes."""
        reads, decs, _, _ = self.state
        fmt, t, log = self.w.fmt, d.tiers, self.log
        sizes, level_sizes, resource = fmt.resident_bytes, fmt.level_sizes, self.link_profile.resource
        ev = list(_cache_records(t.records, self.p.lower.finished, now, free, s, sizes))
        ev += [Event(resource, "copy", a, b, load.item.key.layer, load.item.key.expert, load.item.key.part,
                     load.item.resident_bytes, s, 0) for load, (a, b) in zip(d.loads, copies)]
        ev += [Event("cpu", "expert", a, b, layer, e, lvl, level_sizes[lvl], s, n) for a, b, e, lvl, n in cpu]
        log += ev
        io = [Event("io", "load", a, b, item.key.layer, item.key.expert, item.key.part, item.nbytes, s, 0)
              for item, a, b in reads]
        io += [Event(f"decompress[{w}]", "decompress", a, b, reads[i][0].key.layer, reads[i][0].key.expert,
                     reads[i][0].key.part, reads[i][0].decompress_bytes, s, 0) for i, a, b, w in decs]
        rec = self.rec
        figures = rec.figures if isinstance(rec, TimelineRecorder) else rec
        if isinstance(rec, TimelineRecorder):
            rec.events.events.extend(ev + io)
        for e in io:
            if e.resource == "io":
                figures.bytes_read += e.bytes
                figures.loads += 1
                figures.io.add(e.start, e.end)
            else:
                figures.decomp.add(e.start, e.end)
        span = figures.spans[s]                # the step's work ends with its last copy or CPU call too
        span[1] = max([span[1], *(e.end for e in ev), *(e.end for e in io)])


def _cache_records(records, finished, now, free, s, sizes):
    for key, kind, evicted in records:
        for k in evicted:
            yield Event(HOST_CACHE, "evict", now, now, k.layer, k.expert, k.part, sizes[k.part], s, 0)
        yield Event(HOST_CACHE, kind, now, now, key.layer, key.expert, key.part, sizes[key.part], s, 0)
    for k in finished:
        yield Event(HOST_CACHE, "evict", free, free, k.layer, k.expert, k.part, sizes[k.part], s, 0)
