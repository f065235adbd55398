"""ZipMoE's (3 - 1/L) makespan bound tested where it bites (issue 22 item 6): L = 6 decompression
workers and K = 3 chunks (the released eval setting), unequal SM read times, and the simulator's own
task model (one storage queue, each task's chunks read before its SM bytes; policies/zipmoe_bound.py).
ALG is checked against the simulator itself, OPT (an exact search) against brute force over every
read order and every decompression order, then the worst ALG/OPT over 1,000+ instances."""
import itertools
import math
import random

import numpy as np
import pytest

from conftest import make_device, make_trace
from policies import build_policies
from policies.cost import CostModel
from policies.zipmoe_bound import LayerTasks, SearchBudget, alg_makespan, opt_makespan
from sim.engine import Simulator
from workloads.catalog import ModelArch
from workloads.formats import make_format
from workloads.workload import Workload


def brute_force(inst: LayerTasks) -> float:
    """Every read order x every decompression list order (each on the worker free first once read),
    the computes in order of readiness: no restriction the exact search relies on."""
    n, K, L, d = inst.n, inst.chunks, inst.workers, inst.t_dec
    items = [(j, "c") for j in range(n) for _ in range(K)] + [(j, "sm") for j in range(n) if inst.sm[j] > 0]
    best = math.inf
    for ro in set(itertools.permutations(items)):
        t, rc, rs = 0.0, {j: [] for j in range(n)}, [0.0] * n
        for j, kind in ro:
            t += inst.chunk[j] if kind == "c" else inst.sm[j]
            if kind == "c":
                rc[j].append(t)
            else:
                rs[j] = t
        for co in set(itertools.permutations([j for j in range(n) for _ in range(K)])):
            free, used, ready = [0.0] * L, [0] * n, list(rs)
            for j in co:
                w = free.index(min(free))
                free[w] = max(rc[j][used[j]], free[w]) + d
                used[j] += 1
                ready[j] = max(ready[j], free[w])
            gpu = 0.0
            for r, j in sorted((r, j) for j, r in enumerate(ready)):
                gpu = max(gpu, r) + inst.compute[j]
            best = min(best, gpu)
    return best


def small_instance(rng: random.Random) -> LayerTasks:
    n, K, L = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 3)
    if n == 3:
        K = 1
    return LayerTasks(tuple(rng.uniform(0.1, 2) if rng.random() < 0.7 else 0.0 for _ in range(n)),
                      tuple(rng.uniform(0.05, 1) for _ in range(n)), tuple(rng.uniform(0.05, 2) for _ in range(n)),
                      tuple(rng.randint(1, 8) for _ in range(n)), L, K, rng.uniform(0.1, 2))


def test_exact_search_equals_brute_force():
    rng = random.Random(7)
    for _ in range(150):
        inst = small_instance(rng)
        opt, alg = opt_makespan(inst), alg_makespan(inst)
        assert opt == pytest.approx(brute_force(inst), rel=1e-12), inst
        assert opt <= alg + 1e-12


