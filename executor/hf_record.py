"""`moelab trace record --hf PATH`: the routing of a local Hugging Face transformers MoE checkpoint.

The model runs in `transformers` itself (AutoModelForCausalLM, local files only, random or real
weights), so every architecture its installed version supports records alike: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and V3 (`ROUTED`). Each MoE layer's router is the
`gate` of the decoder layer's `mlp` (dense MLP layers have none); a forward hook on it keeps
its input (the hidden state after the post-attention norm, what moelab's own model passes its
router: executor/record.py) and its output (logits, routing weights, expert ids), so the ids
and weights recorded are the model's own, whatever its top-k rule: softmax then top-k,
renormalised (Mixtral, Qwen norm_topk_prob) or not; DeepSeek-V2's group-limited greedy;
DeepSeek-V3's sigmoid scores with a selection bias and group limits, weights scaled by
routed_scaling_factor. Slots are ordered by weight, highest first (DeepSeek's top-k is unsorted).

`predicted` / `predicted_scores` follow executor/record.py's gate lookahead: the NEXT MoE
layer's router applied to THIS layer's hidden state, the `width` best experts (default 2 x
top-k) by that router's own selection score (`router_scores`), with its probabilities (softmax;
sigmoid for DeepSeek-V3); -1 and 0 at the last MoE layer.

Requests run B at a time in lockstep (left-padded prompts; pad positions are not recorded):
the prefill makes the first new token and each of the new_tokens - 1 decode steps one more,
so a request contributes its prompt tokens plus new_tokens - 1 tokens (as `trace record`).
Decoding is greedy or sampled (temperature, top-p; seeded). Rows stream to a TraceWriter
(workloads/trace_writer.py): memory holds one chunk, not the trace. Ctrl-C stops after the
step in flight and writes what was recorded (metadata "interrupted": true).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from devices.units import ConfigError
from workloads.catalog import ModelArch
from workloads.trace_writer import TraceWriter

ROUTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


# -- the model and its routers ------------------------------------------------------------------
@dataclass
class Router:
    """One MoE layer's gate and how it ranks experts."""
    layer: int                      # decoder layer index
    module: torch.nn.Module
    top_k: int
    sigmoid: bool = False           # DeepSeek-V3: sigmoid scores (else softmax)
    method: str = "greedy"          # "greedy", or group-limited: "group_max" (V2), "group_top2" (V3)
    groups: int = 1
    topk_group: int = 1


def load_hf_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, config) of a local checkpoint folder, in eval mode; ConfigError for what cannot load."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ConfigError("recording a Hugging Face model needs transformers: pip install 'moelab[hf]'") from None
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise ConfigError(f"{folder}: no config.json; expected a local Hugging Face checkpoint folder")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in ROUTED:
        raise ConfigError(f"{folder}: model_type {config.model_type!r} is not supported for recording; "
                          f"supported: {', '.join(ROUTED)}")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
    return model.eval(), config


def find_routers(model) -> list[Router]:
    """Every MoE layer's router, in layer order (see the module doc)."""
    config, out = model.config, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is None or not hasattr(gate, "top_k") or getattr(gate, "weight", None) is None:
            continue                                            # a dense MLP layer
        method = getattr(gate, "topk_method", "greedy") or "greedy"
        if config.model_type == "deepseek_v3":
            out.append(Router(i, gate, gate.top_k, True, "group_top2", gate.num_group, gate.topk_group))
        elif method == "group_limited_greedy":
            out.append(Router(i, gate, gate.top_k, False, "group_max", gate.num_group, gate.topk_group))
        else:
            out.append(Router(i, gate, gate.top_k))
    if not out:
        raise ConfigError(f"{type(model).__name__}: no MoE layer found (no decoder layer's mlp has a gate)")
    return out


