"""The KV cache in both engines: the catalog's attention shape, the memory split (workloads/memory.py),
attention's context term (policies/cost.py), the shared mode's resize, and the executor's real KV
bytes against the simulator's prediction."""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import TINY, make_device, make_trace
from policies import BudgetError, build_policies
from policies.base import Key
from policies.cost import CostModel
from sim.engine import Simulator
from sim.fast import fused_for
from sim.replay import replay_policies
from workloads.catalog import CATALOG, ModelArch
from workloads.formats import make_format
from workloads.memory import MemoryRefused, StepKV, lockstep_kv, split_memory, step_kv
from workloads.synthetic import synthetic_trace
from workloads.workload import Workload

EXPERT = 192                      # one TINY expert in bf16
KV_TOKEN = 2 * 16                 # TINY: 2 layers x (K + V: 2 x 1 head x 4) x 2 B per token
DENSE = 2 * 64 * 2 + 2 * 8 * 2 + 2 * 16 * 4 * 2   # attention 2 x 64, routers 2 x 8, embedding + head: 544 B


# -- the catalog's attention shape -----------------------------------------------------------------
def test_mixtral_kv_of_the_issue():
    m = CATALOG["mixtral-8x7b"]
    assert (m.head_dim, m.n_kv_heads, m.kv_dtype_bytes) == (128, 8, 2)
    assert m.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert 16 * 2048 * m.kv_bytes_per_token == 4_294_967_296          # "about 4.3 GB"


def test_head_dim_from_the_config_where_it_differs():
    q = CATALOG["qwen3-30b-a3b"]
    assert q.head_dim == 128 != q.d_model // q.n_heads
    assert q.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2
    assert q.attention_params_per_layer == 2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128
    assert CATALOG["deepseek-v2-lite"].kv_bytes_per_token == 27 * (512 + 64) * 2     # MLA's latent, 27 layers


def test_tiny_arch_sizes_by_hand():
    assert TINY.kv_bytes_per_token == KV_TOKEN
    assert TINY.dense_weight_bytes == DENSE


# -- the KV of each step ---------------------------------------------------------------------------
def two_requests(prompt=3, decode=2):
    per = [[[0], [1]]] * (prompt + decode)
    ids = np.repeat([0, 1], prompt + decode)
    is_prompt = np.tile(np.arange(prompt + decode) < prompt, 2)
    return make_trace(per * 2, prompt=is_prompt, request_ids=ids)


def test_step_kv_by_hand():
    trace = two_requests()
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=2)
    # prefill of 2 x 3 tokens: 6 positions written and read once, causal pairs 2 x (1 + 2 + 3);
    # each decode step then reads every request's whole context
    assert w.kv == [StepKV(6, 6, 12), StepKV(8, 8, 8), StepKV(10, 10, 10)]
    one = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=1)
    # one request per group: the second group starts from no KV (the first group's is freed)
    assert [k.held_tokens for k in one.kv] == [3, 4, 5, 3, 4, 5]
    assert one.kv == lockstep_kv(2, 1, 3, 2)


def test_lockstep_kv_equals_the_batched_synthetic_trace():
    t = synthetic_trace(TINY, requests=5, prompt_len=4, output_len=6, seed=1)
    w = Workload(TINY, t, make_format("bf16", TINY.expert_shapes), batch=2)
    assert w.kv == lockstep_kv(5, 2, 4, 6)


# -- attention time ---------------------------------------------------------------------------------
def test_attention_seconds_by_hand():
    dev = make_device(mem_bw=19200.0, flops=1e6)
    cost = CostModel.build(dev, TINY, make_format("bf16", TINY.expert_shapes))
    kv = StepKV(held_tokens=9, read_tokens=5, attended=7)
    # 5 positions x 16 B at 19200 B/s + 4 x 1 head x 4 x 7 pairs at 1e6 FLOP/s
    assert cost.attention_seconds(kv) == pytest.approx(5 * 16 / 19200 + 4 * 4 * 7 / 1e6)
    assert cost.layer_dense_seconds(1, False, kv) == pytest.approx(cost.dense_seconds(1) + 5 * 16 / 19200 + 112e-6)


