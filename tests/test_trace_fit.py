"""Fitting the synthetic generator to a trace (workloads/fit.py, workloads/fitted.py) and the
catalog's published-statistics defaults (workloads/catalog.py SYNTHETIC)."""
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_device
from devices.units import ConfigError
from policies import build_policies
from sim.engine import Simulator
from timeline.metrics import compute_metrics
from workloads.catalog import SYNTHETIC, get_model, model_of_trace, synthetic_default
from workloads.compare import curve_distance, lru_curve
from workloads.fit import fit_trace, load_fit, save_fit
from workloads.fitted import synth_from_fit
from workloads.formats import make_format
from workloads.stats import popularity, trace_stats
from workloads.synthetic import synthetic_trace
from workloads.trace import RoutingTrace
from workloads.workload import Workload

REAL = Path(__file__).resolve().parent.parent / "experiments" / "studies" / "layer_aware" / "real.npz"
SEEDS = range(4)


def mean_stats(traces) -> dict:
    """trace_stats' layer means, averaged over same-size synthetic traces (the expected figure)."""
    stats = [trace_stats(t)["mean"] for t in traces]
    return {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}


def assert_reproduces(trace, fit, size, rel=0.10, mrc=0.05):
    synth = [synth_from_fit(fit, *size, seed=s) for s in SEEDS]
    want, got = trace_stats(trace)["mean"], mean_stats(synth)
    for key, v in want.items():
        if not math.isnan(v) and v:
            assert got[key] == pytest.approx(v, rel=rel), key
    curves = [lru_curve(t) for t in synth]
    mean = {f: float(np.mean([c[f] for c in curves])) if curves[0][f] is not None else None for f in curves[0]}
    assert curve_distance(lru_curve(trace), mean) <= mrc
    return synth


@pytest.fixture(scope="module")
def real():
    return RoutingTrace.load(REAL)


@pytest.fixture(scope="module")
def real_fit(real):
    return fit_trace(real)


def test_fit_of_the_shipped_models_routing_reproduces_it(real, real_fit):
    assert real.tokens == 872 and real_fit["size"] == {"requests": 8, "prompt_len": 62, "output_len": 47}
    assert_reproduces(real, real_fit, (8, 62, 47))
    assert real_fit["repeats"]["output"][0][0] in (8, 11)          # the greedy decode's loops are found


def test_gate_lookahead_covers_as_much_on_the_fitted_trace(real, real_fit):
    arch = model_of_trace(real.metadata)
    fmt = make_format("bf16", arch.expert_shapes)

    def coverage(trace, capacity):
        w = Workload(arch, trace, fmt, batch=1)
        policies = build_policies(w, capacity * fmt.expert_bytes, cache="lru", prefetch="gate-lookahead")
        return compute_metrics(Simulator(make_device(), w, policies).run())["prefetch_coverage"]
    for capacity in (20, 40):
        synth = np.mean([coverage(synth_from_fit(real_fit, 8, 62, 47, seed=s), capacity) for s in (0, 1)])
        assert synth == pytest.approx(coverage(real, capacity), abs=0.05)


def known_fit(topics: int) -> dict:
    rng = np.random.default_rng(0)
    L, E = 4, 16
    fit = {"model": {"name": "known", "layers": L, "experts": E, "top_k": 2}, "locality": 0.3, "concentration": 20.0,
           "popularity": [rng.permutation(1 / np.arange(1, E + 1) ** 0.8).tolist() for _ in range(L)]}
    if topics > 1:
        fit.update(topics=rng.dirichlet(np.full(E, 0.5), size=(L, topics)).tolist(), persistence=0.3, recall=8)
    return fit


@pytest.mark.parametrize("topics", [1, 4])
def test_the_fit_recovers_known_parameters(topics):
    truth = known_fit(topics)
    trace = synth_from_fit(truth, 128, 16, 112, seed=7)
    fit = fit_trace(trace, topic_count=topics)
    np.testing.assert_allclose(fit["locality"], 0.3, atol=0.03)
    assert fit["concentration"][0] == pytest.approx(20.0, rel=0.5)
    if topics > 1:
        assert fit["persistence"] == pytest.approx(0.3, abs=0.12)
    big_truth, big_fit = synth_from_fit(truth, 400, 0, 128, seed=8), synth_from_fit(fit, 400, 0, 128, seed=9)
    p, q = (popularity(t) / (2 * t.tokens) for t in (big_truth, big_fit))
    assert (0.5 * np.abs(p - q).sum(1)).max() < 0.05               # each layer's popularity: total variation
    assert_reproduces(trace, fit, (128, 16, 112))


