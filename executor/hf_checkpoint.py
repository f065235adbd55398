"""Load MoE checkpoints from a local folder of safetensors into executor.model.

Supported `model_type`s in config.json:

    mixtral     model.layers.{i}.block_sparse_moe.gate / .experts.{j}.w1|w3|w2
    qwen2_moe   model.layers.{i}.mlp.gate / .experts.{j}.gate_proj|up_proj|down_proj,
                .mlp.shared_expert.*, .mlp.shared_expert_gate; q/k/v biases
    olmoe       as qwen2_moe without shared experts; self_attn.q_norm/k_norm over the projections
    qwen3_moe   as olmoe with per-head q_norm/k_norm
    moelab      our own trained models (executor/train.py): this model's state_dict names

A folder holds `config.json` and one or more `*.safetensors` files; a sharded checkpoint
also has `model.safetensors.index.json` (its weight_map says which file holds which
tensor). Tensors are read lazily with safe_open, so `iter_experts` walks the experts
one at a time without building the model (for the expert store builder), and
`load_hf_moe(..., resident_experts=False)` builds the model without its routed experts.
`build_hf_store` (`moelab store build --hf`) combines both: memory holds the dense weights
and one expert at a time, never the whole checkpoint.

Errors (missing or mis-shaped tensors, unsupported configs) are ConfigError naming the
tensor, the file and the folder.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open

from devices.units import ConfigError
from executor.model import MoEConfig, MoETransformer
from executor.store_build import ensure_store

INDEX = "model.safetensors.index.json"
FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "moelab")

# HF defaults for keys a config.json may leave out (from each model's configuration class)
_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "qwen2_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": False},
    "olmoe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "norm_topk_prob": False},
    "qwen3_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": False},
}
# our expert matrix name -> the family's
_HF_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


# -- config --------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def read_config(folder: Union[str, Path]) -> tuple[MoEConfig, str]:
    """(MoEConfig, family) from folder/config.json."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"{path}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    if family == "moelab":
        return MoEConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"}, str(path)), family
    return _config_from_hf(raw, family, path), family


def _config_from_hf(raw: dict, family: str, path: Path) -> MoEConfig:
    raw = {**_DEFAULTS[family], **{k: v for k, v in raw.items() if v is not None or k in ("head_dim", "clip_qkv")}}

    def need(key):
        if raw.get(key) is None:
            raise ConfigError(f"{path}: key {key!r} is missing (needed for model_type {family})")
        return raw[key]

    if raw.get("rope_scaling"):
        raise ConfigError(f"{path}: rope_scaling {raw['rope_scaling']!r} is not supported (only plain RoPE)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported; allowed: 'silu'")
    n_heads = need("num_attention_heads")
    common = dict(
        vocab=need("vocab_size"), d_model=need("hidden_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        top_k=need("num_experts_per_tok"), max_seq=raw.get("max_position_embeddings", 4096),
        rope_theta=float(raw["rope_theta"]), norm_eps=float(raw["rms_norm_eps"]),
        head_dim=raw.get("head_dim"), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        expert_matrices=3, activation="silu")
    if family == "mixtral":
        fam = dict(experts=need("num_local_experts"), d_ff=need("intermediate_size"), norm_topk=True)
    elif family == "olmoe":
        fam = dict(experts=need("num_experts"), d_ff=need("intermediate_size"),
                   norm_topk=bool(raw["norm_topk_prob"]), qk_norm="proj", clip_qkv=raw.get("clip_qkv"),
                   attn_bias=bool(raw.get("attention_bias", False)))
    else:  # qwen2_moe, qwen3_moe
        _check_all_sparse(raw, path)
        fam = dict(experts=need("num_experts"), d_ff=need("moe_intermediate_size"),
                   norm_topk=bool(raw["norm_topk_prob"]))
        if family == "qwen2_moe":
            shared = int(raw.get("shared_expert_intermediate_size") or 0)
            # Qwen2-MoE hard-codes bias on q/k/v (not o)
            fam.update(shared_experts=1 if shared else 0, shared_d_ff=shared, shared_gate=bool(shared),
                       attn_bias=True)
        else:
            fam.update(qk_norm="head", attn_bias=bool(raw.get("attention_bias", False)))
    try:
        return MoEConfig(**common, **fam)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _check_all_sparse(raw: dict, path: Path) -> None:
    """Qwen MoE configs can make some layers dense (mlp_only_layers, decoder_sparse_step): not supported."""
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = [i for i in range(raw.get("num_hidden_layers", 0))
             if i in (raw.get("mlp_only_layers") or []) or (i + 1) % step]
    if dense:
        raise ConfigError(f"{path}: layers {dense} are dense MLP layers (mlp_only_layers / decoder_sparse_step); "
                          f"only all-MoE models are supported")


# -- tensor names ---------------------------------------------------------------

def expert_tensor_name(family: str, layer: int, expert: int, matrix: str) -> str:
    """Checkpoint name of one routed expert's matrix ("w1", "w3" or "w2") in a checkpoint of `family`."""
    if family == "moelab":
        return f"layers.{layer}.moe.experts.{expert}.{matrix}.weight"
    if family == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{_HF_MLP[matrix]}.weight"


def expert_tensor_names(family: str, layer: int, expert: int, cfg: MoEConfig) -> dict[str, str]:
    """{"w1": name, "w3": name, "w2": name} (or w1, w2) of one routed expert in a checkpoint of `family`."""
    return {m: expert_tensor_name(family, layer, expert, m) for m in cfg.expert_names}


def checkpoint_name(family: str, key: str) -> str:
    """The checkpoint tensor name of one of our state_dict keys."""
    if family == "moelab":
        return key
    if key == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    if key == "output.weight":
        return "lm_head.weight"
    _, i, rest = key.split(".", 2)  # layers.{i}.<rest>
    p = f"model.layers.{i}."
    moe = "block_sparse_moe." if family == "mixtral" else "mlp."
    fixed = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "moe.router.weight": moe + "gate.weight",
        "moe.shared_gate.weight": "mlp.shared_expert_gate.weight",
    }
    if rest in fixed:
        return p + fixed[rest]
    if rest.startswith("attention."):
        sub = rest[len("attention."):]  # wq.weight, wq.bias, q_norm.weight, ...
        proj = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        head, tail = sub.split(".", 1)
        return p + "self_attn." + proj.get(head, head) + "." + tail
    parts = rest.split(".")  # moe.experts.{j}.w1.weight / moe.shared_experts.{j}.w1.weight
    if parts[1] == "experts":
        return expert_tensor_name(family, int(i), int(parts[2]), parts[3])
    if parts[1] == "shared_experts":
        return p + "mlp.shared_expert." + _HF_MLP[parts[3]] + ".weight"
    raise ConfigError(f"no {family} checkpoint name for parameter {key!r}")


