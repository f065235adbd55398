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
from workloads.sampling import _draw, _gate_scores, _popularity, _slot_chain
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
