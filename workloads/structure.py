"""Structure statistics of a routing trace beyond skew: windows, requests, pairs, layers.

Each function returns one value per layer (a float array of length `layers`); NaN where the
trace has nothing to measure (no full window, a single request, k = 1, the last layer).

- `distinct_per_window(trace, w)`: distinct experts per layer in a window of w consecutive
  tokens of one request (non-overlapping windows from each request's first token; ZipMoE's
  traces: 41.6 of 64 experts in a prompt's ~19 tokens on DeepSeek-V2-Lite, issue 22).
- `distinct_per_requests(trace, g, w)`: the same over the first w tokens of each of g
  consecutive requests together (ZipMoE: 61.3 in 4 prompts, 63.9 in 16).
- `own_topk_share(trace)`: the share of a request's selections taken by its own k most used
  experts, mean over requests (ZipMoE: 0.350; over all prompts together 0.199): how much a
  request's popularity drifts from the global one.
- `pair_lift(trace)`: co-activation within a layer: lift = observed pair count / the count
  if the two experts were picked independently at their own rates; (count-weighted mean lift
  of the most frequent pairs, the top tenth: a single most frequent pair's lift changes with
  which pair wins by a few counts; count-weighted mean lift over all pairs).
- `cross_layer(trace)`: how well this layer's experts predict the next layer's through the best
  one-to-one-per-expert mapping (each expert e of layer l -> the expert most often picked
  with it at layer l + 1): the share of the next layer's selections the mapped set covers.

Vectorised with bincounts over (request, window, expert) codes, one layer at a time so memory
stays O(tokens x experts) whatever the depth.
"""
from __future__ import annotations

import numpy as np

from workloads.trace import RoutingTrace


def request_order(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token order, request starts, request lengths): tokens grouped by request (requests in
    order of first appearance, as batch_steps takes them), each in generation order."""
    _, first, inverse = np.unique(trace.request_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    order = np.argsort(rank[inverse.ravel()], kind="stable")
    lengths = np.bincount(rank[inverse.ravel()], minlength=len(first))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return order, starts, lengths


def _distinct(experts: np.ndarray, window_of: np.ndarray, windows: int, E: int) -> np.ndarray:
    """[layers] mean distinct experts per window: experts [n, layers, k] of the tokens that fall
    in a window, window_of [n] their window index (0..windows-1)."""
    n, L, k = experts.shape
    out = np.empty(L)
    for layer in range(L):
        seen = np.zeros(windows * E, bool)
        seen[(window_of[:, None] * E + experts[:, layer, :]).ravel()] = True
        out[layer] = seen.sum() / windows
    return out


def distinct_per_window(trace: RoutingTrace, w: int) -> np.ndarray:
    """[layers] distinct experts per window of w tokens of one request (see the module doc)."""
    order, starts, lengths = request_order(trace)
    full = lengths // w                                        # full windows per request
    if full.sum() == 0:
        return np.full(trace.layers, np.nan)
    if w == 1:                                                 # a token's experts are distinct (check())
        return np.full(trace.layers, float(trace.top_k))
    pos = np.arange(len(order)) - np.repeat(starts, lengths)   # position in its request
    req = np.repeat(np.arange(len(lengths)), lengths)
    keep = pos < np.repeat(full * w, lengths)
    base = np.concatenate([[0], np.cumsum(full)[:-1]])
    window_of = base[req[keep]] + pos[keep] // w
    return _distinct(trace.experts[order[keep]], window_of, int(full.sum()), trace.num_experts)


def distinct_per_requests(trace: RoutingTrace, g: int, w: int = 19) -> np.ndarray:
    """[layers] distinct experts per layer over the first w tokens of g consecutive requests."""
    order, starts, lengths = request_order(trace)
    groups = len(lengths) // g
    if groups == 0:
        return np.full(trace.layers, np.nan)
    pos = np.arange(len(order)) - np.repeat(starts, lengths)
    req = np.repeat(np.arange(len(lengths)), lengths)
    keep = (pos < w) & (req < groups * g)
    return _distinct(trace.experts[order[keep]], req[keep] // g, groups, trace.num_experts)


def own_topk_share(trace: RoutingTrace) -> np.ndarray:
    """[layers] share of each request's selections taken by its own top-k experts, mean over
    requests (the top-k share of the pooled counts is trace_stats' topk_share)."""
    _, req = np.unique(trace.request_ids, return_inverse=True)
    R, E, k = int(req.max()) + 1, trace.num_experts, trace.top_k
    out = np.empty(trace.layers)
    for layer in range(trace.layers):
        counts = np.bincount((req[:, None] * E + trace.experts[:, layer, :]).ravel(), minlength=R * E)
        counts = counts.reshape(R, E)
        top = -np.sort(-counts, axis=1)[:, :k].sum(1)
        out[layer] = np.mean(top / counts.sum(1))
    return out


def pair_counts(experts: np.ndarray, E: int) -> np.ndarray:
    """[E, E] symmetric counts of tokens selecting both experts (experts [tokens, k] distinct)."""
    c = joint_counts(experts, experts, E)                     # ordered pairs, and (e, e) k times
    np.fill_diagonal(c, 0)
    return c


def pair_lift(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """([layers] count-weighted mean lift of the most frequent tenth of the pairs (at least one),
    [layers] count-weighted mean lift over all pairs)."""
    E, k, T = trace.num_experts, trace.top_k, trace.tokens
    top, mean = np.full(trace.layers, np.nan), np.full(trace.layers, np.nan)
    if k < 2:
        return top, mean
    iu = np.triu_indices(E, 1)
    for layer in range(trace.layers):
        ex = trace.experts[:, layer, :]
        pairs = pair_counts(ex, E)[iu].astype(np.float64)
        rate = np.bincount(ex.ravel(), minlength=E) / T       # share of tokens selecting each expert
        expected = T * rate[iu[0]] * rate[iu[1]]
        ok = expected > 0
        lift = np.where(ok, pairs / np.where(ok, expected, 1.0), 0.0)
        best = np.argsort(-pairs, kind="stable")[:max(1, len(pairs) // 10)]
        top[layer] = (pairs[best] * lift[best]).sum() / max(pairs[best].sum(), 1)
        mean[layer] = (pairs * lift).sum() / max(pairs.sum(), 1)
    return top, mean


def joint_counts(src: np.ndarray, dst: np.ndarray, E: int) -> np.ndarray:
    """[E, E] tokens selecting expert a in src and b in dst (src, dst [tokens, k])."""
    codes = (src[:, :, None].astype(np.int64) * E + dst[:, None, :]).ravel()
    return np.bincount(codes, minlength=E * E).reshape(E, E)


def best_mapping(src: np.ndarray, dst: np.ndarray, E: int) -> np.ndarray:
    """[E] for each expert of the source layer, the destination expert most often selected by
    the same tokens (ties: the lowest id); src, dst [tokens, k]."""
    return np.argmax(joint_counts(src, dst, E), axis=1).astype(np.int32)


def cross_layer(trace: RoutingTrace) -> np.ndarray:
    """[layers] share of layer l + 1's selections covered by best_mapping of layer l's experts
    (NaN at the last layer)."""
    E, L = trace.num_experts, trace.layers
    out = np.full(L, np.nan)
    rows = np.arange(trace.tokens)[:, None]
    for layer in range(L - 1):
        src, dst = trace.experts[:, layer, :], trace.experts[:, layer + 1, :]
        predicted = np.zeros((trace.tokens, E), bool)         # each token's mapped set
        predicted[rows, best_mapping(src, dst, E)[src]] = True
        out[layer] = predicted[rows, dst].mean()
    return out
