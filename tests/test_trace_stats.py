"""Trace statistics beyond skew (workloads/structure.py, workloads/stats.py) and the side-by-side
comparison with LRU miss-ratio curves (workloads/compare.py)."""
import time

import numpy as np
import pytest

from workloads.stack import lru_mrc
from sim.replay import _lru
from workloads import structure
from workloads.catalog import ModelArch, get_model
from workloads.compare import FRACTIONS, compare_traces, curve_distance, decision_groups, format_compare, lru_curve
from workloads.stats import format_stats, trace_stats
from workloads.synthetic import synthetic_trace
from workloads.trace import RoutingTrace


def hand_trace():
    # request 0: 4 tokens, request 1: 3 tokens (interleaved); 2 layers, top-2 of 4 experts
    ex = np.array([[[0, 1], [2, 3]],     # r0 t0
                   [[2, 3], [0, 1]],     # r1 t0
                   [[0, 2], [2, 1]],     # r0 t1
                   [[2, 3], [0, 1]],     # r1 t1
                   [[0, 1], [2, 3]],     # r0 t2
                   [[3, 1], [0, 2]],     # r1 t2
                   [[1, 0], [3, 2]]])    # r0 t3
    return RoutingTrace(ex, np.full(ex.shape, 0.5), np.array([0, 1, 0, 1, 0, 1, 0]), None, {"experts": 4})


def test_windows_requests_and_own_topk_by_hand():
    t = hand_trace()
    # r0 layer 0: {0,1} {0,2} {0,1} {1,0}; r1: {2,3} {2,3} {3,1}
    assert structure.distinct_per_window(t, 1).tolist() == [2.0, 2.0]
    # windows of 2: r0 [t0 t1] -> {0,1,2}, [t2 t3] -> {0,1}; r1 [t0 t1] -> {2,3}: (3 + 2 + 2) / 3
    assert structure.distinct_per_window(t, 2)[0] == pytest.approx(7 / 3)
    assert np.isnan(structure.distinct_per_window(t, 5)).all()             # no request has 5 tokens
    # both requests' first 2 tokens together, layer 0: {0,1,2} | {2,3} -> 4
    assert structure.distinct_per_requests(t, 2, w=2)[0] == 4
    assert np.isnan(structure.distinct_per_requests(t, 4)).all()
    # own top-2: r0 layer 0 counts e0 4, e1 3, e2 1 -> 7/8; r1 e3 3, e2 2, e1 1 -> 5/6
    assert structure.own_topk_share(t)[0] == pytest.approx((7 / 8 + 5 / 6) / 2)


def test_pairs_and_cross_layer_by_hand():
    t = hand_trace()
    pairs = structure.pair_counts(t.experts[:, 0], 4)
    assert pairs[0, 1] == pairs[1, 0] == 3 and pairs[2, 3] == 2 and pairs.trace() == 0
    top, mean = structure.pair_lift(t)
    rate = np.bincount(t.experts[:, 0].ravel(), minlength=4) / 7          # tokens selecting each expert
    lift01 = 3 / (7 * rate[0] * rate[1])
    assert top[0] == pytest.approx(lift01)                # 6 pairs: the top tenth is the single top pair
    # layer 0 -> 1: best mapping of each expert, then the share of layer 1's picks it covers
    mapping = structure.best_mapping(t.experts[:, 0], t.experts[:, 1], 4)
    covered = [len(set(mapping[t.experts[i, 0]]) & set(t.experts[i, 1])) for i in range(7)]
    assert structure.cross_layer(t)[0] == pytest.approx(sum(covered) / 14) and np.isnan(structure.cross_layer(t)[1])
    assert np.isnan(structure.pair_lift(RoutingTrace(t.experts[:, :, :1], t.scores[:, :, :1], None, None,
                                                     {"experts": 4}))[0]).all()           # k = 1: no pairs


def test_trace_stats_keep_their_keys_and_add_structure():
    s = trace_stats(hand_trace())
    for key in ("top2_share", "entropy", "gini", "reuse_rate", "slot_reuse", "topk_share", "own_topk_share",
                "distinct_w8", "distinct_r16", "pair_lift_top", "pair_lift_mean", "cross_layer"):
        assert key in s["mean"] and key in s["per_layer"][0]
    assert s["mean"]["cross_layer"] == pytest.approx(s["per_layer"][0]["cross_layer"])   # NaN last layer skipped
    text = format_stats(s).splitlines()
    assert text[1].split()[:3] == ["layer", "top-2", "top-25%"]
    assert any("x-layer" in line for line in text) and text[-1].startswith("random routing: top-2 share")


def test_synthetic_locality_shows_in_the_windows():
    m = get_model("olmoe-1b-7b")
    loose = trace_stats(synthetic_trace(m, requests=4, output_len=200, skew=0.3, locality=0.0))["mean"]
    local = trace_stats(synthetic_trace(m, requests=4, output_len=200, skew=0.3, locality=0.8))["mean"]
    assert local["distinct_w19"] < loose["distinct_w19"] - 10 and local["distinct_w64"] < loose["distinct_w64"]
    assert loose["distinct_w19"] == pytest.approx(64 * (1 - (1 - 8 / 64) ** 19), rel=0.1)   # near random


def test_token_lru_curve_is_sim_mrc_and_replay():
    t = synthetic_trace(ModelArch("m", layers=3, experts=6, top_k=2, d_model=8, d_ff=8), requests=3,
                        prompt_len=2, output_len=30, seed=4)
    groups = decision_groups(t)
    curve = lru_curve(t)
    caps = {f: max(1, round(f * 18)) for f in FRACTIONS}
    want = lru_mrc(groups, sorted(set(caps.values())))
    accesses = sum(map(len, groups))
    for f, c in caps.items():
        assert curve[f] == want[c]
        if want[c] is not None:
            assert curve[f] == _lru(groups, c) / accesses
    # the engines' batch steps instead of tokens: the prefill becomes one decision point
    batched = lru_curve(t, batch=1)
    assert batched[FRACTIONS[0]] is None and batched[1.0] is not None


def test_compare_traces_side_by_side():
    m = get_model("mixtral-8x7b")
    a = synthetic_trace(m, requests=2, output_len=100, skew=0.4, locality=0.15, seed=1)
    b = synthetic_trace(m, requests=2, output_len=100, skew=1.5, locality=0.7, seed=2)
    same = compare_traces(a, a)
    assert same["lru_distance"] == 0
    other = compare_traces(a, b)
    assert other["lru_distance"] > 0.1
    assert curve_distance({0.5: 0.2, 1.0: None}, {0.5: 0.5, 1.0: 0.9}) == pytest.approx(0.3)
    text = format_compare(other, ("a.npz", "b.npz"))
    assert "reuse at next token" in text and "LRU miss-ratio curve distance" in text
    assert text.splitlines()[0].startswith("a.npz: 232 tokens")     # 2 x (16 prompt + 100)


def test_stats_of_a_long_trace_are_vectorised():
    m = get_model("deepseek-v2-lite")
    t = synthetic_trace(m, requests=50, prompt_len=0, output_len=2000, skew=0.4, locality=0.15)   # 100k tokens
    start = time.perf_counter()
    trace_stats(t)
    assert time.perf_counter() - start < 30          # a few seconds on a quiet machine; no quadratic blow-up
