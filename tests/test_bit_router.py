"""D²MoE's learned bit-width router: capacities, training, files, and both engines on its levels."""
import numpy as np
import pytest
import torch

from conftest import make_device
from devices.units import ConfigError
from executor.bit_router import (BitRouter, check_ladder, kl_to_teacher, load_bit_router, rank_levels,
                                 save_bit_router, train_bit_router)
from executor.corpus import Corpus
from executor.execute import execute, strip_experts
from executor.levels import mwq_levels
from executor.model import model_arch
from executor.record import record_routing
from executor.store_build import ensure_store
from policies import ALLOCATORS, build_online_policies, build_policies
from policies.allocators import TraceLevels
from sim.engine import Simulator
from test_executor import CFG, tiny_model
from workloads.workload import Workload


def corpus(seed=0):
    g = np.random.default_rng(seed)
    text = np.tile(g.integers(0, CFG.vocab, 97), 40).astype(np.int16)      # a repeating, learnable stream
    return Corpus(text, text[:500])


def test_rank_levels_fill_the_capacities_by_score():
    ids = torch.tensor([[0, 1]] * 10)
    score = torch.tensor([[float(t), float(-t)] for t in range(10)])
    lv = rank_levels(score, ids, (0.3, 0.4, 0.3))
    assert lv[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]          # expert 0: score rises with t
    assert lv[:, 1].tolist() == [2, 2, 2, 1, 1, 1, 1, 0, 0, 0]          # expert 1: falls
    assert rank_levels(score[:4], ids[:4], (0.25,) * 4)[:, 0].tolist() == [0, 1, 2, 3]


def test_levels_come_from_the_score_and_thresholds():
    r = BitRouter(1, 2, 2, "v1")
    with torch.no_grad():
        r.proj[0].weight.zero_()
        r.proj[0].weight[2, 0] = 10.0          # expert 0, level 2's logit = 10 * hidden[0]
        r.thresholds[0] = torch.tensor([[0.6, 1.5], [0.6, 1.5]])
    h = torch.tensor([[-1.0, 0], [0, 0], [1.0, 0]])
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    lv = r(0, h, ids, None)
    assert lv.dtype == np.uint8 and lv.shape == (3, 2)
    assert lv[:, 0].tolist() == [0, 1, 2] and lv[:, 1].tolist() == [1, 1, 1]   # expert 1: uniform p, level 1


