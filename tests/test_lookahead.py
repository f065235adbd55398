"""Gate-lookahead prefetchers (policies/lookahead.py): predictions recorded into the trace, the
same prefetches in both engines, accuracy."""
import numpy as np
import pytest
import torch

from conftest import make_device
from executor.execute import execute, strip_experts
from executor.model import model_arch
from executor.record import gate_lookahead, lookahead_accuracy, record_routing
from executor.store_build import ensure_store
from policies import build_policies
from policies.lookahead import prediction_accuracy
from sim.engine import Simulator
from test_executor import tiny_model
from workloads.formats import make_format
from workloads.trace import RoutingTrace
from workloads.workload import Workload

PROMPTS = torch.tensor([[1, 5, 9, 2], [7, 3, 3, 8]])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "real.npz"
    record_routing(tiny_model(), PROMPTS, 6, model_name="tiny").save(path)
    return RoutingTrace.load(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ensure_store(tiny_model(), tmp_path_factory.mktemp("store"), "bf16", quiet=True)


def test_the_trace_holds_the_next_layers_router_on_this_hidden_state(recorded):
    model, cfg = tiny_model(), tiny_model().cfg
    assert recorded.predicted.shape == (recorded.tokens, cfg.n_layers, 2 * cfg.top_k)
    assert (recorded.predicted[:, -1] == -1).all() and (recorded.predicted[:, :-1] >= 0).all()
    assert np.all(np.diff(recorded.predicted_scores[:, :-1], axis=-1) <= 0)        # best first
    # layer l's own router on its hidden state is exactly what the trace says layer l selected:
    # the same function at distance 0 reproduces the recorded experts (the hook sees the right state)
    hits = []
    own = gate_lookahead(model, cfg.top_k, distance=0)

    def spy(layer, hidden, ids, gates):
        hits.append(np.array_equal(np.sort(own(layer, hidden)[0], -1), np.sort(ids.numpy(), -1)))
        return model.moe_layers[layer].resident_experts(layer, hidden, ids, gates)
    model.set_expert_fn(spy)
    from executor.model import generate
    generate(model, PROMPTS[:1], 2)
    assert hits and all(hits)


@pytest.mark.parametrize("prefetch", ["gate-lookahead", "gate-topk", "gate-last-use"])
def test_both_engines_issue_the_same_prefetches(recorded, store, prefetch):
    arch = model_arch(tiny_model())
    w = Workload(arch, recorded, store.format, batch=2)
    budget = 8 * store.format.expert_bytes

    def bundle():
        return build_policies(w, budget, cache="least-stale", prefetch=prefetch)
    sim_tl = Simulator(make_device(), w, bundle()).run()
    forced = execute(strip_experts(tiny_model()), store, bundle(), PROMPTS, 0, trace=recorded, batch=2, quiet=True)
    assert sim_tl.of("cache", "prefetch")
    assert forced.timeline.decisions() == sim_tl.decisions()
    # live: the executor computes the predictions itself from the real hidden states (no trace)
    from policies import build_online_policies
    live = execute(strip_experts(tiny_model()), store,
                   build_online_policies(arch, store.format, budget, cache="least-stale", prefetch=prefetch),
                   PROMPTS, 6, batch=2, quiet=True)
    assert live.timeline.decisions() == sim_tl.decisions()


def test_prefetch_order_and_threshold():
    from policies.base import Demand, PolicyContext, Routing
    from policies.lookahead import GateLastUse, GateLookahead, GateTopK
    from workloads.catalog import ModelArch
    m = ModelArch("m", layers=3, experts=6, top_k=1, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    ctx = PolicyContext(make_format("bf16", m.expert_shapes), 3, 6, 10**9)
    ids = np.array([[4, 1], [2, 1]], np.int32)
    probs = np.array([[0.5, 0.3], [0.6, 0.05]], np.float32)
    r = Routing(np.array([[0], [3]]), np.ones((2, 1)), None, (ids, probs))
    d = Demand(0, (((0, 0),), ((3, 0),)))
    got = {}
    for cls in (GateLookahead, GateTopK, GateLastUse):
        got[cls.name] = [(k.layer, k.expert) for k in cls(ctx).after_layer(0, d, r)]
    assert got["gate-lookahead"] == [(1, 4), (1, 2)]                  # each token's top-1, router order
    assert got["gate-topk"] == [(1, 2), (1, 4), (1, 1)]               # 0.6, 0.5, 0.3 (0.05 < 0.1 dropped)
    assert got["gate-last-use"] == [(1, 4), (1, 2)]                   # layer 1 not seen yet: nothing more
    p = GateLastUse(ctx)
    p.after_layer(0, d, r)
    r2 = Routing(np.array([[5]]), np.ones((1, 1)), None, (np.full((1, 2), -1, np.int32), np.zeros((1, 2))))
    assert [(k.layer, k.expert) for k in p.after_layer(2, Demand(2, (((5, 0),),)), r2)] == [(0, 0), (0, 3)]


def test_accuracy_from_the_trace_and_per_layer_distance(recorded):
    acc = prediction_accuracy(recorded)
    assert 0 < acc["recall"] <= 1 and acc["precision"] == pytest.approx(acc["recall"])   # k predicted, k true
    wide = prediction_accuracy(recorded, width=4, threshold=0.0)
    assert wide["recall"] >= acc["recall"] and len(wide["per_layer"]) == recorded.layers - 1
    per_d = lookahead_accuracy(tiny_model(), PROMPTS, 6, distances=(1, 2))
    assert per_d["top-k"][1]["recall"] == pytest.approx(acc["recall"])   # the same predictions, recomputed
    assert set(per_d["top-k"]) == {1, 2} and len(per_d["top-k"][2]["per_layer"]) == recorded.layers - 2
