"""The simulator's run function: `simulate(spec)` turns a run spec into a run, and is the only
place that does (the CLI, sweeps, the reproductions, validation, calibration, the studies and
the benchmark all call it). Here, once: the token convention, the model a trace names, part
sizes from the model's store, the budget ("all", the device's default), the cost model (built
once, handed to the policies and the engine), and the check that a timeline fits in memory.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from devices.units import ConfigError, format_size
from policies.base import BudgetError
from experiments.spec import (DEFAULT_DEVICE, DEFAULT_MODEL, DEFAULT_PROMPT_TOKENS, DEFAULT_TOKENS, RunSpec,
                             trace_model)

# one Event in memory (~0.2 KB), its Chrome-trace dict (~0.9 KB) and its JSON text (~0.3 KB),
# measured on `simulate` runs with tracemalloc; a run holds them all at once when it writes
BYTES_PER_EVENT = 1400
MEMORY_FRACTION = 0.5


class OverMemory(BudgetError):
    """A budget larger than the device's memory: `simulate` refuses it; a sweep row says so."""


@dataclass
class Prepared:
    """Everything a run is built from, resolved: what both engines and the row need."""
    spec: RunSpec            # resolved: every default explicit
    device: object
    storage: object
    model: object
    fmt: object
    trace: object
    workload: object
    budget: int
    cost: object
    policies: object
    memory: object = None    # workloads/memory.py MemorySplit


@dataclass
class SimRun:
    prepared: Prepared
    metrics: dict
    timeline: object | None         # the timeline asked for, else None
    record: object                  # what the run recorded: the timeline, or its figures alone


# -- resolution -------------------------------------------------------------------------------------
def read_trace(spec: RunSpec):
    """The spec's trace file, read with its importer options; an error that names an importer
    option says how to give one."""
    from workloads.importers import import_trace
    try:
        trace = import_trace(spec.trace, **dict(spec.trace_options))
    except ConfigError as e:
        if Path(spec.trace).suffix.lower() == ".npz" or "--option" in str(e) or \
                not any(re.search(rf"\b{n}\b", str(e)) for opts in importer_options().values() for n in opts):
            raise
        raise ConfigError(f"{e} (give importer options as --option KEY=VALUE, or trace_options in a spec or "
                          f"grid; `moelab trace import --help` lists them)") from None
    if trace.metadata.get("path") not in (None, str(spec.trace)):     # errors name the file given
        trace.metadata["imported_from"] = trace.metadata["path"]
    trace.metadata["path"] = str(spec.trace)
    return trace


def importer_options() -> dict[str, list[str]]:
    """The options each trace importer takes (`--option KEY=VALUE`, a spec's trace_options), read
    from its signature."""
    import inspect

    from workloads import importers
    return {name: [p.name for p in inspect.signature(getattr(importers, f"import_{name}")).parameters.values()
                   if p.kind == p.KEYWORD_ONLY or (p.default is not p.empty and p.kind != p.VAR_KEYWORD)]
            for name in ("jsonl", "csv", "numpy")}


def model_of(spec: RunSpec, trace=None):
    """The spec's model, else the one its trace names, else the default."""
    from workloads.catalog import get_model, model_of_trace
    model = _model_named(spec, trace)
    return replace(model, dense_bits=spec.dense_bits) if spec.dense_bits else model


def _model_named(spec: RunSpec, trace=None):
    from workloads.catalog import get_model, model_of_trace
    if spec.model is not None:
        return get_model(spec.model)
    named = model_of_trace(trace.metadata, spec.trace) if trace is not None else None
    if named is None and trace is not None and trace.metadata.get("model"):
        raise ConfigError(f"{spec.trace}: names model {trace.metadata['model']!r}, which is not in the catalog; "
                          f"give model:")
    return named or get_model(DEFAULT_MODEL)


def synthetic_for(spec: RunSpec, model):
    """The seeded synthetic trace: `tokens` new tokens per request, the prefill making the first
    (prompt tokens + tokens - 1 decode tokens; with no prompt every token is decoded)."""
    from workloads.synthetic import synthetic_trace
    decode = spec.tokens - 1 if spec.prompt_tokens > 0 else spec.tokens
    return synthetic_trace(model, requests=spec.requests or spec.batch, prompt_len=spec.prompt_tokens,
                           output_len=decode, skew=spec.skew, locality=spec.locality, seed=spec.seed)