def loud_model():
    """The tiny model with experts 8x larger: their quantization error shows in the logits."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.moe_layers:
            for ex in layer.experts:
                for p in ex.parameters():
                    p.mul_(8)
    return model


def test_distillation_reaches_the_router_and_the_capacities_hold():
    model = loud_model()
    lw = mwq_levels(model, "v1")
    start = BitRouter(CFG.n_layers, CFG.d_model, CFG.experts, "v1").init_from_router(model)
    r = train_bit_router(model, "v1", steps=3, alpha=0.0, lr=1e-2, batch=2, seq=16, corpus=corpus(), lw=lw,
                         quiet=True, calib_windows=12)
    assert r.meta["steps"] == 3 and r.meta["alpha"] == 0.0 and r.meta["history"][0]["kl"] > 0
    moved = [float((a.weight - b.weight).detach().abs().max()) for a, b in zip(r.proj, start.proj)]
    assert all(m > 1e-3 for m in moved)            # alpha = 0: only the KL's gradient (straight-through) moved it
    assert r.meta["calibration"]["level_fractions"] == pytest.approx([0.3, 0.4, 0.3], abs=0.02)
    assert (r.thresholds[..., 1] >= r.thresholds[..., 0]).all()


def test_kl_is_the_teachers_relative_entropy():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    q, logp = t.softmax(-1), s.log_softmax(-1)
    want = (q * (q.log() - logp)).sum(-1).mean()
    assert kl_to_teacher(s, t).item() == pytest.approx(want.item(), rel=1e-5)
    assert kl_to_teacher(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_save_load_round_trip_and_errors(tmp_path):
    model = tiny_model()
    r = BitRouter(CFG.n_layers, CFG.d_model, CFG.experts, "v2").init_from_router(model)
    with torch.no_grad():
        r.thresholds.uniform_()
    r.meta = {"steps": 3}
    path = save_bit_router(r, tmp_path / "r.safetensors")
    back = load_bit_router(path, model)
    h, ids = torch.randn(7, CFG.d_model), torch.randint(0, CFG.experts, (7, 2))
    assert (back(1, h, ids) == r(1, h, ids)).all()
    assert back.ladder == "v2" and back.capacities == (0.25,) * 4 and back.meta == {"steps": 3}
    with pytest.raises(ConfigError, match="no bit router here"):
        load_bit_router(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="bad.safetensors: not a bit router"):
        load_bit_router(tmp_path / "bad.safetensors")
    small = BitRouter(2, CFG.d_model, CFG.experts, "v1")
    save_bit_router(small, tmp_path / "small.safetensors")
    with pytest.raises(ConfigError, match="bit router has layers=2, the model has 3"):
        load_bit_router(tmp_path / "small.safetensors", model)
    with pytest.raises(ConfigError, match="ladder v2 .INT5-8.; the format has INT2-4"):
        check_ladder(back, 2, 4)
    with pytest.raises(ConfigError, match="capacities must be 3 non-negative numbers summing to 1"):
        BitRouter(1, 4, 2, "v1", capacities=(0.5, 0.5))


def test_learned_is_trace_levels_by_another_name():
    assert issubclass(ALLOCATORS["learned"], TraceLevels) and ALLOCATORS["learned"] is not TraceLevels


@pytest.fixture(scope="module")
def mwq_store(tmp_path_factory):
    return ensure_store(tiny_model(), tmp_path_factory.mktemp("mwq"), "mwq", quiet=True)


def spread_router(model, prompts=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])):
    """A router whose levels vary: initialised from the expert router, each layer's thresholds at
    the thirds of its scores on `prompts`."""
    r = BitRouter(CFG.n_layers, CFG.d_model, CFG.experts, "v1").init_from_router(model)
    scores = {}

    def spy(layer, hidden, ids, gates):
        scores[layer] = r.score(r.logits(layer, hidden, ids)).reshape(-1)
        return model.moe_layers[layer].resident_experts(layer, hidden, ids, gates)
    model.set_expert_fn(spy)
    with torch.no_grad():
        model(prompts)
        for layer, s in scores.items():
            r.thresholds[layer] = torch.quantile(s, torch.tensor([1 / 3, 2 / 3]))
    model.set_expert_fn(None)
    return r


def test_recorded_levels_replay_identically_in_both_engines(mwq_store):
    model = tiny_model()
    router = spread_router(model)
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    trace = record_routing(model, prompts, 5, level_fn=router, level_meta={"ladder": "v1"})
    assert trace.levels.shape == trace.experts.shape and len(np.unique(trace.levels)) == 3
    assert trace.metadata["bit_router"] == {"ladder": "v1"}
    fmt, arch = mwq_store.format, model_arch(model)
    w = Workload(arch, trace, fmt, batch=2)
    budget = 7 * fmt.expert_bytes             # some evictions
    sim = Simulator(make_device(workers=1), w, build_policies(w, budget, allocator="trace-levels")).run()
    run = execute(strip_experts(tiny_model()), mwq_store, build_policies(w, budget, allocator="learned"), prompts,
                  0, trace=trace, batch=2, decompress_workers=1, quiet=True, level_fn=router)
    assert len(sim.decisions()) > 10
    assert run.timeline.decisions() == sim.decisions()
    key = lambda e: (e.step, e.layer, e.expert, e.level, e.tokens)       # noqa: E731
    assert sorted(map(key, run.timeline.of("compute"))) == sorted(map(key, sim.of("compute")))
    assert len({e.level for e in sim.of("compute")}) == 3


def test_the_executor_computes_the_levels_the_router_gives(mwq_store):
    model = tiny_model()
    router = spread_router(model)
    given = []

    def level_fn(layer, hidden, ids, gates):
        lv = router(layer, hidden, ids, gates)
        given.extend((layer, int(e), int(v)) for e, v in zip(ids.reshape(-1).tolist(), lv.reshape(-1).tolist()))
        return lv
    arch, fmt = model_arch(model), mwq_store.format
    pol = build_online_policies(arch, fmt, 10 ** 9, allocator="learned")
    run = execute(strip_experts(model), mwq_store, pol, torch.tensor([[1, 2, 3]]), 4, quiet=True,
                  level_fn=level_fn)
    got = {}
    for e in run.timeline.of("compute"):
        got[(e.layer, e.expert, e.level)] = got.get((e.layer, e.expert, e.level), 0) + e.tokens
    want = {}
    for g in given:
        want[g] = want.get(g, 0) + 1
    assert got == want and len({lvl for _, _, lvl in want}) > 1


def test_the_command_line_end_to_end(tmp_path, capsys):
    """train-bit-router -> trace record --bit-router -> simulate --allocator trace-levels, and
    execute --bit-router --allocator learned, and eval's learned row, on a small byte-level model."""
    from experiments.cli import main
    from executor.model import MoEConfig, MoETransformer, init_weights
    from executor.train import save_checkpoint
    from workloads.trace import RoutingTrace
    cfg = MoEConfig(vocab=257, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, experts=4, top_k=2, d_ff=32,
                    max_seq=128)
    model_dir = save_checkpoint(init_weights(MoETransformer(cfg)), tmp_path / "m")
    r, t = tmp_path / "r.safetensors", tmp_path / "t.npz"
    m = ["--model-dir", str(model_dir)]
    assert main(["train-bit-router", *m, "--steps", "2", "--out", str(r), "--quiet"]) == 0
    assert "ladder v1, 2 steps" in capsys.readouterr().out
    assert main(["trace", "record", *m, "--bit-router", str(r), "--requests", "2", "--tokens", "4",
                 "--out", str(t)]) == 0
    trace = RoutingTrace.load(t)
    assert trace.levels is not None and trace.levels.max() <= 2 and trace.metadata["bit_router"]["ladder"] == "v1"
    assert main(["simulate", "--trace", str(t), "--format", "mwq", "--allocator", "trace-levels", "--budget",
                 "1GB", "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    assert main(["execute", *m, "--format", "mwq", "--allocator", "learned", "--tokens", "3",
                 "--store", str(tmp_path / "store"), "--out", str(tmp_path / "ex"), "--quiet"]) == 2
    assert "--allocator learned needs --bit-router" in capsys.readouterr().err
    assert main(["execute", *m, "--format", "mwq", "--ladder", "v2", "--bit-router", str(r), "--allocator",
                 "learned", "--store", str(tmp_path / "store2"), "--out", str(tmp_path / "ex"), "--quiet"]) == 2
    assert "ladder v1 (INT2-4); the format has INT5-8" in capsys.readouterr().err
    assert main(["execute", *m, "--format", "mwq", "--bit-router", str(r), "--allocator", "learned", "--tokens", "3",
                 "--budget", "1MB", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "ex"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", *m, "--windows", "2", "--ladder", "v1", "--bit-router", str(r),
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| learned | V1 |" in md and "| capacity | V1 |" in md and md in capsys.readouterr().out
