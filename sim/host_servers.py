"""The host's shared resources as servers (issue 24, item 1): the cores, shared by processor
sharing, and the interpreter lock, held by one thread at a time. Pure classes and functions, not
wired into the engine yet (sim/host.py's calibrated shares are what the engine charges today).

A thread (the executor's main thread, a reader, a decompression worker) runs its operations one
after another; an operation becomes ready at a given time and is a sequence of segments:

- ``lock``: CPU work done holding the interpreter lock (Python code: the decision path, the
  runtime's loop, a reader's submit and its callback);
- ``core``: CPU work with the lock released (inside a torch kernel, a codec call, a checksum);
- ``wait``: wall time that uses neither (a read in the device);
- ``until``: waits until the absolute time ``work`` (a throttled read's sleep to its device's time;
  no wait if that time has passed).

``work`` is the segment's seconds when its thread runs alone at full speed; a ``core`` segment
may keep ``width`` cores busy at once (a torch kernel on its intra-op threads).

Cores: the runnable segments (``lock`` and ``core``; a thread waiting for the lock is blocked,
not runnable) share ``cores`` cores by processor sharing: with a demand D (their widths summed)
above the cores C each runs at C / D of its speed, else at full speed. With one-wide segments:
n > C runnable threads each run at C / n.

Lock: one holder at a time; a thread asks for it when a ``lock`` segment begins and holds it
until that segment ends; waiting threads get it first come, first served. At one instant every
ending segment ends (releasing the lock to the longest waiter) before the threads whose segments
end there, or whose operations become ready, start their next segment, in thread order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

KINDS = ("lock", "core", "wait", "until")
EPS = 1e-12


@dataclass(frozen=True)
class Segment:
    kind: str               # lock | core | wait | until
    work: float             # seconds alone at full speed (wait: wall seconds; until: the time it waits for)
    width: float = 1        # cores it keeps busy (core segments; a mean, so not always whole)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"segment kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.work < 0 or self.width < 1 or (self.width > 1 and self.kind != "core"):
            raise ValueError(f"segment {self}: work >= 0, width >= 1, and only a core segment is wider than 1")


@dataclass(frozen=True)
class Operation:
    ready: float                         # the earliest time it may begin
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Span:
    thread: int
    op: int
    segment: int
    kind: str
    asked: float            # when the segment could begin (a lock segment: when it asked)
    start: float            # when it began (a lock segment: when it got the lock)
    end: float


def operation(work: float, lock_share: float, *, ready: float = 0.0, pieces: int = 1, width: float = 1) -> Operation:
    """An operation of `work` seconds holding the lock for `lock_share` of them: `pieces` times a
    held part then a released part (the released parts `width` wide)."""
    if not 0.0 <= lock_share <= 1.0 or pieces < 1:
        raise ValueError(f"lock_share {lock_share} must lie in [0, 1] and pieces {pieces} be >= 1")
    held, free = lock_share * work / pieces, (1.0 - lock_share) * work / pieces
    segs = []
    for _ in range(pieces):
        segs += [Segment("lock", held)] if held > 0 else []
        segs += [Segment("core", free, width)] if free > 0 else []
    return Operation(ready, tuple(segs))


class InterpreterLock:
    """One holder at a time, the waiters served first come, first served."""

    def __init__(self):
        self.holder: int | None = None
        self.waiting: deque[int] = deque()

    def request(self, thread: int) -> bool:
        """True: `thread` holds the lock now; False: it waits in line."""
        if self.holder is None:
            self.holder = thread
            return True
        self.waiting.append(thread)
        return False

    def release(self, thread: int) -> int | None:
        """`thread` lets go; returns the waiter that holds it now (None: nobody was waiting)."""
        if self.holder != thread:
            raise RuntimeError(f"thread {thread} releases a lock held by {self.holder}")
        self.holder = self.waiting.popleft() if self.waiting else None
        return self.holder


class ProcessorSharing:
    """`cores` cores shared by the runnable segments: a demand D above them runs at cores / D."""

    def __init__(self, cores: float):
        if cores <= 0:
            raise ValueError(f"cores {cores} must be > 0")
        self.cores = cores

    def speed(self, demand: float) -> float:
        return 1.0 if demand <= self.cores else self.cores / demand

    def finish_times(self, jobs: Sequence[tuple[float, float]]) -> list[float]:
        """Each job (arrival, work) a thread's piece of CPU work on its own thread: when each ends."""
        spans = run_threads([[Operation(a, (Segment("core", w),))] for a, w in jobs], self.cores)
        return [s.end for s in sorted(spans, key=lambda s: s.thread)]