def store_format(spec: RunSpec, model, fmt, quiet: bool = True):
    """The format of the model's expert store (spec.store, or the folder `execute` builds) when
    one exists for this format: its part sizes are the executor's, byte for byte."""
    from workloads.formats import stored_format
    folder = Path(spec.store) if spec.store else default_store(model.name, fmt.name)
    found = stored_format(folder)
    if found is None:
        if spec.store:
            raise ConfigError(f"store {spec.store}: no store there (build one with `moelab store build`)")
        if fmt.name == "zip" and not quiet:
            print(f"note: no zip store in {folder}: part sizes assume an exponent ratio of {fmt.exponent_ratio}; "
                  f"for a real model's measured sizes (what `execute` reads), build its store first "
                  f"(`moelab store build --format zip`) or give --store", file=sys.stderr)
        return fmt
    if found.name != fmt.name or found.shapes != fmt.shapes or not _same_options(found, fmt):
        if spec.store:
            raise ConfigError(f"store {spec.store} holds {found.name} experts of shapes {list(found.shapes)}; "
                              f"the run asks for {fmt.name} experts of shapes {list(fmt.shapes)}")
        return fmt
    if not quiet:
        print(f"part sizes from the store {folder} ({format_size(found.expert_bytes)} per expert)", file=sys.stderr)
    return found


def _same_options(a, b) -> bool:
    """Whether two formats of one name agree on what the spec chose (codec, ladder, group)."""
    return all(getattr(a, k, None) == getattr(b, k, None) for k in ("codec", "b1", "bK", "group"))


def default_store(model_name: str, fmt_name: str) -> Path:
    return Path("runs") / "stores" / f"{Path(model_name).name}-{fmt_name}"


def every_expert_bytes(model, fmt) -> int:
    """The budget "all": every expert resident at the format's top level."""
    return model.layers * model.experts * fmt.level_bytes(fmt.levels - 1)


def resolve(spec: RunSpec, device=None, storage=None) -> RunSpec:
    """The spec with the simulator's defaults made explicit (equal runs hash equal)."""
    from devices.profile import load_device
    device = device or load_device(spec.device or DEFAULT_DEVICE)
    name = device.name if not device.path or Path(device.path).stem == device.name else str(device.path)
    out = spec.with_(device=name, storage=(storage or device.storage_option(spec.storage)).name)
    if spec.synthetic:
        out = out.with_(model=spec.model or DEFAULT_MODEL, tokens=spec.tokens or DEFAULT_TOKENS,
                        prompt_tokens=DEFAULT_PROMPT_TOKENS if spec.prompt_tokens is None else spec.prompt_tokens)
    if out.budget is None:
        out = out.with_(budget=device.expert_budget_bytes)
    if out.tiered:
        out = resolve_tiers(out, device)
    return out


def resolve_tiers(spec: RunSpec, device) -> RunSpec:
    """A tiered spec's defaults made explicit: the host level's budget (its tier's expert budget, else
    its capacity) and cache (lru); a CPU placement needs the profile's cpu: section."""
    from devices.levels import cpu_of, lower_level
    from policies.spec import PolicySpec
    given = "placement" if spec.placement is not None else "host_budget" if spec.host_budget is not None else "host_cache"
    host = _named(given, lambda: lower_level(device))
    if spec.placement is not None and spec.placement.name != "gpu-only":
        _named("placement", lambda: cpu_of(device))
    budget = spec.host_budget if spec.host_budget is not None else host.expert_budget or host.capacity
    if budget > host.capacity:
        raise OverMemory(f"host_budget {format_size(budget)} is more than {device.name}'s {host.name} "
                         f"({format_size(host.capacity)}); give a smaller --host-budget")
    return spec.with_(host_budget=budget, host_cache=spec.host_cache or PolicySpec("lru"))


def check_spec(spec: RunSpec) -> RunSpec:
    """The checks a run makes before it runs, without running it (`sweep --check`, a grid's load):
    the device and storage, the model, the format for it, the cost model (a codec the device has no
    decompression figure for), the budget. Returns the spec resolved; errors name the key."""
    from policies.cost import CostModel
    device = spec_device(spec)
    spec = _named("storage", lambda: resolve(spec, device))
    model = _named("model", lambda: trace_model(spec.trace) if spec.model is None else model_of(spec))
    fmt = _named("format", lambda: spec.format.make(model.expert_shapes))
    _named("format", lambda: CostModel.build(device, model, fmt, device.storage_option(spec.storage)))
    return spec                  # a budget over the device's memory is the run's own outcome (OverMemory)


