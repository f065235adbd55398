"""The executor's run function: `execute(spec, host)` runs a run spec on this host's torch executor,
the only place that does. The spec states the configuration (the same one the simulator runs);
`HostOptions` how this host runs it (threads, reads in flight, a storage throttle, the prompts).

Here, once: the model (the shipped tiny-moe, a trained folder or a Hugging Face checkpoint), its
store for the spec's format (built if missing), the budget ("all", or a quarter of the experts'
bytes by default), the cost model planning policies read (a --cost-profile, the throttled device,
or the spec's device), and the policies (forced routing from a trace, or the model's own router).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from devices.units import MoelabError
from experiments.run import budget_bytes, default_store, every_expert_bytes, read_trace
from experiments.spec import DEFAULT_TOKENS, RunSpec


@dataclass(frozen=True)
class HostOptions:
    """How this host runs a spec (none of it changes the decisions)."""
    hf: str | None = None                 # a Hugging Face checkpoint folder instead of spec.model
    prompt: str | None = None             # prompt text of every request (default: distinct built-in prompts)
    throttle: str | None = None           # DEVICE[:STORAGE]: reads held to that storage's speed
    cost_profile: str | None = None       # DEVICE[:STORAGE]: the costs planning policies read
    io_concurrency: int = 2
    decompress_workers: int = 2
    torch_device: str = "cpu"
    torch_threads: int | None = None
    bit_router: str | None = None
    cost_device: tuple | None = None      # (device, storage) profile objects planning policies read
                                          #   instead (validate: the measured host, a throttled storage)


@dataclass
class ExecRun:
    spec: RunSpec
    metrics: dict
    timeline: object
    run: object                           # executor.execute.Run (tokens, peak RSS, reader mode)
    text: list[str] | None


def load_model(spec: RunSpec, host: HostOptions):
    """(model, tokenizer or None, name): a HF folder, a trained folder, or the shipped tiny-moe."""
    if host.hf:
        from executor.hf_checkpoint import load_hf_moe
        model, _ = load_hf_moe(host.hf)
        return model, None, Path(host.hf).name
    from executor.train import DEFAULT_MODEL, load_trained
    path = spec.model or DEFAULT_MODEL
    model, tok, _ = load_trained(path)
    return model, tok, Path(path).name


def cost_model(spec: RunSpec, host: HostOptions, arch, fmt):
    """What planning policies read: --cost-profile, else the throttled device, else the spec's device."""
    from devices.profile import load_device
    from policies.cost import CostModel
    if host.cost_device is not None:
        return CostModel.build(host.cost_device[0], arch, fmt, host.cost_device[1])
    source = host.cost_profile or host.throttle or spec.device
    if source is None:
        return None
    name, _, storage = source.partition(":")
    return CostModel.build(load_device(name), arch, fmt, storage or (spec.storage if source == spec.device else None))


def check_spec(spec: RunSpec, host: HostOptions | None = None) -> None:
    """What the executor cannot run, refused before a store is built."""
    if spec.tiered and host is not None and host.torch_device == "cuda" and spec.format.name != "bf16":
        raise MoelabError(f"execute: a host level on CUDA copies parts to the GPU and decodes them there; format "
                          f"{spec.format.name} decodes on the host only (numpy/numba): use --format bf16, or "
                          f"--torch-device cpu")
    if spec.tiered and host is not None:
        tier_levels(spec, host)               # a device without the level, a host budget over its RAM
    if spec.policy.prefetch.name == "oracle" and spec.synthetic:
        raise MoelabError("--prefetch oracle reads the routing ahead from a trace: give --trace, or use "
                          "--prefetch last-use with the model's own router")
    if spec.dense_bits not in (None, 16):
        raise MoelabError(f"dense_bits {spec.dense_bits}: the executor runs the model's dense weights as they are "
                          f"stored; quantized dense weights are a simulator what-if (`moelab simulate --dense-bits`)")


