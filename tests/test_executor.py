"""The executor: same outputs as the plain model, same decisions as the simulator."""

import pytest
import torch

from conftest import make_device
from executor.execute import execute, strip_experts
from executor.model import MoEConfig, MoETransformer, generate, init_weights, model_arch
from executor.store import IntegrityError
from executor.store_build import ensure_store
from policies import build_online_policies, build_policies
from sim.engine import Simulator
from workloads.workload import Workload
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace

CFG = MoEConfig(vocab=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, experts=6, top_k=2, d_ff=48,
                max_seq=64)


def tiny_model(seed=0) -> MoETransformer:
    model = init_weights(MoETransformer(CFG), seed=seed).eval()
    with torch.no_grad():       # experts live in the store as bf16: hold the same rounded values
        for layer in model.moe_layers:
            for ex in layer.experts:
                for p in ex.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
    return model


def online_policies(model, budget, cache="lru"):
    arch = model_arch(model)
    return build_online_policies(arch, make_format("bf16", arch.expert_shapes), budget, cache)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ensure_store(tiny_model(), tmp_path_factory.mktemp("store"), quiet=True)


def test_all_resident_logits_equal_plain_model(store):
    plain = tiny_model()
    prompt = torch.tensor([[1, 5, 9, 2, 7]])
    want = plain(prompt)
    runner = strip_experts(tiny_model())
    captured = {}
    expert_bytes = store.format.expert_bytes
    pol = online_policies(runner, CFG.n_layers * CFG.experts * expert_bytes)
    orig_forward = runner.forward
    def spy(tokens, input_pos=None):
        out = orig_forward(tokens, input_pos)
        captured.setdefault("logits", out)
        return out
    runner.forward = spy
    run = execute(runner, store, pol, prompt, 1, quiet=True)
    assert torch.allclose(captured["logits"][:, -1], want[:, -1], atol=1e-5)
    assert run.tokens.shape == (1, 6)


@pytest.mark.parametrize("cache,prefetch", [("lru", "none"), ("on-demand", "none"), ("lfu", "none"),
                                           ("on-demand", "last-use"), ("lru", "last-use")])
def test_budgeted_generation_equals_unbudgeted(store, cache, prefetch):
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
    want = generate(tiny_model(), prompt, 8)
    runner = strip_experts(tiny_model())
    arch = model_arch(runner)
    pol = build_online_policies(arch, store.format, 12 * store.format.expert_bytes, cache, prefetch=prefetch)
    run = execute(runner, store, pol, prompt, 8, batch=2, quiet=True)
    assert torch.equal(run.tokens, want)
    loads = run.timeline.of("io")
    assert loads, "a budget below the model's experts must load"
    assert run.timeline.meta["peak_expert_bytes"] <= 12 * store.format.expert_bytes


@pytest.mark.parametrize("cache,prefetch", [("lru", "none"), ("fifo", "none"), ("belady", "none"),
                                           ("static-hot", "none"), ("lru", "oracle"), ("on-demand", "oracle"),
                                           ("lru", "last-use"), ("lfu", "last-use")])
def test_same_decisions_as_the_simulator(store, cache, prefetch):
    model = tiny_model()
    arch = model_arch(model)
    trace = synthetic_trace(arch, requests=2, prompt_len=4, output_len=6, skew=1.0, locality=0.5, seed=3)
    fmt = store.format
    w = Workload(arch, trace, fmt, batch=2)
    budget = 9 * fmt.expert_bytes
    sim_tl = Simulator(make_device(), w, build_policies(w, budget, cache=cache, prefetch=prefetch)).run()
    runner = strip_experts(model)
    run = execute(runner, store, build_policies(w, budget, cache=cache, prefetch=prefetch),
                  torch.tensor([[1, 2, 3, 4]]), 0, trace=trace, batch=2, quiet=True)
    assert (prefetch == "none") == (not run.timeline.of("cache", "prefetch"))
    assert run.timeline.decisions() == sim_tl.decisions()
    assert len(run.timeline.decisions()) > 0
    sim_computes = sorted((e.step, e.layer, e.expert, e.tokens) for e in sim_tl.of("compute"))
    ex_computes = sorted((e.step, e.layer, e.expert, e.tokens) for e in run.timeline.of("compute"))
    assert ex_computes == sim_computes


