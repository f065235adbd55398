"""Fit the synthetic generator to a routing trace: `fit_trace(trace) -> dict` (YAML-ready).

The model is workloads/fitted.py's. What is fitted:
- topics (workloads/topics.py, EM): Z latent token topics shared by all layers, each with an
  expert profile per layer: the trace's cross-layer correlation and co-activation;
- per layer: the popularity weights (each expert selected as often as in the trace), the
  sharpness of the topic profiles (to the trace's mean pair lift; cross-layer predictability
  when k = 1), temporal locality (per-slot reuse probability, to the trace's slot reuse),
  request-level drift (the Gamma concentration of a request's own expert weights, to the mean
  share of a request's selections its own top-k take above the pooled top-k share; one for all
  layers: a request's drift is its own, and one figure from all layers is far less noisy);
- the topic persistence: how often a token takes the topic of one of its request's last 8
  tokens (to the area under the trace's LRU miss-ratio curve, workloads/compare.py): real routing
  reuses experts a few tokens later, not only at the next token, and that is what a cache sees;
- repeats: how often a token's whole routing equals that of its request's token d back, for
  prompt and generated tokens (greedy decoding loops), less what shorter repeats explain;
- gate scores: the mean per slot; lookahead predictions (if recorded): per rank, how often the
  prediction is one of the next layer's experts, and the mean predicted score.

The knobs interact (a reused expert is not a fresh pick, sharper topics shift popularity), so
they are calibrated by simulation: synthesise at the trace's own size (its request lengths, a
few seeds), measure, and step each knob toward its target (popularity multiplicatively, the
rest by a damped secant per layer). Figures that depend on the sample size (an in-sample best
mapping, the noise a finite sample adds to skew: a shrink of the popularity toward uniform,
steered by the Gini) are thereby matched at that size.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from devices.units import ConfigError
from workloads import structure, topics
from workloads.fitted import FORMAT, RoutingModel, generate
from workloads.stats import popularity, reuse_overlap
from workloads.trace import RoutingTrace

MAX_TOPICS = 32
# the knobs (rows of x), each steered by one target figure (row of _aligned): locality <- slot
# reuse, drift u = 1 / sqrt(1 + concentration) <- own-top-k share less the pooled top-k share,
# sharpness <- pair lift, shrink (of the popularity toward uniform) <- Gini, persistence <- the
# mean LRU hit ratio over capacities
_SLOPE0 = np.array([0.8, 0.3, 1.0, 0.3, 0.3])                 # first-step slopes d target / d knob
_MAX = np.array([0.98, 0.95, 4.0, 1.0, 0.95])
RECALL = 8                         # topic persistence reaches this many tokens back


def targets(trace: RoutingTrace) -> dict[str, np.ndarray]:
    """The figures the calibration matches: freq [L, E] (selections per token) and, per layer,
    the popularity Gini, slot reuse, own-top-k share, cross-layer predictability (of layer
    l + 1 from layer l), mean pair lift; and the mean LRU hit ratio over capacities (one figure,
    repeated per layer)."""
    overlap = reuse_overlap(trace)
    slot = overlap.mean((0, 2)) if len(overlap) else np.full(trace.layers, np.nan)
    counts = popularity(trace)
    out = {"freq": counts / trace.tokens, "gini": gini(counts), "slot_reuse": slot,
           "own": structure.own_topk_share(trace), "cross": structure.cross_layer(trace),
           "pair": structure.pair_lift(trace)[1], "lru": np.full(trace.layers, _lru_area(trace))}
    return out


def _lru_area(trace: RoutingTrace) -> float:
    """The mean LRU hit ratio over workloads/compare.py's capacities (its miss-ratio curve's area)."""
    from workloads.compare import lru_curve
    hits = [h for h in lru_curve(trace).values() if h is not None]
    return float(np.mean(hits)) if hits else float("nan")


def gini(counts: np.ndarray) -> np.ndarray:
    """[layers] Gini coefficient of each layer's selection counts (as trace_stats computes it)."""
    E = counts.shape[1]
    asc = np.sort(counts, axis=1).astype(np.float64)
    return 2 * (np.arange(1, E + 1) * asc).sum(1) / (E * np.maximum(asc.sum(1), 1)) - (E + 1) / E


