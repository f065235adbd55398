"""Tiny Hugging Face-format checkpoints written here, loaded, and checked against an
independent reference forward written from the HF modeling code's semantics."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from devices.units import ConfigError
from executor.hf_checkpoint import (build_hf_store, checkpoint_name, expert_tensor_name, iter_experts, load_hf_moe,
                                    read_config)
from executor.model import MoEConfig, MoETransformer, accumulate_expert
from executor.store_build import ensure_store, peak_rss_bytes, reset_peak_rss

V, D_MODEL, LAYERS = 50, 32, 2

CONFIGS = {
    "mixtral": dict(model_type="mixtral", intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                    sliding_window=None),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=40, num_attention_heads=4, num_key_value_heads=4,
                      num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000.0),
    "olmoe": dict(model_type="olmoe", intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
                  num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5,
                  rope_theta=10000.0),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=16, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True),
}


def hf_config(family):
    c = {"vocab_size": V, "hidden_size": D_MODEL, "num_hidden_layers": LAYERS, "max_position_embeddings": 64,
         "hidden_act": "silu", "tie_word_embeddings": False, **CONFIGS[family]}
    c.setdefault("head_dim", None)
    return c


def make_tensors(family, seed=0):
    """Random weights with the family's HF names (norm weights near 1 so they matter)."""
    c = hf_config(family)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    Dh = c["head_dim"] or D_MODEL // H
    E = c.get("num_local_experts") or c["num_experts"]
    f = c.get("moe_intermediate_size") or c["intermediate_size"]
    t = {"model.embed_tokens.weight": rnd(V, D_MODEL), "model.norm.weight": 1 + rnd(D_MODEL)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = rnd(V, D_MODEL)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rnd(D_MODEL)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(D_MODEL)
        for name, rows in (("q", H * Dh), ("k", Hkv * Dh), ("v", Hkv * Dh)):
            t[p + f"self_attn.{name}_proj.weight"] = rnd(rows, D_MODEL)
            if family == "qwen2_moe":
                t[p + f"self_attn.{name}_proj.bias"] = rnd(rows)
        t[p + "self_attn.o_proj.weight"] = rnd(D_MODEL, H * Dh)
        if family == "olmoe":
            t[p + "self_attn.q_norm.weight"] = 1 + rnd(H * Dh)
            t[p + "self_attn.k_norm.weight"] = 1 + rnd(Hkv * Dh)
        if family == "qwen3_moe":
            t[p + "self_attn.q_norm.weight"] = 1 + rnd(Dh)
            t[p + "self_attn.k_norm.weight"] = 1 + rnd(Dh)
        if family == "mixtral":
            m = p + "block_sparse_moe."
            names = ("w1", "w3", "w2")
        else:
            m = p + "mlp."
            names = ("gate_proj", "up_proj", "down_proj")
        t[m + "gate.weight"] = rnd(E, D_MODEL) * 3
        for e in range(E):
            t[m + f"experts.{e}.{names[0]}.weight"] = rnd(f, D_MODEL)
            t[m + f"experts.{e}.{names[1]}.weight"] = rnd(f, D_MODEL)
            t[m + f"experts.{e}.{names[2]}.weight"] = rnd(D_MODEL, f)
        if family == "qwen2_moe":
            fs = c["shared_expert_intermediate_size"]
            t[m + "shared_expert.gate_proj.weight"] = rnd(fs, D_MODEL)
            t[m + "shared_expert.up_proj.weight"] = rnd(fs, D_MODEL)
            t[m + "shared_expert.down_proj.weight"] = rnd(D_MODEL, fs)
            t[m + "shared_expert_gate.weight"] = rnd(1, D_MODEL)
    return t


def write_checkpoint(folder, family, tensors, sharded=False, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or hf_config(family)))
    if not sharded:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / fname)
        weight_map.update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# -- the independent reference (per-token loops, explicit softmax attention) -----------

