"""The structural host model (issue 24 item 1): the executor's threads on the host's cores
(processor sharing) and its interpreter lock (one holder at a time), sim/host_servers.py, charged
with the shares `moelab profile` measured per operation (compute.measured.host,
devices/host_figures.py). It replaces the calibrated shares of sim/host.py `HostContention` when a
profile has these figures; the engine calls it through the same five methods.

Every operation the executor's threads run becomes an `Operation` of segments, its work taken
from the figures the engine already charges (an expert call's table, a dense part's, the decision
path's, a read's time on the storage, a decompression's bytes at its rate alone) and split by its
measured shares of time alone holding the lock (`lock`) and keeping cores busy (`cpu`):

- the main thread (one thread): a dense part, the decision path, each expert call: the held part
  first (the Python that dispatches it), then the released part (`cpu - lock` cores wide on average
  over the rest; below one core wide it is a narrower kernel followed by a wait);
- each read (a reader thread): half its held part (the worker's submit), the device's time (a wait),
  its released CPU part (the checksum), the other half (the future's callback); a throttled read
  then sleeps until its device's time;
- each decompression task (a worker thread): held half, released part, held half.

At each call the model replays the window that still matters: the main thread's operations since
the oldest read or decompression still in flight, and those reads and decompressions, all from
their ready times, on the profile's cores (`host.cores`, the `--cores` it was measured at). The
servers are causal (an operation ready at t changes nothing before t), so a replay gives the past
the same ends it had. What the engine hears: when a main-thread operation ends, and how much
longer each read takes than its transfer and (`stretch`, a few fixed-point rounds as in sim/host.py)
what its decompression task takes beyond the engine's time for it at the profile's throughput
(a `Stretch`: the model's task, at its rate alone, may end sooner), so the engine's timeline shows
the model's reads and decompressions.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.host_figures import HostFigures, Share
from devices.profile import interpolate, measured_key
from devices.units import ConfigError
from sim.host_beside import BackgroundTask, MainTask, run_tasks
from sim.host_servers import Operation, Segment, operation_ends, run_threads

STALL_ROUNDS = 3        # fixed-point rounds of read stretch <-> compute timing (as sim/host.py)


def main_op(ready: float, seconds: float, share: Share) -> Operation:
    """A main-thread operation of `seconds` alone: the held part, then the released part."""
    held = share.lock * seconds
    free = max(0.0, share.cpu - share.lock) * seconds
    return Operation(ready, (Segment("lock", held),) + released(seconds - held, free))


def released(wall: float, cpu: float) -> tuple[Segment, ...]:
    """The lock-free part of an operation: `wall` seconds alone in which it burns `cpu` CPU seconds."""
    if wall <= 0:
        return ()
    if cpu >= wall:
        return (Segment("core", wall, cpu / wall),)
    return tuple(s for s in (Segment("core", cpu), Segment("wait", wall - cpu)) if s.work > 0)


def worker_op(ready: float, seconds: float, share: Share, wait: float | None = None,
              until: float | None = None) -> Operation:
    """A reader's or decompression worker's operation of `seconds` of host time alone: half its held
    part, `wait` seconds on the device (default: the time alone it burns no CPU), its released CPU,
    the other half; then it sleeps until `until` (a throttled read)."""
    half = share.lock * seconds / 2
    free = max(0.0, share.cpu - share.lock) * seconds
    wall = max(0.0, seconds - 2 * half)                 # its lock-free time alone
    wait = max(0.0, wall - free) if wait is None else wait
    segs = [Segment("lock", half)] if half > 0 else []
    segs += [Segment("wait", wait)] if wait > 0 else []
    # CPU beyond the held part runs in its lock-free time (none when it holds the lock throughout:
    # the helper threads' CPU it measured then ran beside the held part, which takes its own time)
    segs += [Segment("core", min(free, wall), max(1.0, free / wall))] if free > 0 and wall > 0 else []
    segs += [Segment("lock", half)] if half > 0 else []
    segs += [Segment("until", until)] if until is not None else []
    return Operation(ready, tuple(segs) or (Segment("wait", 0.0),))


class Stretch(list):
    """Per load, what its read takes beyond its transfer; `decompress`: per load, what its
    decompression task takes beyond the engine's time for it (the profile's throughput): negative
    where the model's task, at its rate alone, ends sooner."""

    def __init__(self, reads, decompress):
        super().__init__(reads)
        self.decompress = decompress


