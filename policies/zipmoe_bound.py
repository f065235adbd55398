"""ZipMoE's makespan bound where it bites: one layer in the simulator's own task model, the
scheduler's makespan (`alg_makespan`) against the exact optimum (`opt_makespan`, a MILP solved by
scipy's HiGHS), issue 22 item 6. policies/zipmoe_schedule.py has the paper's own model
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
"""
from __future__ import annotations

from dataclasses import dataclass

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


def opt_makespan(inst: LayerTasks, time_limit: float = 60.0) -> float:
    """The optimum makespan over every schedule of the task model: the MILP (`_milp`) picks the
    orders, which are then timed exactly (`timed`), free of the solver's tolerances."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    m, (c, A, lo, hi, integrality, ub) = _milp(inst)
    for presolve in (True, False):                      # (HiGHS's presolve fails on a few of these)
        res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(0, ub),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "presolve": presolve})
        if res.status == 0:
            break
    if res.status != 0:
        raise RuntimeError(f"the MILP of {inst} ended with status {res.status}: {res.message}")
    x = res.x
    names = sorted(m.index.items(), key=lambda kv: (x[kv[1]], kv[1]))
    reads = [name[1] for name, _ in names if name[0] == "s"]
    dec = sorted((name[2], name[1]) for name, v in m.index.items() if name[0] == "x" and x[v] > 0.5)
    gpu = [name[1] for name, _ in names if name[0] == "g"]
    return timed(inst, reads, [c for _, c in dec], gpu)


def timed(inst: LayerTasks, reads: list, decompressions: list, computes: list) -> float:
    """The makespan of one schedule given by its orders, every job as early as its order allows:
    the reads in `reads` back to back, the decompressions in `decompressions` each on the worker
    free first once its chunk is read, the computes in `computes` once each task is ready."""
    t, done = 0.0, {}
    for i in reads:
        t += inst.sm[i[0]] if i[1] == "sm" else inst.chunk[i[0]]
        done[i] = t
    free, ready = [0.0] * inst.workers, [0.0] * inst.n
    for j, q in decompressions:
        w = free.index(min(free))
        free[w] = max(done[j, q], free[w]) + inst.t_dec
        ready[j] = max(ready[j], free[w], done.get((j, "sm"), 0.0))
    gpu = 0.0
    for j in computes:
        gpu = max(gpu, ready[j]) + inst.compute[j]
    return gpu


class _Model:
    """Variables by name and rows of `lo <= a.x <= hi` for the MILP."""

    def __init__(self):
        self.index, self.ints, self.rows = {}, [], []

    def var(self, name, integer: bool = False) -> int:
        self.index[name] = len(self.index)
        self.ints.append(1 if integer else 0)
        return self.index[name]

    def row(self, terms: dict, lo: float = -np.inf, hi: float = np.inf) -> None:
        self.rows.append((terms, lo, hi))


def _milp(inst: LayerTasks):
    """min Cmax. Reads: start s_i per read item, a pair binary per two items (one before the other;
    a task's identical chunks in index order). Decompressions (all t_dec): positions 0..C-1 in start
    order, S_m <= S_m+1 and S_m+L >= S_m + t_dec (equal lengths on L identical workers: feasible
    exactly then), x[c, m] = 1 puts chunk c at position m, after its read; a task's chunks in index
    order (identical, so no loss). GPU: start g_j after the task's SM read and its chunks, a pair
    binary per two tasks. M: the sum of every duration."""
    n, K, L, d = inst.n, inst.chunks, inst.workers, inst.t_dec
    items = [(j, q) for j in range(n) for q in range(K)] + [(j, "sm") for j in range(n) if inst.sm[j] > 0]
    dur = {i: inst.chunk[i[0]] if i[1] != "sm" else inst.sm[i[0]] for i in items}
    big = sum(dur.values()) + n * K * d + sum(inst.compute) + 1.0
    m = _Model()
    cmax = m.var("cmax")
    s = {i: m.var(("s", i)) for i in items}
    for a in range(len(items)):                         # one storage queue
        for b in range(a + 1, len(items)):
            i, k = items[a], items[b]
            if i[0] == k[0] and i[1] != "sm" and k[1] != "sm":      # a task's chunks in order
                m.row({s[k]: 1, s[i]: -1}, lo=dur[i])
                continue
            z = m.var(("z", i, k), integer=True)
            m.row({s[k]: 1, s[i]: -1, z: -big}, lo=dur[i] - big)     # z = 1: i before k
            m.row({s[i]: 1, s[k]: -1, z: big}, lo=dur[k])            # z = 0: k before i
    chunks = [(j, q) for j in range(n) for q in range(K)]
    C = len(chunks)
    S = [m.var(("S", p)) for p in range(C)]
    x = {(c, p): m.var(("x", c, p), integer=True) for c in chunks for p in range(C)}
    t = [m.var(("t", j)) for j in range(n)]
    for p in range(C):
        m.row({x[c, p]: 1 for c in chunks}, lo=1, hi=1)
        if p + 1 < C:
            m.row({S[p + 1]: 1, S[p]: -1}, lo=0)
        if p + L < C:
            m.row({S[p + L]: 1, S[p]: -1}, lo=d)
    for c in chunks:
        m.row({x[c, p]: 1 for p in range(C)}, lo=1, hi=1)
        j, q = c
        if q + 1 < K:                                   # chunk q decompressed before chunk q + 1
            terms = {x[c, p]: float(p) for p in range(C)}
            for p in range(C):
                terms[x[(j, q + 1), p]] = terms.get(x[(j, q + 1), p], 0.0) - p
            m.row(terms, hi=-1)
        for p in range(C):                              # after its read; the task waits for it
            m.row({S[p]: 1, s[c]: -1, x[c, p]: -big}, lo=dur[c] - big)
            m.row({t[j]: 1, S[p]: -1, x[c, p]: -big}, lo=d - big)
    g = [m.var(("g", j)) for j in range(n)]
    for j in range(n):
        m.row({g[j]: 1, t[j]: -1}, lo=0)
        if inst.sm[j] > 0:
            m.row({g[j]: 1, s[j, "sm"]: -1}, lo=inst.sm[j])
        m.row({cmax: 1, g[j]: -1}, lo=inst.compute[j])
        for k in range(j + 1, n):                       # one GPU
            w = m.var(("w", j, k), integer=True)
            m.row({g[k]: 1, g[j]: -1, w: -big}, lo=inst.compute[j] - big)
            m.row({g[j]: 1, g[k]: -1, w: big}, lo=inst.compute[k])
    return m, _arrays(m, cmax, big)


def _arrays(m: _Model, cmax: int, big: float):
    nv = len(m.index)
    A = np.zeros((len(m.rows), nv))
    lo, hi = np.empty(len(m.rows)), np.empty(len(m.rows))
    for r, (terms, a, b) in enumerate(m.rows):
        for v, coef in terms.items():
            A[r, v] += coef
        lo[r], hi[r] = a, b
    c = np.zeros(nv)
    c[cmax] = 1.0
    ub = np.full(nv, big * 4)
    ints = np.array(m.ints)
    ub[ints == 1] = 1.0
    return c, A, lo, hi, ints, ub
