"""Cache policies against libCacheSim, and the fast replay against the engine."""
import json

import libcachesim as lcs
import numpy as np
import pytest

from conftest import make_device, make_trace
from policies import caches_for
from policies import build_policies
from sim.engine import Simulator
from workloads.workload import Workload
from timeline.metrics import compute_metrics
from sim.replay import replay_policies, replay_units, unit_groups
from workloads.batching import batch_steps
from workloads.catalog import ModelArch
from workloads.formats import make_format

LCS = {"lru": lcs.LRU, "fifo": lcs.FIFO, "lfu": lcs.LFU, "belady": lcs.Belady}


def libcachesim_hits(policy: str, seq: list[int], capacity: int) -> int:
    cache = LCS[policy](cache_size=capacity)
    nxt, seen = [0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = seen.get(seq[i], 2**62)
        seen[seq[i]] = i
    hits = 0
    for i, key in enumerate(seq):
        req = lcs.Request()
        req.obj_id, req.obj_size, req.clock_time = key, 1, i
        req.next_access_vtime = nxt[i]
        hits += bool(cache.get(req))
    return hits


def zipf_sequence(n, keys, seed):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, keys + 1) ** 0.9
    return rng.choice(keys, n, p=p / p.sum()).tolist()


@pytest.mark.parametrize("policy", sorted(LCS))
@pytest.mark.parametrize("capacity", [1, 3, 8, 20])
def test_single_key_decisions_equal_libcachesim(policy, capacity):
    seq = zipf_sequence(3000, 40, seed=capacity)
    groups = [[k] for k in seq]
    ours = replay_units(groups, policy, [capacity])[capacity] * len(seq)
    assert round(ours) == libcachesim_hits(policy, seq, capacity)


def test_jsonl_trace_equals_libcachesim(tmp_path):
    # a trace imported from JSONL (top-1, batch 1: one key per decision point)
    from workloads.importers import import_jsonl
    rng = np.random.default_rng(7)
    path = tmp_path / "routing.jsonl"
    with open(path, "w") as f:
        for tok in range(300):
            for layer in range(4):
                e = int(rng.zipf(1.6) % 8)
                f.write(json.dumps({"layer": layer, "token_idx": tok, "experts": [e], "gating_probs": [1.0]}) + "\n")
    trace = import_jsonl(path)
    groups = unit_groups(trace, batch_steps(trace, 1))
    seq = [g[0] for g in groups]
    for policy in LCS:
        for cap in (2, 5, 12):
            ours = round(replay_units(groups, policy, [cap])[cap] * len(seq))
            assert ours == libcachesim_hits(policy, seq, cap), (policy, cap)


@pytest.mark.parametrize("policy", sorted(caches_for("bf16")))
@pytest.mark.parametrize("batch", [1, 3])
def test_replay_gives_the_engines_hit_ratio(policy, batch):
    model = ModelArch("m", layers=4, experts=8, top_k=2, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    rng = np.random.default_rng(batch)
    ex = np.stack([np.stack([rng.choice(8, 2, replace=False, p=np.arange(8, 0, -1) / 36) for _ in range(4)])
                   for _ in range(60)])
    trace = make_trace(ex, request_ids=np.arange(60) % 3, num_experts=8)
    fmt = make_format("bf16", model.expert_shapes)
    w = Workload(model, trace, fmt, batch=batch)
    for cap in (2 * batch * 2, 10, 20):
        budget = max(cap, 2 * batch) * fmt.expert_bytes
        engine = compute_metrics(Simulator(make_device(), w, build_policies(w, budget, cache=policy)).run())
        objects = replay_policies(w, build_policies(w, budget, cache=policy))
        assert objects["hit_ratio"] == pytest.approx(engine["hit_ratio"])
        if policy in ("lru", "fifo", "lfu", "belady", "on-demand"):
            groups = unit_groups(trace, w.steps)
            fast = replay_units(groups, policy, [budget // fmt.expert_bytes])
            assert list(fast.values())[0] == pytest.approx(engine["hit_ratio"])


def test_belady_bounds_the_others():
    seq = zipf_sequence(4000, 64, seed=1)
    groups = [[k] for k in seq]
    for cap in (4, 16, 32):
        best = replay_units(groups, "belady", [cap])[cap]
        for p in ("lru", "fifo", "lfu"):
            assert replay_units(groups, p, [cap])[cap] <= best + 1e-12


def test_capacity_below_a_layers_demand_is_reported_not_run():
    groups = [[0, 1], [2, 3], [0, 2]]
    out = replay_units(groups, "lru", [1, 2, 4])
    assert out[1] is None and out[2] is not None and out[4] == pytest.approx(2 / 6)
