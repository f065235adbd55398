"""A Mixture-of-Experts decoder-only transformer in plain torch (gpt-fast style).

One model covers the families moelab loads: Mixtral, Qwen2-MoE / Qwen1.5-MoE, OLMoE,
Qwen3-MoE (via executor/hf_checkpoint.py) and our own small trained model
(executor/train.py). Pre-norm blocks: RMSNorm -> attention (RoPE, GQA, KV cache) ->
RMSNorm -> MoE layer (router + routed experts + optional shared experts).

The MoE layer is built so an executor runtime can take over the experts:

    ids, gates = layer.route(hidden)                    # the router alone, [T, k] each
    model.set_expert_fn(fn)                             # fn(layer_idx, hidden [T, d],
                                                        #    ids [T, k], gates [T, k]) -> [T, d]
    model.set_forced_routing(fn)                        # fn(layer_idx, input_pos [S])
                                                        #    -> (ids, gates or None)
    accumulate_expert(out, hidden, ids, gates, e, weights)   # one expert's contribution

`run_expert` / `expert_forward` / `ffn_forward` are the only expert math; the resident
path and the runtime both call them, so their outputs match.

Batches run in lockstep: tokens [B, S] share input_pos [S] (no padding masks).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices.units import ConfigError
from workloads.catalog import ModelArch

ExpertFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ForcedRouting = Callable[[int, torch.Tensor], tuple]

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# families that do NOT renormalise the top-k gate weights by default (their config.json
# says norm_topk_prob: false); Mixtral-style models renormalise
_NO_TOPK_NORM = ("qwen1.5", "qwen2", "olmoe", "deepseek")


# -- configuration -------------------------------------------------------------

@dataclass
class MoEConfig:
    vocab: int = 257
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    d_ff: int = 256                # intermediate width of one routed expert
    shared_experts: int = 0
    shared_d_ff: int = 0           # intermediate width of one shared expert
    shared_gate: bool = False      # Qwen2-MoE: sigmoid(linear(x)) scales the shared output; DeepSeek: none
    expert_matrices: int = 3       # 3: gated (SwiGLU) w1/w3/w2; 2: plain FFN w1/w2
    activation: str = "silu"
    max_seq: int = 256
    rope_theta: float = 10000.0
    norm_topk: bool = True         # renormalise the top-k gate weights to sum to 1
    norm_eps: float = 1e-5
    head_dim: Optional[int] = None  # None: d_model // n_heads (Qwen3-MoE sets it explicitly)
    attn_bias: bool = False        # bias on q/k/v projections (Qwen2-MoE)
    qk_norm: Optional[str] = None  # None, "proj" (OLMoE: RMSNorm over the q/k projection), "head" (Qwen3)
    clip_qkv: Optional[float] = None  # OLMoE option: clamp q, k, v
    tie_embeddings: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"MoEConfig: {msg}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                bad(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.experts:
            bad(f"top_k={self.top_k} must be between 1 and experts={self.experts}")
        if self.expert_matrices not in (2, 3):
            bad(f"expert_matrices must be 2 or 3, got {self.expert_matrices}")
        if self.activation not in _ACTIVATIONS:
            bad(f"activation {self.activation!r} unknown; allowed: {', '.join(_ACTIVATIONS)}")
        if self.qk_norm not in (None, "proj", "head"):
            bad(f"qk_norm {self.qk_norm!r} unknown; allowed: None, 'proj', 'head'")
        if self.shared_experts and self.shared_d_ff <= 0:
            bad("shared_experts > 0 needs shared_d_ff > 0")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_arch(cls, arch, **overrides) -> "MoEConfig":
        """A config from a workloads.catalog.ModelArch (its MoE layers only; dense layers are dropped)."""
        name = arch.name.lower()
        fields = dict(
            vocab=arch.vocab, d_model=arch.d_model, n_layers=arch.layers, n_heads=arch.n_heads,
            n_kv_heads=arch.n_kv_heads, experts=arch.experts, top_k=arch.top_k, d_ff=arch.d_ff,
            shared_experts=arch.shared_experts, shared_d_ff=arch.shared_d_ff,
            shared_gate=bool(arch.shared_experts) and name.startswith(("qwen1.5", "qwen2")),
            expert_matrices=arch.expert_matrices,
            activation="silu" if arch.expert_matrices == 3 else "relu",
            norm_topk=not name.startswith(_NO_TOPK_NORM))
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "config") -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return ("w1", "w3", "w2") if self.expert_matrices == 3 else ("w1", "w2")


# -- the expert math (shared by the model and the runtime) ----------------------

def expert_forward(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   activation: str = "silu") -> torch.Tensor:
    """Gated FFN (SwiGLU for silu): w2 @ (act(w1 @ x) * (w3 @ x)); weights in nn.Linear [out, in] layout."""
    return F.linear(_ACTIVATIONS[activation](F.linear(x, w1)) * F.linear(x, w3), w2)


def ffn_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Plain two-matrix FFN (Switch Transformer): w2 @ act(w1 @ x)."""
    return F.linear(_ACTIVATIONS[activation](F.linear(x, w1)), w2)


