"""From a routing trace to batch steps: B requests decode in lockstep.

Requests are taken in order of first appearance, B at a time (one *group*); groups run
one after another. A group's first step is its prefill (every prompt token of its
requests, if the trace has any), then decode step i holds the i-th generated token of
each request that has one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.units import ConfigError
from workloads.trace import RoutingTrace


@dataclass(frozen=True)
class Step:
    index: int
    group: int
    prefill: bool
    tokens: np.ndarray      # indices into the trace
    new_tokens: int         # tokens this step generates (one per request in it)


def batch_steps(trace: RoutingTrace, batch: int) -> list[Step]:
    if batch < 1:
        raise ConfigError(f"--batch: must be >= 1, got {batch}")
    requests = trace.requests()
    steps: list[Step] = []
    for group, first in enumerate(range(0, len(requests), batch)):
        members = requests[first:first + batch]
        prompts = [idx[trace.prompt[idx]] for idx in members]
        decodes = [idx[~trace.prompt[idx]] for idx in members]
        if any(len(p) for p in prompts):
            steps.append(Step(len(steps), group, True, np.concatenate(prompts), len(members)))
        for i in range(max(len(d) for d in decodes)):
            toks = np.array([d[i] for d in decodes if i < len(d)], dtype=np.int64)
            steps.append(Step(len(steps), group, False, toks, len(toks)))
    return steps


def unit_groups(trace, steps) -> list[list[int]]:
    """Decision points of a trace as lists of integer keys (layer * experts + expert),
    each expert once, in first-appearance (router) order."""
    E = trace.num_experts
    groups = []
    for step in steps:
        sel = trace.experts[step.tokens]                       # [tokens, layers, k]
        for layer in range(trace.layers):
            row = sel[:, layer, :].ravel().tolist()
            groups.append([layer * E + e for e in dict.fromkeys(row)])
    return groups