class _Thread:
    def __init__(self, ops: Sequence[Operation]):
        self.ops, self.op, self.seg = list(ops), 0, -1
        self.state = "idle" if self.ops else "done"      # idle | blocked | run | wait | done
        self.left = 0.0                                  # run: work left; wait: when it ends
        self.asked = self.start = 0.0
        self.free_at = 0.0                               # when the previous operation ended

    def segment(self) -> Segment:
        return self.ops[self.op].segments[self.seg]


class HostThreads:
    """The threads, the cores and the lock, advanced from one instant to the next (run_threads)."""

    def __init__(self, threads: Sequence[Sequence[Operation]], cores: float):
        self.threads = [_Thread(ops) for ops in threads]
        self.cpu, self.lock = ProcessorSharing(cores), InterpreterLock()
        self.now, self.spans = 0.0, []

    def speed(self) -> float:
        demand = sum(t.segment().width for t in self.threads if t.state == "run")
        return self.cpu.speed(demand)

    def next_time(self, speed: float) -> float:
        times = []
        for t in self.threads:
            if t.state == "run":
                times.append(self.now + t.left / speed)
            elif t.state == "wait":
                times.append(t.left)
            elif t.state == "idle":
                times.append(max(self.now, t.ops[t.op].ready, t.free_at))
        return min(times) if times else float("inf")

    def step(self) -> bool:
        """Advance to the next instant something ends or becomes ready; False when all is done."""
        speed = self.speed()
        t_next = self.next_time(speed)
        if t_next == float("inf"):
            return False
        for t in self.threads:
            if t.state == "run":
                t.left -= (t_next - self.now) * speed
        self.now = t_next
        ending = [i for i, t in enumerate(self.threads)
                  if (t.state == "run" and t.left <= EPS * max(1.0, t_next))
                  or (t.state == "wait" and t.left <= t_next + EPS)]
        for i in ending:                                 # every end first: locks released
            self._end_segment(i)
        for i, t in enumerate(self.threads):             # then the next segments, in thread order
            if t.state == "idle" and max(t.ops[t.op].ready, t.free_at) <= self.now + EPS:
                self._begin_segment(i)
        return True

    def _end_segment(self, i: int) -> None:
        t = self.threads[i]
        seg = t.segment()
        self.spans.append(Span(i, t.op, t.seg, seg.kind, t.asked, t.start, self.now))
        if seg.kind == "lock":
            nxt = self.lock.release(i)
            if nxt is not None:                          # the longest waiter holds it now
                w = self.threads[nxt]
                w.state, w.start = "run", self.now
        if t.seg + 1 < len(t.ops[t.op].segments):
            t.state = "idle"                             # its next segment begins at this instant
        else:
            t.op, t.seg, t.free_at = t.op + 1, -1, self.now
            t.state = "idle" if t.op < len(t.ops) else "done"

    def _begin_segment(self, i: int) -> None:
        t = self.threads[i]
        t.seg += 1
        seg = t.segment()
        t.asked = t.start = self.now
        if seg.kind in ("wait", "until"):
            t.state, t.left = "wait", self.now + seg.work if seg.kind == "wait" else max(self.now, seg.work)
            return
        t.left = seg.work
        t.state = "run" if seg.kind == "core" or self.lock.request(i) else "blocked"


def run_threads(threads: Sequence[Sequence[Operation]], cores: float) -> list[Span]:
    """Every segment's span, in the order they end (equal ends: in thread order), when `threads`
    (each a list of operations run one after another) share `cores` cores and one interpreter lock."""
    host = HostThreads(threads, cores)
    while host.step():
        pass
    return host.spans


def operation_ends(spans: Sequence[Span]) -> dict[tuple[int, int], float]:
    """(thread, operation) -> when its last segment ended."""
    out: dict[tuple[int, int], float] = {}
    for s in spans:
        out[s.thread, s.op] = max(out.get((s.thread, s.op), 0.0), s.end)
    return out