# -- lazy tensor access ---------------------------------------------------------

class SafetensorsFolder:
    """Tensors of a (possibly sharded) safetensors checkpoint, opened lazily; use as a context manager."""

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: no 'weight_map' object")
            self.where = dict(weight_map)
            for f in sorted(set(self.where.values())):
                if not (self.folder / f).is_file():
                    raise ConfigError(f"{index}: names file {f!r}, which is not in {self.folder}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.folder}: no *.safetensors files")
            self.where = {}
            for f in files:
                with safe_open(self.folder / f, framework="pt") as h:
                    for k in h.keys():
                        self.where.setdefault(k, f)
        self._stack = contextlib.ExitStack()
        self._handles: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: Optional[tuple] = None) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            files = ", ".join(sorted(set(self.where.values())))
            raise ConfigError(f"{self.folder}: tensor {name!r} is missing (files: {files})")
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(self.folder / f, framework="pt"))
        try:
            t = self._handles[f].get_tensor(name)
        except Exception as e:  # the index points at a file that lacks the tensor
            raise ConfigError(f"{self.folder / f}: cannot read tensor {name!r}: {e}") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConfigError(f"{self.folder / f}: tensor {name!r} has shape {tuple(t.shape)}, "
                              f"expected {tuple(shape)}")
        return t


# -- public API -------------------------------------------------------------------

def load_hf_moe(folder: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                resident_experts: bool = True) -> tuple[MoETransformer, MoEConfig]:
    """Build the model of folder/config.json and load its weights (any supported model_type).

    resident_experts=False leaves the routed experts out (a runtime supplies them via
    set_expert_fn); everything else (attention, norms, routers, shared experts) is loaded.
    """
    cfg, family = read_config(folder)
    with torch.device("meta"):  # no memory until the real tensors are assigned
        model = MoETransformer(cfg, resident_experts=resident_experts)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {}
    with SafetensorsFolder(folder) as src:
        for key, shape in expected.items():
            name = checkpoint_name(family, key)
            if key == "output.weight" and cfg.tie_embeddings:
                continue  # tied below
            sd[key] = src.get(name, shape).to(dtype)
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), cfg


load_moe = load_hf_moe  # it loads our own checkpoints too (model_type "moelab")


def iter_experts(folder: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
                 layers: Optional[list[int]] = None) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Yield (layer, expert, {"w1", "w3", "w2": tensor [out, in]}) one expert at a time, layer-major.

    Reads only that expert's tensors (checked for shape); dtype None keeps the stored dtype.
    """
    cfg, family = read_config(folder)
    d, f = cfg.d_model, cfg.d_ff
    shapes = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
    with SafetensorsFolder(folder) as src:
        for layer in (range(cfg.n_layers) if layers is None else layers):
            for e in range(cfg.experts):
                names = expert_tensor_names(family, layer, e, cfg)
                out = {m: src.get(n, shapes[m]) for m, n in names.items()}
                yield layer, e, out if dtype is None else {m: t.to(dtype) for m, t in out.items()}


def lazy_experts(folder: Union[str, Path]):
    """For ensure_store(experts=...): a zero-argument callable; each call walks the checkpoint's
    experts layer-major as (layer, expert, loader). A loader reads only that expert's tensors
    (stored dtype, shapes checked) when called, then closes the files: their memory maps would
    otherwise keep every page read so far in this process's RSS."""
    cfg, family = read_config(folder)
    shapes = {"w1": (cfg.d_ff, cfg.d_model), "w3": (cfg.d_ff, cfg.d_model), "w2": (cfg.d_model, cfg.d_ff)}

    def walk():
        with SafetensorsFolder(folder) as src:
            for layer in range(cfg.n_layers):
                for e in range(cfg.experts):
                    def load(names=expert_tensor_names(family, layer, e, cfg)):
                        try:
                            return {m: src.get(n, shapes[m]) for m, n in names.items()}
                        finally:
                            src.close()
                    yield layer, e, load
    return walk


def build_hf_store(folder: Union[str, Path], out: Union[str, Path], fmt_name: str = "bf16", *,
                   quiet: bool = False, verify: bool = False, **fmt_options):
    """The expert store of a local checkpoint, built expert by expert: peak memory is the dense
    weights (float32) plus about one expert, not the whole checkpoint (store.build_info has the
    peak RSS). Returns (dense-only model, store); see executor/store_build.py ensure_store."""
    model, _ = load_hf_moe(folder, resident_experts=False)
    store = ensure_store(model, out, fmt_name, quiet=quiet, verify=verify, experts=lazy_experts(folder),
                         **fmt_options)
    return model, store