def fit_trace(trace: RoutingTrace, *, iterations: int = 16, calibration_tokens: int = 20_000,
              max_tokens: int = 10_000, em_tokens: int = 8_000, topic_count: int | None = None, seed: int = 0,
              progress=None) -> dict:
    """The fit of `trace` (module doc): a dict of plain lists and numbers (yaml.safe_dump-able)
    that workloads/fitted.py's synth_from_fit (or synthetic_trace(fit=...)) generates from.
    topic_count: Z (default: one per ~30 tokens, at most MAX_TOPICS), learnt from a seeded sample
    of em_tokens tokens; the calibration synthesises the first requests up to max_tokens,
    repeated to about calibration_tokens (so a long trace fits in about a minute)."""
    trace.check(trace.metadata.get("path", "trace"))
    lengths = _lengths(trace)
    model = _structure(trace, topic_count, seed, em_tokens)
    goal = targets(trace)
    p_len, o_len, reps = _calibration_size(lengths, calibration_tokens, max_tokens)
    x, history = _initial(model, goal), None
    for it in range(iterations):
        _apply(model, x)
        got = _measure(generate(model, p_len, o_len, seed + 1 + it), len(p_len) // reps, reps)
        if progress is not None:
            progress(it, got)
        if it >= 3 and _converged(goal, got, model.top_k):
            break                                                # every figure within 2%: done early
        x, history = _step(model, x, goal, got, history)
    _apply(model, x)
    return to_fit(model, trace, goal, lengths)


# -- the pieces ---------------------------------------------------------------------------------
def _structure(trace: RoutingTrace, topic_count, seed: int, em_tokens: int) -> RoutingModel:
    """The model with what is read off the trace: topics, slot scores, lookahead."""
    L, E, k = trace.layers, trace.num_experts, trace.top_k
    Z = topic_count or int(np.clip(trace.tokens // 30, 1, MAX_TOPICS))
    sample = trace.experts
    if len(sample) > em_tokens:                                   # EM on a seeded sample of tokens
        sample = sample[np.sort(np.random.default_rng(seed).choice(len(sample), em_tokens, replace=False))]
    profiles, weights = topics.fit_topics(sample, E, Z, iterations=30, seed=seed) if Z > 1 else (None, None)
    hit = scores = None
    if trace.predicted is not None and L > 1:
        pred, nxt = trace.predicted[:, :-1], trace.experts[:, 1:]
        hit = (pred[..., None] == nxt[:, :, None, :]).any(-1).mean(0)          # [L-1, P]
        scores = trace.predicted_scores[:, :-1].mean(0)
    name = str(trace.metadata.get("model") or "fitted")
    ones = np.ones(L)
    repeats = repeat_rates(trace)
    return RoutingModel(name, E, k, None, ones, ones * 0, ones * 0, np.full(L, np.inf), ones, topics=profiles,
                        topic_count=Z, topic_weights=weights, slot_scores=trace.scores.reshape(-1, k).mean(0), hit=hit,
                        hit_scores=scores, repeats=repeats if any(repeats.values()) else None, recall=RECALL)


def repeat_rates(trace: RoutingTrace, max_distance: int = 64, floor: float = 0.01) -> dict:
    """{"prompt": [[d, rate]], "output": [...]}: the share of tokens (of each kind) whose routing
    at every layer equals that of their request's token d back, beyond what the kept shorter
    periods explain by chaining (a loop of period d also repeats at 2d), where >= floor."""
    order, _, _ = structure.request_order(trace)
    ids = np.sort(trace.experts[order].astype(np.uint64), axis=-1).reshape(len(order), -1)
    mult = np.random.default_rng(12345).integers(1, 2**61, ids.shape[1], dtype=np.uint64) | np.uint64(1)
    h = (ids * mult).sum(1)                                       # a token's routing as one number
    rid, prompt = trace.request_ids[order], trace.prompt[order]
    out = {}
    for part, mask in (("prompt", prompt), ("output", ~prompt)):
        kept: dict[int, float] = {}
        for d in range(1, min(max_distance, len(h) - 1) + 1):
            pairs = (rid[d:] == rid[:-d]) & mask[d:]
            if pairs.sum() < 20:
                continue
            rate = float((h[d:] == h[:-d])[pairs].mean())
            rate -= sum(r ** (d // a) for a, r in kept.items() if d % a == 0)
            if rate >= floor:
                kept[d] = rate
        total = sum(kept.values())
        out[part] = [[d, r / max(total, 1.0)] for d, r in kept.items()]
    return out


def _lengths(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, generated tokens) per request, in order of first appearance."""
    order, starts, lengths = structure.request_order(trace)
    prompts = np.add.reduceat(trace.prompt[order].astype(np.int64), starts)
    return prompts, lengths - prompts


def _calibration_size(lengths, calibration_tokens: int, max_tokens: int):
    """(prompt lengths, output lengths, replicas): the trace's own requests (the first up to
    max_tokens), repeated until about calibration_tokens."""
    p, o = lengths
    n = max(1, int(np.searchsorted(np.cumsum(p + o), max_tokens, side="right")))
    p, o = p[:n], o[:n]
    reps = max(1, math.ceil(calibration_tokens / max(int((p + o).sum()), 1)))
    return np.tile(p, reps), np.tile(o, reps), reps


def _initial(model: RoutingModel, goal: dict) -> np.ndarray:
    """[5, L] the starting knobs (see _SLOPE0); the popularity from the selection rates
    (divided by what the topics already give)."""
    k, L = model.top_k, model.layers
    mixed = (model.topic_weights[None, :, None] * model.topics).sum(1) if model.topics is not None else 1.0
    pop = np.maximum(goal["freq"], 1e-6) / mixed
    model.popularity = pop / pop.sum(1, keepdims=True)
    s0 = (goal["freq"] ** 2).sum(1) / k                          # overlap share of independent tokens
    lam = np.clip((np.nan_to_num(goal["slot_reuse"]) - s0) / (1 - s0), 0, 0.9)
    return np.stack([lam * 0.5, np.full(L, 0.1), np.ones(L), np.ones(L), np.zeros(L)])


def _apply(model: RoutingModel, x: np.ndarray) -> None:
    model.locality = x[0].copy()
    model.concentration = np.where(x[1] > 1e-6, 1.0 / np.maximum(x[1], 1e-6) ** 2 - 1.0, np.inf)
    model.sharpness = x[2].copy()
    model.persistence = float(x[4].mean())


def _measure(trace: RoutingTrace, requests: int, reps: int) -> dict:
    """targets() averaged over the `reps` replicas of `requests` requests each."""
    rid = trace.request_ids
    parts = []
    for r in range(reps):
        keep = (rid >= r * requests) & (rid < (r + 1) * requests)
        t = RoutingTrace(trace.experts[keep], trace.scores[keep], rid[keep], trace.prompt[keep], trace.metadata)
        parts.append(targets(t))
    with warnings.catch_warnings():                              # all-NaN figures stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {key: np.nanmean(np.stack([p[key] for p in parts]), 0) for key in parts[0]}


def _aligned(figures: dict, k: int) -> np.ndarray:
    """[5, L] the target figure of each knob by layer (module doc); sharpness follows the pair
    lift, or for k = 1 the predictability of layer l from layer l - 1."""
    sharp = figures["pair"] if k > 1 else np.r_[np.nan, figures["cross"][:-1]]
    # drift shows as a request's own top-k share above the pooled one (skew raises both alike)
    excess = figures["own"] - np.sort(figures["freq"], axis=1)[:, -k:].sum(1) / k
    return np.stack([figures["slot_reuse"], excess, sharp, figures["gini"], figures["lru"]])


def _step(model: RoutingModel, x: np.ndarray, goal: dict, got: dict, history):
    """One calibration step: popularity multiplicatively, the knobs by a damped secant per
    layer (the slope of the last two steps where it is sensible, else the default)."""
    # each expert's rate toward the trace's, shrunk toward uniform by x[3]: a same-size sample's
    # own noise adds skew, so matching the rates exactly would overshoot the trace's Gini
    mean = goal["freq"].mean(1, keepdims=True)
    want = mean + x[3][:, None] * (goal["freq"] - mean)
    ratio = np.where(got["freq"] > 0, want / np.maximum(got["freq"], 1e-12), 1.5)
    pop = model.popularity * np.clip(ratio, 0.67, 1.5)
    model.popularity = np.maximum(pop / pop.sum(1, keepdims=True), 1e-8)
    y_goal, y = _aligned(goal, model.top_k), _aligned(got, model.top_k)
    slope = np.broadcast_to(_SLOPE0[:, None], x.shape).copy()
    if history is not None:
        x0, y0, s0 = history
        dx, dy = x - x0, y - y0
        with np.errstate(divide="ignore", invalid="ignore"):
            sec = dy / dx
        ok = (np.abs(dx) > 1e-4) & np.isfinite(sec) & (sec > 0.05 * _SLOPE0[:, None])
        slope = np.where(ok, 0.5 * sec + 0.5 * s0, s0)
    step = np.clip(np.nan_to_num((y_goal - y) / slope), -0.25 * _MAX[:, None], 0.25 * _MAX[:, None])
    new = np.clip(x + step, 0, _MAX[:, None])
    new[1] = new[1].mean()                                       # one drift: a request's, all layers alike
    new[4] = new[4].mean() if model.topics is not None else 0.0  # one persistence, and only with topics
    return new, (x, y, slope)


def _converged(goal: dict, got: dict, k: int, tolerance: float = 0.02) -> bool:
    """Whether every calibrated figure (and each expert's rate, in total variation) is within
    `tolerance` of the trace's."""
    want, have = _aligned(goal, k), _aligned(got, k)
    ok = np.isnan(want) | (np.abs(have - want) <= tolerance * np.maximum(np.abs(want), 1e-9))
    tv = 0.5 * np.abs(goal["freq"] - got["freq"]).sum(1) / k
    return bool(ok.all() and (tv <= tolerance).all())


def _num(v) -> float | None:
    v = float(v)
    return None if not math.isfinite(v) else float(f"{v:.6g}")


def _lst(a):
    a = np.asarray(a)
    return np.vectorize(_num, otypes=[object])(a).tolist() if a.dtype.kind == "f" else a.tolist()


def to_fit(model: RoutingModel, trace: RoutingTrace, goal: dict, lengths) -> dict:
    """The YAML-ready dict of a fitted model (plus the trace's target figures, for reference)."""
    p, o = lengths
    fit = {"format": FORMAT,
           "model": {"name": model.name, "layers": model.layers, "experts": model.experts, "top_k": model.top_k},
           "size": {"requests": int(len(p)), "prompt_len": int(np.median(p)), "output_len": int(np.median(o))},
           "source": {key: trace.metadata[key] for key in ("model", "source", "generator", "path")
                      if key in trace.metadata} | {"tokens": trace.tokens},
           "locality": _lst(model.locality), "concentration": _lst(model.concentration),
           "sharpness": _lst(model.sharpness), "persistence": _num(model.persistence), "recall": int(model.recall),
           "popularity": _lst(model.popularity), "slot_scores": _lst(model.slot_scores),
           "topics": _lst(model.topics) if model.topics is not None else 1,
           "topic_weights": _lst(model.topic_weights) if model.topics is not None else None,
           "targets": {key: _lst(goal[key]) for key in ("gini", "slot_reuse", "own", "cross", "pair")}}
    if isinstance(trace.metadata.get("arch"), dict):              # so a synthesised trace names its model too
        fit["arch"] = trace.metadata["arch"]
    if model.repeats is not None:
        fit["repeats"] = {part: [[int(d), _num(r)] for d, r in rows] for part, rows in model.repeats.items()}
    if model.hit is not None:
        fit["lookahead"] = {"width": int(model.hit.shape[1]), "hit": _lst(model.hit), "scores": _lst(model.hit_scores)}
    return fit


# -- files --------------------------------------------------------------------------------------
def save_fit(fit: dict, path) -> None:
    """Write a fit as YAML (atomically)."""
    import yaml
    from devices.atomic import atomic_write
    atomic_write(path, yaml.safe_dump(fit, sort_keys=False, default_flow_style=None, width=120))


def load_fit(path) -> dict:
    """Read a fit written by save_fit (`moelab trace fit`); ConfigError naming the file."""
    import yaml
    try:
        with open(path) as f:
            fit = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such fit file") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read as a YAML fit ({type(e).__name__}: {e})") from None
    if not isinstance(fit, dict) or fit.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a routing fit (expected format: {FORMAT}, as `moelab trace fit` writes)")
    RoutingModel.from_fit(fit, str(path))                       # every problem now, naming the file
    return fit
