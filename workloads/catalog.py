"""MoE architectures from their public configs (config.json on each model's hub page).

Only what the policies and the cost model need: the MoE structure and the widths that
set an expert's size. `layers` counts MoE layers (dense-FFN layers are `dense_layers`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devices.units import ConfigError


@dataclass(frozen=True)
class ModelArch:
    name: str
    layers: int                 # MoE layers
    experts: int                # routed experts per MoE layer
    top_k: int
    d_model: int
    d_ff: int                   # intermediate width of one routed expert
    shared_experts: int = 0
    shared_d_ff: int = 0        # intermediate width of one shared expert
    expert_matrices: int = 3    # SwiGLU: w1 (gate), w3 (up), w2 (down); Switch FFN: 2
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab: int = 32000
    dense_layers: int = 0       # leading layers with a dense FFN instead of experts
    dense_d_ff: int = 0
    dtype_bytes: int = 2        # bf16
    source: str = ""
    head_dim: int = 0           # attention head size (0: d_model // n_heads, where config.json sets none)
    kv_dtype_bytes: int = 0     # bytes per cached K/V element (0: dtype_bytes)
    kv_dims: int = 0            # K/V elements cached per token and layer (0: 2 x n_kv_heads x head_dim;
                                #   MLA caches one latent instead)

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not self.kv_dtype_bytes:
            object.__setattr__(self, "kv_dtype_bytes", self.dtype_bytes)
        if not self.kv_dims:
            object.__setattr__(self, "kv_dims", 2 * self.n_kv_heads * self.head_dim)

    @property
    def expert_params(self) -> int:
        return self.expert_matrices * self.d_model * self.d_ff

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    @property
    def expert_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each weight matrix of one expert, nn.Linear convention."""
        up = (self.d_ff, self.d_model)
        down = (self.d_model, self.d_ff)
        return [up, up, down] if self.expert_matrices == 3 else [up, down]

    @property
    def attention_params_per_layer(self) -> int:
        q_o = 2 * self.d_model * self.n_heads * self.head_dim
        k_v = 2 * self.d_model * self.n_kv_heads * self.head_dim
        return q_o + k_v

    @property
    def attention_layers(self) -> int:
        """Every layer has attention: the MoE layers and the dense-FFN ones."""
        return self.layers + self.dense_layers

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer's cache."""
        return self.kv_dims * self.kv_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all attention layers (the KV cache grows by this per token)."""
        return self.attention_layers * self.kv_bytes_per_token_layer

    @property
    def dense_weight_bytes(self) -> int:
        """The non-expert weights the device holds for the whole run: attention of every layer, the
        routers and shared experts of the MoE layers, the dense-FFN layers, the embeddings and the
        output head (untied); norms are negligible and left out."""
        moe = self.layers * (self.d_model * self.experts
                             + self.shared_experts * self.expert_matrices * self.d_model * self.shared_d_ff)
        dense_ffn = self.dense_layers * self.expert_matrices * self.d_model * self.dense_d_ff
        params = self.attention_layers * self.attention_params_per_layer + moe + dense_ffn + 2 * self.vocab * self.d_model
        return params * self.dtype_bytes

    @property
    def dense_params_per_layer(self) -> int:
        """Non-expert weights read for every token of a MoE layer: attention, router, shared experts."""
        shared = self.shared_experts * self.expert_matrices * self.d_model * self.shared_d_ff
        return self.attention_params_per_layer + self.d_model * self.experts + shared

    def scaled(self, d_model: int, d_ff: int, *, layers: int | None = None, vocab: int | None = None,
               n_heads: int | None = None) -> "ModelArch":
        """Same expert/top-k structure, smaller widths (runs on a CPU)."""
        heads = n_heads or max(1, min(self.n_heads, d_model // 64))
        kv = max(1, heads * self.n_kv_heads // self.n_heads)
        return ModelArch(
            name=f"{self.name}-scaled-{d_model}", layers=layers or self.layers, experts=self.experts,
            top_k=self.top_k, d_model=d_model, d_ff=d_ff, shared_experts=self.shared_experts,
            shared_d_ff=d_ff * (self.shared_d_ff // self.d_ff if self.d_ff else 0) if self.shared_experts else 0,
            expert_matrices=self.expert_matrices, n_heads=heads, n_kv_heads=kv,
            vocab=vocab or self.vocab, dense_layers=0, dtype_bytes=self.dtype_bytes,
            kv_dtype_bytes=self.kv_dtype_bytes, source=f"scaled from {self.name}")


CATALOG: dict[str, ModelArch] = {m.name: m for m in [
    ModelArch("mixtral-8x7b", layers=32, experts=8, top_k=2, d_model=4096, d_ff=14336,
              n_heads=32, n_kv_heads=8, vocab=32000,
              source="mistralai/Mixtral-8x7B-v0.1 config.json"),
    ModelArch("llama-moe-3.5b", layers=32, experts=8, top_k=2, d_model=4096, d_ff=1376,
              n_heads=32, n_kv_heads=32, vocab=32000,
              source="llama-moe/LLaMA-MoE-v1-3_5B-2_8 config.json (11008 split into 8 experts of 1376)"),
    ModelArch("deepseek-v2-lite", layers=26, experts=64, top_k=6, d_model=2048, d_ff=1408,
              shared_experts=2, shared_d_ff=1408, n_heads=16, n_kv_heads=16, vocab=102400,
              dense_layers=1, dense_d_ff=10944, kv_dims=512 + 64,
              source="deepseek-ai/DeepSeek-V2-Lite config.json (27 layers, first_k_dense_replace=1; MLA: the "
                     "cache holds kv_lora_rank 512 + qk_rope_head_dim 64 per token and layer)"),
    ModelArch("qwen1.5-moe-a2.7b", layers=24, experts=60, top_k=4, d_model=2048, d_ff=1408,
              shared_experts=1, shared_d_ff=5632, n_heads=16, n_kv_heads=16, vocab=151936,
              source="Qwen/Qwen1.5-MoE-A2.7B config.json"),
    ModelArch("olmoe-1b-7b", layers=16, experts=64, top_k=8, d_model=2048, d_ff=1024,
              n_heads=16, n_kv_heads=16, vocab=50304,
              source="allenai/OLMoE-1B-7B-0924 config.json"),
    ModelArch("qwen3-30b-a3b", layers=48, experts=128, top_k=8, d_model=2048, d_ff=768,
              n_heads=32, n_kv_heads=4, vocab=151936, head_dim=128,
              source="Qwen/Qwen3-30B-A3B config.json (head_dim 128, not hidden_size / heads = 64)"),
    ModelArch("phi-3.5-moe", layers=32, experts=16, top_k=2, d_model=4096, d_ff=6400,
              n_heads=32, n_kv_heads=8, vocab=32064,
              source="microsoft/Phi-3.5-MoE-instruct config.json"),
    ModelArch("switch-large-128", layers=24, experts=128, top_k=1, d_model=1024, d_ff=4096,
              expert_matrices=2, n_heads=16, n_kv_heads=16, vocab=32128,
              source="google/switch-large-128 config.json (12 sparse encoder + 12 sparse decoder layers)"),
]}


def _ramp(skew: float, spread: float, layers: int) -> list[float]:
    """Per-layer skews rising linearly from skew x (1 - spread) to skew x (1 + spread)."""
    return [round(skew * (1 + spread * (2 * i / (layers - 1) - 1)), 4) for i in range(layers)]


# Synthetic routing defaults per model (workloads/fitted.py's parameters; a scalar means every
# layer), fitted to published routing statistics. Used by synthetic_trace(model, fit="catalog")
# and synthetic_default(name); the plain synthetic_trace(model) keeps its skew/locality defaults.
SYNTHETIC: dict[str, dict] = {
    # ZipMoE's released traces (ZipMoE-ICML26 trace/*.pt: per prompt, per layer, per-expert counts
    # over ~19 tokens, 953 prompts; statistics computed in issue 22 item 5): distinct experts per
    # layer in one prompt 41.6, in 4 prompts 61.3, in 16 prompts 63.9; a prompt's own top-6 take
    # 0.350 of its selections; the top-6 over all prompts 0.199 per layer (0.156-0.243); Gini 0.246.
    # The per-layer range is met with a skew ramp over depth +-30% (the published figures do not say
    # which layers are the skewed ones: the ramp is an assumption).
    # Seeded fit at 953 x 19 tokens: 40.9 / 62.5 / 64.0, 0.366, 0.210 (0.169-0.253), 0.234 (tests/test_trace_fit.py)
    "deepseek-v2-lite": {"skew": _ramp(0.541, 0.3, 26), "skew_offset": 1.04, "locality": 0.082,
                         "concentration": 1.21, "source": "ZipMoE-ICML26 released traces, issue 22 item 5"},
    # the same for Qwen1.5-MoE (1,000 prompts, top-4 of 60): 37.4 / 58.0 / 60.0, own top-4 0.256,
    # top-4 over all prompts 0.111 (0.086-0.145), Gini 0.150; a skew ramp of +-50% over depth.
    # Seeded fit at 1000 x 19 tokens: 37.6 / 58.5 / 60.0, 0.250, 0.115 (0.088-0.143), 0.143
    "qwen1.5-moe-a2.7b": {"skew": _ramp(0.371, 0.5, 24), "skew_offset": 3.21, "locality": 0.100,
                          "concentration": 3.18, "source": "ZipMoE-ICML26 released traces, issue 22 item 5"},
    # public traces of Mixtral-8x7B decode (HumanEval/GSM8K; ../shared/reference/peers.md "Observed on
    # real routing"): an expert reused at the next token (at least one of 2) 59-65% of the time
    # (random: 46%), the 2 most-used of 8 take 34-35% of a layer's selections, normalised per-layer
    # entropy 0.94-0.99. Seeded fit at 16 x 256 decode tokens: 0.62, 0.347, 0.985
    "mixtral-8x7b": {"skew": 0.405, "locality": 0.133,
                     "source": "public Mixtral-8x7B decode traces (HumanEval/GSM8K), peers.md"},
}


def synthetic_default(name: str) -> dict | None:
    """The catalog's synthetic routing default for a model (a fit dict for workloads/fitted.py,
    with the model's shape), or None where no published statistics exist."""
    fit = SYNTHETIC.get(name)
    if fit is None:
        return None
    m = CATALOG[name]
    return dict(fit, model={"name": name, "layers": m.layers, "experts": m.experts, "top_k": m.top_k})


