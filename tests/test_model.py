import pytest
import torch

from devices.units import ConfigError
from executor.model import (MoEConfig, MoETransformer, accumulate_expert, expert_forward, ffn_forward, generate,
                            init_weights, run_expert)
from workloads.catalog import CATALOG

CONFIGS = {
    "swiglu": MoEConfig(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, experts=4, top_k=2, d_ff=48,
                        max_seq=32),
    "shared-gated": MoEConfig(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, experts=6, top_k=3,
                              d_ff=24, shared_experts=1, shared_d_ff=40, shared_gate=True, norm_topk=False,
                              max_seq=32, attn_bias=True, qk_norm="proj"),
    "two-matrix": MoEConfig(vocab=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, experts=4, top_k=1, d_ff=48,
                            expert_matrices=2, activation="relu", shared_experts=2, shared_d_ff=16, max_seq=32,
                            qk_norm="head"),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    model = init_weights(MoETransformer(CONFIGS[name]), seed=seed, std=0.2).eval()
    return model


def tokens(b, s, seed=1, vocab=64):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def plain_expert_fn(model, order=1):
    """The runtime's way: fetch each expert's weights, compute it with the shared expert math."""
    def fn(layer, hidden, ids, gates):
        out = torch.zeros_like(hidden)
        for e in sorted(ids.unique().tolist(), reverse=order < 0):
            w = model.layers[layer].moe.experts[e].weights()
            tok, slot = torch.where(ids == e)
            if "w3" in w:
                y = expert_forward(hidden[tok], w["w1"], w["w3"], w["w2"], model.cfg.activation)
            else:
                y = ffn_forward(hidden[tok], w["w1"], w["w2"], model.cfg.activation)
            out.index_add_(0, tok, y * gates[tok, slot, None])
        return out
    return fn


@pytest.mark.parametrize("name", CONFIGS)
def test_expert_fn_hook_matches_resident_experts(name):
    model = make(name)
    x = tokens(2, 10)
    with torch.no_grad():
        ref = model(x)
        model.set_expert_fn(plain_expert_fn(model))
        same_order = model(x)
        model.set_expert_fn(plain_expert_fn(model, order=-1))
        other_order = model(x)
    assert torch.equal(ref, same_order)  # same math in the same order: bit-identical
    torch.testing.assert_close(other_order, ref, rtol=1e-5, atol=1e-5)


def test_expert_fn_sees_the_router_output():
    model = make("swiglu")
    x = tokens(1, 7)
    seen = {}

    def fn(layer, hidden, ids, gates):
        seen[layer] = (hidden.clone(), ids.clone(), gates.clone())
        return model.layers[layer].moe.resident_experts(layer, hidden, ids, gates)

    model.set_expert_fn(fn)
    with torch.no_grad():
        model(x)
    for layer, (hidden, ids, gates) in seen.items():
        r_ids, r_gates = model.layers[layer].moe.route(hidden)
        assert torch.equal(ids, r_ids) and torch.equal(gates, r_gates)
        assert ids.shape == (7, 2) and ids.dtype == torch.long
        torch.testing.assert_close(gates.sum(-1), torch.ones(7))  # norm_topk
    assert sorted(seen) == [0, 1]


def test_accumulate_expert_on_token_subsets_adds_up():
    model = make("swiglu")
    moe = model.layers[0].moe
    h = torch.randn(9, 32)
    ids, gates = moe.route(h)
    e = int(ids[0, 0])
    w = moe.experts[e].weights()
    whole = accumulate_expert(torch.zeros_like(h), h, ids, gates, e, w)
    rows = torch.where((ids == e).any(-1))[0]
    part = accumulate_expert(torch.zeros_like(h), h, ids, gates, e, w, rows=rows[:1])
    part = accumulate_expert(part, h, ids, gates, e, w, rows=rows[1:])
    torch.testing.assert_close(part, whole)
    # bf16 weights from a store give the same result as a model holding the bf16-rounded weights
    w16 = {k: v.to(torch.bfloat16) for k, v in w.items()}
    w32 = {k: v.float() for k, v in w16.items()}
    assert torch.equal(run_expert(h, w16), run_expert(h, w32))


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_equals_full_forward(name):
    model = make(name)
    x = tokens(2, 12)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 16)
        steps = [model(x[:, :5], torch.arange(5))]
        for t in range(5, 12):
            steps.append(model(x[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_forced_routing_is_obeyed():
    model = make("swiglu")
    E = model.cfg.experts
    x = tokens(2, 6)
    seen = []

    def forced(layer, input_pos):
        ids = torch.stack([(input_pos + layer) % E, (input_pos + layer + 1) % E], dim=-1)  # [S, 2]
        return ids, torch.full(ids.shape, 0.5)

    def fn(layer, hidden, ids, gates):
        seen.append((layer, ids.clone(), gates.clone()))
        return model.layers[layer].moe.resident_experts(layer, hidden, ids, gates)

    model.set_forced_routing(forced)
    model.set_expert_fn(fn)
    with torch.no_grad():
        model(x)
    pos = torch.arange(6)
    for layer, ids, gates in seen:
        want = torch.stack([(pos + layer) % E, (pos + layer + 1) % E], -1).repeat(2, 1)  # batch rows, S-major
        assert torch.equal(ids, want)
        assert torch.equal(gates, torch.full((12, 2), 0.5))


def test_forced_routing_with_router_gates_and_own_choice():
    model = make("swiglu")
    x = tokens(1, 8)
    with torch.no_grad():
        ref = model(x)
        # record the router's choice, then force it back: the same logits
        trace = {}
        model.set_expert_fn(lambda l, h, i, g: (trace.__setitem__(l, i.clone()),
                                                model.layers[l].moe.resident_experts(l, h, i, g))[1])
        model(x)
        model.set_expert_fn(None)
        model.set_forced_routing(lambda layer, pos: (trace[layer][pos], None))  # gates from the router
        forced = model(x)
    torch.testing.assert_close(forced, ref)


def test_forced_routing_bad_ids_is_an_error():
    model = make("swiglu")
    model.set_forced_routing(lambda layer, pos: (torch.full((len(pos), 2), 99), None))
    with pytest.raises(ConfigError, match="forced routing"):
        model(tokens(1, 4))


@pytest.mark.parametrize("name", ["swiglu", "shared-gated"])
def test_batch_of_two_equals_two_single_runs(name):
    model = make(name)
    x = tokens(2, 9, seed=5)
    with torch.no_grad():
        batch = model(x)
        singles = torch.cat([model(x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    model.clear_caches()
    out_b = generate(model, x[:, :5], 6)
    model.clear_caches()
    out_s = torch.stack([generate(model, x[i, :5], 6) for i in range(2)])
    assert out_b.shape == (2, 11)
    assert torch.equal(out_b, out_s)


def test_generate_is_greedy_and_matches_full_forward():
    model = make("swiglu")
    prompt = tokens(1, 4)[0]
    out = generate(model, prompt, 5)
    assert out.shape == (9,) and torch.equal(out[:4], prompt)
    with torch.no_grad():
        logits = model(out[None, :-1])[0]
    assert torch.equal(logits[3:].argmax(-1), out[4:])


def test_model_without_resident_experts_needs_an_expert_fn():
    full = make("swiglu")
    bare = MoETransformer(full.cfg, resident_experts=False).eval()
    missing = bare.load_state_dict(full.state_dict(), strict=False)
    assert not missing.missing_keys and all(".experts." in k for k in missing.unexpected_keys)
    x = tokens(1, 5)
    with pytest.raises(ConfigError, match="no resident experts"):
        bare(x)
    bare.set_expert_fn(plain_expert_fn(full))
    with torch.no_grad():
        assert torch.equal(bare(x), full(x))


def test_training_mode_sets_the_load_balancing_loss():
    model = make("swiglu").train()
    model(tokens(2, 8))
    aux = model.aux_loss()
    assert aux.requires_grad and 0.0 < float(aux.detach()) < model.cfg.experts  # 1.0 is perfect balance


def test_config_from_arch_and_dict_roundtrip():
    arch = CATALOG["qwen1.5-moe-a2.7b"].scaled(64, 32, layers=2, vocab=100)
    cfg = MoEConfig.from_arch(arch, max_seq=16)
    assert (cfg.experts, cfg.top_k, cfg.shared_experts, cfg.shared_gate, cfg.norm_topk) == (60, 4, 1, True, False)
    assert MoEConfig.from_arch(CATALOG["mixtral-8x7b"]).norm_topk
    assert MoEConfig.from_arch(CATALOG["switch-large-128"]).expert_matrices == 2
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown keys bogus"):
        MoEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        MoEConfig(n_heads=4, n_kv_heads=3)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 100)
    with pytest.raises(ConfigError, match="max_seq"):
        model.setup_caches(1, 17)