def ref_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_rope(x, theta):  # x [S, H, Dh], positions 0..S-1, rotate-half pairs (i, i + Dh/2)
    S, _, Dh = x.shape
    out = torch.empty_like(x)
    for s in range(S):
        for i in range(Dh // 2):
            a = s / theta ** (2 * i / Dh)
            x1, x2 = x[s, :, i], x[s, :, i + Dh // 2]
            out[s, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[s, :, i + Dh // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def ref_attention(x, t, p, c):
    family = c["model_type"]
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    Dh = c["head_dim"] or D_MODEL // H
    S = x.shape[0]
    proj = {}
    for n in "qkv":
        y = x @ t[p + f"self_attn.{n}_proj.weight"].T
        if family == "qwen2_moe":
            y = y + t[p + f"self_attn.{n}_proj.bias"]
        if family == "olmoe" and n in "qk":
            y = ref_rms(y, t[p + f"self_attn.{n}_norm.weight"], c["rms_norm_eps"])
        y = y.view(S, -1, Dh)
        if family == "qwen3_moe" and n in "qk":
            y = ref_rms(y, t[p + f"self_attn.{n}_norm.weight"], c["rms_norm_eps"])
        proj[n] = y
    q, k, v = ref_rope(proj["q"], c["rope_theta"]), ref_rope(proj["k"], c["rope_theta"]), proj["v"]
    out = torch.zeros(S, H, Dh)
    for h in range(H):
        kv = h // (H // Hkv)  # query head h reads kv head h // group
        scores = q[:, h] @ k[:, kv].T / math.sqrt(Dh)
        scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kv]
    return out.reshape(S, H * Dh) @ t[p + "self_attn.o_proj.weight"].T


def ref_moe(x, t, p, c):
    family = c["model_type"]
    m, (g, u, d) = (p + "block_sparse_moe.", ("w1", "w3", "w2")) if family == "mixtral" else \
        (p + "mlp.", ("gate_proj", "up_proj", "down_proj"))
    k = c["num_experts_per_tok"]
    renorm = True if family == "mixtral" else c["norm_topk_prob"]
    mlp = lambda xt, pre: (F.silu(t[pre + g + ".weight"] @ xt) * (t[pre + u + ".weight"] @ xt)) \
        @ t[pre + d + ".weight"].T  # noqa: E731
    out = torch.zeros_like(x)
    for s in range(x.shape[0]):
        probs = torch.softmax(t[m + "gate.weight"] @ x[s], -1)
        top = probs.topk(k)
        w = top.values / top.values.sum() if renorm else top.values
        for wi, e in zip(w, top.indices.tolist()):
            out[s] += wi * mlp(x[s], m + f"experts.{e}.")
        if family == "qwen2_moe":
            out[s] += torch.sigmoid(t[m + "shared_expert_gate.weight"] @ x[s]) * mlp(x[s], m + "shared_expert.")
    return out


def ref_forward(tokens, t, c):
    x = t["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = x + ref_attention(ref_rms(x, t[p + "input_layernorm.weight"], eps), t, p, c)
        x = x + ref_moe(ref_rms(x, t[p + "post_attention_layernorm.weight"], eps), t, p, c)
    head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
    return ref_rms(x, t["model.norm.weight"], eps) @ head.T


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,sharded", [("mixtral", False), ("mixtral", True), ("qwen2_moe", False),
                                            ("olmoe", True), ("qwen3_moe", False)])
def test_logits_match_independent_reference(tmp_path, family, sharded):
    tensors = make_tensors(family)
    folder = write_checkpoint(tmp_path / family, family, tensors, sharded)
    model, cfg = load_hf_moe(folder)
    tokens = torch.tensor([3, 17, 42, 8, 8, 0, 49, 21])
    with torch.no_grad():
        logits = model(tokens[None])[0]
    torch.testing.assert_close(logits, ref_forward(tokens, tensors, hf_config(family)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_moe_block_matches_reference(tmp_path, family):
    tensors = make_tensors(family, seed=3)
    model, cfg = load_hf_moe(write_checkpoint(tmp_path, family, tensors))
    x = torch.randn(1, 9, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.layers[1].moe(x, torch.arange(9))[0]
    torch.testing.assert_close(got, ref_moe(x[0], tensors, "model.layers.1.", hf_config(family)),
                               rtol=1e-5, atol=1e-5)


def test_read_config_per_family(tmp_path):
    cfgs = {}
    for fam in CONFIGS:
        write_checkpoint(tmp_path / fam, fam, {"x": torch.zeros(1)})
        cfgs[fam], family = read_config(tmp_path / fam)
        assert family == fam
    assert (cfgs["mixtral"].experts, cfgs["mixtral"].top_k, cfgs["mixtral"].norm_topk) == (4, 2, True)
    q = cfgs["qwen2_moe"]
    assert (q.d_ff, q.shared_experts, q.shared_d_ff, q.shared_gate, q.attn_bias, q.norm_topk) == \
        (16, 1, 40, True, True, False)
    assert (cfgs["olmoe"].qk_norm, cfgs["olmoe"].norm_topk) == ("proj", False)
    assert (cfgs["qwen3_moe"].qk_norm, cfgs["qwen3_moe"].head_dim, cfgs["qwen3_moe"].tie_embeddings) == \
        ("head", 16, True)


def test_missing_tensor_is_named(tmp_path):
    tensors = make_tensors("qwen2_moe")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    folder = write_checkpoint(tmp_path, "qwen2_moe", tensors)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight.*missing"):
        load_hf_moe(folder)


def test_misshaped_tensor_names_tensor_and_file(tmp_path):
    tensors = make_tensors("mixtral")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, D_MODEL)
    folder = write_checkpoint(tmp_path, "mixtral", tensors, sharded=True)
    with pytest.raises(ConfigError, match=r"model-0000\d-of-00002\.safetensors: tensor "
                                          r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(3, 32\)"):
        load_hf_moe(folder)


def test_unsupported_configs_are_config_errors(tmp_path):
    write_checkpoint(tmp_path / "a", "mixtral", {"x": torch.zeros(1)}, config={"model_type": "llama"})
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        read_config(tmp_path / "a")
    dense = dict(hf_config("qwen2_moe"), mlp_only_layers=[0])
    write_checkpoint(tmp_path / "b", "qwen2_moe", {"x": torch.zeros(1)}, config=dense)
    with pytest.raises(ConfigError, match="dense MLP layers"):
        read_config(tmp_path / "b")
    missing = {k: v for k, v in hf_config("mixtral").items() if k != "num_local_experts"}
    write_checkpoint(tmp_path / "c", "mixtral", {"x": torch.zeros(1)}, config=missing)
    with pytest.raises(ConfigError, match="num_local_experts"):
        read_config(tmp_path / "c")


def test_iter_experts_and_the_runtime_path(tmp_path):
    """Experts streamed by iter_experts into an expert_fn reproduce the resident model's logits."""
    tensors = make_tensors("olmoe")
    folder = write_checkpoint(tmp_path, "olmoe", tensors, sharded=True)
    experts = {(layer, e): w for layer, e, w in iter_experts(folder)}
    cfg, _ = read_config(folder)
    assert sorted(experts) == [(i, e) for i in range(LAYERS) for e in range(cfg.experts)]
    assert torch.equal(experts[(1, 5)]["w3"], tensors["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert set(experts[(0, 0)]) == {"w1", "w3", "w2"}

    full, _ = load_hf_moe(folder)
    bare, _ = load_hf_moe(folder, resident_experts=False)
    assert not any(".experts." in k for k in bare.state_dict())

    def expert_fn(layer, hidden, ids, gates):
        out = torch.zeros_like(hidden)
        for e in ids.unique().tolist():
            accumulate_expert(out, hidden, ids, gates, e, experts[(layer, e)])
        return out

    bare.set_expert_fn(expert_fn)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(bare(tokens), full(tokens))


def test_index_naming_a_missing_file(tmp_path):
    folder = write_checkpoint(tmp_path, "mixtral", make_tensors("mixtral"), sharded=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors"):
        load_hf_moe(folder)


# -- issue 9: `store build --hf` expert by expert -----------------------------------------------
def big_expert_checkpoint(folder, layers=2, experts=10, d=256, f=2048):
    """A mixtral checkpoint whose experts dwarf its dense weights (bf16, as published)."""
    cfg = dict(hf_config("mixtral"), hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
               num_local_experts=experts)
    g = torch.Generator().manual_seed(0)
    model = MoETransformer(MoEConfig(vocab=V, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2,
                                     experts=experts, top_k=2, d_ff=f, max_seq=64), resident_experts=False)
    t = {checkpoint_name("mixtral", k): torch.randn(v.shape, generator=g).to(torch.bfloat16)
         for k, v in model.state_dict().items()}
    for i in range(layers):
        for e in range(experts):
            for m, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f))):
                t[expert_tensor_name("mixtral", i, e, m)] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return write_checkpoint(folder, "mixtral", t, config=cfg)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_store_build_hf_holds_one_expert_at_a_time(tmp_path):
    folder = big_expert_checkpoint(tmp_path / "ckpt")
    cfg, _ = read_config(folder)
    expert_f32 = 3 * cfg.d_model * cfg.d_ff * 4                  # 6.3 MB; all 20 experts: 126 MB in float32
    load_hf_moe(folder, resident_experts=False)                  # warm-up: torch's one-time allocations
    reset_peak_rss()
    before = peak_rss_bytes()                                    # = the RSS now
    model, store = build_hf_store(folder, tmp_path / "store", quiet=True)
    assert store.build_info["action"] == "built" and not model.moe_layers[0].experts
    growth = store.build_info["peak_rss_bytes"] - before
    assert growth < 5 * expert_f32, f"peak grew {growth / 1e6:.1f} MB, one expert is {expert_f32 / 1e6:.1f} MB"
    store.verify()
    # the same store as one built from the fully loaded model: the digest is dtype-independent
    full, _ = load_hf_moe(folder)
    again = ensure_store(full, tmp_path / "store", quiet=True)
    assert again.build_info["action"] == "reused"
    assert torch.equal(again.load_expert(1, 9)["w2"], full.moe_layers[1].experts[9].weights()["w2"].to(torch.bfloat16))
