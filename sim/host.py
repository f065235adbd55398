"""The executor's own thread contention, as an optional host model the simulator is handed.

A profile measured on a host (`moelab profile`, compute.measured.contention) says how the
executor's threads share its cores: the main thread's work (expert calls, dense parts) runs
slower while reads or decompressions are in flight, an expert call or a dense part costs a
little more in runs than its table, and a read runs slower while the main thread works. The
bundled roofline profiles have none of it: `HostContention.of` is then None and the engine
pays nothing for it. The engine calls this model through five methods (dense_end, spans,
call_end, commit, stretch) and knows nothing else of it. A profile with the structural model's
figures (compute.measured.host) gets sim/host_model.py instead, through the same methods.

The main thread is a fluid model: its speed changes at each read's or decompression's start
and end. A read's stall depends on the computes, which depend on when the reads end: a few
fixed-point rounds (STALL_ROUNDS) from the same server state settle it.
"""
from __future__ import annotations

from dataclasses import astuple

from devices.profile import Contention
from sim.host_model import HostModel

STALL_ROUNDS = 3        # fixed-point rounds of read stall <-> compute timing


class HostContention:
    def __init__(self, contention: Contention, stall: float = 0.0, host_read: tuple[float, float] | None = None):
        self.contention = contention
        self.stall = stall                     # the share of its speed a read loses while the main thread works
        self.host_read = host_read             # (latency, bandwidth) of the host's own reads under a throttle
        self.in_flight: list[tuple[float, float, bool]] = []   # (start, end, is decompression) not yet past

    @classmethod
    def of(cls, cost, device, storage):
        """The host model of a run: the structural one (sim/host_model.py) when the profile has its
        figures (compute.measured.host), else this calibrated one, None without measured contention
        (roofline profiles)."""
        structural = HostModel.of(cost, device, storage)
        if structural is not None:
            return structural
        c = cost.contention()
        if not any(astuple(c)):
            return None
        # a read's stall is the host's own read path: a throttled run's reads sleep to their
        # device's times, whatever the main thread does
        own = device.storage.get(storage.name) == storage
        # likewise a throttled read contends for the cores only while the host reads it (then its
        # thread sleeps to its device's time): as long as a read of the host's own storage takes
        host = device.storage_option(None)
        return cls(c, c.stall if own else 0.0, None if own else (host.latency, host.read_bandwidth))

    # -- the engine's interface ---------------------------------------------------------------
    def dense_end(self, start: float, seconds: float, tokens: int = 1, prefill: bool = False) -> float:
        """When a dense part of `seconds` (its table) begun at `start` ends (its tokens and phase: for
        the structural model's shares)."""
        return self.main_thread(start, seconds + self.contention.dense, self.in_flight)

    def spans(self, now: float, loads, reads, decs) -> list[tuple[float, float, bool]]:
        """The reads and decompressions in flight from `now` on if a decision point's `loads` are
        read at `reads` [(issue, done)] and decompressed at `decs` [(load index, start, done,
        worker)]: those still in flight from earlier, then the decision's own, as long as each
        takes the host's cores (a throttled read: only its host read)."""
        out = [x for x in self.in_flight if x[1] > now]
        if self.host_read is None:
            out += [(a, b, False) for a, b in reads]
        else:
            latency, bandwidth = self.host_read
            out += [(a, min(b, a + latency + item.nbytes / bandwidth), False)
                    for (a, b), (item, _, _) in zip(reads, loads)]
        return out + [(a, b, True) for _, a, b, _ in decs]

    def call_end(self, start: float, seconds: float, spans, level: int = 0, tokens: int = 1) -> float:
        """When an expert call of `seconds` (its table) begun at `start` ends, `spans` in flight (its
        level and tokens: for the structural model's shares)."""
        return self.main_thread(start, seconds + self.contention.call, spans)

    def commit(self, spans) -> None:
        """The decision point is carried out: its spans are what is in flight from now on."""
        self.in_flight = spans

    def stretch(self, now: float, n_loads: int, plan, servers) -> list[float] | None:
        """What each of a decision point's reads takes beyond its transfer because the main thread
        works meanwhile (None: nothing). `plan(stretch)` times the decision point from the
        servers' state (returns reads, decompressions, computes and the decision path's end);
        `servers` is restored after each round."""
        if not self.stall or not n_loads:
            return None
        state = [s.state() for s in servers]
        stretch = [0.0] * n_loads
        for _ in range(STALL_ROUNDS):
            reads, _, computes, path_end = plan(stretch)
            busy = [(now, path_end)] + [(a, b) for a, b, *_ in computes]
            stretch = [stalled_end(a, b - x - a, busy, self.stall) - (b - x)
                       for (a, b), x in zip(reads, stretch)]
            for s, saved in zip(servers, state):
                s.restore(saved)
        return stretch

    # -- the fluid model -------------------------------------------------------------------------
    def main_thread(self, start: float, work: float, spans) -> float:
        """When `work` seconds of the main thread's work (at full speed) begun at `start` end: it runs
        at the measured contention's rate while reads / decompressions of `spans` are in flight (the
        executor's worker threads share the cores with it), its speed changing at each of their starts
        and ends."""
        spans = [x for x in spans if x[1] > start]
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


def stalled_end(start: float, work: float, busy, stall: float) -> float:
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
