"""Latent routing topics of a trace: a mixture model learnt by EM (what workloads/fit.py fits).

Each token has one of Z topics; given topic z, layer l's k experts are (approximately,
ignoring that they are distinct) k draws from profile[l, z]. The topic is shared by all the
token's layers, so a mixture learnt from whole tokens carries the trace's cross-layer
correlation and its within-layer co-activation (workloads/fitted.py generates from it).

EM on [tokens, layers, k] expert ids, vectorised: the E-step sums log profile[l, :, e] over a
token's (layer, slot) picks by gathering, the M-step adds posterior weights per (topic,
expert) with one bincount per layer. O(iterations x tokens x layers x k x Z).
"""
from __future__ import annotations

import numpy as np

PSEUDO = 0.1            # pseudo-count per (topic, layer, expert): no expert impossible in a topic


def log_likelihood(experts: np.ndarray, profiles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[tokens, Z] log P(token's picks, topic z) up to a constant."""
    logp = np.log(profiles)                                           # [L, Z, E]
    out = np.tile(np.log(np.maximum(weights, 1e-300)), (experts.shape[0], 1))
    for layer in range(experts.shape[1]):
        out += logp[layer][:, experts[:, layer, :]].sum(-1).T
    return out


def posterior(experts: np.ndarray, profiles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[tokens, Z] P(topic | token's picks)."""
    ll = log_likelihood(experts, profiles, weights)
    ll -= ll.max(1, keepdims=True)
    post = np.exp(ll)
    return post / post.sum(1, keepdims=True)


def fit_topics(experts: np.ndarray, E: int, Z: int, iterations: int = 40, seed: int = 0):
    """([L, Z, E] profiles, [Z] weights) of a Z-topic mixture fitted to experts [T, L, k]."""
    T, L, k = experts.shape
    rng = np.random.default_rng(seed)
    post = rng.dirichlet(np.ones(Z), size=T)
    for _ in range(iterations):
        profiles, weights = _m_step(experts, post, E)
        post = posterior(experts, profiles, weights)
    return _m_step(experts, post, E)


def _m_step(experts: np.ndarray, post: np.ndarray, E: int):
    T, L, k = experts.shape
    Z = post.shape[1]
    profiles = np.empty((L, Z, E))
    w = np.repeat(post, k, axis=0).ravel()                            # [T * k * Z], token-major
    for layer in range(L):
        codes = (np.arange(Z)[None, :] * E + experts[:, layer, :].reshape(-1, 1)).ravel()
        profiles[layer] = np.bincount(codes, weights=w, minlength=Z * E).reshape(Z, E) + PSEUDO
    profiles /= profiles.sum(-1, keepdims=True)
    return profiles, post.mean(0)


def same_topic_rate(experts: np.ndarray, request_ids: np.ndarray, profiles: np.ndarray,
                    weights: np.ndarray) -> float:
    """The share of consecutive tokens of one request whose most likely topics are equal (what
    the topic persistence is calibrated to; NaN without such pairs)."""
    order = np.argsort(request_ids, kind="stable")
    same = request_ids[order[1:]] == request_ids[order[:-1]]
    if not same.any():
        return float("nan")
    best = log_likelihood(experts[order], profiles, weights).argmax(1)
    return float((best[1:] == best[:-1])[same].mean())
