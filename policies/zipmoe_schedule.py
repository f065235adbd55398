"""ZipMoE's load scheduler, its makespan bound, and the baselines of its evaluation
(policies/zipmoe.py has the format's cache; papers.md, ZipMoE §2).

- `ZipMoEScheduler`: Type-I and Type-II tasks, each a max-heap on tokens, interleaved by a
  balance meter (`dispatch`); each task's exponent chunks are read before its SM bytes, so
  the decompression workers start while the raw bytes stream.
- `bound_makespan`: the three-resource model of one layer (one I/O stream, L workers, one
  GPU) in which the scheduler's makespan is at most (3 - 1/L) x OPT (tests/test_zipmoe.py
  checks it against brute force).
- `LayerStream` (DeepSpeed-like: every expert of the layer streamed whole) and `NextLayerAll`
  (its prefetch of the next layer's parameters).
"""
from __future__ import annotations

import heapq
from typing import Sequence

from policies.base import Key, PolicyContext, Scheduler, load_item
from policies.prefetch import Prefetcher
from policies.zipmoe import require_zip


# -- the scheduler -------------------------------------------------------------------------------
def dispatch(type1: Sequence[tuple[object, int]], type2: Sequence[tuple[object, int]], t_sm: float, t_dec: float,
             workers: int, chunks: int) -> list:
    """The released code's ZipMoESchedulerFunc. type1 / type2: (task, tokens) in arrival order.
    Each type is a max-heap on tokens (ties: arrival). Balance meter: IO = Type-I dispatched x
    t_sm; Compute = floor(ops / L) x t_dec, each task adding K ops. Loop: dispatch one Type-I;
    while Compute <= IO, dispatch Type-II; when Type-I runs out, the rest of Type-II."""
    h1 = [(-n, i, task) for i, (task, n) in enumerate(type1)]
    h2 = [(-n, i, task) for i, (task, n) in enumerate(type2)]
    heapq.heapify(h1)
    heapq.heapify(h2)
    out, io, ops = [], 0.0, 0
    while h1 or h2:
        if h1:
            out.append(heapq.heappop(h1)[2])
            io += t_sm
            ops += chunks
        while h2 and (not h1 or (ops // workers) * t_dec <= io):
            out.append(heapq.heappop(h2)[2])
            ops += chunks
    return out


class ZipMoEScheduler(Scheduler):
    """ZipMoE's Type-I/Type-II interleaving (`dispatch`), timed by the cost model. Loads: per
    task in dispatch order, its exponent chunks, then its SM bytes (Type-I); decompression tasks
    go to the workers in the same order."""
    name = "zipmoe"
    formats = ("zip",)

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        require_zip(ctx.fmt, "the zipmoe scheduler")
        cost, fmt = ctx.need_cost("the zipmoe scheduler"), ctx.fmt
        self.t_sm = cost.read_seconds(fmt.part_bytes[0])
        self.t_dec = cost.decompress_seconds(fmt.decompress_bytes[1])
        self.workers = cost.decompress_workers

    def order(self, layer, demand, resident):
        fmt = self.fmt
        tokens: dict[int, int] = {}
        for (e, _), n in demand.counts().items():
            tokens[e] = tokens.get(e, 0) + n
        type1, type2 = [], []
        for e, n in tokens.items():
            missing = [p for p in range(fmt.n_parts) if Key(layer, e, p) not in resident]
            if missing:
                (type2 if missing[0] > 0 else type1).append((e, n))
        plan = []
        for e in dispatch(type1, type2, self.t_sm, self.t_dec, self.workers, fmt.chunks):
            for p in (*range(1, fmt.n_parts), 0):
                key = Key(layer, e, p)
                if key not in resident:
                    plan.append(load_item(key, fmt))
        return plan

    def decompress_order(self, layer, loads):
        return [item.key for item in loads if item.decompress_bytes]


# -- the bound -------------------------------------------------------------------------------------
def bound_makespan(sm: Sequence[float], compute: Sequence[float], io_order: Sequence[int],
                   op_order: Sequence[int], workers: int, t_dec: float, gpu_priority: Sequence[float]) -> float:
    """Makespan of one layer in the model of ZipMoE's bound: task j's SM read (sm[j] seconds, 0
    for Type-II) on the one I/O stream in io_order; its K exponent chunks (t_dec each, read by the
    workers themselves, as in the released code) on `workers` workers taking op_order (task ids)
    FIFO; then its compute (compute[j]) on the GPU once both are done, the ready task of lowest
    gpu_priority first, never idle while one is ready."""
    n = len(sm)
    ready = [0.0] * n
    t = 0.0
    for j in io_order:
        t += sm[j]
        ready[j] = t
    for i, j in enumerate(op_order):       # equal tasks, all released at 0: op i ends at slot i // L
        ready[j] = max(ready[j], (i // workers + 1) * t_dec)
    todo, t = set(range(n)), 0.0
    while todo:
        now = [j for j in todo if ready[j] <= t]
        if not now:
            t = min(ready[j] for j in todo)
            continue
        j = min(now, key=lambda j: (gpu_priority[j], j))
        todo.discard(j)
        t += compute[j]
    return t


def zipmoe_makespan(sm: Sequence[float], compute: Sequence[float], tokens: Sequence[int], workers: int,
                    chunks: int, t_dec: float) -> float:
    """The scheduler's makespan in the bound's model: dispatch order in every pool."""
    t_sm = max(sm) if any(sm) else 0.0
    order = dispatch([(j, tokens[j]) for j in range(len(sm)) if sm[j] > 0],
                     [(j, tokens[j]) for j in range(len(sm)) if sm[j] == 0], t_sm, t_dec, workers, chunks)
    rank = {j: i for i, j in enumerate(order)}
    return bound_makespan(sm, compute, [j for j in order if sm[j] > 0], [j for j in order for _ in range(chunks)],
                          workers, t_dec, [rank[j] for j in range(len(sm))])


# -- baselines of ZipMoE's evaluation ------------------------------------------------------------------
class LayerStream(Scheduler):
    """DeepSpeed-like (ZeRO-3 offload, not MoE-aware): every expert of the layer is fetched, in
    index order, whether or not a token routes to it."""
    name = "layer-stream"

    def order(self, layer, demand, resident):
        fmt = self.fmt
        return [load_item(Key(layer, e, p), fmt) for e in range(self.ctx.experts) for p in range(fmt.n_parts)
                if Key(layer, e, p) not in resident]


class NextLayerAll(Prefetcher):
    """DeepSpeed-like parameter prefetch: every expert of the next layer, while this one computes."""
    name = "next-layer-all"

    def after_layer(self, layer, demand, routing=None):
        nxt = (layer + 1) % self.ctx.layers
        return [Key(nxt, e, p) for e in range(self.ctx.experts) for p in range(self.fmt.n_parts)]
