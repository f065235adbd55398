"""`moelab trace record`: a real model's routing, in the trace format the simulator replays."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from executor.model import MoETransformer, generate, model_arch
from workloads.trace import RoutingTrace


def capture_layers(model: MoETransformer, prompts: torch.Tensor, new_tokens: int, capture) -> list[list]:
    """Greedy-decode with the model's resident experts, keeping capture(layer, hidden, ids, gates)
    of every MoE layer call: one list per forward pass (prefill, then each decode step), one
    entry per layer."""
    L, steps = model.cfg.n_layers, []

    def spy(layer, hidden, ids, gates):
        if layer == 0:
            steps.append([None] * L)
        steps[-1][layer] = capture(layer, hidden, ids, gates)
        return model.moe_layers[layer].resident_experts(layer, hidden, ids, gates)

    model.set_expert_fn(spy)
    try:
        generate(model, prompts, new_tokens)
    finally:
        model.set_expert_fn(None)
    return steps


@torch.no_grad()
def record_routing(model: MoETransformer, prompts: torch.Tensor, new_tokens: int, model_name: str = "",
                   level_fn=None, level_meta: dict | None = None, lookahead: int | None = None) -> RoutingTrace:
    """Greedy-decode `new_tokens` for each prompt ([requests, P], lockstep) and record, for
    every token that went through the model, each layer's experts and gate scores. level_fn: a
    bit-width router (executor/bit_router.py), run on each layer's hidden state: its levels go
    into the trace (RoutingTrace.levels) and level_meta into its metadata ("bit_router"). The gate
    lookahead's predictions for the next layer (`gate_lookahead`, `lookahead` experts per token,
    default 2 x top-k) go into RoutingTrace.predicted / predicted_scores, so that the simulator
    replays exactly the prefetches the executor makes."""
    model.eval()
    B, P = prompts.shape
    L = model.cfg.n_layers
    predict = gate_lookahead(model, lookahead)

    def record(layer, hidden, ids, gates):          # per forward, per layer: [B * S, k] arrays
        levels = None if level_fn is None else np.asarray(level_fn(layer, hidden, ids, gates), np.uint8)
        return ids.cpu().numpy(), gates.float().cpu().numpy(), levels, predict(layer, hidden, ids, gates)
    steps = capture_layers(model, prompts, new_tokens, record)
    experts, scores, levels, request_ids, prompt, pred_ids, pred_probs = [], [], [], [], [], [], []
    for r in range(B):
        for i, step in enumerate(steps):
            S = step[0][0].shape[0] // B
            rows = slice(r * S, (r + 1) * S)
            experts.append(np.stack([step[layer][0][rows] for layer in range(L)], axis=1))
            scores.append(np.stack([step[layer][1][rows] for layer in range(L)], axis=1))
            pred_ids.append(np.stack([step[layer][3][0][rows] for layer in range(L)], axis=1))
            pred_probs.append(np.stack([step[layer][3][1][rows] for layer in range(L)], axis=1))
            if level_fn is not None:
                levels.append(np.stack([step[layer][2][rows] for layer in range(L)], axis=1))
            request_ids += [r] * S
            prompt += [i == 0] * S
    # the architecture too, so `moelab simulate --trace` can rebuild the model without --model
    meta = {"source": "moelab trace record", "model": model_name, "experts": model.cfg.experts,
            "requests": B, "prompt_len": P, "new_tokens": new_tokens,
            "arch": asdict(model_arch(model, model_name or "model"))}
    if level_fn is not None:
        meta["bit_router"] = dict(level_meta or {})
    meta["lookahead"] = {"predictor": "next layer's router on this layer's hidden state", "width": predict.width}
    return RoutingTrace(np.concatenate(experts), np.concatenate(scores), np.array(request_ids),
                        np.array(prompt), meta, np.concatenate(levels) if level_fn is not None else None,
                        np.concatenate(pred_ids), np.concatenate(pred_probs))


def gate_lookahead(model: MoETransformer, width: int | None = None, distance: int = 1):
    """predict_fn for ExpertRuntime (and the trace): layer l + distance's router applied to layer
    l's hidden state (Fate, HOBBIT), -> (ids int32 [tokens, width], probabilities [tokens, width]),
    best first; -1 (and 0) where there is no such layer. width: default 2 x top-k."""
    cfg = model.cfg
    width = min(cfg.experts, width or 2 * cfg.top_k)

    @torch.no_grad()
    def predict(layer, hidden, ids=None, gates=None):
        T, nxt = hidden.shape[0], layer + distance
        if nxt >= cfg.n_layers:
            return np.full((T, width), -1, np.int32), np.zeros((T, width), np.float32)
        probs, top = torch.topk(model.moe_layers[nxt].router.probs(hidden), width, dim=-1)
        return top.cpu().numpy().astype(np.int32), probs.float().cpu().numpy()

    predict.width = width
    return predict


@torch.no_grad()
def lookahead_accuracy(model: MoETransformer, prompts: torch.Tensor, new_tokens: int, distances=(1, 2, 3),
                       predictors: dict | None = None) -> dict:
    """Precision and recall of the gate lookahead per layer distance d: layer l + d's router on
    layer l's hidden state against the experts layer l + d really selects, over every token of
    a greedy decode. predictors: name -> (experts kept per token, probability threshold); default
    top-k (as many as the router picks: precision = recall) and gate-topk's (2 x top-k, >= 0.1)."""
    cfg, L = model.cfg, model.cfg.n_layers
    predictors = predictors or {"top-k": (cfg.top_k, 0.0), "2k>=0.1": (2 * cfg.top_k, 0.1)}
    hiddens = capture_layers(model, prompts, new_tokens,
                             lambda layer, hidden, ids, gates: (hidden.clone(), ids.clone()))
    out = {}
    for name, (keep, threshold) in predictors.items():
        for d in distances:
            per_layer = []
            for layer in range(L - d):
                hit = pred = true = 0
                for step in hiddens:
                    hidden, actual = step[layer][0], step[layer + d][1]
                    probs, top = torch.topk(model.moe_layers[layer + d].router.probs(hidden), keep, dim=-1)
                    mask = probs >= threshold
                    hit += int(((top[:, :, None] == actual[:, None, :]).any(-1) & mask).sum())
                    pred += int(mask.sum())
                    true += actual.numel()
                per_layer.append({"layer": layer, "precision": hit / pred if pred else None, "recall": hit / true})
            hits = [r["recall"] * 1 for r in per_layer]
            out.setdefault(name, {})[d] = {
                "precision": _mean([r["precision"] for r in per_layer if r["precision"] is not None]),
                "recall": _mean(hits), "per_layer": per_layer}
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None
