"""Named policy bundles: D²MoE and the baselines of its evaluation, as moelab runs them.

A preset fixes the expert format (and its ladder), the allocator, the scheduler, the cache
and the prefetcher; the budget stays the user's, except for the hold-in-memory systems,
which need every expert resident (`budget="all"`: the memory they need). `moelab policies`
lists them; `experiments/reproduce_d2moe.py` runs them.

Where a baseline uses a method moelab does not have, the preset says what it uses instead:
AWQ and GPTQ quantization -> plain per-group round-to-nearest INT (the `copies` format's
single-width copies); EdgeMoE's profiled per-expert sensitivity -> activation frequency.
Hold-in-memory systems load each expert on its first use (warm-up) instead of before the
run; their steady state is the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from devices.units import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    format: str                       # bf16 | mwq | copies | zip
    ladder: str | None = None         # mwq/copies: v1, v2, int4, int8
    allocator: str = "fixed"
    allocator_options: dict = field(default_factory=dict)
    scheduler: str = "fifo"
    cache: str = "lru"
    prefetch: str = "none"
    budget: str | None = None         # "all": every expert at the format's top level

    def format_options(self) -> dict:
        return {"ladder": self.ladder} if self.ladder else {}

    def policy_kwargs(self) -> dict:
        """Keyword arguments of policies.build_policies."""
        return dict(cache=self.cache, scheduler=self.scheduler, prefetch=self.prefetch, allocator=self.allocator,
                    **self.allocator_options)


PRESETS = {p.name: p for p in (
    Preset("d2moe", "D²MoE V1: MWQ INT2-4 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v1", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    Preset("d2moe-v2", "D²MoE V2: MWQ INT5-8 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v2", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    Preset("d2moe-mwq", "ablation +MWQ: D²MoE's planes and bit allocation, FIFO loads, LRU cache",
           "mwq", "v1", allocator="capacity"),
    Preset("d2moe-hebf", "ablation +HEBF: +MWQ with HEBF loads", "mwq", "v1", allocator="capacity",
           scheduler="hebf"),
    Preset("d2moe-router", "ablation +Router: the same bit allocation over separate per-width copies "
           "(no planes), FIFO, LRU", "copies", "v1", allocator="capacity"),
    Preset("matryoshka-free", "separate per-width INT2/3/4 copies on demand (GPTQ in the paper; moelab: "
           "per-group RTN), D²MoE's bit allocation, FIFO, LRU", "copies", "v1", allocator="capacity"),
    Preset("moqe-dynaio-int4", "uniform INT4 experts loaded on demand (LRU under the budget)", "copies", "int4"),
    Preset("moqe-dynaio-int8", "uniform INT8 experts loaded on demand (LRU under the budget)", "copies", "int8"),
    Preset("edgemoe", "EdgeMoE: a static per-expert width by importance (INT2/3/4 copies, ranked by "
           "activation frequency), last-use preloading", "copies", "v1", allocator="static-importance",
           prefetch="last-use"),
    Preset("hold-in-memory", "every expert INT8 and resident (the memory it needs)", "copies", "int8",
           budget="all"),
    Preset("him-awq", "every expert INT4 and resident (AWQ in the paper; moelab: per-group RTN)", "copies",
           "int4", budget="all"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