# -- the memory split -----------------------------------------------------------------------------------
def device(left, reserved=1000, expert_budget=10**6):
    """A device whose memory leaves `left` bytes for the KV and the experts of a TINY run."""
    return replace(make_device(), memory_bytes=reserved + DENSE + left, memory_reserved_bytes=reserved,
                   expert_budget_bytes=expert_budget)


def test_fixed_refusal_gives_the_arithmetic():
    kv = lockstep_kv(1, 1, 0, 4)                  # peak: 4 tokens = 128 B
    with pytest.raises(MemoryRefused) as e:
        split_memory("fixed", device(500), TINY, kv, budget=400)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("reserved 1.00KB", f"dense weights {DENSE}B", "KV peak 128B", "expert budget 400B", "> memory",
                 "the largest budget that fits is 372B (372 B)", "--kv shared"):
        assert part in msg, (part, msg)
    assert split_memory("fixed", device(500), TINY, kv, budget=372).budget == 372


def test_fixed_default_budget_is_capped_to_what_fits():
    kv = lockstep_kv(1, 1, 0, 4)
    split = split_memory("fixed", device(500, expert_budget=450), TINY, kv, budget=None)
    assert split.budget == 372 and "capped to 372B" in split.note
    assert split_memory("fixed", device(500, expert_budget=300), TINY, kv, budget=None).budget == 300


def test_simulate_refuses_a_fixed_budget_that_does_not_fit(tmp_path):
    from experiments.run import OverMemory, simulate
    from experiments.spec import RunSpec
    m = CATALOG["mixtral-8x7b"]
    spec = RunSpec(device="jetson-orin-nano-8gb", model=m.name, batch=4, prompt_tokens=2047, tokens=2,
                   budget=2 * 10**9)
    # 8 GB - 2 GB reserved - 3.21 GB dense - 4 x 2048 tokens x 128 KiB leaves 1.72 GB for experts
    fits = 8 * 10**9 - 2 * 10**9 - m.dense_weight_bytes - 4 * 2048 * m.kv_bytes_per_token
    with pytest.raises(OverMemory, match=rf"kv fixed: budget 2.00GB does not fit: .*KV peak 1.07GB .*"
                                         rf"the largest budget that fits is 1.72GB \({fits} B\), or give --kv shared"):
        simulate(spec, timeline=False)
    with pytest.raises(OverMemory, match=r"kv fixed: nothing is left for experts: .*KV peak 4.29GB"):
        simulate(spec.with_(batch=16), timeline=False)


# -- the shared mode -----------------------------------------------------------------------------------
def shared_run(left, tokens=6, cache="lru"):
    """One decode-only request routed L0 -> E0, L1 -> E1 at every token, under the shared mode."""
    trace = make_trace([[[0], [1]]] * tokens)
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes))
    split = split_memory("shared", device(left), TINY, w.kv, budget=None)
    p = build_policies(w, split.budget, cache=cache)
    p.capacities = split.capacities
    return w, p, split


def test_shared_budget_evicts_at_the_step_the_arithmetic_says():
    # left for KV + experts: 480 B; the step s holds s + 1 tokens of KV (32 B each), so the expert
    # capacity is 448, 416, 384, 352 B...: the two resident experts (384 B) fit until step 3
    w, p, split = shared_run(480)
    assert split.capacities == (448, 416, 384, 352, 320, 288)
    sim = Simulator(device(480), w, p)
    assert not fused_for(sim)                       # the fused loops never resize: the engine runs it
    tl = sim.run()
    evicts = [(e.step, e.layer, e.expert) for e in tl.of("cache", "evict")]
    # step 3 starts by evicting LRU's victim (L0, E0); from then on one expert fits at a time
    assert evicts[0] == (3, 0, 0)
    step3 = min(e.start for e in tl.events if e.step == 3 and e.resource == "dense")
    assert tl.of("cache", "evict")[0].start == step3
    assert evicts == [(3, 0, 0), (3, 1, 1), (3, 0, 0), (4, 1, 1), (4, 0, 0), (5, 1, 1), (5, 0, 0)]
    admits = [(e.step, e.layer, e.expert) for e in tl.of("cache", "admit")]
    assert admits == [(0, 0, 0), (0, 1, 1)] + [(s, layer, layer) for s in (3, 4, 5) for layer in (0, 1)]