def test_corrupted_blob_is_refused(tmp_path):
    model = tiny_model()
    store = ensure_store(model, tmp_path / "s", quiet=True)
    info = store.blob_info((1, 2, 0))
    path = tmp_path / "s" / info.file
    data = bytearray(path.read_bytes())
    data[info.offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    runner = strip_experts(tiny_model())
    trace = synthetic_trace(model_arch(model), requests=1, prompt_len=3, output_len=2, seed=0)
    trace.experts[:, 1, 0] = 2                          # make sure layer 1 needs expert 2
    trace.experts[:, 1, 1] = 3
    w = Workload(model_arch(model), trace, store.format, batch=1)
    with pytest.raises(IntegrityError, match=r"layer 1, expert 2"):
        execute(runner, store, build_policies(w, 18 * store.format.expert_bytes), torch.tensor([[1, 2, 3]]), 0,
                trace=trace, quiet=True)


def test_recorded_trace_replays_to_the_same_tokens(store):
    from executor.record import record_routing
    prompt = torch.tensor([[5, 3, 8, 1], [9, 9, 2, 4]])
    model = tiny_model()
    trace = record_routing(model, prompt, 5)
    want = generate(tiny_model(), prompt, 5)
    assert trace.tokens == 2 * (4 + 4) and trace.prompt.sum() == 8
    w = Workload(model_arch(model), trace, store.format, batch=2)
    runner = strip_experts(tiny_model())
    run = execute(runner, store, build_policies(w, 8 * store.format.expert_bytes), prompt, 5, trace=trace,
                  batch=2, quiet=True)
    assert torch.equal(run.tokens, want)      # forced routing = the model's own routing here


@pytest.mark.parametrize("fmt_name,prefetch", [("zip", "none"), ("mwq", "none"), ("zip", "oracle"),
                                              ("mwq", "last-use")])
def test_paper_formats_run_end_to_end(tmp_path, fmt_name, prefetch):
    model = tiny_model()
    store = ensure_store(model, tmp_path / fmt_name, fmt_name, quiet=True)
    fmt, arch = store.format, model_arch(model)
    trace = synthetic_trace(arch, requests=2, prompt_len=3, output_len=4, seed=5)
    w = Workload(arch, trace, fmt, batch=2)
    budget = 8 * fmt.level_bytes(fmt.levels - 1)
    sim_tl = Simulator(make_device(), w, build_policies(w, budget, cache="lru", prefetch=prefetch)).run()
    run = execute(strip_experts(tiny_model()), store, build_policies(w, budget, cache="lru", prefetch=prefetch),
                  torch.tensor([[1, 2, 3]]), 0, trace=trace, batch=2, quiet=True)
    assert run.timeline.decisions() == sim_tl.decisions()
    if fmt_name == "zip":
        # lossless: the same tokens as the bf16 model under the same forced routing
        ref = execute(strip_experts(tiny_model()), ensure_store(tiny_model(), tmp_path / "bf16", quiet=True),
                      build_policies(Workload(arch, trace, make_format("bf16", arch.expert_shapes), batch=2),
                                     10**9), torch.tensor([[1, 2, 3]]), 0, trace=trace, batch=2, quiet=True)
        assert torch.equal(run.tokens, ref.tokens)
        dec = run.timeline.of("decompress")
        assert len(dec) == fmt.chunks * len(run.timeline.of("io", "load")) // (fmt.chunks + 1)


def test_read_buffers_are_recycled_and_torch_threads_restored(store, monkeypatch):
    import executor.io as eio
    made = []
    real = eio.aligned_buffer
    monkeypatch.setattr(eio, "aligned_buffer", lambda n: made.append(n) or real(n))
    runner = strip_experts(tiny_model())
    before = torch.get_num_threads()
    run = execute(runner, store, online_policies(runner, 6 * store.format.expert_bytes, "on-demand"),
                  torch.tensor([[1, 2, 3]]), 8, quiet=True, torch_threads=1)
    loads = len(run.timeline.of("io"))
    assert loads >= 40 and len(made) <= 6      # at most what the budget holds at once
    assert torch.get_num_threads() == before and run.timeline.meta["torch_threads"] == 1


def test_a_part_evicted_in_flight_gives_its_buffer_back():
    from executor.runtime import ExpertMemory
    from policies import Key
    mem = ExpertMemory(100)
    k = Key(0, 1, 0)
    mem.reserve(k, 60)
    buf = mem.pool.take(10)
    mem.release(k)                          # evicted before its read landed
    mem.fill(k, b"late", buf)
    assert k not in mem.buffers and mem.used == 0 and mem.pool.take(10) is buf
    mem.reserve(k, 60)
    mem.fill(k, b"data", buf)
    mem.release(k)
    assert mem.pool.take(10) is buf