def run_expert(x: torch.Tensor, weights: Mapping[str, torch.Tensor], activation: str = "silu") -> torch.Tensor:
    """One expert on rows x [n, d] from its weights {"w1", "w3", "w2"} or {"w1", "w2"}.

    Weights in another dtype (bf16 from an expert store) are cast to x's dtype first;
    bf16 -> fp32 is exact, so a model holding the same bf16-rounded weights gives the same result.
    """
    w = {k: v if v.dtype == x.dtype else v.to(x.dtype) for k, v in weights.items()}
    if "w3" in w:
        return expert_forward(x, w["w1"], w["w3"], w["w2"], activation)
    return ffn_forward(x, w["w1"], w["w2"], activation)


def accumulate_expert(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                      expert: int, weights: Mapping[str, torch.Tensor], activation: str = "silu",
                      rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] += gate[t, e] * expert_e(x[t]) for every token t routed to `expert`; returns out.

    x, out: [T, d]; ids, gates: [T, k]. `rows` restricts the update to a subset of tokens
    (e.g. the tokens whose needed precision is resident); None means all routed tokens.
    """
    hit = ids == expert
    if rows is not None:
        keep = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        keep[rows] = True
        hit &= keep[:, None]
    tok, slot = torch.where(hit)
    if tok.numel():
        y = run_expert(x[tok], weights, activation) * gates[tok, slot, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


def topk_gates(probs: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, gates) [T, k] from router probabilities [T, E]."""
    gates, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