# the executor's trained models (executor/assets), found by name too: a host profile names its model
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "executor" / "assets"


def get_model(name: str) -> ModelArch:
    """A catalog architecture by name, or the architecture of a local model folder (its config.json)."""
    if name in CATALOG:
        return CATALOG[name]
    path = Path(name)
    if (path / "config.json").exists():
        return arch_from_config(path / "config.json")
    bundled = BUNDLED_MODELS / name                  # the executor's own trained models, by name
    if path.name == name and (bundled / "config.json").exists():
        return arch_from_config(bundled / "config.json")
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}, and the bundled "
                      f"trained {', '.join(sorted(p.parent.name for p in BUNDLED_MODELS.glob('*/config.json'))) or '-'} "
                      f"(or a folder with a config.json: a `moelab train` output or a Hugging Face checkpoint)")


# config.json keys of moelab's own models, then of Hugging Face MoE configs
_CONFIG_KEYS = {
    "layers": ("n_layers", "num_hidden_layers"), "experts": ("experts", "num_local_experts", "num_experts"),
    "top_k": ("top_k", "num_experts_per_tok"), "d_model": ("d_model", "hidden_size"),
    "d_ff": ("d_ff", "moe_intermediate_size", "intermediate_size"), "n_heads": ("n_heads", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "num_key_value_heads"), "vocab": ("vocab", "vocab_size"),
}


