"""ZipMoE's makespan bound where it bites: one layer in the simulator's own task model, the
scheduler's makespan (`alg_makespan`) against the exact optimum (`opt_makespan`, an exact search),
issue 22 item 6. (scipy's MILP, tried first, took minutes an instance at three tasks: its big-M
relaxation of the workers and the read queue is weak.) policies/zipmoe_schedule.py has the paper's own model
(`bound_makespan`: SM reads alone on the I/O stream, the workers reading their own chunks).

The task model (sim/engine.py): task j has K exponent chunks (each read for chunk[j] seconds and
decompressed for t_dec seconds) and, if it is Type-I, its SM bytes (read for sm[j] seconds; 0:
Type-II, SM cached), then a compute of compute[j] seconds once its SM bytes are read and its K
chunks decompressed. One storage queue serves one read at a time; L identical workers decompress;
one GPU computes. All tasks are released at 0.

ALG is what the simulator does with ZipMoE's scheduler: the dispatch order (`dispatch`, its balance
meter timed by the mean SM read and t_dec); each task's chunks read before its SM bytes, in that
order; decompressions taken FIFO in that order (each once its chunk is read and the one before it
has started, on the worker free first); computes in order of readiness. OPT is free in every pool:
any read order, any assignment of decompressions to workers, any compute order.

OPT by an exact search (`opt_makespan`): depth-first over the read order, then over the order the
decompressions are listed in, each branch cut by a lower bound against the best schedule found
(ALG's first). Three facts keep it small, each an exchange argument checked against brute force
over every read and decompression order (tests/test_zipmoe_bound.py): a task's identical chunks
are read and decompressed in index order; a task's SM bytes are read after its chunks (moving them
later only makes the reads between them earlier, and the task waits for its last chunk's
decompression anyway); a decompression schedule is as good as the list schedule of its start order
(each in turn on the worker free first, once read), and the computes run in order of readiness
(Jackson's rule on one machine).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from policies.zipmoe_schedule import dispatch


@dataclass(frozen=True)
class LayerTasks:
    sm: tuple[float, ...]          # SM read seconds per task (0: Type-II)
    chunk: tuple[float, ...]       # one exponent chunk's read seconds per task
    compute: tuple[float, ...]
    tokens: tuple[int, ...]        # the scheduler's heap key
    workers: int
    chunks: int
    t_dec: float                   # one chunk's decompression seconds

    @property
    def n(self) -> int:
        return len(self.sm)


def alg_makespan(inst: LayerTasks) -> float:
    """The simulator's makespan of the layer under ZipMoE's scheduler (module docstring)."""
    n, K, L = inst.n, inst.chunks, inst.workers
    type1 = [j for j in range(n) if inst.sm[j] > 0]
    t_sm = float(np.mean([inst.sm[j] for j in type1])) if type1 else 0.0
    order = dispatch([(j, inst.tokens[j]) for j in type1], [(j, inst.tokens[j]) for j in range(n) if j not in type1],
                     t_sm, inst.t_dec, L, K)
    t, read = 0.0, {}
    for j in order:                                     # one storage queue: chunks, then the SM bytes
        for q in range(K):
            t += inst.chunk[j]
            read[j, q] = t
        t += inst.sm[j]
        read[j, "sm"] = t
    free, last, ready = [0.0] * L, 0.0, {}
    for j in order:                                     # FIFO decompressions, the worker free first
        for q in range(K):
            w = free.index(min(free))
            start = max(read[j, q], last, free[w])
            last, free[w] = start, start + inst.t_dec
            ready[j] = max(ready.get(j, 0.0), free[w])
    gpu = 0.0
    for r, j in sorted((max(ready[j], read[j, "sm"]), j) for j in range(n)):
        gpu = max(gpu, r) + inst.compute[j]
    return gpu


def jackson(ready: list[float], compute) -> float:
    """One GPU, the ready tasks earliest first: the least makespan for these ready times."""
    gpu = 0.0
    for r, j in sorted((r, j) for j, r in enumerate(ready)):
        gpu = max(gpu, r) + compute[j]
    return gpu


class SearchBudget(Exception):
    """The exact search needed more nodes than it was given."""


def opt_makespan(inst: LayerTasks, nodes: int | None = None) -> float:
    """The least makespan of the layer over every schedule of the task model (module docstring);
    `nodes`: give up (SearchBudget) after that many search nodes."""
    n, K = inst.n, inst.chunks
    best = [alg_makespan(inst)]
    budget = [math.inf if nodes is None else nodes]
    dur = [[inst.chunk[j]] * K + ([inst.sm[j]] if inst.sm[j] > 0 else []) for j in range(n)]
    releases = [[] for _ in range(n)]
    sm_done = [0.0] * n

    def reads(t: float, left: float, items: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise SearchBudget(f"{inst}: more than {nodes} search nodes")
        if _read_bound(inst, t, left if items else 0.0, releases, sm_done, dur) >= best[0] - 1e-12:
            return
        if not items:
            best[0] = min(best[0], _decompress(inst, releases, sm_done, best[0], budget))
            return
        for j in range(n):
            q = len(releases[j]) + (1 if sm_done[j] else 0)
            if q == len(dur[j]):
                continue
            t2 = t + dur[j][q]
            if q < K:
                releases[j].append(t2)
            else:
                sm_done[j] = t2
            reads(t2, left - dur[j][q], items - 1)
            if q < K:
                releases[j].pop()
            else:
                sm_done[j] = 0.0

    reads(0.0, sum(map(sum, dur)), sum(map(len, dur)))
    return best[0]


def _read_bound(inst: LayerTasks, t: float, left: float, releases, sm_done, dur) -> float:
    """A lower bound on any completion of the reads so far: every task ready no earlier than its
    reads allow with a free worker for every chunk, the last read's task no earlier than the end of
    all reads; then Jackson."""
    K, d = inst.chunks, inst.t_dec
    ready, last = [], math.inf
    for j in range(inst.n):
        done = len(releases[j]) + (1 if sm_done[j] else 0)
        rest = sum(dur[j][done:])
        r = max(sm_done[j], (releases[j][-1] + d) if releases[j] else 0.0)
        if rest > 0:
            chunks_left = sum(dur[j][len(releases[j]):K])
            r = max(r, t + rest, (t + chunks_left + d) if chunks_left else 0.0)
            last = min(last, inst.compute[j])
        ready.append(r)
    bound = jackson(ready, inst.compute)
    unread = sorted(inst.chunk[j] for j in range(inst.n) for _ in range(K - len(releases[j])))
    pending = sorted([r for rel in releases for r in rel] + list(t + np.cumsum(unread)))
    bound = max(bound, capacity_bound(inst, [0.0] * inst.workers, pending, list(range(inst.n))))
    return max(bound, t + left + last) if last < math.inf else bound


def capacity_bound(inst: LayerTasks, free: list[float], pending: list[float], waiting: list[int]) -> float:
    """A lower bound from the workers: the chunks still to decompress (`pending`: their reads' ends or
    lower bounds on them) taken earliest first on the workers free at `free`, which gives the least
    i-th completion for every i (equal lengths); the task ready i-th from last (of `waiting`, the tasks
    they belong to) is ready no earlier than the (1 + (i - 1) K)-th completion from last, and that task
    and the later ones still compute."""
    free, done = sorted(free), []
    for r in sorted(pending):
        start = max(r, free[0])
        done.append(start + inst.t_dec)
        free[0] = start + inst.t_dec
        free.sort()
    if not done:
        return 0.0
    done.sort()
    computes = sorted(inst.compute[j] for j in waiting)
    bound, tail = 0.0, 0.0
    for i in range(len(waiting)):
        at = len(done) - 1 - i * inst.chunks
        if at < 0:
            break
        tail += computes[i]
        bound = max(bound, done[at] + tail)
    return bound


def _decompress(inst: LayerTasks, releases, sm_done, incumbent: float, budget: list) -> float:
    """The best makespan for these read completions: depth-first over the order decompressions are
    listed in (a task's chunks in order), each on the worker free first once read, their starts
    non-decreasing (a schedule is no better than the list schedule of its start order, whose starts
    are no later; repeating that ends in a list with non-decreasing starts)."""
    n, K, d, L = inst.n, inst.chunks, inst.t_dec, inst.workers
    best = [incumbent]
    ready = [sm_done[j] for j in range(n)]
    taken = [0] * n

    def step(free: list[float], placed: int, last: float) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise SearchBudget(f"{inst}: out of search nodes")
        lower = [max(ready[j], releases[j][-1] + d, min(free) + d) if taken[j] < K else ready[j] for j in range(n)]
        if jackson(lower, inst.compute) >= best[0] - 1e-12:
            return
        waiting = [j for j in range(n) if taken[j] < K]
        pending = [r for j in waiting for r in releases[j][taken[j]:]]
        if waiting and capacity_bound(inst, free, pending, waiting) >= best[0] - 1e-12:
            return
        if placed == n * K:
            best[0] = jackson(ready, inst.compute)
            return
        w = free.index(min(free))
        for j in range(n):
            if taken[j] == K:
                continue
            start = max(releases[j][taken[j]], free[w])
            if start < last:
                continue
            keep_free, keep_ready = free[w], ready[j]
            free[w], ready[j] = start + d, max(ready[j], start + d)
            taken[j] += 1
            step(free, placed + 1, start)
            taken[j] -= 1
            free[w], ready[j] = keep_free, keep_ready

    step([0.0] * L, 0, 0.0)
    return best[0]
