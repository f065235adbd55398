"""`moelab trace record`: a real model's routing, in the trace format the simulator replays."""
from __future__ import annotations

import numpy as np
import torch

from executor.model import MoETransformer, generate
from workloads.trace import RoutingTrace


@torch.no_grad()
def record_routing(model: MoETransformer, prompts: torch.Tensor, new_tokens: int, model_name: str = "",
                   level_fn=None, level_meta: dict | None = None) -> RoutingTrace:
    """Greedy-decode `new_tokens` for each prompt ([requests, P], lockstep) and record, for
    every token that went through the model, each layer's experts and gate scores. level_fn: a
    bit-width router (executor/bit_router.py), run on each layer's hidden state: its levels go
    into the trace (RoutingTrace.levels) and level_meta into its metadata ("bit_router")."""
    model.eval()
    B, P = prompts.shape
    L = model.cfg.n_layers
    steps: list[list] = []                      # per forward: per layer (ids, gates) [B * S, k]

    def spy(layer, hidden, ids, gates):
        if layer == 0:
            steps.append([None] * L)
        levels = None if level_fn is None else np.asarray(level_fn(layer, hidden, ids, gates), np.uint8)
        steps[-1][layer] = (ids.cpu().numpy(), gates.float().cpu().numpy(), levels)
        return model.moe_layers[layer].resident_experts(layer, hidden, ids, gates)

    model.set_expert_fn(spy)
    try:
        generate(model, prompts, new_tokens)
    finally:
        model.set_expert_fn(None)
    experts, scores, levels, request_ids, prompt = [], [], [], [], []
    for r in range(B):
        for i, step in enumerate(steps):
            S = step[0][0].shape[0] // B
            rows = slice(r * S, (r + 1) * S)
            experts.append(np.stack([step[layer][0][rows] for layer in range(L)], axis=1))
            scores.append(np.stack([step[layer][1][rows] for layer in range(L)], axis=1))
            if level_fn is not None:
                levels.append(np.stack([step[layer][2][rows] for layer in range(L)], axis=1))
            request_ids += [r] * S
            prompt += [i == 0] * S
    # the architecture too, so `moelab simulate --trace` can rebuild the model without --model
    from dataclasses import asdict

    from executor.execute import model_arch
    meta = {"source": "moelab trace record", "model": model_name, "experts": model.cfg.experts,
            "requests": B, "prompt_len": P, "new_tokens": new_tokens,
            "arch": asdict(model_arch(model, model_name or "model"))}
    if level_fn is not None:
        meta["bit_router"] = dict(level_meta or {})
    return RoutingTrace(np.concatenate(experts), np.concatenate(scores), np.array(request_ids),
                        np.array(prompt), meta, np.concatenate(levels) if level_fn is not None else None)
