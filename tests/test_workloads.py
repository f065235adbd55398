"""Trace importers, the synthetic generator and trace statistics."""
import json
import math

import numpy as np
import pytest

from devices.units import ConfigError
from workloads.catalog import ModelArch, get_model
from workloads.importers import import_csv, import_jsonl, import_numpy, import_trace
from workloads.stats import format_stats, popularity, trace_stats
from workloads.synthetic import _slot_chain, synthetic_trace
from workloads.trace import RoutingTrace


# -- JSONL ------------------------------------------------------------------------------------
def reference_arrays(tokens=5, layers=3, k=2, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                   for _ in range(tokens)]).astype(np.int32)
    sc = rng.dirichlet(np.ones(k), size=(tokens, layers)).astype(np.float32)
    return ex, sc


def write_jsonl(path, records, shuffle_seed=None):
    if shuffle_seed is not None:
        records = [records[i] for i in np.random.default_rng(shuffle_seed).permutation(len(records))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records_of(ex, sc, fields=("layer", "token_idx", "experts", "gating_probs"), requests=None, token_ids=None):
    lf, tf, ef, sf = fields
    out = []
    for t in range(ex.shape[0]):
        for layer in range(ex.shape[1]):
            rec = {lf: layer, tf: int(token_ids[t]) if token_ids is not None else t,
                   ef: ex[t, layer].tolist(), sf: [float(s) for s in sc[t, layer]]}
            if requests is not None:
                rec["req"] = requests[t]
            out.append(rec)
    return out


def test_jsonl_round_trip_with_shuffled_records(tmp_path):
    ex, sc = reference_arrays()
    path = write_jsonl(tmp_path / "routing.jsonl", records_of(ex, sc), shuffle_seed=1)
    trace = import_jsonl(path, num_experts=8)
    np.testing.assert_array_equal(trace.experts, ex)
    np.testing.assert_array_equal(trace.scores, sc)
    np.testing.assert_array_equal(trace.request_ids, 0)
    assert not trace.prompt.any()
    assert trace.num_experts == 8 and trace.metadata["format"] == "jsonl"


def test_jsonl_sorts_tokens_by_request_then_token_index(tmp_path):
    ex, sc = reference_arrays(tokens=6)
    # requests interleaved in the file, token indices restart per request and have gaps
    requests = ["b", "a", "b", "a", "b", "a"]
    token_ids = [10, 0, 2, 5, 30, 3]
    path = write_jsonl(tmp_path / "r.jsonl", records_of(ex, sc, requests=requests, token_ids=token_ids), 2)
    trace = import_jsonl(path, request_field="req")
    # string requests keep their order of first appearance in the (shuffled) file
    names = trace.metadata["request_names"]
    order = sorted(range(6), key=lambda t: (names.index(requests[t]), token_ids[t]))
    np.testing.assert_array_equal(trace.experts, ex[order])
    assert [names[r] for r in trace.request_ids] == [requests[t] for t in order]


def test_jsonl_integer_requests_and_prompt_field(tmp_path):
    recs = [{"layer": 0, "token_idx": t, "experts": [t % 4], "gating_probs": [1.0], "req": r, "is_prompt": t < 1}
            for r in (7, 3) for t in range(3)]
    trace = import_jsonl(write_jsonl(tmp_path / "p.jsonl", recs, 0), request_field="req", prompt_field="is_prompt")
    assert trace.request_ids.tolist() == [3, 3, 3, 7, 7, 7]
    assert trace.prompt.tolist() == [True, False, False, True, False, False]
    assert trace.top_k == 1


def test_jsonl_custom_field_names_and_absent_scores(tmp_path):
    ex, sc = reference_arrays(tokens=4, layers=2, k=3)
    recs = records_of(ex, sc, fields=("moe_layer", "pos", "topk_ids", "weights"))
    for r in recs:
        del r["weights"]
    path = write_jsonl(tmp_path / "custom.jsonl", recs, 3)
    trace = import_jsonl(path, layer_field="moe_layer", token_field="pos", experts_field="topk_ids",
                         scores_field="weights")
    np.testing.assert_array_equal(trace.experts, ex)
    np.testing.assert_allclose(trace.scores, 1 / 3)
    assert "1/k" in trace.metadata["scores"]


def test_jsonl_non_contiguous_layer_ids_are_mapped(tmp_path):
    recs = [{"layer": layer, "token_idx": t, "experts": [1, 2]} for t in range(2) for layer in (1, 3, 5)]
    trace = import_jsonl(write_jsonl(tmp_path / "l.jsonl", recs))
    assert trace.layers == 3 and trace.metadata["layer_ids"] == [1, 3, 5]


GOOD = {"layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}


def rec(**changes):
    r = dict(GOOD, **changes)
    return {k: v for k, v in r.items() if v is not None}


@pytest.mark.parametrize("lines, line_no, words", [
    ([GOOD, "{not json"], 2, "not valid JSON"),
    ([GOOD, [1, 2]], 2, "JSON object"),
    ([GOOD, rec(layer=1), rec(token_idx=1)], None, "no record for layer 1"),      # token 1 misses layer 1
    ([GOOD, rec(layer=1, experts=[1, 2, 3], gating_probs=[.5, .3, .2])], 2, "same top-k"),
    ([GOOD, rec(layer="1")], 2, "'layer' must be a non-negative integer"),
    ([GOOD, rec(layer=1, token_idx=0.5)], 2, "'token_idx' must be a non-negative integer"),
    ([GOOD, rec(layer=1, experts=[1, 2.5])], 2, "integer expert ids"),
    ([GOOD, rec(layer=1, experts=[True, 2])], 2, "integer expert ids"),
    ([GOOD, rec(layer=1, experts=[3, 3])], 2, "distinct"),
    ([GOOD, rec(layer=1), rec(gating_probs=[0.5, 0.5])], 3, "duplicate record"),
    ([GOOD, rec(layer=1, gating_probs=None)], 2, "'gating_probs' is missing"),
    ([GOOD, rec(layer=1, gating_probs=[1.0])], 2, "1 scores for 2 experts"),
    ([GOOD, rec(layer=1, gating_probs=["x", 1])], 2, "finite numbers"),
    ([GOOD, rec(layer=None)], 2, "no field 'layer'"),
])
def test_jsonl_bad_input_names_file_and_line(tmp_path, lines, line_no, words):
    path = tmp_path / "bad_trace.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(ConfigError) as err:
        import_jsonl(path)
    msg = str(err.value)
    assert "bad_trace.jsonl" in msg and words in msg
    assert f"line {line_no if line_no else ''}" in msg


def test_jsonl_missing_record_names_the_token(tmp_path):
    recs = [rec(layer=layer, token_idx=t) for t in range(3) for layer in range(2) if (t, layer) != (2, 0)]
    with pytest.raises(ConfigError, match=r"miss\.jsonl: token 2 \(first record on line 5\) has no record for layer 0"):
        import_jsonl(write_jsonl(tmp_path / "miss.jsonl", recs))


def test_jsonl_expert_out_of_range_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "range.jsonl", [GOOD, rec(layer=1, experts=[1, 8])])
    with pytest.raises(ConfigError, match=r"range\.jsonl, line 2: expert id 8 out of range 0\.\.7"):
        import_jsonl(path, num_experts=8)
    assert import_jsonl(path).num_experts == 9      # without num_experts: largest id + 1


def test_jsonl_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.jsonl: no records"):
        import_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="nope.jsonl"):
        import_jsonl(tmp_path / "nope.jsonl")


