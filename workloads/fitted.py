"""The synthetic generator extended to what a fit finds (workloads/fit.py): `synth_from_fit`.

A routing model (every per-layer figure may be a scalar in a fit: the same for all layers):

- topics: each token has a latent topic z (one of Z, weights `topic_weights`), shared by all
  its layers; layer l's experts are drawn from topic_l,z ** sharpness_l x popularity_l
  (normalised). Shared topics are what make one layer's experts predict the next layer's
  (cross-layer correlation, which gate-lookahead prefetchers exploit) and what makes experts
  co-activate within a layer; a fit learns the topic profiles from the trace (EM), a
  parametric model draws them at random (`topics: Z`, `topic_concentration`). Z = 1 (no
  topics): the draws follow the popularity alone, as in workloads/synthetic.py;
- popularity_l: per-expert weights (or a Zipf `skew` over a seeded random ranking, as
  workloads/synthetic.py builds it; `skew_offset` q > 0 makes it Zipf-Mandelbrot, 1 / (rank +
  q) ** skew: a flatter head for the same tail, so top-k share and Gini can be set apart);
- request-level drift: each request scales every expert's weight by its own Gamma(concentration,
  1 / concentration) factor (mean 1, variance 1 / concentration); a small concentration makes
  requests differ (ZipMoE's traces: a prompt's own top-k take 0.350 of its selections where the
  top-k over all prompts take 0.199); None (inf): no drift;
- temporal locality: a token takes the topic of its request's token d back (d uniform in
  1..recall) with probability `persistence` (real routing reuses experts a few tokens later,
  not only at the next token); slot j keeps the expert it held at the previous token with probability
  locality_l (workloads/synthetic.py's chains), else draws afresh (without replacement);
- repeats (optional): a token copies the whole routing (every layer, scores and predictions)
  of its request's token `d` positions back with probability rate_d, one table for prompt and
  one for generated tokens: greedy decoding loops (the shipped model's decode repeats a period
  of 11 tokens a quarter of the time), which shows as reuse at a distance, not at the next token;
- lookahead (optional): recorded-like predictions for the next layer (RoutingTrace.predicted):
  the prediction at rank i is one of the next layer's actual experts with probability
  hit[l][i] (in router order), else another expert drawn from the next layer's popularity;
  its score is the fitted mean score at that rank.

Each layer is vectorised over (request, position) with synthetic.py's run-based chains; the
draw tables are [requests x topics, experts] per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.units import ConfigError
from workloads.sampling import _draw, _gate_scores, _popularity, _slot_chain
from workloads.trace import RoutingTrace

FORMAT = "moelab-routing-fit/1"
# what a fit may hold: the generator's parameters, and (informational) what fit_trace records
FIT_KEYS = {"format", "model", "popularity", "skew", "skew_offset", "locality", "concentration", "sharpness",
            "topics", "topic_concentration", "topic_weights", "persistence", "recall", "slot_scores", "lookahead",
            "repeats", "arch", "source", "size", "targets"}


@dataclass
class RoutingModel:
    """The generator's parameters as arrays (see the module doc); from_fit converts a fit dict."""
    name: str
    experts: int
    top_k: int
    popularity: np.ndarray | None          # [L, E] weights, or None: Zipf(skew) ranked at random
    skew: np.ndarray                       # [L] (used when popularity is None)
    skew_offset: np.ndarray                # [L] Zipf-Mandelbrot offset q (0: Zipf)
    locality: np.ndarray                   # [L]
    concentration: np.ndarray              # [L], inf = no drift
    sharpness: np.ndarray                  # [L] exponent of the topic profiles
    topics: np.ndarray | None = None       # [L, Z, E] topic profiles; None: Z random ones (or none)
    topic_count: int = 1                   # Z when topics is None
    topic_concentration: float = 1.0       # Dirichlet of random profiles
    topic_weights: np.ndarray | None = None   # [Z]
    persistence: float = 0.0
    recall: int = 1                        # topic persistence reaches 1..recall tokens back
    slot_scores: np.ndarray | None = None  # [k] mean gate score per slot
    hit: np.ndarray | None = None          # [L-1, P] lookahead: P(rank i predicts a next-layer expert)
    hit_scores: np.ndarray | None = None   # [L-1, P] mean predicted score per rank
    repeats: dict | None = None            # {"prompt": [[d, rate], ...], "output": [...]}

    @property
    def layers(self) -> int:
        return len(self.locality)

    @classmethod
    def from_fit(cls, fit: dict, where: str = "fit") -> "RoutingModel":
        if not isinstance(fit, dict):
            raise ConfigError(f"{where}: a fit is a mapping, got {type(fit).__name__}")
        unknown = sorted(set(fit) - FIT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FIT_KEYS))}")
        model = fit.get("model") or {}
        try:
            L, E, k = int(model["layers"]), int(model["experts"]), int(model["top_k"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: needs model: {{layers, experts, top_k}}") from None
        per = lambda key, default: _per_layer(fit.get(key, default), L, key, where)   # noqa: E731
        conc = np.array([np.inf if v is None else v for v in _list(fit.get("concentration"), L)], float)
        topics = fit.get("topics", 1)
        profiles = None if isinstance(topics, int) else _array(topics, (L, None, E), "topics", where)
        look = fit.get("lookahead") or {}
        m = cls(str(model.get("name", "fitted")), E, k, _array(fit.get("popularity"), (L, E), "popularity", where),
                per("skew", 1.0), per("skew_offset", 0.0), per("locality", 0.0), conc, per("sharpness", 1.0), profiles,
                topics if isinstance(topics, int) else profiles.shape[1], float(fit.get("topic_concentration", 1.0)),
                _array(fit.get("topic_weights"), (None,), "topic_weights", where),
                float(fit.get("persistence", 0.0)), int(fit.get("recall", 1)),
                _array(fit.get("slot_scores"), (k,), "slot_scores", where),
                _array(look.get("hit"), (L - 1, None), "lookahead.hit", where),
                _array(look.get("scores"), (L - 1, None), "lookahead.scores", where),
                _repeats(fit.get("repeats"), where))
        m.check(where)
        return m

    def check(self, where: str) -> None:
        for key in ("locality",):
            v = getattr(self, key)
            if not ((v >= 0) & (v <= 1)).all():
                raise ConfigError(f"{where}: {key} must be in [0, 1] per layer, got {v.tolist()}")
        if not 0 <= self.persistence <= 1 or self.recall < 1:
            raise ConfigError(f"{where}: persistence must be in [0, 1] and recall >= 1, got "
                              f"{self.persistence}, {self.recall}")
        if not (self.concentration > 0).all() or not (self.skew >= 0).all() or not (self.sharpness >= 0).all() \
                or not (self.skew_offset >= 0).all():
            raise ConfigError(f"{where}: concentration must be > 0 (or null); skew, skew_offset and sharpness >= 0")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"{where}: top_k {self.top_k} must be in 1..experts ({self.experts})")
        if self.topic_count < 1 or self.topic_concentration <= 0:
            raise ConfigError(f"{where}: topics must be >= 1 and topic_concentration > 0")
        if self.topic_weights is not None and len(self.topic_weights) != self.topic_count:
            raise ConfigError(f"{where}: {len(self.topic_weights)} topic_weights for {self.topic_count} topics")


def _repeats(v, where: str) -> dict | None:
    """{"prompt": [[d, rate], ...], "output": [...]} checked: d >= 1, rates >= 0 summing to <= 1."""
    if v is None:
        return None
    out = {}
    for part in ("prompt", "output"):
        try:
            pairs = [(int(d), float(r)) for d, r in (v.get(part) or [])]
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"{where}: repeats.{part} must be a list of [distance, rate] pairs") from None
        total = sum(r for _, r in pairs)
        # a fit's rates sum to at most 1, and to a little more once written to 6 digits
        if any(d < 1 or r < 0 for d, r in pairs) or total > 1 + 1e-4:
            raise ConfigError(f"{where}: repeats.{part}: distances >= 1, rates >= 0 summing to <= 1")
        out[part] = [(d, r / max(total, 1.0)) for d, r in pairs]
    return out


