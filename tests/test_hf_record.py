"""Recording routing from Hugging Face transformers MoE checkpoints (executor/hf_record.py): one
tiny random-weight model per architecture, built from its config class (no download), and the
recorded experts, weights and lookahead predictions checked against each router's own math on
the hidden states the router saw (captured here by separate hooks)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from devices.units import ConfigError                                  # noqa: E402
from executor import hf_record                                         # noqa: E402
from executor.hf_record import find_routers, load_hf_model, load_prompts, record_hf   # noqa: E402
from workloads.trace import RoutingTrace                               # noqa: E402

COMMON = dict(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, intermediate_size=48)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
           first_k_dense_replace=1, n_group=2, topk_group=1)
CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", dict(MLA, topk_method="group_limited_greedy")),
    "deepseek_v3": ("DeepseekV3Config", dict(MLA, routed_scaling_factor=2.5, norm_topk_prob=True)),
}
PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "1, 2, 3, 5, 8,"]


def build(family: str, folder):
    """A tiny random-weight checkpoint of `family` in `folder`; routers with spread-out weights
    (and, for DeepSeek-V3, a selection bias) so that the routing is far from uniform."""
    cls, extra = CONFIGS[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for r in find_routers(model):
            r.module.weight.normal_(0, 1.0)
            bias = getattr(r.module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn_like(bias) * 0.3)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def reference(family: str, gate, config, hidden: torch.Tensor):
    """(ids, weights [T, k]; choice, probs [T, E]) straight from the router's definition in the
    installed transformers (modeling_*.py), written out independently of executor/hf_record.py."""
    logits = hidden.float() @ gate.weight.float().T
    k, E = gate.top_k, logits.shape[1]
    if family == "deepseek_v3":
        probs = logits.sigmoid()
        choice = probs + gate.e_score_correction_bias
        group = choice.view(-1, config.n_group, E // config.n_group).topk(2, dim=-1)[0].sum(-1)
    else:
        probs = choice = logits.softmax(-1)
        group = choice.view(-1, config.n_group, E // config.n_group).max(-1).values if family == "deepseek_v2" \
            else None
    if group is not None:                                        # the groups a token may pick from
        top_groups = group.topk(config.topk_group, dim=-1)[1]
        allowed = torch.zeros_like(group).scatter_(1, top_groups, 1).bool()
        choice = choice.masked_fill(~allowed.repeat_interleave(E // config.n_group, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1)[1]
    weights = probs.gather(1, ids)
    if family == "mixtral" or getattr(config, "norm_topk_prob", False) and family != "deepseek_v2":
        weights = weights / weights.sum(-1, keepdim=True)
    if family.startswith("deepseek"):
        weights = weights * config.routed_scaling_factor
    return ids, weights, choice, probs


def record_with_hidden(folder, out, **kw):
    """record_hf on the folder's model, and every router input, concatenated in call order."""
    model, config = load_hf_model(folder)
    routers = find_routers(model)
    seen = [[] for _ in routers]
    hooks = [r.module.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].reshape(
        -1, args[0].shape[-1]).detach().clone())) for i, r in enumerate(routers)]
    try:
        result = record_hf(folder, out, model=model, quiet=True, **kw)
    finally:
        for h in hooks:
            h.remove()
    return result, model, config, routers, [torch.cat(s) for s in seen]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_recorded_routing_is_the_routers_own(family, tmp_path):
    folder = build(family, tmp_path / family)
    result, model, config, routers, hidden = record_with_hidden(folder, tmp_path / "t.npz", prompts=PROMPTS,
                                                                 new_tokens=4, batch=1)
    trace = RoutingTrace.load(result["path"])
    L, k = len(routers), routers[0].top_k
    assert trace.layers == L and trace.top_k == k and trace.tokens == hidden[0].shape[0] == result["tokens"]
    lengths = [len(p.encode()) for p in PROMPTS]                 # no tokenizer in the folder: bytes
    assert trace.tokens == sum(lengths) + 3 * len(PROMPTS)
    assert trace.prompt.sum() == sum(lengths)
    assert trace.request_ids.tolist() == sum(([r] * (n + 3) for r, n in enumerate(lengths)), [])
    for layer, r in enumerate(routers):
        ids, weights, _, _ = reference(family, r.module, config, hidden[layer])
        got_ids, got_w = trace.experts[:, layer], trace.scores[:, layer]
        order = np.argsort(ids.numpy(), axis=1)
        np.testing.assert_array_equal(np.sort(got_ids, 1), np.take_along_axis(ids.numpy(), order, 1))
        np.testing.assert_allclose(np.take_along_axis(got_w, np.argsort(got_ids, 1), 1),
                                   np.take_along_axis(weights.numpy(), order, 1), rtol=1e-5, atol=1e-6)
        assert (np.diff(got_w, axis=1) <= 1e-7).all()             # slots by weight, highest first
        if layer + 1 < L:                                          # the next router on this hidden state
            _, _, choice, probs = reference(family, routers[layer + 1].module, config, hidden[layer])
            best = choice.topk(trace.predicted.shape[2], dim=-1)
            np.testing.assert_array_equal(trace.predicted[:, layer], torch.where(
                torch.isfinite(best.values), best.indices, -1).numpy())
            np.testing.assert_allclose(trace.predicted_scores[:, layer], torch.where(
                torch.isfinite(best.values), probs.gather(1, best.indices), 0.0).numpy(), rtol=1e-5, atol=1e-6)
        else:
            assert (trace.predicted[:, layer] == -1).all() and (trace.predicted_scores[:, layer] == 0).all()
    arch = trace.metadata["arch"]
    assert (arch["layers"], arch["experts"], arch["top_k"]) == (L, trace.num_experts, k)
    assert trace.metadata["hf"]["model_type"] == family and trace.metadata["lookahead"]["width"] == 2 * k
    assert arch["dense_layers"] == (1 if family.startswith("deepseek") else 0)