@dataclass
class Background:
    """A read or decompression of one decision point, as the model runs it."""
    op: Operation
    read: bool                  # a read (else a decompression)
    base_end: float             # its end in the engine before any stretch
    load: int = 0               # its load index in its decision point
    end: float = float("inf")   # its end in the latest replay


class HostModel:
    def __init__(self, figures: HostFigures, key: str, codec: str | None, cost, host_read=None, throttled=False):
        self.f, self.cost, self.cores, self.fmt_key = figures, cost, figures.cores, key
        self.calls = figures.calls[key]
        self.read_share = figures.read[key]
        self.dec = figures.decompress.get(codec) if codec else None
        self.dec_rate = self.dec[1] if self.dec else None   # raw bytes/s of a decompression alone
        self.host_read = host_read            # (latency, bandwidth) of the host's own storage
        self.throttled = throttled
        self.history: list[tuple[Operation, float]] = []     # main-thread ops kept for replays (op, end)
        self.in_flight: list[Background] = []                # reads / decompressions not known to be past
        self.layer: list[Operation] = []                     # this decision point's main-thread ops
        self.stretch_used: list[float] | None = None         # the stretch of the plan being timed
        self.new: list[Background] = []                      # the plan being timed's reads, decompressions
        self.planned: list[Background] = []                  # what the plan being timed has in flight

    @classmethod
    def of(cls, cost, device, storage) -> "HostModel | None":
        """The structural model of a run, None when the profile has no host figures for its model."""
        m = cost.measured
        if m is None or m.host is None:
            return None
        key, where = measured_key(cost.fmt), f"{device.path or device.name}: compute.measured.host"
        for part, table in (("calls", m.host.calls), ("read", m.host.read)):
            if key not in table:
                raise ConfigError(f"{where}.{part} has no entry for format {key!r} (has: {', '.join(table)}); "
                                  f"re-run `moelab profile`")
        codec = getattr(cost.fmt, "codec", None) if any(cost.fmt.decompress_bytes) else None
        if codec and codec not in m.host.decompress:
            raise ConfigError(f"{where}.decompress has no entry for codec {codec!r} (has: "
                              f"{', '.join(m.host.decompress)}); re-run `moelab profile`")
        host = device.storage_option(None)
        throttled = device.storage.get(storage.name) != storage
        model = BesideModel if m.host.beside is not None else cls
        return model(m.host, key, codec, cost, (host.latency, host.read_bandwidth), throttled)

    # -- shares ----------------------------------------------------------------------------------
    def _share(self, row, tokens: int) -> Share:
        """The shares at `tokens`, interpolated as the tables are; a share extrapolated beyond the last
        token counts is held to 0 <= lock <= 1 and lock <= cpu."""
        xs = self.cost.measured.tokens
        lock = min(1.0, max(0.0, interpolate(xs, [s.lock for s in row], tokens)))
        return Share(lock, max(lock, interpolate(xs, [s.cpu for s in row], tokens)))

    # -- the engine's interface ------------------------------------------------------------------
    def dense_end(self, start: float, seconds: float, tokens: int = 1, prefill: bool = False) -> float:
        """When a dense part of `seconds` (its table) of `tokens` tokens begun at `start` ends."""
        self._prune(start)
        op = self._main(start, seconds, "prefill" if prefill else "decode", tokens)
        end = self._replay([op], self.in_flight)[0]
        self.history.append((op, end))
        return end

    def spans(self, now: float, loads, reads, decs) -> list[Background]:
        """The reads and decompressions in flight from `now` on if a decision point's `loads` are read at
        `reads` [(issue, done)] and decompressed at `decs` [(load index, start, done, worker)]: those
        still in flight from earlier, then the decision's own; the decision path begins the main
        thread's operations of this decision point."""
        path = self.cost.decision_seconds(len(loads))
        self.layer = [self._main(now, path, "decide")] if path > 0 else []
        stretch = self.stretch_used or Stretch([0.0] * len(reads), [0.0] * len(reads))
        self.new = [self._read(i, a, b - x, item.nbytes)
                    for i, ((a, b), (item, _, _), x) in enumerate(zip(reads, loads, stretch))]
        for i, a, b, _ in decs:
            secs = loads[i][0].decompress_bytes / self.dec_rate
            self.new.append(Background(self._decompress(a, secs), False, b - stretch.decompress[i], i))
        self.planned = [b for b in self.in_flight if b.end > now] + self.new
        return self.planned

    def call_end(self, start: float, seconds: float, spans, level: int = 0, tokens: int = 1) -> float:
        """When an expert call of `seconds` (its table) at `level` for `tokens` tokens begun at `start`
        ends, `spans` in flight."""
        self.layer.append(self._main(start, seconds, "call", tokens, level))
        return self._replay(self.layer, spans)[-1]

    def commit(self, spans) -> None:
        """The decision point is carried out: its main-thread ops join the history, its spans are what
        is in flight from now on."""
        ends = self._replay(self.layer, spans) if self.layer else []
        self.history += list(zip(self.layer, ends))
        self.in_flight, self.layer, self.stretch_used = spans, [], None

    def stretch(self, now: float, n_loads: int, plan, servers) -> list[float] | None:
        """What each of a decision point's reads takes beyond its transfer because the threads share the
        cores and the lock (None: no loads). `plan(stretch)` times the decision point from the servers'
        state (which calls spans and call_end); `servers` is restored after each round."""
        if not n_loads:
            return None
        state = [s.state() for s in servers]
        stretch = Stretch([0.0] * n_loads, [0.0] * n_loads)
        for _ in range(STALL_ROUNDS):
            self.stretch_used = stretch
            plan(stretch)
            self._replay(self.layer, self.planned)
            stretch = Stretch([0.0] * n_loads, [0.0] * n_loads)
            for b in self.new:
                if b.read:
                    stretch[b.load] = max(0.0, b.end - b.base_end)
                else:
                    stretch.decompress[b.load] = b.end - b.base_end
            for s, saved in zip(servers, state):
                s.restore(saved)
        self.stretch_used = stretch
        return stretch

    # -- the operations, as the servers run them -------------------------------------------------
    def _main(self, ready: float, seconds: float, what: str, tokens: int = 1, level: int = 0) -> Operation:
        """A main-thread operation: a dense part (`prefill` / `decode`), the decision path, an expert call."""
        row = {"prefill": self.f.dense_prefill, "decode": self.f.dense_decode}.get(what)
        share = self.f.decide if what == "decide" else self._share(self.calls[level] if row is None else row, tokens)
        return main_op(ready, seconds, share)

    def _decompress(self, ready: float, seconds: float) -> Operation:
        return worker_op(ready, seconds, self.dec[0])

    def _host_seconds(self, issue: float, transfer_end: float, nbytes: int) -> float:
        """A read's time alone on the host's own storage (latency + bytes / bandwidth), at most its transfer."""
        latency, bandwidth = self.host_read
        return min(transfer_end - issue, latency + nbytes / bandwidth)

    # -- the replay --------------------------------------------------------------------------------
    def _read(self, i: int, issue: float, transfer_end: float, nbytes: int) -> Background:
        """A read issued at `issue` whose transfer ends at `transfer_end` (the storage channel's time,
        queueing included): its CPU parts are its shares of a read of the host's own storage; the
        rest of its time is the device's (a throttled read: its host read, then the sleep)."""
        total = transfer_end - issue
        host = self._host_seconds(issue, transfer_end, nbytes)
        cpu = self.read_share.cpu * host
        wait = max(0.0, (host if self.throttled else total) - cpu)
        op = worker_op(issue, host, self.read_share, wait, transfer_end if self.throttled else None)
        return Background(op, True, transfer_end, i)

    def _prune(self, now: float) -> None:
        """Forget what can no longer change: reads / decompressions that ended by `now`, and the main
        thread's operations that ended before every remaining one was ready."""
        self.in_flight = [b for b in self.in_flight if b.end > now]
        oldest = min((b.op.ready for b in self.in_flight), default=now)
        self.history = [(op, end) for op, end in self.history if end > oldest]

    def _replay(self, ops, bg) -> list[float]:
        """The ends of the main thread's `ops` (after its history) with `bg` in flight; sets each
        background's end."""
        main = [op for op, _ in self.history] + list(ops)
        ends = operation_ends(run_threads([main] + [[b.op] for b in bg], self.cores))
        for i, b in enumerate(bg):
            b.end = ends[i + 1, 0]
        return [ends[0, i] for i in range(len(self.history), len(main))]