# -- modules -------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, as the HF models do, then back to the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(input_pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [S, head_dim] for positions input_pos, HF "rotate_half" layout (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=input_pos.device)
                                .float() / head_dim))
    freqs = input_pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; rotates the first and second halves of D (HF convention, no weight permutation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys/values [B, H_kv, max_seq, D]; written at input_pos."""

    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.written = [0] * max_batch       # positions written per batch row (the KV it holds)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        # attend only over the filled prefix: positions > max(input_pos) are masked anyway
        end = int(input_pos.max()) + 1
        self.written[:B] = [max(w, end) for w in self.written[:B]]
        return self.k_cache[:B, :, :end], self.v_cache[:B, :, :end]

    def held_bytes(self) -> int:
        """K and V bytes of the positions written: the KV this cache holds."""
        per_position = 2 * self.k_cache.shape[1] * self.k_cache.shape[3] * self.k_cache.element_size()
        return sum(self.written) * per_position

    def allocated_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, H * D, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.d_model, Hkv * D, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.d_model, Hkv * D, bias=cfg.attn_bias)
        self.wo = nn.Linear(H * D, cfg.d_model, bias=False)
        if cfg.qk_norm == "proj":
            self.q_norm, self.k_norm = RMSNorm(H * D, cfg.norm_eps), RMSNorm(Hkv * D, cfg.norm_eps)
        elif cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if cfg.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, cfg.n_heads, cfg.head_dim)
        k = k.view(B, S, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(B, S, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            key_pos = torch.arange(k.shape[2], device=x.device)
            mask = input_pos[:, None] >= key_pos[None, :]
            causal = False
        else:
            mask, causal = None, True  # the tokens are the whole sequence so far
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:  # GQA: each kv head serves `rep` consecutive query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.wo(y.transpose(1, 2).reshape(B, S, cfg.n_heads * cfg.head_dim))


class Expert(nn.Module):
    """One FFN expert: w1 (gate), w3 (up), w2 (down), nn.Linear [out, in] layout, no bias."""

    def __init__(self, d_model: int, d_ff: int, matrices: int = 3, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        if matrices == 3:
            self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def weights(self) -> dict[str, torch.Tensor]:
        names = ("w1", "w3", "w2") if hasattr(self, "w3") else ("w1", "w2")
        return {n: getattr(self, n).weight for n in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_expert(x, self.weights(), self.activation)


class Router(nn.Linear):
    """Linear d_model -> experts; softmax over all experts in fp32, then top-k."""

    def __init__(self, d_model: int, experts: int, top_k: int, norm_topk: bool):
        super().__init__(d_model, experts, bias=False)
        self.top_k, self.norm_topk = top_k, norm_topk

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        return F.softmax(super().forward(h), dim=-1, dtype=torch.float32)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_gates(self.probs(h), self.top_k, self.norm_topk)


class MoELayer(nn.Module):
    """Router + routed experts (+ shared experts). Hooks: expert_fn, forced_routing (see module doc)."""

    def __init__(self, cfg: MoEConfig, layer_idx: int, resident_experts: bool = True):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.router = Router(cfg.d_model, cfg.experts, cfg.top_k, cfg.norm_topk)
        # without resident experts the layer needs an expert_fn (the runtime loads experts itself)
        self.experts = nn.ModuleList(
            [Expert(cfg.d_model, cfg.d_ff, cfg.expert_matrices, cfg.activation) for _ in range(cfg.experts)]
            if resident_experts else [])
        self.shared_experts = nn.ModuleList(
            [Expert(cfg.d_model, cfg.shared_d_ff, cfg.expert_matrices, cfg.activation)
             for _ in range(cfg.shared_experts)])
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate and cfg.shared_experts else None
        self.expert_fn: Optional[ExpertFn] = None
        self.forced_routing: Optional[ForcedRouting] = None
        self.aux_loss: Optional[torch.Tensor] = None  # set in training mode

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's decision for hidden [T, d]: expert ids [T, k] (long) and gates [T, k] (fp32)."""
        return self.router(hidden)

    def resident_experts(self, layer_idx: int, hidden: torch.Tensor, ids: torch.Tensor,
                         gates: torch.Tensor) -> torch.Tensor:
        """The default expert_fn: this layer's own experts, in ascending expert order."""
        if not len(self.experts):
            raise ConfigError(f"MoE layer {layer_idx} has no resident experts; set an expert_fn")
        out = torch.zeros_like(hidden)
        for e in ids.unique().tolist():
            accumulate_expert(out, hidden, ids, gates, e, self.experts[e].weights(), self.cfg.activation)
        return out

    def shared_forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        if not len(self.shared_experts):
            return None
        out = self.shared_experts[0](hidden)
        for ex in self.shared_experts[1:]:
            out = out + ex(hidden)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(hidden)) * out
        return out

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        h = x.reshape(B * S, d)
        probs = self.router.probs(h)
        if self.forced_routing is not None:
            ids, gates = self._forced(probs, input_pos, B)
        else:
            ids, gates = topk_gates(probs, self.router.top_k, self.router.norm_topk)
        self.aux_loss = load_balancing_loss(probs, ids, self.cfg.experts) if self.training else None
        fn = self.expert_fn if self.expert_fn is not None else self.resident_experts
        out = fn(self.layer_idx, h, ids, gates)
        shared = self.shared_forward(h)
        if shared is not None:
            out = out + shared
        return out.view(B, S, d)

    def _forced(self, probs: torch.Tensor, input_pos: torch.Tensor, batch: int):
        """Routing from forced_routing(layer_idx, input_pos) -> (ids, gates or None), [S, k] or [B, S, k].

        Gates None: the router's own probabilities of the forced experts (renormalised if norm_topk).
        """
        ids, gates = self.forced_routing(self.layer_idx, input_pos)
        S = input_pos.shape[0]
        ids = torch.as_tensor(ids, dtype=torch.long, device=probs.device)
        if ids.dim() == 2:
            ids = ids.unsqueeze(0).expand(batch, -1, -1)
        if ids.shape[:2] != (batch, S) or int(ids.max()) >= self.cfg.experts or int(ids.min()) < 0:
            raise ConfigError(f"forced routing for layer {self.layer_idx}: expected expert ids of shape "
                              f"[{batch}, {S}, k] in 0..{self.cfg.experts - 1}, got {tuple(ids.shape)}")
        ids = ids.reshape(batch * S, -1)
        if gates is None:
            gates = probs.gather(1, ids)
            if self.router.norm_topk:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        else:
            gates = torch.as_tensor(gates, dtype=torch.float32, device=probs.device)
            if gates.dim() == 2:
                gates = gates.unsqueeze(0).expand(batch, -1, -1)
            gates = gates.reshape(batch * S, -1)
            if gates.shape != ids.shape:
                raise ConfigError(f"forced routing for layer {self.layer_idx}: gates shape {tuple(gates.shape)} "
                                  f"does not match ids shape {tuple(ids.shape)}")
        return ids, gates


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss, top-k form: E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e: fraction of the T*k routing slots that went to expert e (no gradient);
    P_e: mean router probability of e (carries the gradient).
    """
    counts = torch.bincount(ids.reshape(-1), minlength=experts).to(probs.dtype)
    frac = counts / ids.numel()
    return experts * torch.sum(frac * probs.mean(dim=0))


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int, resident_experts: bool = True):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoELayer(cfg, layer_idx, resident_experts)

    def forward(self, x, cos, sin, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos)
        return h + self.moe(self.ffn_norm(h), input_pos)


class MoETransformer(nn.Module):
    def __init__(self, cfg: MoEConfig, resident_experts: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, i, resident_experts) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq = -1

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.layers]

    def set_expert_fn(self, fn: Optional[ExpertFn]) -> None:
        """fn(layer_idx, hidden [T, d], ids [T, k], gates [T, k]) -> routed output [T, d]; None: resident experts."""
        for m in self.moe_layers:
            m.expert_fn = fn

    def set_forced_routing(self, fn: Optional[ForcedRouting]) -> None:
        """fn(layer_idx, input_pos [S]) -> (ids, gates or None) replaces the router's choice; None: the router."""
        for m in self.moe_layers:
            m.forced_routing = fn

    def expert_weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """{"w1", "w3", "w2"} (or w1, w2) of a resident routed expert, nn.Linear [out, in] layout."""
        return self.layers[layer].moe.experts[expert].weights()

    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss over the MoE layers from the last training-mode forward."""
        losses = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Preallocate KV caches for batches up to max_batch and sequences up to max_seq tokens."""
        if max_seq > self.cfg.max_seq:
            raise ConfigError(f"sequence of {max_seq} tokens exceeds the model's max_seq={self.cfg.max_seq}")
        if max_batch <= self.max_batch and max_seq <= self.max_seq:
            for b in self.layers:                  # reused: a new group of requests holds nothing yet
                b.attention.kv_cache.written = [0] * len(b.attention.kv_cache.written)
            return
        dtype, device = self.output.weight.dtype, self.output.weight.device
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch, max_seq, self.cfg.n_kv_heads, self.cfg.head_dim, dtype, device)
        self.max_batch, self.max_seq = max_batch, max_seq

    def kv_bytes(self) -> tuple[int, int]:
        """(held, allocated) bytes of the KV caches over all layers: the positions written per batch
        row x bytes per position, and the preallocated buffers."""
        caches = [b.attention.kv_cache for b in self.layers if b.attention.kv_cache is not None]
        return sum(c.held_bytes() for c in caches), sum(c.allocated_bytes() for c in caches)

    def clear_caches(self) -> None:
        for b in self.layers:
            b.attention.kv_cache = None
        self.max_batch = self.max_seq = -1

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab].

        Without caches the tokens are a whole sequence (input_pos defaults to 0..S-1);
        with caches (setup_caches) input_pos [S] says where they go and they attend to the cache.
        """
        B, S = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(S, device=tokens.device)
        x = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(input_pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, input_pos)
        return self.output(self.norm(x))


def model_arch(model: MoETransformer, name: str = "model") -> ModelArch:
    """The model's architecture as the policies and the simulator see it (workloads/catalog.py)."""
    c = model.cfg
    return ModelArch(name, layers=c.n_layers, experts=c.experts, top_k=c.top_k, d_model=c.d_model, d_ff=c.d_ff,
                     shared_experts=c.shared_experts, shared_d_ff=c.shared_d_ff, expert_matrices=c.expert_matrices,
                     n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, vocab=c.vocab, head_dim=c.head_dim,
                     kv_dtype_bytes=model.output.weight.element_size())


def init_weights(model: MoETransformer, seed: int = 0, std: float = 0.02) -> MoETransformer:
    """GPT-2 style init: N(0, std); residual output projections scaled by 1/sqrt(2 * layers)."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
    return model


@torch.no_grad()
def generate(model: MoETransformer, prompt_tokens, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache. prompt [T] or [B, T] (lockstep) -> [T + n] or [B, T + n]."""
    prompt = torch.as_tensor(prompt_tokens, dtype=torch.long)
    single = prompt.dim() == 1
    if single:
        prompt = prompt[None]
    B, T = prompt.shape
    model.setup_caches(B, T + max_new_tokens)
    out = [prompt]
    if max_new_tokens > 0:
        logits = model(prompt, torch.arange(T))
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt[:, None])
        for i in range(max_new_tokens - 1):
            logits = model(nxt[:, None], torch.tensor([T + i]))
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt[:, None])
    result = torch.cat(out, dim=1)
    return result[0] if single else result
