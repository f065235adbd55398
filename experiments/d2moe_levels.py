"""The precision levels D²MoE's reproduction assigns, and where their shares come from.

In the paper a learned bit-width router in front of each expert picks each token's level at
inference; the capacities {c_k} (V1 0.3 / 0.4 / 0.3) cap the levels while it is trained. moelab
cannot run the paper's models (LLaMA-MoE-3.5B, Mixtral-8x7B), so their synthetic traces get
levels drawn from the per-level token shares the learned router gives on the model moelab ships
(executor/assets/tiny-moe, its bit router bit_router-v1.safetensors), measured by
`measure_router_shares` (greedy decoding of the built-in prompts, `moelab trace record
--bit-router`, prefill and decode tokens together) and pinned in ROUTER_SHARES. The `shares`
allocator (policies/allocators.py) draws each (token, expert)'s level with those probabilities
from a seeded hash, online, never reading the future. The router also gives the tokens one expert
serves at a step similar levels (so fewer experts need their top plane than independent draws
would): `fit_group` measures how much, pinned in ROUTER_GROUP, the allocator's `group` option.

The shipped router's selection rule (executor/bit_router.py; the paper gives none): per (layer,
expert), the token's expected level sum_k k p_k (p = softmax of the router's logits for that
expert) is compared with K - 1 thresholds, and the level is how many it exceeds. The thresholds
are the capacities' cumulative quantiles of those scores on calibration text, so the router meets
the capacities on that text and drifts from them on other text (ROUTER_SHARES). It was trained
with the capacities enforced by rank (straight-through), not by the paper's random drop of the
tokens over c_k T (moelab's router has no random source there).

`capacity` (the rank rule: per expert, its tokens ranked by gate score, the top c_K share at the
highest level, ...) stays as an option: reproduce d2moe runs D²MoE under both.
"""
from __future__ import annotations

from pathlib import Path

ROUTER = Path("executor/assets/tiny-moe/bit_router-v1.safetensors")
# measure_router_shares(requests=32, tokens=64, seed=0) on the shipped tiny-moe and its V1 router:
# 32,000 (token, layer, slot) levels (32 requests x (62 prompt + 63 decoded tokens), 4 layers, top-2);
# 4 requests x 16 tokens gives 0.2784 / 0.4278 / 0.2938 (the spread of a small sample)
ROUTER_SHARES = {"v1": (0.2533, 0.4316, 0.3151)}
# fit_group on the same trace: of its 3,056 decode (step, layer, expert) groups the router put at least one
# token at INT4 in 52.2% (independent draws at the shares: 74.9%); the `shares` allocator matches that when a
# token takes its group's draw with probability 0.7607, and then also needs INT3 or more in 88.4% of groups
# (the router: 89.1%; independent draws: 95.8%)
ROUTER_GROUP = {"v1": 0.7607}
MEASURED_WITH = {"requests": 32, "tokens": 64, "seed": 0}
CAPACITIES = {"v1": (0.3, 0.4, 0.3)}          # the paper's V1 capacities, the `capacity` allocator's


def measure_router_shares(requests: int = 32, tokens: int = 64, seed: int = 0, router: Path = ROUTER,
                          model_dir: Path | None = None) -> tuple[float, ...]:
    """The share of (token, layer, slot)s the learned router puts at each level when the shipped
    model greedily decodes `requests` built-in prompts for `tokens` new tokens (prefill included)."""
    import numpy as np
    trace = record_router_trace(requests, tokens, seed, router, model_dir)
    counts = np.bincount(trace.levels.ravel(), minlength=int(trace.levels.max()) + 1)
    return tuple(round(float(c) / float(counts.sum()), 4) for c in counts)


def record_router_trace(requests: int = 32, tokens: int = 64, seed: int = 0, router: Path = ROUTER,
                        model_dir: Path | None = None):
    """The shipped model's routing with the learned router's levels (`moelab trace record --bit-router`)."""
    from executor.bit_router import load_bit_router
    from executor.record import record_routing
    from executor.train import DEFAULT_MODEL, load_trained
    from experiments.prompts import prompt_tokens
    model, tok, _ = load_trained(model_dir or DEFAULT_MODEL)
    bit_router = load_bit_router(router, model)
    prompts = prompt_tokens(None, tok, model.cfg.vocab, requests, seed)
    return record_routing(model, prompts, tokens, level_fn=bit_router)