def spec_device(spec: RunSpec, device=None):
    """The spec's device profile (or `device`, a what-if variant of it) in the spec's power mode,
    whose caps scale the compute figures (devices/power.py)."""
    from devices.profile import load_device
    device = device or _named("device", lambda: load_device(spec.device or DEFAULT_DEVICE))
    if spec.power_mode is not None:
        from devices.power import with_mode
        device = _named("power_mode", lambda: with_mode(device, spec.power_mode))
    return device


def budget_bytes(spec: RunSpec, model, fmt, default: int) -> int:
    """The spec's budget in bytes: `all` (every expert resident), or the engine's default."""
    if spec.budget == "all":
        return every_expert_bytes(model, fmt)
    return default if spec.budget is None else int(spec.budget)


def costs(spec: RunSpec, device=None):
    """(model, format, cost model) of a spec, built as its run builds them, without a run: what a
    report reads (one expert's call time, the planner's delay model). The spec names its model."""
    from policies.cost import CostModel
    device = spec_device(spec, device)
    spec = resolve(spec, device)
    model = model_of(spec)
    fmt = store_format(spec, model, spec.format.make(model.expert_shapes))
    return model, fmt, CostModel.build(device, model, fmt, device.storage_option(spec.storage))


def _named(key: str, fn):
    try:
        return fn()
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def prepare(spec: RunSpec, timeline: bool = True, quiet: bool = True, device=None, storage=None) -> Prepared:
    """Build a run: device, model, routing, format (from the store where there is one), budget,
    the cost model once, and the policies planning with it. `device`: a profile object to use
    instead of loading spec.device (a what-if variant of it, e.g. slower compute); `storage`: a
    storage profile object instead of the device's own option (a measured host reading at a
    throttled device's storage speed: validate, calibrate)."""
    from policies import build_policies
    from policies.cost import CostModel
    from workloads.workload import Workload
    device = spec_device(spec, device)
    default_budget = spec.budget is None
    spec = resolve(spec, device, storage)
    storage = storage or device.storage_option(spec.storage)
    trace = None if spec.synthetic else read_trace(spec)
    model = model_of(spec, trace)
    fmt = store_format(spec, model, spec.format.make(model.expert_shapes), quiet)
    if trace is None:
        if timeline:
            check_run_fits(model, fmt, spec.batch * (spec.prompt_tokens + spec.tokens), spec.tokens,
                           "tokens or batch (--tokens, --batch)")
        trace = synthetic_for(spec, model)
    elif timeline:
        check_run_fits(model, fmt, trace.tokens, trace.tokens, "the trace (fewer requests or tokens)")
    budget = budget_bytes(spec, model, fmt, device.expert_budget_bytes)
    if budget > device.memory_bytes and spec.budget != "all":
        raise OverMemory(f"budget {format_size(budget)} is more than {device.name}'s memory "
                         f"({format_size(device.memory_bytes)}); give a smaller budget or another device")
    workload = Workload(model, trace, fmt, batch=spec.batch)
    memory = memory_split(spec, device, model, workload.kv, budget, default_budget)
    cost = CostModel.build(device, model, fmt, storage)
    try:
        policies = build_policies(workload, memory.budget, cost=cost, **spec.policy.kwargs())
    except BudgetError as e:
        if memory.note:                  # the budget is not the one asked for: say why
            raise type(e)(f"{e}; {memory.note}") from None
        raise
    policies.capacities = memory.capacities
    if spec.tiered:
        from policies.tiers import attach_tiers
        attach_tiers(policies, spec.host_budget, spec.host_cache.name, spec.host_cache.opts,
                     spec.placement.name if spec.placement else "gpu-only", spec.placement.opts if spec.placement else {})
    return Prepared(spec, device, storage, model, fmt, trace, workload, memory.budget, cost, policies, memory)


def memory_split(spec: RunSpec, device, model, kv, budget: int, default: bool, engine_default: int | None = None):
    """The run's memory split (workloads/memory.py), both engines': refused up front as OverMemory (a
    sweep's row) where it cannot fit. A budget equal to the profile's expert_budget counts as the
    default (resolve writes the default in), so it is capped, not refused."""
    from workloads.memory import MemoryRefused, split_memory
    default = default or (engine_default is None and budget == device.expert_budget_bytes)
    try:
        return split_memory(spec.kv, device, model, kv, None if default else budget, checked=spec.budget != "all",
                            default=engine_default)
    except MemoryRefused as e:
        raise OverMemory(str(e)) from None


