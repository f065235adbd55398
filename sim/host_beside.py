"""The executor's threads as measured co-runs (issue 24): the main thread's operations and the
background tasks (reads, decompressions) slow each other down by the factors `moelab profile`
measured when they ran side by side on the profile's cores (executor/profile_beside.py,
compute.measured.host.beside), applied as rates that hold while the same set runs.

Why not the lock and core servers of sim/host_servers.py: CPython's interpreter lock is not handed
over first come, first served. A thread that releases it for a short kernel usually takes it back
before a waiter has woken (~40 us here), and a waiter gets it at a long release or after the switch
interval (5 ms), so what one thread costs another depends on how its releases fall, which a share
of time held does not carry (a tiny-moe zip call of 242 us took 2.4 ms beside one decompression
worker and 8 ms beside two on 2 cores, 0.5 and 0.8 ms on 1 core; in a validation run on 2 cores
the executor's zip calls that overlapped a decompression took a median 1.0-1.2 ms, where the
servers with the measured shares gave every call 0.26-0.3 ms). A co-run measured as the executor runs it carries it, for the thread counts
the executor uses (its two read and two decompression workers).

The model, from one instant to the next:
- the main thread runs its tasks one after another, each from its ready time; with n_k background
  tasks of kind k running (at most 2 counted: the pools' workers), it runs at 1 / (1 + sum over
  kinds of (its slowdown beside n_k of them - 1));
- a background task runs from its ready time for `work` seconds alone at 1 / its kind's slowdown
  with the n_k running (beside the main thread's current task when it has one, else alone), times
  its slowdown beside the m running of each other kind (`cross`, measured with one of it beside 1
  and 2 of them and no main-thread work: reads and decompressions slow each other), then waits
  until `until` (a throttled read's sleep to its device's time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

EPS = 1e-12
WORKERS = 2             # background tasks of a kind counted at most (the executor's pools)


@dataclass(frozen=True)
class MainTask:
    ready: float
    work: float                                          # seconds alone
    slowed: dict = field(default_factory=dict)           # kind -> (beside 1, beside 2): its slowdown
    slows: dict = field(default_factory=dict)            # kind -> (1, 2): their slowdown beside it


@dataclass(frozen=True)
class BackgroundTask:
    ready: float
    work: float                                          # seconds alone on the host
    kind: str
    alone: tuple = (1.0, 1.0)                            # its kind's slowdown with no main-thread task, 1 and 2
    until: float | None = None                           # then it waits until this time (a throttled read)
    cross: dict = field(default_factory=dict)            # other kind -> its slowdown beside 1 and 2 of them


def _factor(table: tuple, n: int) -> float:
    return 1.0 if n <= 0 else table[min(n, WORKERS) - 1]


class _Run:
    def __init__(self, main: Sequence[MainTask], bg: Sequence[BackgroundTask]):
        self.main, self.bg = list(main), list(bg)
        self.now, self.mi, self.m_left = 0.0, 0, None           # main: index, work left (None: not begun)
        self.m_free = 0.0                                       # when the main thread's last task ended
        self.b_left = [None] * len(self.bg)                     # work left (None: not begun; 0: waiting)
        self.main_end = [0.0] * len(self.main)
        self.bg_end: list[float | None] = [None] * len(self.bg)

    def running(self) -> list[int]:
        return [i for i, left in enumerate(self.b_left) if left is not None and left > 0]

    def rates(self, run: list[int]) -> tuple[float, list[float]]:
        counts: dict[str, int] = {}
        for i in run:
            counts[self.bg[i].kind] = counts.get(self.bg[i].kind, 0) + 1
        task = self.main[self.mi] if self.m_left is not None else None
        main_rate = 0.0
        if task is not None:
            extra = sum(_factor(task.slowed.get(k, (1.0, 1.0)), n) - 1.0 for k, n in counts.items())
            main_rate = 1.0 / (1.0 + max(0.0, extra))
        rates = []
        for i in run:
            b = self.bg[i]
            table = task.slows.get(b.kind, b.alone) if task is not None else b.alone
            slow = _factor(table, counts[b.kind])
            for kind, n in counts.items():
                if kind != b.kind:
                    slow *= _factor(b.cross.get(kind, (1.0, 1.0)), n)
            rates.append(1.0 / slow)
        return main_rate, rates

    def step(self) -> bool:
        self._begin()
        self._end()                                 # tasks of no work end as they begin
        if self.done():
            return False
        self._begin()
        run = self.running()
        main_rate, rates = self.rates(run)
        times = []
        if self.m_left is not None:
            times.append(self.now + self.m_left / main_rate)
        elif self.mi < len(self.main):
            times.append(max(self.main[self.mi].ready, self.m_free))
        times += [self.now + self.b_left[i] / r for i, r in zip(run, rates)]
        times += [self.bg[i].ready for i, left in enumerate(self.b_left) if left is None]
        times += [self.bg[i].until for i, left in enumerate(self.b_left)
                  if left == 0 and self.bg_end[i] is None and self.bg[i].until is not None]                # sleeping until its device's time
        if not times:
            return False
        t = max(self.now, min(times))
        dt = t - self.now
        if self.m_left is not None:
            self.m_left -= dt * main_rate
        for i, r in zip(run, rates):
            self.b_left[i] -= dt * r
        self.now = t
        self._end()
        return True

    def _begin(self) -> None:
        if self.m_left is None and self.mi < len(self.main) and max(self.main[self.mi].ready, self.m_free) <= self.now + EPS:
            self.m_left = self.main[self.mi].work
        for i, b in enumerate(self.bg):
            if self.b_left[i] is None and b.ready <= self.now + EPS:
                self.b_left[i] = b.work

    def _end(self) -> None:
        tol = EPS * max(1.0, self.now)
        if self.m_left is not None and self.m_left <= tol:
            self.main_end[self.mi] = self.now
            self.mi, self.m_left, self.m_free = self.mi + 1, None, self.now
        for i, b in enumerate(self.bg):
            left = self.b_left[i]
            if left is not None and left <= tol and self.bg_end[i] is None:
                self.b_left[i] = 0.0
                if b.until is None or b.until <= self.now + tol:
                    self.bg_end[i] = self.now

    def done(self) -> bool:
        return self.mi >= len(self.main) and all(e is not None for e in self.bg_end)


def run_tasks(main: Sequence[MainTask], bg: Sequence[BackgroundTask]) -> tuple[list[float], list[float]]:
    """When each main-thread task and each background task ends."""
    r = _Run(main, bg)
    while not r.done() and r.step():
        pass
    return r.main_end, r.bg_end
