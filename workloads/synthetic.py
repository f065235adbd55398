"""Seeded synthetic routing traces with tunable expert skew and temporal locality.

Model: each layer has a Zipf-like popularity over its experts (exponent `skew`, 0 =
uniform; ranks assigned to experts by a per-layer random permutation). Each request is an
independent chain per layer: at every token, slot j reuses the expert slot j held at the
request's previous token with probability `locality` (unless an earlier slot of this token
already took it), else it draws from the popularity, without replacement within the token.

Everything is vectorised over (request, layer) chains and positions; the only loops are
over the k slots and a short fix-point per slot (see `_slot_chain`).
"""
from __future__ import annotations

import numpy as np

from devices.units import ConfigError
from workloads.catalog import ModelArch
from workloads.trace import RoutingTrace

def _check(requests, prompt_len, output_len, skew, locality) -> None:
    where = "synthetic trace"
    for name, v, lo in (("requests", requests, 1), ("prompt_len", prompt_len, 0), ("output_len", output_len, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"{where}: {name} must be an integer >= {lo}, got {v!r}")
    if prompt_len + output_len < 1:
        raise ConfigError(f"{where}: prompt_len + output_len must be >= 1")
    if not 0 <= skew < float("inf"):
        raise ConfigError(f"{where}: skew must be a finite number >= 0, got {skew!r}")
    if not 0 <= locality <= 1:
        raise ConfigError(f"{where}: locality must be in [0, 1], got {locality!r}")


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


def synthetic_trace(model: ModelArch, *, requests=1, prompt_len=16, output_len=64, skew=1.0, locality=0.6,
                    seed=0, fit=None) -> RoutingTrace:
    """A seeded trace: `requests` requests of prompt_len prompt tokens then output_len generated
    tokens each, request after request.

    fit: route like a fit instead (workloads/fit.py's fit_trace dict, a catalog default, or
    "catalog" for the model's own catalog default; workloads/fitted.py): skew and locality
    are then ignored. Without a fit this generator is unchanged, bit for bit."""
    if fit is not None:
        return _from_fit(model, fit, requests, prompt_len, output_len, seed)
    _check(requests, prompt_len, output_len, skew, locality)
    L, E, k = model.layers, model.experts, model.top_k
    if not 1 <= k <= E:
        raise ConfigError(f"synthetic trace: model {model.name} has top_k={k} but {E} experts")
    P = prompt_len + output_len
    rng = np.random.default_rng(seed)
    pop = _popularity(rng, L, E, float(skew))
    reuse = rng.random((requests * L, P, k)) < locality
    layer = (np.arange(requests * L * P) // P) % L        # chain c = request * L + layer, P positions each
    chain = np.empty((requests * L * P, k), np.int32)
    for j in range(k):
        taken = chain[:, :j]
        def draw(pos, taken=taken):
            return _draw(rng, pop, layer[pos], taken[pos])
        chain[:, j] = _slot_chain(reuse[..., j], taken, draw)
    experts = chain.reshape(requests, L, P, k).transpose(0, 2, 1, 3).reshape(requests * P, L, k)
    scores = _gate_scores(rng, experts.shape)
    meta = {"generator": "synthetic", "model": model.name, "experts": E, "layers": L, "top_k": k,
            "requests": requests, "prompt_len": prompt_len, "output_len": output_len, "skew": float(skew),
            "locality": float(locality), "seed": None if seed is None else int(seed)}
    return RoutingTrace(experts, scores, np.repeat(np.arange(requests, dtype=np.int32), P),
                        np.tile(np.arange(P) < prompt_len, requests), meta)


def _from_fit(model: ModelArch, fit, requests, prompt_len, output_len, seed) -> RoutingTrace:
    """synthetic_trace(fit=...): the fit's generator, checked against the model's shape."""
    from workloads.catalog import synthetic_default
    from workloads.fitted import synth_from_fit
    if isinstance(fit, str):
        if fit != "catalog":
            raise ConfigError(f"synthetic trace: fit must be a fit dict or 'catalog', got {fit!r}")
        fit = synthetic_default(model.name)
        if fit is None:
            raise ConfigError(f"synthetic trace: the catalog has no synthetic default for {model.name!r}")
    shape = {"layers": model.layers, "experts": model.experts, "top_k": model.top_k}
    given = fit.get("model") or {}
    if any(key in given and int(given[key]) != v for key, v in shape.items()):
        raise ConfigError(f"synthetic trace: the fit is for {given}, the model {model.name} has {shape}")
    fit = dict(fit, model={"name": model.name, **given, **shape})
    return synth_from_fit(fit, requests, prompt_len, output_len, seed)
