"""Miss-ratio curves (sim/mrc.py): the one-pass LRU curve equals per-capacity replay at every
point; the other policies' curves are their replays; the CLI."""
import json
import subprocess
import sys

import numpy as np
from hypothesis import given, settings, strategies as st

from conftest import make_trace
from sim.mrc import miss_ratio_curves
from workloads.stack import lru_mrc, lru_stack_hits
from sim.replay import replay_capacities, unit_groups
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.workload import Workload


@st.composite
def workloads(draw):
    layers, experts, k = draw(st.integers(1, 4)), draw(st.integers(2, 7)), draw(st.integers(1, 3))
    k = min(k, experts)
    tokens, seed = draw(st.integers(1, 40)), draw(st.integers(0, 10**6))
    rng = np.random.default_rng(seed)
    hot = rng.random() < 0.5                         # skewed routing: more hits near the boundary
    p = 1.0 / np.arange(1, experts + 1) ** (1.5 if hot else 0.0)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False, p=p / p.sum()) for _ in range(layers)])
                   for _ in range(tokens)])
    m = ModelArch("m", layers=layers, experts=experts, top_k=k, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    trace = make_trace(ex, prompt=rng.random(tokens) < 0.2, request_ids=rng.integers(0, 3, tokens),
                       num_experts=experts)
    return Workload(m, trace, make_format("bf16", m.expert_shapes), batch=draw(st.integers(1, 3)))


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_one_pass_lru_curve_equals_replay_at_every_capacity(w):
    caps = list(range(1, w.model.layers * w.model.experts + 2))
    groups = unit_groups(w.trace, w.steps)
    assert lru_mrc(groups, caps) == replay_capacities(w, "lru", caps)
    # the same kernel as plain Python (where numba is missing) gives the same hits
    assert lru_stack_hits(groups, caps, compiled=False) == lru_stack_hits(groups, caps)


def test_the_order_inside_a_decision_point_depends_on_capacity():
    # capacity 3: at [0, 3], 3 hits and 0 misses, so LRU puts 0 above 3; at [1, 2] 2 misses and
    # evicts 3 (not 0), and [0, 1] hits twice. A plain stack keeping router order (3 above 0) at
    # every capacity would evict 0 and count one hit fewer. The one-pass curve follows the cache.
    from sim.replay import _lru
    groups = [[3, 2], [0, 3], [1, 2], [0, 1]]
    assert {c: _lru(groups, c) for c in (2, 3, 4)} == {2: 2, 3: 4, 4: 4}
    assert lru_stack_hits(groups, [2, 3, 4]) == {2: 2, 3: 4, 4: 4}


def test_curves_for_many_policies_are_their_replays_in_parallel():
    rng = np.random.default_rng(0)
    m = ModelArch("m", layers=3, experts=6, top_k=2, d_model=128, d_ff=128, n_heads=1, n_kv_heads=1)
    ex = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(3)]) for _ in range(40)])
    w = Workload(m, make_trace(ex, num_experts=6), make_format("bf16", m.expert_shapes))
    caps = [1, 2, 4, 6, 9, 12, 18]
    policies = ["lru", "least-stale", "layered-lru", "layer-lru", "page-cache", "belady"]
    curves = miss_ratio_curves(w, policies, caps, jobs=2)
    for p in policies:
        assert curves[p] == replay_capacities(w, p, caps)
        assert curves[p][1] is None and curves[p][2] is not None    # the largest decision point: 2 experts
    for c in caps:
        for p in policies:
            if curves[p][c] is not None:
                assert curves[p][c] <= curves["belady"][c] + 1e-12


def test_cli_mrc(tmp_path):
    rng = np.random.default_rng(1)
    ex = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(4)]) for _ in range(30)])
    path = tmp_path / "t.npz"
    make_trace(ex, num_experts=8).save(path)
    out = tmp_path / "fig" / "mrc.png"
    run = subprocess.run([sys.executable, "-m", "experiments.cli", "mrc", "--trace", str(path), "--policies",
                          "lru,layered-lru,belady", "--capacities", "4,8,16", "--jobs", "1", "--out", str(out),
                          "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.exists() and "one token's working set = 8" in run.stdout
    curves = json.loads(out.with_suffix(".json").read_text())
    assert set(curves) == {"lru", "layered-lru", "belady"} and curves["lru"]["8"] >= 0
    bad = subprocess.run([sys.executable, "-m", "experiments.cli", "mrc", "--trace", str(path), "--policies",
                          "lru,nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--policies: unknown or not for whole experts: nope; allowed: " in bad.stderr