def decode_groups(trace) -> list:
    """The levels of each decode step's (layer, expert) group of tokens, one array per group."""
    import numpy as np
    order = np.argsort(trace.request_ids, kind="stable")
    first = np.r_[True, trace.request_ids[order][1:] != trace.request_ids[order][:-1]]
    pos = np.empty(trace.tokens, np.int64)
    pos[order] = np.arange(trace.tokens) - np.maximum.accumulate(np.where(first, np.arange(trace.tokens), 0))
    decode, out = ~trace.prompt, []
    for p in np.unique(pos[decode]):
        rows = np.flatnonzero(decode & (pos == p))
        for layer in range(trace.layers):
            e, lv = trace.experts[rows, layer].ravel(), trace.levels[rows, layer].ravel()
            out += [lv[e == x] for x in np.unique(e)]
    return out


def top_need(sizes, top_share: float, group: float) -> float:
    """The mean over groups of n tokens of P(at least one at the top level) under the `shares`
    allocator: each token takes the group's draw with probability `group`, else its own;
    P(none) = a ((g + (1 - g) a)^n - ((1 - g) a)^n) + ((1 - g) a)^n with a = 1 - top share."""
    a, total = 1.0 - top_share, 0.0
    for n in sizes:
        own = (1 - group) * a
        total += 1 - (a * ((group + own) ** n - own ** n) + own ** n)
    return total / len(sizes)


def fit_group(trace, shares) -> dict:
    """The `group` probability at which the `shares` allocator needs the top level in as many decode
    groups as the learned router did (bisection; the need falls as group rises)."""
    groups = decode_groups(trace)
    top = len(shares) - 1
    observed = sum(bool((g == top).any()) for g in groups) / len(groups)
    sizes = [len(g) for g in groups]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top_need(sizes, shares[top], mid) > observed else (lo, mid)
    return {"group": round((lo + hi) / 2, 4), "observed": observed, "independent": top_need(sizes, shares[top], 0.0),
            "groups": len(groups)}


def shares_option(ladder: str = "v1") -> dict:
    """The `shares` allocator's options for a ladder: the router's measured shares, renormalised
    (they are rounded to 4 digits), its measured group agreement, and the hash's seed."""
    s = ROUTER_SHARES[ladder]
    total = sum(s)
    return {"shares": [round(x / total, 6) for x in s], "group": ROUTER_GROUP[ladder], "seed": 0}


def describe() -> str:
    s = ROUTER_SHARES["v1"]
    c = CAPACITIES["v1"]
    return (f"levels from the learned router: INT2 / INT3 / INT4 = {s[0]:.1%} / {s[1]:.1%} / {s[2]:.1%} of "
            f"(token, expert)s ({s[0] * 2 + s[1] * 3 + s[2] * 4:.3f} bits), the V1 router's measured shares on the "
            f"shipped tiny-moe ({MEASURED_WITH['requests']} requests x {MEASURED_WITH['tokens']} new tokens, "
            f"`{ROUTER}`), drawn per (token, expert) by a seeded hash (the `shares` allocator), a token taking "
            f"its (step, layer, expert) group's draw with probability {ROUTER_GROUP['v1']} (fitted so that as many "
            f"decode groups need INT4 as with the router: 52.2%, against 74.9% for independent draws); the "
            f"router's capacities are {c[0]:.0%} / {c[1]:.0%} / {c[2]:.0%}. Selection rule: a token's level for "
            f"an expert is how many of that (layer, expert)'s K-1 thresholds its expected level sum_k k p_k "
            f"exceeds, the thresholds the capacities' quantiles on calibration text (executor/bit_router.py; the "
            f"paper gives no rule); the router was trained with the capacities enforced by rank, not by the "
            f"paper's random drop of overflow tokens")