def test_fit_files_round_trip(real_fit, tmp_path):
    path = tmp_path / "fit.yaml"
    save_fit(real_fit, path)
    again = load_fit(path)
    a, b = synth_from_fit(real_fit, 2, 4, 8, seed=3), synth_from_fit(again, 2, 4, 8, seed=3)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    assert a.metadata["generator"] == "fitted" and b.metadata["fit_source"]["model"] == "tiny-moe"
    (tmp_path / "bad.yaml").write_text("format: something-else\n")
    with pytest.raises(ConfigError, match="not a routing fit"):
        load_fit(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown key.*lokality"):
        synth_from_fit(dict(real_fit, lokality=0.3), 1, 1, 1)
    with pytest.raises(ConfigError, match="locality must be in"):
        synth_from_fit(dict(real_fit, locality=1.5), 1, 1, 1)
    with pytest.raises(ConfigError, match="the fit is for"):
        synthetic_trace(get_model("olmoe-1b-7b"), fit=real_fit)


# -- the catalog's defaults (issue 22 item 5, issue 23 item 4) ----------------------------------------------
ZIPMOE = {  # issue 22 item 5 (ZipMoE's released traces): per prompt of ~19 tokens
    "deepseek-v2-lite": (953, dict(distinct_w19=41.6, distinct_r4=61.3, distinct_r16=63.9, own_topk_share=0.350,
                                   topk_share=0.199, gini=0.246)),
    "qwen1.5-moe-a2.7b": (1000, dict(distinct_w19=37.4, distinct_r4=58.0, distinct_r16=60.0, own_topk_share=0.256,
                                     topk_share=0.111, gini=0.150)),
}


@pytest.mark.parametrize("name", list(ZIPMOE))
def test_catalog_defaults_look_like_zipmoes_traces(name):
    prompts, want = ZIPMOE[name]
    trace = synthetic_trace(get_model(name), requests=prompts, prompt_len=19, output_len=0, fit="catalog")
    stats = trace_stats(trace)
    for key, v in want.items():
        assert stats["mean"][key] == pytest.approx(v, rel=0.10), key
    low, high = {"deepseek-v2-lite": (0.156, 0.243), "qwen1.5-moe-a2.7b": (0.086, 0.145)}[name]
    shares = [layer["topk_share"] for layer in stats["per_layer"]]  # the published per-layer range
    assert min(shares) == pytest.approx(low, rel=0.10) and max(shares) == pytest.approx(high, rel=0.10)


def test_catalog_default_of_mixtral_decode():
    # peers.md: reuse at the next token 59-65%, top-2 of 8 take 34-35%, normalised entropy 0.94-0.99
    got = trace_stats(synthetic_trace(get_model("mixtral-8x7b"), requests=16, prompt_len=0, output_len=256,
                                      fit="catalog"))["mean"]
    assert got["reuse_rate"] == pytest.approx(0.62, rel=0.10)
    assert got["top2_share"] == pytest.approx(0.345, rel=0.10)
    assert got["entropy"] == pytest.approx(0.965, rel=0.10) and 0.94 <= got["entropy"] <= 0.99


def test_catalog_defaults_are_sourced_and_opt_in():
    for name, fit in SYNTHETIC.items():
        assert fit["source"] and synthetic_default(name)["model"]["layers"] == get_model(name).layers
    assert synthetic_default("olmoe-1b-7b") is None
    with pytest.raises(ConfigError, match="no synthetic default"):
        synthetic_trace(get_model("olmoe-1b-7b"), fit="catalog")
    m = get_model("deepseek-v2-lite")                              # without fit: the old generator
    assert synthetic_trace(m, requests=1, output_len=4).metadata["generator"] == "synthetic"