def test_alg_is_the_simulators_makespan():
    # one layer of 4 experts, top-2, 3 tokens: e0 3 tokens, e1-e3 one each (unequal computes and
    # priorities); zip with 3 equal chunks; one storage queue (QD 1, no latency), 6 workers
    model = ModelArch("b", layers=1, experts=4, top_k=2, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1)
    fmt = make_format("zip", model.expert_shapes, chunks=3, exponent_ratio=0.5)
    assert len(set(fmt.part_bytes[1:])) == 1 and len(set(fmt.decompress_bytes[1:])) == 1
    for workers, flops in ((6, 2e4), (2, 2e3)):
        device = make_device(latency=0.0, queue_depth=1, workers=workers, flops=flops)
        cost = CostModel.build(device, model, fmt)
        assert cost.expert_seconds(0, 3) > cost.expert_seconds(0, 1)
        w = Workload(model, make_trace([[[0, 1]], [[0, 2]], [[0, 3]]], request_ids=[0, 1, 2]), fmt, batch=3)
        tl = Simulator(device, w, build_policies(w, 10**6, scheduler="zipmoe", cost=cost)).run()
        start = tl.of("dense")[0].end
        got = max(e.end for e in tl.of("compute")) - start
        tokens = {0: 3, 1: 1, 2: 1, 3: 1}
        inst = LayerTasks(tuple(cost.read_seconds(fmt.part_bytes[0]) for _ in tokens),
                          tuple(cost.read_seconds(fmt.part_bytes[1]) for _ in tokens),
                          tuple(cost.expert_seconds(0, tokens[e]) for e in tokens), tuple(tokens.values()),
                          workers, 3, cost.decompress_seconds(fmt.decompress_bytes[1]))
        assert got == pytest.approx(alg_makespan(inst), rel=1e-12)


def l6k3_instance(rng: random.Random, n: int) -> LayerTasks:
    """L = 6, K = 3; Type-I with probability 0.7, their SM reads unequal (x 0.3 .. 1.7 of a mean);
    chunk reads, decompressions and computes drawn over wide ranges, so that each resource may
    dominate."""
    t_sm, c = rng.uniform(0.2, 3.0), rng.uniform(0.02, 0.6)
    return LayerTasks(tuple(t_sm * rng.uniform(0.3, 1.7) if rng.random() < 0.7 else 0.0 for _ in range(n)),
                      tuple(c * rng.uniform(0.8, 1.2) for _ in range(n)), tuple(rng.uniform(0.05, 3.0) for _ in range(n)),
                      tuple(rng.randint(1, 16) for _ in range(n)), 6, 3, rng.uniform(0.1, 4.0))


def ratio(inst: LayerTasks, nodes: int = 30_000) -> float | None:
    try:
        return alg_makespan(inst) / opt_makespan(inst, nodes)
    except SearchBudget:
        return None


def perturbed(inst: LayerTasks, rng: random.Random) -> LayerTasks:
    f = lambda x: x * math.exp(rng.gauss(0, 0.3))        # noqa: E731
    return LayerTasks(tuple(f(x) for x in inst.sm), tuple(f(x) for x in inst.chunk), tuple(f(x) for x in inst.compute),
                      tuple(max(1, t + rng.randint(-3, 3)) for t in inst.tokens), 6, 3, f(inst.t_dec))


def test_worst_ratio_at_l6_k3_is_within_three_minus_one_over_l(capsys):
    """1,000 random instances of 2 and 3 tasks (9 chunks > 6 workers at 3), then a local search
    from the three worst: each step perturbs the times and keeps the instance if ALG/OPT grew. An
    instance the exact search cannot finish in 30,000 nodes is counted, not guessed."""
    rng = random.Random(22)
    found, skipped = [], 0
    for i in range(1000):
        inst = l6k3_instance(rng, 2 + i % 2)
        r = ratio(inst)
        if r is None:
            skipped += 1
            continue
        found.append((r, inst))
    found.sort(key=lambda x: -x[0])
    climbed = 0
    for r, inst in found[:3]:
        for _ in range(100):
            cand = perturbed(inst, rng)
            rc = ratio(cand)
            climbed += 1
            if rc is not None and rc > r:
                r, inst = rc, cand
        found.append((r, inst))
    worst, inst = max(found, key=lambda x: x[0])
    with capsys.disabled():
        print(f"\nworst ALG/OPT at L=6, K=3 over {len(found) - 3 + climbed} instances "
              f"({skipped} over the search budget): {worst:.4f} (3 - 1/L = {3 - 1 / 6:.4f}); {inst}")
    assert len(found) >= 1000 - 25 and skipped <= 25
    assert 1.0 <= worst <= 3 - 1 / 6
    assert np.mean([r for r, _ in found]) >= 1.0