def test_replay_resizes_as_the_engine_does():
    w, p, _ = shared_run(480)
    engine = Simulator(device(480), w, p).run()
    w, p, _ = shared_run(480)
    out = replay_policies(w, p)
    hits = sum(1 for e in engine.of("cache", "admit"))
    assert out["accesses"] - out["hits"] == hits == 8


def test_shared_refuses_a_step_the_kv_fills():
    with pytest.raises(MemoryRefused, match="kv shared: at step 2 the KV"):
        split_memory("shared", device(96), TINY, lockstep_kv(1, 1, 0, 4), budget=None)


def test_a_step_whose_layer_no_longer_fits_is_a_clear_error():
    w, p, split = shared_run(224, tokens=2)         # one expert fits at step 0, none at step 1
    assert split.capacities == (192, 160)
    with pytest.raises(BudgetError, match="budget 160 B cannot hold layer 0's demand"):
        Simulator(device(224), w, p).run()


# -- the property: budget never exceeded at any level at any event, KV included --------------------------
def used_at_events(tl, sizes):
    used, out = 0, []
    for e in tl.events:
        if e.resource == "cache":
            used += e.bytes if e.kind in ("admit", "prefetch") else -e.bytes
            out.append((e.step, used))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=st.lists(st.lists(st.integers(0, 1), min_size=2, max_size=2), min_size=1, max_size=10),
       prompt=st.integers(0, 3), batch=st.integers(1, 3), left=st.integers(200, 1200),
       budget=st.one_of(st.none(), st.integers(192, 1200)), mode=st.sampled_from(["fixed", "shared"]),
       cache=st.sampled_from(["lru", "fifo", "lfu", "d2moe-budget"]))