# -- the run ---------------------------------------------------------------------------------------
def simulate(spec: RunSpec, timeline: bool = True, quiet: bool = True, device=None, storage=None,
             fast_path: bool = True) -> SimRun:
    """One simulator run of `spec`: its metrics (and timeline, unless timeline=False: the run then
    records no events, only what the metrics need). `device`, `storage`: as in `prepare`.
    `fast_path`: a fused loop carries the run out where one is proven equal to the policy objects
    for its bundle and device (sim/fast.py); False: the engine with the policy objects, always."""
    from sim.engine import Simulator
    from sim.fast import fused_for, run_fused
    from sim.tiers import TieredSimulator
    p = prepare(spec, timeline, quiet, device, storage)
    engine = TieredSimulator if p.spec.tiered else Simulator      # a host level: never a fused loop
    sim = engine(p.device, p.workload, p.policies, p.storage, cost=p.cost)
    if fast_path and not p.spec.tiered and fused_for(sim):
        tl = run_fused(sim, quiet=quiet, events=timeline)
    else:
        tl = sim.run(quiet=quiet, events=timeline)
    tl.meta["memory"] = p.memory.meta()
    return SimRun(p, run_metrics(p, tl), tl if timeline else None, tl)


def run_metrics(p: Prepared, tl) -> dict:
    """A run's metrics (timeline/metrics.py), the policies' own counters, and what was run."""
    from timeline.metrics import compute_metrics
    from workloads.formats import level_bits
    m = compute_metrics(tl, level_bits=level_bits(p.fmt))
    m.update(tl.meta.get("policy_report", {}))
    if "tier_figures" in tl.meta:                 # a host level (timeline/tiers.py); absent otherwise
        from timeline.tiers import tier_metrics
        tokens = sum(tl.figures.tokens_at.values()) if tl.figures is not None else \
            sum(e.tokens for e in tl.events if e.resource == "compute")
        m.update(tier_metrics(tl.meta["tier_figures"], m["makespan_s"], tokens), **tl.meta["tiers"])
    # energy in the run's power mode (devices/power.py, timeline/energy.py); null with the reason where the
    # device has no power figures; a timeline with events also carries the power as a counter track
    from devices.power import mode_powers
    from timeline.energy import Powers, energy_metrics, power_track
    try:
        powers = Powers.of(mode_powers(p.device.name, p.spec.power_mode, p.storage.name, p.device.decompress_workers))
    except ConfigError as e:
        m.update(power_mode=p.spec.power_mode, **energy_metrics(tl, None, m["generated_tokens"], str(e)))
    else:
        if tl.events:
            tl.meta["power_track"] = power_track(tl, powers)
        m.update(power_mode=powers.mode, **energy_metrics(tl, powers, m["generated_tokens"]))
    b = p.spec.policy
    m.update(device=p.device.name, storage=p.storage.name, model=p.model.name, format=p.fmt.name,
             policy=b.label(), cache=b.cache.name, scheduler=b.scheduler.name, allocator=b.allocator.name,
             prefetch=b.prefetch.name, budget_bytes=p.budget, batch=p.spec.batch, config_hash=p.spec.config_hash())
    return m


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimated_events(model, fmt, tokens: int, steps: int) -> int:
    """An upper bound on the timeline's events: every (token, layer, expert) a miss that is
    admitted, loaded (and decompressed) and evicted, computed once; a dense part per step and layer."""
    per_part = 3 + (1 if any(fmt.decompress_bytes) else 0)
    return model.layers * (tokens * model.top_k * (1 + per_part * fmt.n_parts) + steps)


def check_run_fits(model, fmt, tokens: int, steps: int, reduce: str) -> None:
    """Refuse, before running, a run whose timeline would not fit in memory."""
    need = estimated_events(model, fmt, tokens, steps) * BYTES_PER_EVENT
    avail = available_memory()
    if avail is not None and need > MEMORY_FRACTION * avail:
        raise ConfigError(f"this run's timeline would need about {format_size(need)} of memory ({tokens} tokens "
                          f"x {model.layers} layers; ~{BYTES_PER_EVENT} B per event), more than "
                          f"{MEMORY_FRACTION:.0%} of the {format_size(avail)} available; reduce {reduce}")