def test_batched_requests_skip_the_padding(tmp_path):
    folder = build("qwen2_moe", tmp_path / "m")
    single = RoutingTrace.load(record_hf(folder, tmp_path / "a.npz", prompts=PROMPTS, new_tokens=3, quiet=True)["path"])
    batched = RoutingTrace.load(record_hf(folder, tmp_path / "b.npz", prompts=PROMPTS, new_tokens=3, batch=2,
                                          quiet=True)["path"])
    assert batched.tokens == single.tokens
    for r in range(len(PROMPTS)):                                # same tokens per request, prompt first
        a, b = single.request_ids == r, batched.request_ids == r
        assert a.sum() == b.sum() and batched.prompt[b].tolist() == single.prompt[a].tolist()
        same = (np.sort(single.experts[a], -1) == np.sort(batched.experts[b], -1)).all(-1).mean()
        assert same > 0.95                                       # left padding is masked out


def test_long_recording_stays_in_bounded_memory(tmp_path):
    folder = build("olmoe", tmp_path / "m")
    result = record_hf(folder, tmp_path / "long.npz", prompts=PROMPTS[:2], new_tokens=160, batch=2,
                       chunk_tokens=32, quiet=True)
    trace = RoutingTrace.load(result["path"])
    assert trace.tokens == result["tokens"] == sum(len(p.encode()) for p in PROMPTS[:2]) + 2 * 159
    # the writer never holds more than a chunk plus one forward pass's rows (the prefill's here)
    assert result["peak_buffered"] <= 32 + sum(len(p.encode()) for p in PROMPTS[:2])
    assert not list(tmp_path.glob(".long.npz.chunks.*"))         # chunk files removed


def test_ctrl_c_keeps_a_valid_shorter_trace(tmp_path, monkeypatch):
    folder = build("mixtral", tmp_path / "m")
    calls = {"n": 0}
    real = hf_record._next_token

    def interrupt(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(hf_record, "_next_token", interrupt)
    result = record_hf(folder, tmp_path / "t.npz", prompts=PROMPTS, new_tokens=6, quiet=True)
    trace = RoutingTrace.load(result["path"])                    # loads: a checked, valid trace
    assert result["interrupted"] and trace.metadata["interrupted"]
    n0 = len(PROMPTS[0].encode())
    assert trace.tokens == n0 + 2 and set(trace.request_ids.tolist()) == {0}


def test_sampling_is_seeded_and_prompt_files(tmp_path):
    folder = build("qwen3_moe", tmp_path / "m")
    runs = [RoutingTrace.load(record_hf(folder, tmp_path / f"{i}.npz", requests=2, new_tokens=6, sample=True,
                                        temperature=1.5, seed=s, quiet=True)["path"]) for i, s in enumerate((1, 1, 2))]
    np.testing.assert_array_equal(runs[0].experts, runs[1].experts)
    assert runs[0].metadata["decoding"]["sample"] and runs[0].metadata["requests"] == 2
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\\nline\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second\nline"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "a", "id": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"q.jsonl:2: no string field 'prompt'"):
        load_prompts(tmp_path / "q.jsonl", field="prompt")
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        load_hf_model(tmp_path / "llama")


def test_record_stats_fit_synth_simulate(tmp_path):
    # the whole pipeline on a random-weight model: record -> stats -> fit -> synth -> simulate
    from conftest import make_device
    from policies import build_policies
    from sim.engine import Simulator
    from timeline.metrics import compute_metrics
    from workloads.catalog import model_of_trace
    from workloads.fit import fit_trace, load_fit, save_fit
    from workloads.fitted import synth_from_fit
    from workloads.formats import make_format
    from workloads.stats import format_stats, trace_stats
    from workloads.workload import Workload
    folder = build("deepseek_v2", tmp_path / "m")
    trace = RoutingTrace.load(record_hf(folder, tmp_path / "t.npz", requests=4, new_tokens=8, batch=2,
                                        quiet=True)["path"])
    assert "x-layer" in format_stats(trace_stats(trace))
    save_fit(fit_trace(trace, iterations=4), tmp_path / "fit.yaml")
    synth = synth_from_fit(load_fit(tmp_path / "fit.yaml"), 3, 10, 20, seed=1)
    arch = model_of_trace(synth.metadata)                         # the recorded architecture, carried over
    assert synth.predicted is not None and arch.layers == synth.layers == 2
    fmt = make_format("bf16", arch.expert_shapes)
    w = Workload(arch, synth, fmt, batch=1)
    tl = Simulator(make_device(), w, build_policies(w, 2 * arch.experts * fmt.expert_bytes, cache="lru",
                                                    prefetch="gate-lookahead")).run()
    assert compute_metrics(tl)["generated_tokens"] == 3 * 21