def execute(spec: RunSpec, host: HostOptions = HostOptions(), quiet: bool = True) -> ExecRun:
    """One executor run of `spec` on this host."""
    from executor.execute import execute as run_executor, strip_experts
    from executor.model import model_arch
    from executor.store_build import ensure_store
    from executor.io import StorageThrottle
    check_spec(spec, host)
    levels = tier_levels(spec, host) if spec.tiered else None
    if levels is not None:
        spec = levels[0]
    forced = None if spec.synthetic else read_trace(spec)
    model, tok, name = load_model(spec, host)
    level_fn = bit_router_for(spec, host, model, forced)
    folder = Path(spec.store) if spec.store else default_store(name, spec.format.name)
    store = ensure_store(model, folder, spec.format.name, quiet=quiet, **spec.format.options())
    strip_experts(model)
    fmt, arch = store.format, model_arch(model, name)
    total = every_expert_bytes(arch, fmt)
    budget = budget_bytes(spec, arch, fmt, total // 4)      # default: a quarter of every expert's bytes
    throttle = None
    if host.throttle:
        from devices.profile import load_device
        dev, _, storage = host.throttle.partition(":")
        throttle = StorageThrottle.from_profile(load_device(dev).storage_option(storage or None))
    from experiments.prompts import prompt_tokens
    prompts = prompt_tokens(host.prompt, tok, model.cfg.vocab, spec.batch, spec.seed)
    tokens = spec.tokens or DEFAULT_TOKENS
    memory = exec_memory(spec, arch, fmt, forced, prompts.shape, tokens, budget, total // 4)
    budget = memory.budget
    policies = build_bundle(spec, arch, fmt, budget, cost_model(spec, host, arch, fmt), forced)
    policies.capacities = memory.capacities
    if levels is not None:
        from policies.tiers import attach_tiers
        attach_tiers(policies, spec.host_budget, spec.host_cache.name, spec.host_cache.opts,
                     spec.placement.name if spec.placement else "gpu-only", spec.placement.opts if spec.placement else {})
    link, link_clock = levels[1:] if levels is not None else (None, None)
    b = spec.policy
    from executor.power import PowerMeter
    meter = PowerMeter()                  # the host's power, sampled on a thread while the run runs
    with meter:
        run = run_executor(model, store, policies, prompts, tokens, trace=forced, batch=spec.batch,
                           io_concurrency=host.io_concurrency, throttle=throttle,
                           decompress_workers=host.decompress_workers, torch_device=host.torch_device,
                           torch_threads=host.torch_threads, quiet=quiet, level_fn=level_fn, link=link,
                           link_throttle=link_clock,
                           meta={"model": name, "device": f"host ({host.torch_device})", "format": fmt.name,
                                 "budget_bytes": budget, "cache": b.cache.name, "scheduler": b.scheduler.name,
                                 "prefetcher": b.prefetch.name, "memory": memory.meta()})
    metrics = exec_metrics(spec, run, fmt, name, budget, total, host)
    metrics.update(meter.reading.metrics(metrics["generated_tokens"]))     # null with the reason where unmeasured
    if meter.reading.track() is not None:
        run.timeline.meta["power_track"] = meter.reading.track()
    text = [tok.decode(row.tolist()) for row in run.tokens] if tok is not None else None
    if text is not None:
        metrics["text"] = text
    return ExecRun(spec, metrics, run.timeline, run, text)


def tier_levels(spec: RunSpec, host: HostOptions):
    """(the spec with its host level's defaults explicit, the link, a clock holding copies to the --throttle
    device's link or None) of a tiered spec. The levels are the spec's device's, else the --throttle
    device's, else the --cost-profile's (execute has no --device); a one-level device is refused."""
    from devices.levels import lower_link
    from devices.profile import load_device
    from experiments.run import resolve_tiers
    from experiments.spec import DEFAULT_DEVICE
    name = spec.device or (host.throttle or host.cost_profile or DEFAULT_DEVICE).partition(":")[0]
    device = load_device(name)
    spec = resolve_tiers(spec, device)
    clock = None
    if host.throttle:
        throttled = load_device(host.throttle.partition(":")[0])
        if len(throttled.tiers) > 1:               # copies at least as slow as that device's link
            from executor.tiers import link_throttle
            clock = link_throttle(lower_link(throttled))
    return spec, lower_link(device), clock


def exec_memory(spec: RunSpec, arch, fmt, forced, prompts_shape, tokens: int, budget: int, default: int):
    """The run's memory split (workloads/memory.py) on the spec's device (the default one without it:
    the host itself has no profile), by the simulator's arithmetic: its KV steps from the forced
    trace's batching, else from the lockstep groups the executor decodes."""
    from devices.profile import load_device
    from experiments.run import memory_split, spec_device
    from experiments.spec import DEFAULT_DEVICE
    from workloads.memory import lockstep_kv
    from workloads.workload import Workload
    if forced is not None:
        kv = Workload(arch, forced, fmt, batch=spec.batch).kv
    else:
        kv = lockstep_kv(prompts_shape[0], spec.batch, prompts_shape[1], tokens - 1)
    device = spec_device(spec) if spec.device else load_device(DEFAULT_DEVICE)
    return memory_split(spec, device, arch, kv, budget, spec.budget is None, engine_default=default)


def build_bundle(spec: RunSpec, arch, fmt, budget: int, cost, forced):
    from policies import build_online_policies, build_policies
    from workloads.workload import Workload
    if forced is not None:
        return build_policies(Workload(arch, forced, fmt, batch=spec.batch), budget, cost=cost, **spec.policy.kwargs())
    return build_online_policies(arch, fmt, budget, cost=cost, **spec.policy.kwargs())


def exec_metrics(spec: RunSpec, run, fmt, name: str, budget: int, total: int, host: HostOptions) -> dict:
    from timeline.metrics import compute_metrics
    from workloads.formats import level_bits
    m = compute_metrics(run.timeline, level_bits=level_bits(fmt))
    m.update(run.timeline.meta.get("policy_report", {}))
    meta = run.timeline.meta
    if "tier_figures" in meta:                    # a host level (timeline/tiers.py), as run_metrics adds it
        from timeline.tiers import tier_metrics
        tokens = sum(e.tokens for e in run.timeline.events if e.resource == "compute")
        m.update(tier_metrics(meta["tier_figures"], m["makespan_s"], tokens), **meta["tiers"],
                 host_pinned=meta["host_pinned"])
    b = spec.policy
    m.update(model=name, format=fmt.name, policy=b.label(), cache=b.cache.name, scheduler=b.scheduler.name,
             allocator=b.allocator.name, prefetch=b.prefetch.name, budget_bytes=budget, expert_bytes_total=total,
             batch=spec.batch, peak_rss_bytes=run.peak_rss_bytes, read_mode=run.reader_mode,
             torch_device=host.torch_device, throttle=host.throttle)
    return m


def bit_router_for(spec: RunSpec, host: HostOptions, model, trace=None):
    """The --bit-router loaded and checked against the model and the format (None without one);
    `--allocator learned` without a router or a trace with levels is refused here."""
    from executor.bit_router import check_ladder, load_bit_router
    from workloads.formats import MWQ_LADDERS
    if spec.policy.allocator.name == "learned" and not host.bit_router and getattr(trace, "levels", None) is None:
        raise MoelabError("--allocator learned needs --bit-router PATH (`moelab train-bit-router` writes one) "
                          "or a --trace recorded with one")
    if not host.bit_router:
        return None
    router = load_bit_router(host.bit_router, model)
    if spec.format.name not in ("mwq", "copies"):
        raise MoelabError(f"--bit-router chooses MWQ levels: use --format mwq or copies, not {spec.format.name}")
    ladder = spec.format.ladder
    check_ladder(router, *MWQ_LADDERS.get(ladder, (None, None)), where=f"--bit-router {host.bit_router} "
                                                                       f"(--ladder {ladder})")
    return router

