"""Latent routing topics of a trace: a mixture model learnt by EM (what workloads/fit.py fits).

Each token has one of Z topics; given topic z, layer l's k experts are (approximately,
ignoring that they are distinct) k draws from profile[l, z]. The topic is shared by all the
token's layers, so a mixture learnt from whole tokens carries the trace's cross-layer
correlation and its within-layer co-activation (workloads/fitted.py generates from it).

EM on [tokens, layers, k] expert ids, vectorised: per layer, the tokens' one-hot picks times
log profile (E-step) and the posterior times the picks (M-step), two matrix products each.
O(iterations x tokens x layers x experts x Z) flops, BLAS-fast.
"""
from __future__ import annotations

import numpy as np

PSEUDO = 0.1            # pseudo-count per (topic, layer, expert): no expert impossible in a topic


def _one_hot(experts: np.ndarray, E: int) -> np.ndarray:
    """[tokens, E] float32 selection indicators of one layer's picks [tokens, k]."""
    x = np.zeros((experts.shape[0], E), np.float32)
    np.put_along_axis(x, experts.astype(np.intp), 1.0, axis=1)
    return x


def log_likelihood(experts: np.ndarray, profiles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[tokens, Z] log P(token's picks, topic z) up to a constant."""
    logp = np.log(profiles).astype(np.float32)                         # [L, Z, E]
    out = np.tile(np.log(np.maximum(weights, 1e-300)), (experts.shape[0], 1))
    for layer in range(experts.shape[1]):
        out += _one_hot(experts[:, layer, :], profiles.shape[2]) @ logp[layer].T
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
    L = experts.shape[1]
    p = np.where(post > 1e-12, post, 0.0).astype(np.float32)          # no denormals: BLAS crawls on them
    # picks.T @ posterior, not posterior.T @ picks: the same product, ~30x faster in BLAS here
    profiles = np.stack([(_one_hot(experts[:, layer, :], E).T @ p).T for layer in range(L)]).astype(np.float64)
    profiles += PSEUDO
    profiles /= profiles.sum(-1, keepdims=True)
    return profiles, post.mean(0)
