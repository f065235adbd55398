"""Skew and reuse statistics of a routing trace (what `moelab trace stats FILE` prints).

Skew says how much a static hot-expert cache can win; reuse (an expert of this token was
also selected by the request's previous token, same layer) says how much recency can win.
Both compare to uniform random routing: top-2 share 2/E, reuse 1 - C(E-k,k)/C(E,k)
(peers.md: real Mixtral decode reuses ~59-65% against 46% at random).

The structure columns (workloads/structure.py) say what a cache sees beyond that: distinct
experts per window of w tokens of one request and per 4 / 16 requests' first 19 tokens
(ZipMoE's trace statistics, issue 22), a request's own top-k share (request-level drift),
pair co-activation and cross-layer predictability (what gate lookahead can exploit).
"""
from __future__ import annotations

import math

import numpy as np

from devices.units import ConfigError
from workloads import structure
from workloads.trace import RoutingTrace

_COLUMNS = [("top2_share", "top-2"), ("top25_share", "top-25%"), ("entropy", "entropy"), ("gini", "gini"),
            ("reuse_rate", "reuse"), ("slot_reuse", "slot-reuse")]
WINDOWS = (1, 8, 19, 64)        # tokens of one request (19: ZipMoE's prompts, issue 22)
REQUEST_GROUPS = (4, 16)        # requests together, each its first 19 tokens (ZipMoE)
_STRUCTURE = ([("topk_share", "top-k"), ("own_topk_share", "own-top-k")]
              + [(f"distinct_w{w}", f"dist/{w}") for w in WINDOWS]
              + [(f"distinct_r{g}", f"dist/{g}req") for g in REQUEST_GROUPS]
              + [("pair_lift_top", "pair-top"), ("pair_lift_mean", "pair-mean"), ("cross_layer", "x-layer")])


def popularity(trace: RoutingTrace, experts: int | None = None) -> np.ndarray:
    """[layers, experts] selection counts (experts defaults to trace.num_experts)."""
    E = trace.num_experts if experts is None else int(experts)
    ex = trace.experts
    bad = np.argwhere((ex < 0) | (ex >= E))
    if len(bad):
        tok, layer, slot = bad[0]
        raise ConfigError(f"{trace.metadata.get('path', 'trace')}: token {tok}, layer {layer}, slot {slot}: "
                          f"expert id {ex[tok, layer, slot]} out of range 0..{E - 1}")
    flat = (np.arange(trace.layers)[None, :, None] * E + ex).ravel()
    return np.bincount(flat, minlength=trace.layers * E).reshape(trace.layers, E)


def reuse_overlap(trace: RoutingTrace) -> np.ndarray:
    """[pairs, layers, k] bools: for each token that has a previous token in its request, whether
    each of its experts was also selected by that previous token (same layer)."""
    order = np.argsort(trace.request_ids, kind="stable")     # stable: keeps generation order
    same = trace.request_ids[order[1:]] == trace.request_ids[order[:-1]]
    cur, prev = trace.experts[order[1:][same]], trace.experts[order[:-1][same]]
    return (cur[..., :, None] == prev[..., None, :]).any(-1)


def random_reuse(experts: int, k: int) -> float:
    """Probability that two independent uniform top-k draws share an expert."""
    return 1.0 - math.comb(experts - k, k) / math.comb(experts, k)


