"""Named policy bundles: D²MoE, ZipMoE and the baselines of their evaluations, as moelab runs them.

A preset fixes the expert format (and its ladder), the allocator, the scheduler, the cache
and the prefetcher; the budget stays the user's, except for the hold-in-memory systems,
which need every expert resident (`budget="all"`: the memory they need). `moelab policies`
lists them; `experiments/reproduce_d2moe.py` runs them.

Where a baseline uses a method moelab does not have, the preset says what it uses instead:
AWQ and GPTQ quantization -> plain per-group round-to-nearest INT (the `copies` format's
single-width copies); EdgeMoE's profiled per-expert sensitivity -> activation frequency.
Hold-in-memory systems load each expert on its first use (warm-up) instead of before the
run; their steady state is the same. ZipMoE's baselines: MoE-Infinity's request-level
activation matrix -> per-expert activation counts (LFU) and last-use prefetch; DeepSpeed
ZeRO-3 -> the whole layer streamed with next-layer prefetch; Accelerate -> routed experts on
demand without a cache.
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
    scheduler_options: dict = field(default_factory=dict)
    cache: str = "lru"
    prefetch: str = "none"
    budget: str | None = None         # "all": every expert at the format's top level

    def format_options(self) -> dict:
        return {"ladder": self.ladder} if self.ladder else {}

    def policy_kwargs(self) -> dict:
        """Keyword arguments of policies.build_policies."""
        return dict(cache=self.cache, scheduler=self.scheduler, prefetch=self.prefetch, allocator=self.allocator,
                    scheduler_options=dict(self.scheduler_options), **self.allocator_options)


ID_ORDER = {"order": "expert-id"}
PRESETS = {p.name: p for p in (
    Preset("d2moe", "D²MoE V1: MWQ INT2-4 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v1", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    Preset("d2moe-v2", "D²MoE V2: MWQ INT5-8 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v2", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    # D²MoE's FIFO baseline loads in expert-ID order (its Fig. 3); moelab's default FIFO, router
    # order, already puts the hottest expert near the front and so would hide HEBF's gain
    Preset("d2moe-mwq", "ablation +MWQ: D²MoE's planes and bit allocation, FIFO loads in expert-ID order, "
           "LRU cache", "mwq", "v1", allocator="capacity", scheduler_options=ID_ORDER),
    Preset("d2moe-hebf", "ablation +HEBF: +MWQ with HEBF loads", "mwq", "v1", allocator="capacity",
           scheduler="hebf"),
    Preset("d2moe-router", "ablation +Router: the same bit allocation over separate per-width copies "
           "(no planes), FIFO loads in expert-ID order, LRU", "copies", "v1", allocator="capacity",
           scheduler_options=ID_ORDER),
    Preset("matryoshka-free", "separate per-width INT2/3/4 copies on demand (GPTQ in the paper; moelab: "
           "per-group RTN), D²MoE's bit allocation, FIFO loads in expert-ID order, LRU", "copies", "v1",
           allocator="capacity", scheduler_options=ID_ORDER),
    Preset("moqe-dynaio-int4", "uniform INT4 experts loaded on demand (LRU under the budget)", "copies", "int4"),
    Preset("moqe-dynaio-int8", "uniform INT8 experts loaded on demand (LRU under the budget)", "copies", "int8"),
    Preset("edgemoe", "EdgeMoE: a static per-expert width by importance (INT2/3/4 copies, ranked by "
           "activation frequency), last-use preloading", "copies", "v1", allocator="static-importance",
           prefetch="last-use"),
    Preset("hold-in-memory", "every expert INT8 and resident (the memory it needs)", "copies", "int8",
           budget="all"),
    Preset("him-awq", "every expert INT4 and resident (AWQ in the paper; moelab: per-group RTN)", "copies",
           "int4", budget="all"),
    # ZipMoE (policies/zipmoe.py) and the systems of its evaluation; Table 1's ablation is
    # bf16-lru -> zipmoe-basic -> zipmoe-c -> zipmoe
    Preset("zipmoe", "ZipMoE (+C+P): lossless zip experts, Type-I/II scheduler, full + SM-only tiers, "
           "token-weighted LFU, PlanCache split", "zip", scheduler="zipmoe", cache="zipmoe"),
    Preset("zipmoe-c", "ablation +C: ZipMoE's tiers and token-weighted LFU at a fixed half/half split",
           "zip", scheduler="zipmoe", cache="zipmoe-fixed"),
    Preset("zipmoe-basic", "ablation Basic: zip experts and ZipMoE's scheduler, the baseline's LRU cache "
           "(every expert full; the paper does not say which cache Basic has)", "zip", scheduler="zipmoe",
           cache="zipmoe-lru"),
    Preset("bf16-lru", "plain BF16 experts on demand, LRU cache (ZipMoE's Table 1 baseline)", "bf16"),
    Preset("moe-infinity", "MoE-Infinity-like: BF16, activation-aware cache (LFU on activation counts), "
           "prefetch of what the next layer used last time (moelab lacks its request-level activation "
           "matrix)", "bf16", cache="lfu", prefetch="last-use"),
    Preset("deepspeed", "DeepSpeed-like ZeRO-3 offload: every expert of a layer streamed whole (used or not), "
           "the next layer prefetched, no expert cache", "bf16", scheduler="layer-stream", cache="on-demand",
           prefetch="next-layer-all"),
    Preset("accelerate", "Accelerate-like device_map offload: the layer's routed experts loaded whole when "
           "called, no cache, no prefetch", "bf16", cache="on-demand"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