def _list(v, L: int) -> list:
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * L


def _per_layer(v, L: int, key: str, where: str) -> np.ndarray:
    try:
        out = np.asarray(_list(v, L), float)
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (L,) or not np.isfinite(out).all():
        raise ConfigError(f"{where}: {key} must be a number or a list of {L} numbers, got {v!r}")
    return out


def _array(v, shape: tuple, key: str, where: str) -> np.ndarray | None:
    if v is None:
        return None
    try:
        out = np.asarray(v, float)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be numbers of shape {shape}") from None
    if out.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, out.shape)):
        raise ConfigError(f"{where}: {key} must have shape {shape} (None: any), got {out.shape}")
    if not np.isfinite(out).all() or (out < 0).any():
        raise ConfigError(f"{where}: {key} must hold finite numbers >= 0")
    return out


# -- generation ---------------------------------------------------------------------------------
def synth_from_fit(fit, requests: int, prompt_len: int, output_len: int, seed: int | None = 0) -> RoutingTrace:
    """`requests` requests of prompt_len + output_len tokens routed like the fit (a dict as
    fit_trace returns or a catalog default; or a RoutingModel)."""
    model = fit if isinstance(fit, RoutingModel) else RoutingModel.from_fit(fit)
    for name, v, lo in (("requests", requests, 1), ("prompt_len", prompt_len, 0), ("output_len", output_len, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"synthetic trace: {name} must be an integer >= {lo}, got {v!r}")
    if prompt_len + output_len < 1:
        raise ConfigError("synthetic trace: prompt_len + output_len must be >= 1")
    trace = generate(model, np.full(requests, prompt_len), np.full(requests, output_len), seed)
    trace.metadata.update({"generator": "fitted", "layers": model.layers, "top_k": model.top_k,
                           "requests": requests, "prompt_len": prompt_len, "output_len": output_len,
                           "seed": None if seed is None else int(seed)})
    if isinstance(fit, dict):
        trace.metadata["fit_source"] = fit.get("source", {})
        if isinstance(fit.get("arch"), dict):                   # the recorded architecture, for simulate --trace
            trace.metadata["arch"] = fit["arch"]
    return trace


def generate(model: RoutingModel, prompt_lens: np.ndarray, output_lens: np.ndarray, seed) -> RoutingTrace:
    """A trace of len(prompt_lens) requests (request r: prompt_lens[r] + output_lens[r] tokens,
    request after request) from the routing model."""
    rng = np.random.default_rng(seed)
    L, E, k = model.layers, model.experts, model.top_k
    lengths = np.asarray(prompt_lens) + np.asarray(output_lens)
    R, P = len(lengths), int(lengths.max())
    pop = model.popularity if model.popularity is not None else np.concatenate(
        [_ranked(rng, E, float(s), float(q)) for s, q in zip(model.skew, model.skew_offset)])
    profiles, weights = _topics(model, rng)
    Z = profiles.shape[1]
    topic = _topic_chains(rng, weights, model, R, P)                        # [R * P]
    row = np.repeat(np.arange(R), P) * Z + topic                            # draw-table row of each position
    chosen = np.empty((L, R * P, k), np.int32)
    for layer in range(L):
        table = _draw_table(rng, profiles[layer], model.sharpness[layer], pop[layer],
                            model.concentration[layer], R)
        reuse = rng.random((R, P, k)) < model.locality[layer]
        for j in range(k):
            taken = chosen[layer, :, :j]

            def draw(pos, taken=taken, table=table):
                return _draw(rng, table, row[pos], taken[pos])
            chosen[layer, :, j] = _slot_chain(reuse[..., j], taken, draw)
    keep = (np.arange(P)[None, :] < lengths[:, None]).ravel()
    prompt = (np.arange(P)[None, :] < np.asarray(prompt_lens)[:, None]).ravel()
    arrays = [chosen.transpose(1, 0, 2)]
    arrays.append(_scores(rng, arrays[0].shape, model.slot_scores))
    if model.hit is not None:
        arrays += _lookahead(rng, model, arrays[0], pop)
    if model.repeats:
        root = _repeat_roots(rng, model.repeats, prompt, P)
        arrays = [a[root] for a in arrays]
    arrays = [a[keep] for a in arrays] + [None] * (4 - len(arrays))
    return RoutingTrace(arrays[0], arrays[1], np.repeat(np.arange(R, dtype=np.int32), P)[keep], prompt[keep],
                        {"experts": E, "model": model.name}, None, arrays[2], arrays[3])


def _repeat_roots(rng, repeats: dict, prompt: np.ndarray, P: int) -> np.ndarray:
    """[R * P] the position whose routing each position carries: itself, or (with the table's
    rate) the position d back in its request, followed to the first that copies nothing."""
    n = len(prompt)
    src = np.arange(n)
    pos = src % P
    u = rng.random(n)
    for part, rows in (("prompt", prompt), ("output", ~prompt)):
        lo = np.zeros(n)
        for d, rate in repeats.get(part, []):
            take = rows & (u >= lo) & (u < lo + rate) & (pos >= d)
            src[take] -= d
            lo = lo + rate
    return _roots(src)


def _roots(src: np.ndarray) -> np.ndarray:
    """Follow each position's back-pointer to a position that points to itself (pointer
    jumping: O(log chain length) rounds)."""
    while True:
        nxt = src[src]
        if np.array_equal(nxt, src):
            return src
        src = nxt


def _ranked(rng, E: int, skew: float, offset: float) -> np.ndarray:
    """[1, E] synthetic.py's Zipf popularity over a random ranking, or with offset > 0 the
    Zipf-Mandelbrot weights 1 / (rank + offset) ** skew on the same ranking."""
    pop = _popularity(rng, 1, E, skew)
    if offset == 0 or skew == 0:
        return pop
    by_rank = 1.0 / (np.arange(1, E + 1) + offset) ** skew
    out = np.empty_like(pop)
    out[0, np.argsort(-pop[0], kind="stable")] = by_rank / by_rank.sum()
    return out


def _topics(model: RoutingModel, rng) -> tuple[np.ndarray, np.ndarray]:
    """([L, Z, E] topic profiles, [Z] weights): the fitted ones, or Z seeded random profiles."""
    L, E, Z = model.layers, model.experts, model.topic_count
    if model.topics is not None:
        profiles = model.topics
    elif Z == 1:
        profiles = np.ones((L, 1, E))
    else:
        profiles = rng.dirichlet(np.full(E, model.topic_concentration), size=(L, Z))
    w = np.ones(profiles.shape[1]) if model.topic_weights is None else np.asarray(model.topic_weights, float)
    return profiles, w / w.sum()


def _topic_chains(rng, weights: np.ndarray, model: RoutingModel, R: int, P: int) -> np.ndarray:
    """[R * P] each position's topic: with probability `persistence` the topic of the request's
    position d back (d uniform in 1..recall), else a draw from the topic weights."""
    Z = len(weights)
    if Z == 1:
        return np.zeros(R * P, np.int64)
    n = R * P
    topic = np.minimum(np.searchsorted(np.cumsum(weights), rng.random(n), side="right"), Z - 1)
    back = rng.integers(1, int(model.recall) + 1, n)
    src = np.arange(n)
    take = (rng.random(n) < model.persistence) & (src % P >= back)
    src[take] -= back[take]
    return topic[_roots(src)]


def _draw_table(rng, profiles: np.ndarray, sharpness: float, pop: np.ndarray, concentration: float,
                R: int) -> np.ndarray:
    """[R * Z, E] fresh-draw weights of each (request, topic): profile ** sharpness x popularity,
    x the request's drift factors; floored so that every expert stays drawable."""
    base = np.maximum(profiles, 1e-12) ** sharpness * pop[None, :]
    base /= base.sum(1, keepdims=True)                                   # [Z, E]
    if np.isfinite(concentration):
        drift = rng.gamma(concentration, 1.0 / concentration, size=(R, 1, base.shape[1]))
        table = base[None] * drift
    else:
        table = np.broadcast_to(base[None], (R,) + base.shape)
    table = table.reshape(-1, base.shape[1]) + 1e-9
    return table / table.sum(1, keepdims=True)


def _scores(rng, shape: tuple, slot_means: np.ndarray | None) -> np.ndarray:
    """synthetic.py's gate scores, scaled per slot to the fitted means (kept in router order)."""
    s = _gate_scores(rng, shape)
    if slot_means is None:
        return s
    s = s * (np.asarray(slot_means, np.float64) / np.maximum(s.reshape(-1, shape[-1]).mean(0), 1e-12))
    return (-np.sort(-s, axis=-1)).astype(np.float32)


def _lookahead(rng, model: RoutingModel, experts: np.ndarray, pop: np.ndarray):
    """(predicted [T, L, P], predicted_scores) like a recorded gate lookahead (module doc)."""
    T, L, k = experts.shape
    P = model.hit.shape[1]
    ids = np.full((T, L, P), -1, np.int32)
    probs = np.zeros((T, L, P), np.float32)
    for layer in range(L - 1):
        actual = experts[:, layer + 1, :]
        hit = rng.random((T, P)) < model.hit[layer]
        rank = np.cumsum(hit, 1) - 1
        hit &= rank < k
        got = np.where(hit, np.take_along_axis(actual, np.clip(rank, 0, k - 1), 1), -1)
        for i in range(P):
            miss = np.flatnonzero(~hit[:, i])
            got[miss, i] = _draw_outside(rng, pop[layer + 1], np.concatenate([actual, got[:, :i]], 1)[miss])
        ids[:, layer] = got
        mean = model.hit_scores[layer] if model.hit_scores is not None else np.zeros(P)
        probs[:, layer] = np.where(got >= 0, mean, 0)
    return ids, probs


def _draw_outside(rng, p: np.ndarray, excluded: np.ndarray, tries: int = 64) -> np.ndarray:
    """One expert per row from p, none of the row's `excluded` (-1 entries ignored): rejection
    sampling, then the lowest allowed id for rows still rejected (-1 if none is allowed)."""
    out = np.full(len(excluded), -1, np.int64)
    cdf = np.cumsum(p)
    todo = np.arange(len(excluded))
    for _ in range(tries):
        if not len(todo):
            return out
        cand = np.minimum(np.searchsorted(cdf, rng.random(len(todo)) * cdf[-1], side="right"), len(p) - 1)
        ok = ~(excluded[todo] == cand[:, None]).any(1)
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    for r in todo:
        free = np.setdiff1d(np.arange(len(p)), excluded[r])
        out[r] = free[0] if len(free) else -1
    return out