def test_memory_never_exceeded_at_any_event(routes, prompt, batch, left, budget, mode, cache):
    n = len(routes)
    requests = max(1, min(3, n // 2))
    ids = np.arange(n) % requests
    is_prompt = np.zeros(n, bool)
    for r in range(requests):
        is_prompt[np.flatnonzero(ids == r)[:prompt]] = True
    trace = make_trace([[[a], [b]] for a, b in routes], prompt=is_prompt, request_ids=ids)
    w = Workload(TINY, trace, make_format("bf16", TINY.expert_shapes), batch=batch)
    dev = device(left)
    try:
        split = split_memory(mode, dev, TINY, w.kv, budget)
        p = build_policies(w, split.budget, cache=cache)
        p.capacities = split.capacities
        tl = Simulator(dev, w, p).run()
    except (MemoryRefused, BudgetError):
        assume(False)
    kv = tl.meta["kv_bytes_per_step"]
    assert kv == [k.held_tokens * KV_TOKEN for k in w.kv]
    for step, used in used_at_events(tl, None):
        assert used + kv[step] + DENSE + dev.memory_reserved_bytes <= dev.memory_bytes
        assert used <= (split.budget if split.capacities is None else split.capacities[step])


# -- the executor's real KV bytes --------------------------------------------------------------------
def small_device(tmp_path, memory: int) -> str:
    """The AGX Orin profile with `memory` bytes and nothing reserved: a device the tiny model fills."""
    from pathlib import Path
    src = (Path(__file__).resolve().parent.parent / "devices" / "jetson-agx-orin-64gb.yaml").read_text()
    lines = [f"memory: {memory}B" if l.startswith("memory:") else "memory_reserved: 0B" if
             l.startswith("memory_reserved:") else f"expert_budget: {memory // 2}B" if l.startswith("expert_budget:")
             else l for l in src.splitlines()]
    path = tmp_path / "small.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kv", ["fixed", "shared"])
def test_executor_kv_bytes_equal_the_simulators(tmp_path, kv):
    pytest.importorskip("torch")
    from experiments.run import simulate
    from experiments.run_exec import execute
    from experiments.spec import RunSpec
    from workloads.catalog import get_model
    model = get_model("tiny-moe")
    expert = make_format("bf16", model.expert_shapes).expert_bytes
    path = synthetic_trace(model, requests=3, prompt_len=5, output_len=6, seed=2).save(tmp_path / "t.npz")
    # left for KV + experts: 20 experts + the prefill's KV (2 x 5 tokens): the shared cache has 20
    # experts at the prefill and yields as the KV grows; the fixed budget is what fits beside the peak
    prefill, peak = 2 * 5 * model.kv_bytes_per_token, 2 * (5 + 6) * model.kv_bytes_per_token
    left = 20 * expert + prefill
    spec = RunSpec(device=small_device(tmp_path, model.dense_weight_bytes + left),
                   trace=str(path), batch=2, budget=20 * expert if kv == "shared" else left - peak, kv=kv,
                   store=str(tmp_path / "store"))
    run = execute(spec)                         # (it builds the store the simulator reads its sizes from)
    sim = simulate(spec, timeline=True)
    per_step = sim.metrics["kv_bytes_per_step"]
    assert run.metrics["kv_bytes_per_step"] == per_step
    assert run.metrics["kv_bytes_peak"] == sim.metrics["kv_bytes_peak"] == peak
    assert len(per_step) == len(sim.prepared.workload.steps)
    assert run.metrics["kv_bytes_allocated"] >= run.metrics["kv_bytes_peak"]
    assert run.metrics["memory"] == sim.metrics["memory"]
    assert run.timeline.decisions() == sim.timeline.decisions()
    if kv == "shared":                          # the cache yielded at a step start, in both engines
        assert any(d[0] == "evict" and d[1] == 1 for d in sim.timeline.decisions())


def test_budget_only_models_the_budget_alone_and_says_whether_it_would_fit():
    """kv budget-only (a paper's formulation: only the expert budget): never refused, the budget as
    given, and the meta says what the whole would need. D²MoE's Env 1 LLaMA-MoE point: 0.8 GB reserved
    + 4.82 GB bf16 dense + 4.29 GB KV (32 x 256 tokens x 524288 B) + 1.6 GB = 11.52 GB > 6 GB."""
    from dataclasses import replace as _replace
    from devices.profile import load_device
    device, m = load_device("rtx-3060-laptop-6gb"), CATALOG["llama-moe-3.5b"]
    kv = lockstep_kv(32, 32, 128, 128)
    assert max(s.held_bytes(m) for s in kv) == 32 * 256 * 524288
    with pytest.raises(MemoryRefused):
        split_memory("fixed", device, m, kv, 1_600_000_000)
    split = split_memory("budget-only", device, m, kv, 1_600_000_000)
    assert split.budget == 1_600_000_000 and split.meta()["fits"] is False
    assert "needs 11.52GB of 6.00GB (it would not fit)" in split.note
    small = split_memory("budget-only", device, _replace(m, dense_bits=4), lockstep_kv(1, 1, 16, 16), 200_000_000)
    assert small.meta()["fits"] is True


def test_a_capped_default_budget_below_the_minimum_says_it_was_capped():
    """Mixtral on the Orin Nano: the default 4 GB expert budget is capped to what fits beside 2 GB
    reserved + 3.21 GB dense weights + the KV, which is below one layer's demand: the refusal says both."""
    from experiments.run import prepare
    from experiments.spec import RunSpec
    with pytest.raises(BudgetError, match=r"below the minimum .*; the default expert budget 4\.00GB capped to"):
        prepare(RunSpec(device="jetson-orin-nano-8gb", model="mixtral-8x7b", tokens=2), timeline=False)


def test_a_sweep_row_says_when_its_default_budget_was_capped(tmp_path):
    """A grid row at the device's default budget that the memory caps records the budget it ran at."""
    import csv
    from experiments.sweep import sweep
    grid = tmp_path / "g.yaml"
    grid.write_text("tokens: 2\nruns:\n  - {device: jetson-orin-nano-8gb, model: qwen1.5-moe-a2.7b}\n")
    sweep(grid, tmp_path / "r.csv", quiet=True)
    (row,) = csv.DictReader(open(tmp_path / "r.csv"))
    assert row["status"] == "ok" and row["budget_bytes"] == "4000000000"
    assert "the default expert budget 4.00GB capped to 2.2" in row["note"]