@torch.no_grad()
def router_scores(router: Router, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice [T, E]: what the router ranks by, -inf outside the groups it may pick from;
    probs [T, E]: its probabilities) for hidden states [T, d], recomputed from the gate's weights."""
    logits = F.linear(hidden.float(), router.module.weight.float())
    probs = torch.sigmoid(logits) if router.sigmoid else torch.softmax(logits, dim=-1)
    choice = probs.clone()
    bias = getattr(router.module, "e_score_correction_bias", None)
    if bias is not None:
        choice = choice + bias.float()
    if router.method != "greedy":
        T, E = choice.shape
        grouped = choice.view(T, router.groups, E // router.groups)
        score = grouped.topk(2, dim=-1)[0].sum(-1) if router.method == "group_top2" else grouped.max(-1).values
        keep = torch.zeros_like(score).scatter_(1, score.topk(router.topk_group, dim=-1)[1], 1.0)
        mask = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(T, E)
        choice = choice.masked_fill(~mask, float("-inf"))
    return choice, probs


def predict_next(router: Router | None, hidden: torch.Tensor, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, width] int32, probabilities [T, width]) of `router` (the next MoE layer's) on
    this layer's hidden states, best first; -1 / 0 where there is no next layer or no choice."""
    T = hidden.shape[0]
    if router is None:
        return np.full((T, width), -1, np.int32), np.zeros((T, width), np.float32)
    choice, probs = router_scores(router, hidden)
    best, ids = torch.topk(choice, width, dim=-1)
    p = probs.gather(1, ids)
    ok = torch.isfinite(best)
    return (torch.where(ok, ids, -1).cpu().numpy().astype(np.int32),
            torch.where(ok, p, 0.0).cpu().numpy().astype(np.float32))


def hf_arch(config, routers: list[Router], name: str) -> ModelArch:
    """moelab's architecture record of a transformers MoE config (written into the trace)."""
    def get(*keys, default=0) -> int:
        return next((int(getattr(config, k)) for k in keys if getattr(config, k, None) is not None), default)
    d_ff = get("moe_intermediate_size", "intermediate_size")
    shared_d_ff = get("shared_expert_intermediate_size")                  # Qwen2-MoE: one shared expert
    shared = get("n_shared_experts") or int(shared_d_ff > 0)              # DeepSeek: n of d_ff each
    dense = get("num_hidden_layers") - len(routers)
    heads = get("num_attention_heads")
    return ModelArch(name, layers=len(routers), experts=get("num_local_experts", "n_routed_experts", "num_experts"),
                     top_k=routers[0].top_k, d_model=get("hidden_size"), d_ff=d_ff, shared_experts=shared,
                     shared_d_ff=shared_d_ff or (d_ff if shared else 0), n_heads=heads,
                     n_kv_heads=get("num_key_value_heads", default=heads), vocab=get("vocab_size"),
                     dense_layers=dense, dense_d_ff=get("intermediate_size") if dense else 0,
                     source=f"{config.model_type} config.json")


# -- prompts ------------------------------------------------------------------------------------
BUILTIN_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a haiku about the sea at night.",
    "Explain in two sentences why the sky is blue.",
    "Q: A train travels 120 km in 1.5 hours. What is its average speed?\nA:",
    "Translate to French: The library opens at nine in the morning.",
    "import numpy as np\n\ndef moving_average(x, w):\n",
    "Summarise the plot of Hamlet for a ten-year-old.",
    "List three differences between TCP and UDP.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING",
    "Once upon a time, in a village at the edge of a forest,",
    "What is the derivative of x^3 * sin(x)?",
    "<html>\n  <head>\n    <title>",
    "Give me a recipe for a quick vegetarian dinner.",
    "The mitochondria is the powerhouse of the cell because",
    "class Stack:\n    def __init__(self):\n",
    "Write a short email asking a colleague to review a pull request.",
]


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts from BUILTIN_PROMPTS in a seeded order (each used before any repeats)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(BUILTIN_PROMPTS)) for _ in range(-(-n // len(BUILTIN_PROMPTS)))])
    return [BUILTIN_PROMPTS[i] for i in order[:n]]


def load_prompts(path, field: str = "text") -> list[str]:
    """Prompts of a file: one per line, or JSONL objects with a `field` (blank lines skipped)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    if not lines:
        raise ConfigError(f"{path}: no prompts (the file has no non-blank line)")
    if path.suffix != ".jsonl" and not lines[0].lstrip().startswith("{"):
        return [line.replace("\\n", "\n") for line in lines]
    out = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ConfigError(f"{path}:{i}: no string field {field!r} (choose it with the prompt field option)")
        out.append(record[field])
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def tokenize(folder, prompts: list[str], vocab: int, max_tokens: int) -> tuple[list[list[int]], str]:
    """(token ids per prompt, the tokenizer's name): the checkpoint's own tokenizer, or, where the
    folder has none (a random-weight test model), UTF-8 bytes modulo the vocabulary."""
    ids, name = [[b % vocab for b in p.encode()] for p in prompts], "utf-8 bytes mod vocab"
    if folder is not None and any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder}: cannot load its tokenizer ({e})") from None
        ids, name = [tok(p)["input_ids"] for p in prompts], type(tok).__name__
    ids = [x[:max_tokens] or [0] for x in ids]
    return ids, name


# -- recording ----------------------------------------------------------------------------------
class _Capture:
    """Forward hooks on the routers: per forward pass, each MoE layer's (hidden, ids, weights)."""

    def __init__(self, routers: list[Router]):
        self.routers, self.step = routers, {}
        self.handles = [r.module.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, r in enumerate(routers)]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not (isinstance(output, tuple) and len(output) == 3):
                raise ConfigError(f"{type(module).__name__} returned {type(output).__name__}, not (logits, weights, "
                                  f"ids): the router API of transformers >= 5 is needed (pip install 'moelab[hf]')")
            _, weights, ids = output
            self.step[index] = (hidden.reshape(-1, hidden.shape[-1]).detach(), ids.detach(), weights.detach())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(capture: _Capture, keep: torch.Tensor, width: int) -> dict:
    """The trace rows of one forward pass (the positions in `keep`, flat [B * S] order)."""
    L = len(capture.routers)
    if len(capture.step) != L:
        raise ConfigError(f"the forward pass reached {len(capture.step)} of {L} MoE routers")
    experts, scores, pred, pscores = [], [], [], []
    for i in range(L):
        hidden, ids, weights = (t[keep] for t in capture.step[i])
        order = torch.argsort(-weights.float(), dim=-1, stable=True)           # highest weight first
        experts.append(ids.gather(1, order).cpu().numpy())
        scores.append(weights.float().gather(1, order).cpu().numpy())
        p = predict_next(capture.routers[i + 1] if i + 1 < L else None, hidden, width)
        pred.append(p[0])
        pscores.append(p[1])
    stack = lambda xs: np.stack(xs, axis=1)                                    # noqa: E731
    return {"experts": stack(experts), "scores": stack(scores), "predicted": stack(pred),
            "predicted_scores": stack(pscores)}


def _next_token(logits: torch.Tensor, sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """[B] the next tokens from the last position's logits [B, V]: greedy, or sampled."""
    if not sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p                         # keep the smallest nucleus
        probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _cache_kwargs(model, out) -> dict:
    """The KV cache to pass back: `cache` in transformers >= 5.2x, `past_key_values` before."""
    import inspect
    if "cache" in inspect.signature(model.forward).parameters:
        cache = getattr(out, "cache", None)
        return {"cache": cache if cache is not None else out.past_key_values}
    return {"past_key_values": out.past_key_values}


@torch.no_grad()
def _record_group(model, capture, writer, ids: list[list[int]], first_request: int, new_tokens: int,
                  decode: dict, width: int, bar) -> None:
    """One lockstep group: the left-padded prefill, then new_tokens - 1 decode steps."""
    B, S, dev = len(ids), max(map(len, ids)), next(model.parameters()).device
    tokens = torch.zeros((B, S), dtype=torch.long, device=dev)
    mask = torch.zeros((B, S), dtype=torch.long, device=dev)
    for b, x in enumerate(ids):
        tokens[b, S - len(x):], mask[b, S - len(x):] = torch.tensor(x, device=dev), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    requests = np.arange(first_request, first_request + B, dtype=np.int32)
    past, keep, prompt = {}, mask.reshape(-1).bool(), True
    for step in range(new_tokens):
        capture.step = {}
        out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True, **past)
        rows = _rows(capture, keep, width)
        rid = np.repeat(requests, mask.sum(-1).cpu().numpy()) if prompt else requests
        writer.append(**rows, request_ids=rid, prompt=np.full(len(rid), prompt))
        bar.update(1)
        if step + 1 == new_tokens:
            return
        past, prompt = _cache_kwargs(model, out), False
        tokens = _next_token(out.logits[:, -1], **decode)[:, None]
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        pos = pos[:, -1:] + 1
        keep = torch.ones(B, dtype=torch.bool, device=dev)


def record_hf(folder, out, *, prompts: list[str] | None = None, requests: int = 4, new_tokens: int = 32,
              batch: int = 1, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
              width: int | None = None, max_prompt_tokens: int = 512, chunk_tokens: int = 4096,
              dtype: torch.dtype = torch.float32, device: str = "cpu", quiet: bool = False,
              model=None) -> dict:
    """Record a checkpoint folder's routing on `prompts` (default: `requests` built-in prompts,
    seeded) into the trace file `out` (module doc); {"path", "tokens", "interrupted", ...}.
    model: an already loaded transformers model of that folder (tests)."""
    from tqdm import tqdm
    if new_tokens < 1 or batch < 1:
        raise ConfigError(f"record: new_tokens and batch must be >= 1, got {new_tokens}, {batch}")
    model, config = (model, model.config) if model is not None else load_hf_model(folder, dtype, device)
    routers = find_routers(model)
    E = hf_arch(config, routers, "x").experts
    width = min(E, width or 2 * routers[0].top_k)
    texts = prompts if prompts is not None else builtin_prompts(requests, seed)
    ids, tokenizer = tokenize(folder, texts, int(config.vocab_size), max_prompt_tokens)
    torch.manual_seed(seed)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    decode = {"sample": sample, "temperature": temperature, "top_p": top_p, "gen": gen}
    writer, capture, interrupted = TraceWriter(out, chunk_tokens), _Capture(routers), False
    groups = range(0, len(ids), batch)
    try:
        with tqdm(total=len(groups) * new_tokens, disable=quiet, desc="record", unit="step") as bar:
            for first in groups:
                _record_group(model, capture, writer, ids[first:first + batch], first, new_tokens, decode, width, bar)
    except KeyboardInterrupt:
        interrupted = True                                   # keep the whole steps recorded so far
    except BaseException:
        writer.abort()
        raise
    finally:
        capture.remove()
    name = Path(folder).name if folder else "hf-model"
    meta = {"source": "moelab trace record --hf", "model": name, "experts": E, "requests": len(ids),
            "new_tokens": new_tokens, "batch": batch, "interrupted": interrupted,
            "arch": asdict(hf_arch(config, routers, name)),
            "hf": {"model_type": config.model_type, "architectures": list(getattr(config, "architectures", None) or []),
                   "moe_layers": [r.layer for r in routers], "tokenizer": tokenizer,
                   "router": {"scores": "sigmoid" if routers[0].sigmoid else "softmax", "method": routers[0].method,
                              "norm_topk_prob": getattr(config, "norm_topk_prob", None),
                              "routed_scaling_factor": getattr(config, "routed_scaling_factor", None)}},
            "decoding": {"sample": sample, "temperature": temperature, "top_p": top_p, "seed": seed},
            "lookahead": {"predictor": "next layer's router on this layer's hidden state", "width": width}}
    path = writer.close(meta)
    return {"path": path, "tokens": writer.tokens, "interrupted": interrupted, "layers": len(routers),
            "peak_buffered": writer.peak_buffered}