# -- CSV --------------------------------------------------------------------------------------
def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_csv_top_k_ties_and_layer_order(tmp_path):
    header = ["e0", "e1", "e2", "e3"]
    # layer 2 (file layer_2.csv) must come before layer 10 although "layer_10" sorts first by name
    l10 = write_csv(tmp_path / "layer_10.csv", header, [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    l2 = write_csv(tmp_path / "layer_2.csv", header, [[0.9, 0.05, 0.05, 0.0], [0.25, 0.25, 0.25, 0.25]])
    trace = import_csv([l10, l2], top_k=2)
    assert trace.experts.tolist() == [[[0, 1], [3, 2]],        # token 0: layer 2, then layer 10
                                      [[0, 1], [0, 1]]]        # ties -> lower id first
    np.testing.assert_allclose(trace.scores, [[[0.9, 0.05], [0.4, 0.3]], [[0.25, 0.25], [0.5, 0.5]]])
    assert trace.num_experts == 4 and trace.metadata["expert_names"] == header


def test_csv_request_and_token_columns_order_tokens(tmp_path):
    header = ["request", "token", "a", "b", "c"]
    rows = [["r1", 1, 0.1, 0.8, 0.1], ["r0", 0, 0.7, 0.2, 0.1], ["r1", 0, 0.2, 0.2, 0.6]]
    trace = import_csv([write_csv(tmp_path / "l0.csv", header, rows)], top_k=1)
    # requests keep first-appearance order (r1 then r0), tokens sorted within a request
    assert trace.experts[:, 0, 0].tolist() == [2, 1, 0]
    assert trace.request_ids.tolist() == [0, 0, 1] and trace.metadata["request_names"] == ["r1", "r0"]


def test_csv_errors_name_file_row_and_column(tmp_path):
    a = write_csv(tmp_path / "layer_0.csv", ["e0", "e1"], [[0.1, 0.9], [0.3, 0.7]])
    b = write_csv(tmp_path / "layer_1.csv", ["e0", "e1"], [[0.1, 0.9]])
    with pytest.raises(ConfigError, match=r"layer_1\.csv: 1 rows, .*layer_0\.csv has 2"):
        import_csv([a, b], top_k=1)
    c = write_csv(tmp_path / "layer_1.csv", ["e0", "e1"], [[0.1, 0.9], [0.3, "high"]])
    with pytest.raises(ConfigError, match=r"layer_1\.csv, row 2 \(line 3\), column 'e1': .*'high'"):
        import_csv([a, c], top_k=1)
    d = write_csv(tmp_path / "layer_1.csv", ["e0", "e1"], [[0.1, 0.9], [0.3, "nan"]])
    with pytest.raises(ConfigError, match=r"layer_1\.csv, row 2 \(line 3\), column 'e1'"):
        import_csv([a, d], top_k=1)
    e = write_csv(tmp_path / "layer_1.csv", ["e0", "e1", "e2"], [[0.1, 0.9, 0], [0.3, 0.2, 0]])
    with pytest.raises(ConfigError, match=r"layer_1\.csv: 3 expert columns"):
        import_csv([a, e], top_k=1)
    with pytest.raises(ConfigError, match=r"layer_0\.csv: top_k=3 exceeds"):
        import_csv([a], top_k=3)
    with pytest.raises(ConfigError, match=r"layer_0\.csv: 2 expert columns, but num_experts=8"):
        import_csv([a], top_k=1, num_experts=8)
    f = tmp_path / "ragged.csv"
    f.write_text("e0,e1\n0.1,0.2\n0.3\n")
    with pytest.raises(ConfigError, match=r"ragged\.csv, row 2 \(line 3\): 1 cells"):
        import_csv([f], top_k=1)


# -- NumPy and dispatch -----------------------------------------------------------------------
def test_import_numpy_arrays_and_paths(tmp_path):
    ex, sc = reference_arrays(tokens=4, layers=2)
    trace = import_numpy(ex, sc, request_ids=[0, 0, 1, 1], prompt=[1, 0, 1, 0])
    np.testing.assert_array_equal(trace.experts, ex)
    assert trace.prompt.tolist() == [True, False, True, False]
    np.save(tmp_path / "ex.npy", ex.astype(np.int64))
    np.save(tmp_path / "sc.npy", sc)
    trace = import_numpy(tmp_path / "ex.npy", str(tmp_path / "sc.npy"))
    np.testing.assert_array_equal(trace.scores, sc)
    assert trace.experts.dtype == np.int32 and trace.metadata["path"].endswith("ex.npy")
    np.testing.assert_allclose(import_numpy(ex).scores, 0.5)


@pytest.mark.parametrize("args, words", [
    ((np.zeros((4, 2)),), r"expected shape \[tokens, layers, k\]"),
    ((np.full((4, 2, 2), 0.5),), "must be integers"),
    ((-np.ones((4, 2, 2), int),), r"expert id -1 at \[token, layer, slot\] \[0, 0, 0\]"),
    ((np.zeros((4, 2, 2), int), np.zeros((4, 2, 1))), "shape"),
    ((np.zeros((4, 2, 2), int), None, np.zeros(3, int)), r"expected shape \(4,\)"),
    ((np.zeros((4, 2, 2), int), None, None, np.full(4, 2)), "prompt flags"),
])
def test_import_numpy_errors(args, words):
    with pytest.raises(ConfigError, match=words):
        import_numpy(*args)


def test_import_numpy_bad_path_names_it(tmp_path):
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(ConfigError, match="junk.npy"):
        import_numpy(tmp_path / "junk.npy")


def test_import_trace_dispatch(tmp_path):
    ex, sc = reference_arrays(tokens=3, layers=2)
    jsonl = write_jsonl(tmp_path / "t.jsonl", records_of(ex, sc))
    np.testing.assert_array_equal(import_trace(jsonl).experts, ex)
    np.testing.assert_array_equal(import_trace(jsonl, num_experts="8").experts, ex)   # CLI strings
    npz = RoutingTrace(ex, sc, None, None, {"experts": 8}).save(tmp_path / "t.npz")
    np.testing.assert_array_equal(import_trace(npz).experts, ex)
    np.save(tmp_path / "t.npy", ex)
    np.testing.assert_array_equal(import_trace(tmp_path / "t.npy").experts, ex)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for layer in range(2):
        write_csv(csv_dir / f"layer{layer}.csv", ["a", "b", "c"], [[0.1, 0.5, 0.4], [0.6, 0.1, 0.3]])
    trace = import_trace(csv_dir, top_k="2")
    assert trace.experts[:, 0].tolist() == [[1, 2], [0, 2]]
    with pytest.raises(ConfigError, match="needs top_k"):
        import_trace(csv_dir)
    with pytest.raises(ConfigError, match="unknown option.*colour.*allowed: layer_field"):
        import_trace(jsonl, colour="red")
    with pytest.raises(ConfigError, match="cannot tell the trace format"):
        import_trace(jsonl.rename(tmp_path / "t.txt"))
    with pytest.raises(ConfigError, match="no such file"):
        import_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="option top_k must be an integer"):
        import_trace(csv_dir, top_k="two")


# -- synthetic --------------------------------------------------------------------------------
MODEL = ModelArch("synth", layers=4, experts=8, top_k=2, d_model=64, d_ff=64)


def test_synthetic_is_seeded():
    a = synthetic_trace(MODEL, requests=2, seed=3)
    b = synthetic_trace(MODEL, requests=2, seed=3)
    c = synthetic_trace(MODEL, requests=2, seed=4)
    for name in ("experts", "scores", "request_ids", "prompt"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.experts, c.experts)
    assert a.metadata == b.metadata


def test_synthetic_shape_flags_and_metadata():
    t = synthetic_trace(MODEL, requests=3, prompt_len=5, output_len=7, skew=0.5, locality=0.3, seed=1)
    assert t.experts.shape == (36, 4, 2)
    assert t.request_ids.tolist() == [r for r in range(3) for _ in range(12)]
    assert t.prompt.tolist() == ([True] * 5 + [False] * 7) * 3
    assert t.metadata == {"generator": "synthetic", "model": "synth", "experts": 8, "layers": 4, "top_k": 2,
                          "requests": 3, "prompt_len": 5, "output_len": 7, "skew": 0.5, "locality": 0.3,
                          "seed": 1}
    json.dumps(t.metadata)


@pytest.mark.parametrize("model", [MODEL, get_model("olmoe-1b-7b"), get_model("switch-large-128"),
                                   ModelArch("full", layers=2, experts=4, top_k=4, d_model=8, d_ff=8)])
def test_synthetic_ids_and_scores_are_valid(model):
    t = synthetic_trace(model, requests=2, output_len=100, skew=2.0, locality=0.7)
    t.validate(model.layers, model.experts)
    assert (np.sort(t.experts, -1)[..., 1:] != np.sort(t.experts, -1)[..., :-1]).all()   # distinct per token
    assert (t.scores > 0).all()
    np.testing.assert_allclose(t.scores.sum(-1), 1.0, atol=1e-5)
    assert (np.diff(t.scores, axis=-1) <= 0).all()                                          # router order


def test_synthetic_skew_and_locality_show_in_the_stats():
    def mean(**kw):
        return trace_stats(synthetic_trace(MODEL, requests=4, output_len=1000, **kw))["mean"]
    uniform = mean(skew=0.0, locality=0.0)
    assert uniform["top2_share"] == pytest.approx(2 / 8, abs=0.02)
    assert uniform["entropy"] > 0.99
    assert uniform["reuse_rate"] == pytest.approx(1 - math.comb(6, 2) / math.comb(8, 2), abs=0.02)
    assert mean(skew=1.0, locality=0.0)["top2_share"] > mean(skew=0.3, locality=0.0)["top2_share"] + 0.05
    assert mean(skew=1.0, locality=0.0)["top2_share"] > uniform["top2_share"] + 0.1
    assert mean(locality=0.9)["reuse_rate"] > mean(locality=0.0)["reuse_rate"] + 0.2


def test_synthetic_rejects_bad_settings():
    with pytest.raises(ConfigError, match="locality must be in"):
        synthetic_trace(MODEL, locality=1.5)
    with pytest.raises(ConfigError, match="requests must be an integer >= 1"):
        synthetic_trace(MODEL, requests=0)
    with pytest.raises(ConfigError, match="skew"):
        synthetic_trace(MODEL, skew=-1)


def test_slot_chain_equals_the_sequential_definition():
    # with a fixed candidate list per token, the vectorised chains equal a plain loop
    rng = np.random.default_rng(0)
    for experts, k, locality in ((8, 2, 0.6), (6, 4, 0.9), (5, 5, 0.8)):
        chains, positions = 5, 120
        cand = np.stack([rng.permutation(experts)[:k] for _ in range(chains * positions)])
        reuse = rng.random((chains, positions, k)) < locality
        got = np.empty((chains * positions, k), np.int32)
        for j in range(k):
            taken = got[:, :j]

            def draw(pos, taken=taken):
                free = ~(cand[pos][:, :, None] == taken[pos][:, None, :]).any(-1)
                return cand[pos][np.arange(len(pos)), free.argmax(1)]
            got[:, j] = _slot_chain(reuse[..., j].copy(), taken, draw)
        want = np.empty((chains, positions, k), np.int32)
        for c in range(chains):
            for t in range(positions):
                chosen = []
                for j in range(k):
                    prev = want[c, t - 1, j] if t else None
                    fresh = next(e for e in cand[c * positions + t] if e not in chosen)
                    chosen.append(prev if t and reuse[c, t, j] and prev not in chosen else fresh)
                want[c, t] = chosen
        np.testing.assert_array_equal(got.reshape(want.shape), want)


# -- stats ------------------------------------------------------------------------------------
def tiny_trace():
    # 5 tokens of 2 interleaved requests, 2 layers, top-2 of 4 experts
    ex = np.array([[[0, 1], [3, 2]],      # t0 request 0
                   [[2, 3], [3, 2]],      # t1 request 1
                   [[1, 2], [3, 2]],      # t2 request 0: shares 1 with t0
                   [[0, 1], [3, 2]],      # t3 request 1: shares nothing with t1
                   [[1, 0], [3, 2]]])     # t4 request 0: shares 1 with t2
    return RoutingTrace(ex, np.full(ex.shape, 0.5), np.array([0, 1, 0, 1, 0]), np.array([1, 1, 0, 0, 0], bool),
                        {"experts": 4})


def test_stats_on_a_hand_made_trace():
    s = trace_stats(tiny_trace())
    assert (s["tokens"], s["requests"], s["layers"], s["k"], s["experts"]) == (5, 2, 2, 2, 4)
    assert s["prompt_tokens"] == 2 and s["reuse_pairs"] == 3
    assert s["random_reuse"] == pytest.approx(1 - 1 / 6)
    l0, l1 = s["per_layer"]
    # layer 0 counts: e0 3, e1 4, e2 2, e3 1 (of 10)
    assert l0["top2_share"] == pytest.approx(0.7)
    assert l0["top25_share"] == pytest.approx(0.4)
    p = np.array([0.3, 0.4, 0.2, 0.1])
    assert l0["entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert l0["gini"] == pytest.approx(0.25)
    assert l0["reuse_rate"] == pytest.approx(2 / 3)
    assert l0["slot_reuse"] == pytest.approx(2 / 6)
    # layer 1: always {2, 3}
    assert (l1["top2_share"], l1["entropy"], l1["gini"], l1["reuse_rate"], l1["slot_reuse"]) == \
        pytest.approx((1.0, 0.5, 0.5, 1.0, 1.0))
    assert s["mean"]["reuse_rate"] == pytest.approx((2 / 3 + 1) / 2)
    assert popularity(tiny_trace(), 4).tolist() == [[3, 4, 2, 1], [0, 0, 5, 5]]


def test_popularity_rejects_ids_out_of_range():
    with pytest.raises(ConfigError, match="expert id 3 out of range 0..2"):
        popularity(tiny_trace(), 3)


def test_format_stats_table():
    text = format_stats(trace_stats(tiny_trace()))
    lines = text.splitlines()
    assert lines[0].startswith("5 tokens (2 prompt), 2 requests, 2 layers, top-2 of 4 experts")
    assert lines[1].split()[:3] == ["layer", "top-2", "top-25%"]
    assert lines[2].split()[0] == "0" and lines[3].split()[0] == "1" and lines[4].split()[0] == "mean"
    assert "reuse 0.833" in lines[-1]
    single = RoutingTrace(np.zeros((1, 1, 1), int), np.ones((1, 1, 1)), None, None, {"experts": 2})
    assert "-" in format_stats(trace_stats(single)).splitlines()[2]     # no token pairs: no reuse figure


# -- issue 9: bookkeeping CSV columns, ragged JSONL, trace checks, precision levels -------------
def test_csv_bookkeeping_columns_are_not_experts(tmp_path):
    # integer bookkeeping columns beside token_id: before, they became experts 0..2 and
    # 'position' (non-zero) landed in every token's top-k
    header = ["token_id", "layer_id", "batch_id", "position", "e0", "e1", "e2", "e3"]
    rows = [[0, 0, 0, 5, 0.1, 0.6, 0.2, 0.1], [1, 0, 0, 6, 0.7, 0.1, 0.1, 0.1]]
    trace = import_csv([write_csv(tmp_path / "layer_0.csv", header, rows)], top_k=2)
    assert trace.num_experts == 4 and trace.metadata["expert_names"] == ["e0", "e1", "e2", "e3"]
    assert trace.experts[:, 0].tolist() == [[1, 2], [0, 1]]
    assert trace.metadata["ignored_columns"] == ["layer_id", "batch_id", "position"]
    numeric = ["token_id", "layer_id", "0", "1", "2"]              # numbered expert columns
    trace = import_csv([write_csv(tmp_path / "n.csv", numeric, [[0, 3, 0.2, 0.1, 0.7]])], top_k=1)
    assert trace.experts.tolist() == [[[2]]] and trace.num_experts == 3


def test_csv_ambiguous_columns_are_refused_and_resolved(tmp_path):
    header = ["token_id", "layer_id", "alpha", "beta", "gamma"]
    path = write_csv(tmp_path / "layer_0.csv", header, [[0, 7, 0.2, 0.5, 0.3], [1, 7, 0.6, 0.1, 0.3]])
    with pytest.raises(ConfigError, match=r"layer_0\.csv: cannot tell which columns hold expert scores: "
                                          r"\['layer_id', 'alpha', 'beta', 'gamma'\].*expert_columns=.*num_experts=N"):
        import_trace(path, top_k="1")
    by_count = import_trace(path, top_k="1", num_experts="3")      # the last 3 columns
    assert by_count.metadata["expert_names"] == ["alpha", "beta", "gamma"]
    assert by_count.experts[:, 0, 0].tolist() == [1, 0]
    by_name = import_trace(path, top_k="1", expert_columns="alpha|beta|gamma")
    np.testing.assert_array_equal(by_name.experts, by_count.experts)
    with pytest.raises(ConfigError, match=r"expert_columns='zeta' matches none of the columns \['layer_id'"):
        import_trace(path, top_k="1", expert_columns="zeta")
    with pytest.raises(ConfigError, match="not a regular expression"):
        import_trace(path, top_k="1", expert_columns="(")


def ragged_records():
    """Request 'a' has 3 tokens, 'b' 2; a's last token and b's last token lack layer 1."""
    out = []
    for req, n in (("a", 3), ("b", 2)):
        for t in range(n):
            for layer in range(2):
                if t == n - 1 and layer == 1:
                    continue
                out.append({"req": req, "layer": layer, "token_idx": t, "experts": [t % 4, 4 + layer]})
    return out


def test_jsonl_ragged_strict_names_the_option_and_drop_counts_per_request(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ragged.jsonl", ragged_records())
    with pytest.raises(ConfigError, match=r"token 2 of request 'a'.*no record for layer 1.*incomplete=drop"):
        import_jsonl(path, request_field="req")
    trace = import_trace(path, request_field="req", incomplete="drop")
    assert trace.tokens == 3 and trace.request_ids.tolist() == [0, 0, 1]
    assert trace.experts[:, :, 0].tolist() == [[0, 0], [1, 1], [0, 0]]
    assert trace.metadata["dropped_tokens"] == {"a": 1, "b": 1}
    assert "left out 2 token(s)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"option incomplete must be one of strict, drop, got 'some'"):
        import_jsonl(path, request_field="req", incomplete="some")


def test_jsonl_duplicate_record_mentions_request_field(tmp_path):
    recs = [{"layer": 0, "token_idx": 0, "experts": [1], "req": r} for r in ("a", "b")]
    path = write_jsonl(tmp_path / "two.jsonl", recs)
    with pytest.raises(ConfigError, match=r"line 2: duplicate record for token 0, layer 0 \(first on line 1\).*"
                                          r"request_field="):
        import_jsonl(path)
    assert import_jsonl(path, request_field="req").tokens == 2


@pytest.mark.parametrize("edit, words", [
    (lambda ex, sc: (ex.__setitem__((3, 1, 1), ex[3, 1, 0]), sc), r"token 3, layer 1: expert ids .* repeat"),
    (lambda ex, sc: (ex, sc.__setitem__((2, 0, 1), np.nan)), r"token 2, layer 0: scores .*not all finite"),
    (lambda ex, sc: (ex, sc.__setitem__((4, 2, 0), np.inf)), r"token 4, layer 2: scores .*not all finite"),
])
def test_npz_trace_with_bad_routing_is_refused(tmp_path, edit, words):
    ex, sc = reference_arrays()
    edit(ex, sc)
    path = RoutingTrace(ex, sc, None, None).save(tmp_path / "bad.npz")
    with pytest.raises(ConfigError, match=rf"bad\.npz: {words}"):
        RoutingTrace.load(path)
    with pytest.raises(ConfigError, match=words):
        import_numpy(ex, sc)


def test_npz_zero_empty_and_non_zip_traces_are_refused(tmp_path):
    zero = RoutingTrace(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)), None, None).save(tmp_path / "zero.npz")
    with pytest.raises(ConfigError, match=r"zero\.npz: the trace is empty"):
        RoutingTrace.load(zero)
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("experts,scores\n1,0.5\n")
    np.savez(tmp_path / "objects.npz", experts=np.array([[[1]]], object), scores=np.ones((1, 1, 1)))
    for name, why in (("empty", "empty file"), ("text", "not a zip archive"), ("objects", "an array holds Python objects")):
        with pytest.raises(ConfigError, match=rf"{name}\.npz: cannot read as a \.npz trace \({why}") as e:
            import_trace(tmp_path / f"{name}.npz")
        assert "allow_pickle" not in str(e.value)


def test_levels_round_trip_and_validation(tmp_path):
    ex, sc = reference_arrays()
    levels = np.arange(ex.size).reshape(ex.shape) % 4
    trace = RoutingTrace(ex, sc, None, None, {}, levels)
    assert trace.levels.dtype == np.uint8
    back = RoutingTrace.load(trace.save(tmp_path / "lv.npz"))
    np.testing.assert_array_equal(back.levels, levels)
    assert RoutingTrace.load(RoutingTrace(ex, sc, None, None).save(tmp_path / "no.npz")).levels is None
    with pytest.raises(ConfigError, match=r"levels shape \(5, 3\) differs from experts shape \(5, 3, 2\)"):
        RoutingTrace(ex, sc, None, None, {}, levels[..., 0])
    with pytest.raises(ConfigError, match=r"levels must be integers 0\.\.255"):
        RoutingTrace(ex, sc, None, None, {}, levels + 300)
    np.savez(tmp_path / "badlv.npz", experts=ex, scores=sc, levels=np.zeros((5, 3, 1), np.uint8))
    with pytest.raises(ConfigError, match=r"badlv\.npz: levels shape"):
        RoutingTrace.load(tmp_path / "badlv.npz")


def test_the_bundled_trained_model_is_found_by_name_and_listed_when_a_name_is_wrong():
    """A host profile names its model (tiny-moe): `--model tiny-moe` must find the bundled one."""
    from devices.units import ConfigError
    from workloads.catalog import get_model
    arch = get_model("tiny-moe")
    assert (arch.name, arch.layers, arch.experts) == ("tiny-moe", 4, 16)
    with pytest.raises(ConfigError) as e:
        get_model("tiny")
    assert "mixtral-8x7b" in str(e.value) and "bundled trained tiny-moe" in str(e.value)