class BesideModel(HostModel):
    """The same window replays with the measured co-runs (compute.measured.host.beside) in place of
    the lock and core servers: sim/host_beside.py says why and how they are charged."""

    def __init__(self, figures: HostFigures, key: str, codec: str | None, cost, host_read=None, throttled=False):
        super().__init__(figures, key, codec, cost, host_read, throttled)
        where = "compute.measured.host.beside"
        reads = figures.beside.get("read", {})
        if key not in reads:
            raise ConfigError(f"{where}.read has no entry for format {key!r} (has: {', '.join(reads) or 'none'}); "
                              f"re-run `moelab profile`")
        self.kinds = {"read": reads[key]}
        self.cross: dict = {}                       # kind -> other kind -> slowdown beside 1 and 2 (zip runs)
        if codec:
            decs = figures.beside.get("decompress", {})
            if codec not in decs:
                raise ConfigError(f"{where}.decompress has no entry for codec {codec!r} (has: "
                                  f"{', '.join(decs) or 'none'}); re-run `moelab profile`")
            self.kinds["decompress"] = decs[codec]
            # its task on the pool, as the executor's timeline times it, and how it and reads slow each other
            self.dec_rate = decs[codec].rate or self.dec_rate
            across = decs[codec].across or (1.0, 1.0, 1.0, 1.0)
            self.cross = {"decompress": {"read": across[:2]}, "read": {"decompress": across[2:]}}
        for kind, f in self.kinds.items():          # decompress is a kind only of zip runs
            if key not in f.calls:
                raise ConfigError(f"{where}.{kind} has no calls of format {key!r}; re-run `moelab profile`")

    def _slow(self, row, tokens: int) -> tuple[float, ...]:
        xs = self.cost.measured.tokens
        return tuple(max(1.0, interpolate(xs, [x[i] for x in row], tokens)) for i in range(4))

    def _main(self, ready: float, seconds: float, what: str, tokens: int = 1, level: int = 0) -> MainTask:
        slowed, slows = {}, {}
        for kind, f in self.kinds.items():
            if what == "decide":
                x = f.decide
            elif what == "call":
                x = self._slow(f.calls[self.fmt_key][level], tokens)
            else:
                x = self._slow(f.dense_prefill if what == "prefill" else f.dense_decode, tokens)
            slowed[kind], slows[kind] = x[:2], x[2:]
        return MainTask(ready, seconds, slowed, slows)

    def _decompress(self, ready: float, seconds: float) -> BackgroundTask:
        return BackgroundTask(ready, seconds, "decompress", self.kinds["decompress"].alone,
                              cross=self.cross["decompress"])

    def _read(self, i: int, issue: float, transfer_end: float, nbytes: int) -> Background:
        """A read: its host time alone (a read of the host's own storage) slowed by the co-runs, then
        (a throttled read, or one queued in the storage channel) a wait until the transfer's end."""
        host = self._host_seconds(issue, transfer_end, nbytes)
        task = BackgroundTask(issue, host, "read", self.kinds["read"].alone, transfer_end,
                              cross=self.cross.get("read", {}))
        return Background(task, True, transfer_end, i)

    def _replay(self, ops, bg) -> list[float]:
        main = [op for op, _ in self.history] + list(ops)
        ends, bg_ends = run_tasks(main, [b.op for b in bg])
        for b, end in zip(bg, bg_ends):
            b.end = end
        return ends[len(self.history):]
