"""The samplers the synthetic generators share (workloads/synthetic.py, workloads/fitted.py):
Zipf popularity over a random ranking, draws without replacement within a token, the run-based
chains of per-slot reuse, and router-ordered gate scores. Moved here unchanged from
synthetic.py (which re-exports them), so both generators import them without a cycle."""
from __future__ import annotations

import numpy as np


def _popularity(rng, layers: int, experts: int, skew: float) -> np.ndarray:
    """[layers, experts] probabilities: Zipf over ranks, a random expert at each rank per layer."""
    by_rank = 1.0 / np.arange(1, experts + 1) ** skew
    by_rank /= by_rank.sum()
    ranks = rng.permuted(np.tile(np.arange(experts), (layers, 1)), axis=1)   # ranks[l, r] = expert
    pop = np.empty((layers, experts))
    np.put_along_axis(pop, ranks, np.broadcast_to(by_rank, pop.shape), axis=1)
    return pop


def _draw(rng, pop: np.ndarray, layer: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """One expert per row from its layer's popularity, never one of the row's `taken` experts
    (sampling without replacement within a token), O(k log E) per row: pick a point in the
    untaken mass, step it over each taken expert's CDF interval (in id order), invert the CDF."""
    layers, experts = pop.shape
    hi = np.cumsum(pop, axis=1)
    hi[:, -1] = 1.0
    hi = (hi + np.arange(layers)[:, None]).ravel()       # one sorted array: layer l spans [l, l + 1)
    lo = np.r_[0.0, hi[:-1]]                             # expert i owns [lo[i], hi[i])
    base = layer * experts
    t = np.sort(taken, axis=1) + base[:, None]
    start, width = lo[t], hi[t] - lo[t]
    x = layer + rng.random(len(layer)) * (1.0 - width.sum(1))
    for i in range(t.shape[1]):
        x += width[:, i] * (x >= start[:, i])
    e = np.searchsorted(hi, x, side="right") - base
    # rounding can land a point on a taken interval's edge: redraw those rows exactly (rare)
    bad = np.flatnonzero((e >= experts) | (taken == e[:, None]).any(1))
    if len(bad):
        w = pop[layer[bad]]
        np.put_along_axis(w, taken[bad].astype(np.intp), 0.0, axis=1)
        c = np.cumsum(w, axis=1)
        e[bad] = np.argmax(c > (rng.random(len(bad)) * c[:, -1])[:, None], axis=1)
    return e.astype(np.int32)


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    length = end - start
    return np.arange(length.sum()) - np.repeat(np.cumsum(length) - length - start, length)


def _slot_chain(reuse: np.ndarray, taken: np.ndarray, draw) -> np.ndarray:
    """Slot j's expert at every flat (chain, position): [chains * positions].

    Sequentially: e[t] = e[t-1] if reuse[t] and e[t-1] is not in taken[t] (the experts of slots
    < j at t), else a fresh draw. Vectorised over *runs*: a fresh draw starts a run whose
    value fills forward. A run's first clash with `taken` is certainly a fresh draw and all
    before it is final, so split runs at their first clash and re-check only the new runs
    (the remaining suffixes) until none clashes. draw(flat positions) -> fresh experts.
    """
    breaks = ~reuse
    breaks[:, 0] = True                                  # a request's first token has no predecessor
    start = np.flatnonzero(breaks.ravel())               # runs, in flat (chain, position) order
    end = np.append(start[1:], breaks.size)
    out = np.repeat(draw(start), end - start)
    if not taken.shape[1]:
        return out
    pos, run = np.arange(breaks.size), np.cumsum(breaks.ravel()) - 1
    while True:
        clash = (taken[pos] == out[pos, None]).any(-1)   # a run's fresh start never clashes
        hit, r = pos[clash], run[clash]
        if not len(hit):
            return out
        first = np.r_[True, r[1:] != r[:-1]]             # hits are in flat order: first per run
        start, end = hit[first], end[r[first]]
        out[_ranges(start, end)] = np.repeat(draw(start), end - start)
        pos, run = _ranges(start + 1, end), np.repeat(np.arange(len(start)), end - start - 1)


def _gate_scores(rng, shape: tuple) -> np.ndarray:
    """Positive, descending along the k slots (router order), summing to 1: softmax of sorted
    Gumbel logits."""
    # softmax(-log x) = (1/x) / sum(1/x) for standard exponentials x; ascending x = descending score
    w = 1.0 / np.maximum(np.sort(rng.standard_exponential(shape), axis=-1), 1e-30)
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)
