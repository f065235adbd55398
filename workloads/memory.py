"""The device's memory split, one piece of arithmetic for both engines (DESIGN.md, "DeviceProfile"):

    memory = reserved (OS, runtime, engine buffers: the profile's memory_reserved)
           + dense weights (ModelArch.dense_weight_bytes: attention, routers, shared experts,
             dense layers, embeddings, output head)
           + KV cache (per request: its context so far x ModelArch.kv_bytes_per_token)
           + expert cache (the budget)

The KV a step holds is counted at the step's end (its attention has written the step's tokens):
every request of the step's group, at its context so far (prompt + tokens generated so far). A
group's requests keep their rows until the group ends, as the executor's preallocated cache
does (a request that finished early still holds its KV); the next group starts from none.

Two modes (RunSpec `kv`):
- fixed: the expert budget is fixed; the KV at its peak must fit beside it, else the run is
  refused up front with the arithmetic. Without an explicit budget the profile's expert_budget
  is capped to what fits.
- shared: the expert cache's capacity at each step is what the step's KV leaves (at most the
  budget, when one is given); the cache evicts as the KV grows (CachePolicy.resize, called through
  Policies.begin_step by every engine with these same figures).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.units import ConfigError, MoelabError, format_size

KV_MODES = ("fixed", "shared")


@dataclass(frozen=True)
class StepKV:
    """The KV cache at one batch step, per attention layer where it says so."""
    held_tokens: int       # tokens whose K/V the step's group holds at the step's end
    read_tokens: int       # K/V positions the step's attention reads, per layer
    attended: int          # (query, key) pairs the step's attention computes, per layer and head

    def held_bytes(self, model) -> int:
        return self.held_tokens * model.kv_bytes_per_token


def step_kv(trace, steps, batch: int) -> list[StepKV]:
    """The KV of every step of `steps` (workloads/batching.py batch_steps(trace, batch)). A decode
    token attends to its whole context, itself included, and reads every cached position; a
    prefill's tokens attend causally (the j-th prompt token to j + 1 positions), and the prefill
    reads the prompt's K/V once (a fused attention kernel keeps it on chip across queries)."""
    requests = trace.requests()
    owner = np.empty(len(trace.experts), dtype=np.int64)
    for r, idx in enumerate(requests):
        owner[idx] = r
    context = np.zeros(len(requests), dtype=np.int64)
    out, group = [], None
    for step in steps:
        if step.group != group:                  # the previous group's KV is freed
            group = step.group
            members = slice(group * batch, group * batch + batch)
        per_request = np.bincount(owner[step.tokens], minlength=len(requests))
        context += per_request
        if step.prefill:
            read = int(per_request.sum())
            attended = int((per_request * (per_request + 1) // 2).sum())
        else:
            read = attended = int(context[per_request > 0].sum())
        out.append(StepKV(int(context[members].sum()), read, attended))
    return out


@dataclass(frozen=True)
class MemorySplit:
    """A run's memory: its terms and, in shared mode, the expert capacity of every step."""
    mode: str
    memory: int
    reserved: int
    dense: int
    kv_per_step: tuple[int, ...]     # KV bytes held at each step's end
    budget: int                      # the expert budget (shared: the largest capacity)
    note: str = ""                   # how the budget was chosen, when not as given
    capacities: tuple[int, ...] | None = None     # shared: the expert capacity of each step

    @property
    def kv_peak(self) -> int:
        return max(self.kv_per_step, default=0)

    def meta(self) -> dict:
        """The split as the timeline's meta and metrics.json carry it (DESIGN.md, Metrics)."""
        out = {"mode": self.mode, "memory_bytes": self.memory, "reserved_bytes": self.reserved,
               "dense_bytes": self.dense, "kv_peak_bytes": self.kv_peak, "expert_budget_bytes": self.budget}
        if self.capacities is not None:
            out["expert_capacity_min_bytes"] = min(self.capacities, default=self.budget)
        if self.note:
            out["note"] = self.note
        return out

    def summary(self) -> str:
        """One line: `moelab simulate` prints it."""
        cap = (f", expert cache {format_size(min(self.capacities, default=0))}-{format_size(self.budget)} (shared)"
               if self.capacities is not None else f", expert budget {format_size(self.budget)} (fixed)")
        return (f"memory {format_size(self.memory)}: reserved {format_size(self.reserved)}, dense weights "
                f"{format_size(self.dense)}, KV peak {format_size(self.kv_peak)}{cap}"
                + (f"; {self.note}" if self.note else ""))


def lockstep_kv(requests: int, batch: int, prompt: int, decode: int) -> list[StepKV]:
    """step_kv of requests decoded in lockstep groups of `batch`, each with a `prompt`-token prefill
    and `decode` decode steps (the executor's own router runs: no trace to batch)."""
    out = []
    for first in range(0, requests, batch):
        b = min(batch, requests - first)
        if prompt:
            out.append(StepKV(b * prompt, b * prompt, b * (prompt * (prompt + 1) // 2)))
        for i in range(decode):
            ctx = prompt + i + 1 if prompt else i + 1
            out.append(StepKV(b * ctx, b * ctx, b * ctx))
    return out


class MemoryRefused(MoelabError):
    """A run whose weights, KV and expert budget do not fit the device's memory (refused up front)."""


def split_memory(mode: str, device, model, kv: list[StepKV], budget: int | None, checked: bool = True,
                 where: str = "", default: int | None = None) -> MemorySplit:
    """The run's memory split on `device` (memory_bytes, memory_reserved_bytes). `budget`: the
    explicit expert budget, or None for the default (fixed: the profile's expert_budget capped to
    what fits; shared: all that is left); `default`: the engine's default budget instead of the
    profile's expert_budget (the executor's). `checked=False`: the budget `all` (every expert resident,
    a what-if bound), neither refused nor resized. Refuses (MemoryRefused, one line) what cannot fit."""
    if mode not in KV_MODES:
        raise ConfigError(f"kv: {mode!r} is not a KV mode; allowed: {', '.join(KV_MODES)}")
    memory, reserved, dense = device.memory_bytes, device.memory_reserved_bytes, model.dense_weight_bytes
    per_step = tuple(s.held_bytes(model) for s in kv)
    if not checked:
        return MemorySplit(mode, memory, reserved, dense, per_step, budget, "budget all: memory not checked")
    peak = max(per_step, default=0)
    left = memory - reserved - dense            # for the KV and the experts
    name = f"{where}: " if where else ""
    if mode == "shared":
        return _shared(name, memory, reserved, dense, per_step, left, budget)
    fits = left - peak
    terms = (f"reserved {format_size(reserved)} + dense weights {format_size(dense)} + KV peak {format_size(peak)} "
             f"({peak // max(1, model.kv_bytes_per_token)} tokens x {model.kv_bytes_per_token} B)")
    if fits <= 0:
        raise MemoryRefused(f"{name}kv fixed: nothing is left for experts: {terms} >= memory {format_size(memory)}; "
                            f"use a device with more memory, or fewer or shorter requests")
    if budget is None:
        default = device.expert_budget_bytes if default is None else default
        budget = min(default, fits)
        note = ("" if budget == default else
                f"the default expert budget {format_size(default)} capped to "
                f"{format_size(budget)}, what fits beside the KV peak")
        return MemorySplit(mode, memory, reserved, dense, per_step, budget, note)
    if budget > fits:
        raise MemoryRefused(f"{name}kv fixed: budget {format_size(budget)} does not fit: {terms} + expert budget "
                            f"{format_size(budget)} = {format_size(reserved + dense + peak + budget)} > memory "
                            f"{format_size(memory)}; the largest budget that fits is {format_size(fits)} ({fits} B), "
                            f"or give --kv shared (the expert cache yields to the KV as it grows)")
    return MemorySplit(mode, memory, reserved, dense, per_step, budget)


def _shared(name: str, memory: int, reserved: int, dense: int, per_step: tuple[int, ...], left: int,
            budget: int | None) -> MemorySplit:
    """Shared mode: each step's expert capacity is what its KV leaves, at most the budget if given."""
    caps = []
    for i, kv_bytes in enumerate(per_step):
        room = left - kv_bytes
        if room <= 0:
            raise MemoryRefused(f"{name}kv shared: at step {i} the KV ({format_size(kv_bytes)}) leaves nothing for "
                                f"experts: memory {format_size(memory)} - reserved {format_size(reserved)} - dense "
                                f"weights {format_size(dense)} - KV = {format_size(room)}; use fewer or shorter "
                                f"requests or a device with more memory")
        caps.append(room if budget is None else min(budget, room))
    top = max(caps, default=left if budget is None else budget)
    return MemorySplit("shared", memory, reserved, dense, per_step, top,
                       "" if budget is not None else "the expert cache takes what the KV leaves", tuple(caps))
