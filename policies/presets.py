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

from dataclasses import dataclass, replace

from devices.units import ConfigError
from policies.spec import BundleSpec
from workloads.formats import FormatSpec
from policies.zipmoe_released import CONFIG_SHARE, EVAL_SHARE


@dataclass(frozen=True)
class Preset:
    """A named format + bundle (+ "all" for the hold-in-memory systems' budget)."""
    name: str
    description: str
    format: FormatSpec
    bundle: BundleSpec
    budget: str | None = None         # "all": every expert at the format's top level


def preset(name: str, description: str, fmt: str, ladder: str | None = None, budget: str | None = None,
           **roles) -> Preset:
    """A preset from its format and its roles (cache="lru", scheduler_options={...}, ...)."""
    return Preset(name, description, FormatSpec(fmt, ladder=ladder), BundleSpec.from_doc(roles, f"preset {name}: "),
                  budget)


ID_ORDER = {"order": "expert-id"}
PRESETS = {p.name: p for p in (
    preset("d2moe", "D²MoE V1: MWQ INT2-4 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v1", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    preset("d2moe-v2", "D²MoE V2: MWQ INT5-8 planes, capacity bit allocation, HEBF loads, the budget rule",
           "mwq", "v2", allocator="capacity", scheduler="hebf", cache="d2moe-budget"),
    # D²MoE's FIFO baseline loads in expert-ID order (its Fig. 3); moelab's default FIFO, router
    # order, already puts the hottest expert near the front and so would hide HEBF's gain
    preset("d2moe-mwq", "ablation +MWQ: D²MoE's planes and bit allocation, FIFO loads in expert-ID order, "
           "LRU cache", "mwq", "v1", allocator="capacity", scheduler_options=ID_ORDER),
    preset("d2moe-hebf", "ablation +HEBF: +MWQ with HEBF loads", "mwq", "v1", allocator="capacity",
           scheduler="hebf"),
    preset("d2moe-router", "ablation +Router: the same bit allocation over separate per-width copies "
           "(no planes), FIFO loads in expert-ID order, LRU", "copies", "v1", allocator="capacity",
           scheduler_options=ID_ORDER),
    preset("matryoshka-free", "separate per-width INT2/3/4 copies on demand (GPTQ in the paper; moelab: "
           "per-group RTN), D²MoE's bit allocation, FIFO loads in expert-ID order, LRU", "copies", "v1",
           allocator="capacity", scheduler_options=ID_ORDER),
    preset("moqe-dynaio-int4", "uniform INT4 experts loaded on demand (LRU under the budget)", "copies", "int4"),
    preset("moqe-dynaio-int8", "uniform INT8 experts loaded on demand (LRU under the budget)", "copies", "int8"),
    preset("edgemoe", "EdgeMoE: a static per-expert width by importance (INT2/3/4 copies, ranked by "
           "activation frequency), last-use preloading", "copies", "v1", allocator="static-importance",
           prefetch="last-use"),
    preset("hold-in-memory", "every expert INT8 and resident (the memory it needs)", "copies", "int8",
           budget="all"),
    preset("him-awq", "every expert INT4 and resident (AWQ in the paper; moelab: per-group RTN)", "copies",
           "int4", budget="all"),
    # ZipMoE (policies/zipmoe.py; mode=released unless --cache-option mode=corrected) and the systems
    # of its evaluation; Table 1's ablation is bf16-lru -> zipmoe-basic[-lfu|-fifo] -> zipmoe-c[95] -> zipmoe
    preset("zipmoe", "ZipMoE (+C+P): lossless zip experts, Type-I/II scheduler, full + SM-only tiers, "
           "token-weighted LFU, PlanCache split from a plan trace", "zip", scheduler="zipmoe", cache="zipmoe"),
    preset("zipmoe-c", f"ablation +C: ZipMoE's tiers and token-weighted LFU at the released config's full share "
           f"{CONFIG_SHARE}", "zip", scheduler="zipmoe", cache="zipmoe", cache_options={"split": CONFIG_SHARE}),
    preset("zipmoe-c95", f"ablation +C at the eval script's full share {EVAL_SHARE}", "zip", scheduler="zipmoe",
           cache="zipmoe", cache_options={"split": EVAL_SHARE}),
    *(preset(f"zipmoe-basic{suffix}", f"ablation Basic: zip experts and ZipMoE's scheduler, every expert full, "
             f"{rule.upper()} victims (the released code has no Basic; its cache rules are ZipMoE, LFU, LRU, "
             f"Marking, FIFO)", "zip", scheduler="zipmoe", cache="zipmoe",
             cache_options={"victim": rule, "tiers": False})
      for suffix, rule in (("", "lru"), ("-lfu", "lfu"), ("-fifo", "fifo"))),
    preset("bf16-lru", "plain BF16 experts on demand, LRU cache (ZipMoE's Table 1 baseline)", "bf16"),
    preset("moe-infinity", "MoE-Infinity-like: BF16, activation-aware cache (LFU on activation counts), "
           "prefetch of what the next layer used last time (moelab lacks its request-level activation "
           "matrix)", "bf16", cache="lfu", prefetch="last-use"),
    preset("deepspeed", "DeepSpeed-like ZeRO-3 offload: every expert of a layer streamed whole (used or not), "
           "the next layer prefetched, no expert cache", "bf16", scheduler="layer-stream", cache="on-demand",
           prefetch="next-layer-all"),
    preset("accelerate", "Accelerate-like device_map offload: the layer's routed experts loaded whole when "
           "called, no cache, no prefetch", "bf16", cache="on-demand"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def bundle_from_doc(doc, where: str = "") -> BundleSpec:
    """A bundle document (policies/spec.py), or `{preset: NAME}`: the preset's bundle, labelled
    with its name. A preset beside roles that differ from its own is a conflict, not an override."""
    if not (isinstance(doc, dict) and "preset" in doc):
        return BundleSpec.from_doc(doc, where)
    try:
        p = get_preset(doc["preset"])
    except ConfigError as e:
        raise ConfigError(f"{where}preset: {e}") from None
    given = {k: v for k, v in doc.items() if k != "preset"}
    if given and BundleSpec.from_doc(given, where) != p.bundle:
        raise ConfigError(f"{where.rstrip('.')}: preset {p.name} sets the whole bundle; give `preset` alone "
                          f"(`moelab policies {p.name}` shows what it sets)")
    return replace(p.bundle, preset=p.name)


def bundle_to_doc(bundle: BundleSpec):
    """A bundle's document: a preset's by its name, any other role by role."""
    return {"preset": bundle.preset} if bundle.preset else bundle.to_doc()