def trace_stats(trace: RoutingTrace) -> dict:
    """Totals, per-layer skew and reuse figures, and their mean over layers (see the module doc)."""
    if trace.tokens == 0:
        raise ConfigError(f"{trace.metadata.get('path', 'trace')}: the trace has no tokens")
    E, L, k = trace.num_experts, trace.layers, trace.top_k
    counts = popularity(trace, E).astype(np.float64)
    total = np.maximum(counts.sum(1), 1)
    desc = -np.sort(-counts, axis=1)
    p = counts / total[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    entropy = h / math.log(E) if E > 1 else np.ones(L)
    asc = desc[:, ::-1]
    gini = 2 * (np.arange(1, E + 1) * asc).sum(1) / (E * total) - (E + 1) / E
    overlap = reuse_overlap(trace)
    if len(overlap):
        reuse, slot = overlap.any(-1).mean(0), overlap.mean((0, 2))
    else:
        reuse = slot = np.full(L, np.nan)
    per_layer = {
        "top2_share": desc[:, :min(2, E)].sum(1) / total,
        "top25_share": desc[:, :max(1, math.ceil(E / 4))].sum(1) / total,
        "entropy": entropy, "gini": gini, "reuse_rate": reuse, "slot_reuse": slot,
    }
    extra = structure_stats(trace, desc[:, :k].sum(1) / total)
    baseline = random_reuse(E, k)
    return {
        "tokens": trace.tokens, "requests": int(len(np.unique(trace.request_ids))), "layers": L, "k": k,
        "experts": E, "prompt_tokens": int(trace.prompt.sum()), "reuse_pairs": int(len(overlap)),
        "random_reuse": baseline, "random_slot_reuse": k / E, "random_top2_share": min(2, E) / E,
        "random_topk_share": k / E, "random_distinct": {w: random_distinct(E, k, w) for w in WINDOWS},
        "per_layer": [dict({"layer": layer, "random_reuse": baseline},
                           **{key: float(v[layer]) for key, v in per_layer.items()},
                           **{key: float(v[layer]) for key, v in extra.items()}) for layer in range(L)],
        "mean": dict({key: float(np.mean(v)) for key, v in per_layer.items()},
                     **{key: _nanmean(v) for key, v in extra.items()}),
    }


def structure_stats(trace: RoutingTrace, topk_share: np.ndarray) -> dict[str, np.ndarray]:
    """The structure columns, [layers] each (workloads/structure.py)."""
    out = {"topk_share": topk_share, "own_topk_share": structure.own_topk_share(trace)}
    out.update({f"distinct_w{w}": structure.distinct_per_window(trace, w) for w in WINDOWS})
    out.update({f"distinct_r{g}": structure.distinct_per_requests(trace, g, 19) for g in REQUEST_GROUPS})
    out["pair_lift_top"], out["pair_lift_mean"] = structure.pair_lift(trace)
    out["cross_layer"] = structure.cross_layer(trace)
    return out


def random_distinct(experts: int, k: int, w: int) -> float:
    """Expected distinct experts in w independent uniform top-k draws."""
    return experts * (1.0 - (1.0 - k / experts) ** w)


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, np.float64)
    return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")


def format_stats(stats: dict) -> str:
    """A compact table: one row per layer, then the mean and the random-routing baseline."""
    def fmt(v: float) -> str:
        return "     -" if v != v else f"{v:6.3f}"      # NaN: the trace has no token pairs

    def row(label: str, d: dict) -> str:
        return f"{label:>5}  " + "  ".join(f"{fmt(d[key]):>10}" for key, _ in _COLUMNS)

    head = "  ".join(f"{title:>10}" for _, title in _COLUMNS)
    lines = [f"{stats['tokens']} tokens ({stats['prompt_tokens']} prompt), {stats['requests']} requests, "
             f"{stats['layers']} layers, top-{stats['k']} of {stats['experts']} experts",
             f"{'layer':>5}  {head}"]
    lines += [row(str(d["layer"]), d) for d in stats["per_layer"]]
    lines.append(row("mean", stats["mean"]))
    if "cross_layer" in stats["mean"]:                        # the structure table (older dicts lack it)
        lines += _structure_table(stats, fmt)
    lines.append(f"random routing: top-2 share {stats['random_top2_share']:.3f}, reuse {stats['random_reuse']:.3f}, "
                 f"slot-reuse {stats['random_slot_reuse']:.3f}; mean reuse {fmt(stats['mean']['reuse_rate']).strip()} "
                 f"over {stats['reuse_pairs']} token pairs")
    return "\n".join(lines)


def _structure_table(stats: dict, fmt) -> list[str]:
    """Rows of the structure columns; dist/w: distinct experts per w tokens of one request."""
    def row(label: str, d: dict) -> str:
        return f"{label:>5}  " + "  ".join(f"{fmt(d[key]):>9}" for key, _ in _STRUCTURE)

    lines = [f"{'layer':>5}  " + "  ".join(f"{title:>9}" for _, title in _STRUCTURE)]
    lines += [row(str(d["layer"]), d) for d in stats["per_layer"]]
    lines.append(row("mean", stats["mean"]))
    rand = stats["random_distinct"]
    lines.append(f"random routing: top-k share {stats['random_topk_share']:.3f}, distinct per window "
                 + ", ".join(f"{w}: {v:.1f}" for w, v in rand.items()))
    return lines