def arch_from_config(path: Path) -> ModelArch:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read as JSON ({e})") from None
    fields = {}
    for field_name, keys in _CONFIG_KEYS.items():
        key = next((k for k in keys if k in raw), None)
        if key is None:
            raise ConfigError(f"{path}: no {' / '.join(keys)} key; cannot tell the model's {field_name}")
        fields[field_name] = int(raw[key])
    shared = int(raw.get("shared_experts", 1 if raw.get("shared_expert_intermediate_size") else 0))
    shared_d_ff = int(raw.get("shared_d_ff", raw.get("shared_expert_intermediate_size", 0)))
    return ModelArch(path.parent.name, shared_experts=shared, shared_d_ff=shared_d_ff,
                     expert_matrices=int(raw.get("expert_matrices", 3)), source=str(path),
                     head_dim=int(raw.get("head_dim") or 0), kv_dtype_bytes=_kv_dtype_bytes(raw), **fields)


# bytes per element of a Hugging Face config's torch_dtype
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _kv_dtype_bytes(raw: dict) -> int:
    """What one cached K/V element takes: moelab's own models run in float32 in the executor
    (executor/train.py load_trained), a Hugging Face checkpoint in its torch_dtype (0: the default)."""
    if raw.get("model_type") == "moelab":
        return 4
    return _DTYPE_BYTES.get(str(raw.get("torch_dtype")), 0)


def model_of_trace(metadata: dict, where: str = "trace") -> ModelArch | None:
    """The architecture a trace names: its recorded one (`moelab trace record` writes it), else
    a catalog model by name; None if it names none."""
    from dataclasses import fields
    if isinstance(metadata.get("arch"), dict):
        names = {f.name for f in fields(ModelArch)}
        return ModelArch(**{k: v for k, v in metadata["arch"].items() if k in names})
    if metadata.get("model"):
        try:
            return get_model(metadata["model"])
        except ConfigError:
            raise ConfigError(f"{where}: the trace names model {metadata['model']!r}, which is not in the "
                              f"catalog and the trace carries no architecture; give the model") from None
    return None
