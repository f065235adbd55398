"""`moelab`: the command line. Every subcommand is a thin layer over a library call."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from devices.units import MoelabError, format_size, parse_size

DEFAULTS = {"device": "jetson-agx-orin-64gb", "model": "mixtral-8x7b", "policy": "lru", "batch": 1,
            "tokens": 64, "prompt": 16, "seed": 0}


# -- shared helpers --------------------------------------------------------------------
def load_workload_trace(args, model):
    """The trace a run uses: a file if given, else a seeded synthetic one."""
    from workloads.synthetic import synthetic_trace
    if args.trace:
        from workloads.importers import import_trace
        trace = import_trace(args.trace)
        trace.metadata.setdefault("path", str(args.trace))
        return trace
    return synthetic_trace(model, requests=args.batch, prompt_len=args.prompt, output_len=args.tokens,
                           skew=args.skew, locality=args.locality, seed=args.seed)


def make_format_for(model, name: str, codec: str | None = None):
    from workloads.formats import make_format
    opts = {}
    if name == "mwq":
        opts["ladder"] = "v1"
    if name == "zip" and codec:
        opts["codec"] = codec
    return make_format(name, model.expert_shapes, **opts)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def summary_rows(m: dict) -> list[tuple[str, str]]:
    return [
        ("TTFT", f"{m['ttft_s'] * 1e3:.2f} ms"),
        ("TPOT mean / p50 / p99", f"{m['tpot_s_mean'] * 1e3:.2f} / {m['tpot_s_p50'] * 1e3:.2f} / "
                                  f"{m['tpot_s_p99'] * 1e3:.2f} ms"),
        ("throughput", f"{m['throughput_tok_s']:.2f} tok/s"),
        ("peak expert memory", format_size(m["peak_expert_bytes"])),
        ("bytes read", format_size(m["bytes_read"])),
        ("hit ratio", f"{m['hit_ratio']:.3f}" + (f" ({m['prefetches']} prefetched loads)" if m["prefetches"] else "")),
        ("compute bubble", f"{m['compute_bubble_fraction']:.3f}"),
        ("I/O busy", f"{m['io_busy_fraction']:.3f}"),
    ]


def write_outputs(out: Path, timeline, metrics: dict, quiet: bool = False) -> None:
    from sim.plot import gantt
    from sim.timeline import write_json_atomic
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "timeline.json", timeline.chrome_trace())
    gantt(timeline, out / "gantt.png")
    if not quiet:
        print(f"wrote {out / 'metrics.json'}, {out / 'timeline.json'} (Chrome trace: open in Perfetto), "
              f"{out / 'gantt.png'}")


# -- subcommands -------------------------------------------------------------------------
def cmd_simulate(args) -> None:
    from devices.profile import load_device
    from sim.engine import Simulator, Workload, build_policies
    from sim.metrics import compute_metrics
    from workloads.catalog import get_model

    device = load_device(args.device)
    storage = device.storage_option(args.storage)
    model = get_model(args.model)
    trace = load_workload_trace(args, model)
    fmt = make_format_for(model, args.format, args.codec)
    workload = Workload(model, trace, fmt, batch=args.batch)
    budget = parse_size(args.budget, "--budget") if args.budget else device.expert_budget_bytes
    policies = build_policies(workload, budget, cache=args.policy, scheduler=args.scheduler, prefetch=args.prefetch)
    timeline = Simulator(device, workload, policies, storage).run(quiet=args.quiet)
    metrics = compute_metrics(timeline)
    metrics.update(device=device.name, storage=storage.name, model=model.name, format=fmt.name,
                   policy=args.policy, scheduler=args.scheduler, prefetch=args.prefetch, budget_bytes=budget,
                   batch=args.batch)
    print(f"moelab simulate: {model.name} on {device.name} ({storage.name}), {fmt.name} experts, "
          f"{args.policy} cache, {args.scheduler} loads, {args.prefetch} prefetch, budget {format_size(budget)}, "
          f"batch {args.batch}, "
          f"{metrics['generated_tokens']} tokens")
    print_table(summary_rows(metrics))
    write_outputs(Path(args.out), timeline, metrics, args.quiet)


def cmd_replay(args) -> None:
    from sim.replay import replay_units, unit_groups
    from workloads.batching import batch_steps
    from workloads.importers import import_trace
    trace = import_trace(args.trace)
    caps = [int(c) for c in args.capacities.split(",") if c.strip()]
    groups = unit_groups(trace, batch_steps(trace, args.batch))
    ratios = replay_units(groups, args.policy, caps)
    print(f"{'capacity':>10}  {'hit ratio':>9}   ({args.policy}, {sum(map(len, groups))} accesses)")
    largest = max(map(len, groups), default=0)
    for cap, r in ratios.items():
        print(f"{cap:>10}  {r:>9.4f}" if r is not None else
              f"{cap:>10}  {'-':>9}   (below the largest single-layer demand: {largest} experts)")


def cmd_devices(args) -> None:
    from devices.profile import list_devices, load_device
    if args.name:
        print(load_device(args.name).describe())
        return
    for name in list_devices():
        d = load_device(name)
        print(f"  {name:<24} {format_size(d.memory_bytes):>9}  storage: {', '.join(d.storage)} "
              f"(default {d.default_storage})")


def cmd_models(args) -> None:
    from workloads.catalog import CATALOG
    print(f"  {'name':<20} {'layers':>6} {'experts':>7} {'top-k':>5} {'d_model':>7} {'d_ff':>6} {'expert':>9}")
    for m in CATALOG.values():
        print(f"  {m.name:<20} {m.layers:>6} {m.experts:>7} {m.top_k:>5} {m.d_model:>7} {m.d_ff:>6} "
              f"{format_size(m.expert_bytes):>9}")


def cmd_policies(args) -> None:
    from policies import ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS
    for title, table in (("cache", CACHES), ("scheduler", SCHEDULERS), ("allocator", ALLOCATORS),
                         ("prefetch", PREFETCHERS)):
        print(f"  {title + ':':<11} {', '.join(table)}")


def cmd_trace_stats(args) -> None:
    from workloads.importers import import_trace
    from workloads.stats import format_stats, trace_stats
    print(format_stats(trace_stats(import_trace(args.file))))


def cmd_trace_synth(args) -> None:
    from workloads.catalog import get_model
    from workloads.synthetic import synthetic_trace
    model = get_model(args.model)
    trace = synthetic_trace(model, requests=args.requests, prompt_len=args.prompt, output_len=args.tokens,
                            skew=args.skew, locality=args.locality, seed=args.seed)
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")


def cmd_trace_import(args) -> None:
    from workloads.importers import import_trace
    options = dict(kv.split("=", 1) for kv in args.option)
    trace = import_trace(args.file, args.format, **options)
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")


# -- executor subcommands (torch imported only here) ------------------------------------
DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def load_model(args):
    """(model, tokenizer or None, name): the trained default, a trained folder, or a HF folder."""
    if getattr(args, "hf", None):
        from executor.hf_checkpoint import load_hf_moe
        model, _ = load_hf_moe(args.hf)
        return model, None, Path(args.hf).name
    from executor.train import DEFAULT_MODEL, load_trained
    path = args.model_dir or DEFAULT_MODEL
    model, tok, _ = load_trained(path)
    return model, tok, Path(path).name


def default_store_dir(args, name: str) -> Path:
    return Path(args.store) if args.store else Path("runs") / "stores" / f"{name}-{args.format}"


def format_options(args) -> dict:
    if args.format == "mwq":
        return {"ladder": "v1"}
    if args.format == "zip":
        return {"codec": args.codec or "lz4hc"}
    return {}


def cmd_train(args) -> None:
    from executor.train import train
    log = train(args.out, minutes=args.minutes, seed=args.seed, quiet=args.quiet)
    print(json.dumps({k: v for k, v in log.items() if k not in ("history", "losses")}, indent=1, default=str))


def cmd_store_build(args) -> None:
    from executor.execute import ensure_store
    model, _, name = load_model(args)
    store = ensure_store(model, default_store_dir(args, name), args.format, quiet=args.quiet, **format_options(args))
    fmt = store.format
    print(f"store {store.path}: {fmt.name}, {len(store.keys())} blobs, {format_size(fmt.expert_bytes)} per expert "
          f"({fmt.n_parts} parts)")


def prompt_tokens(args, tok, vocab: int, requests: int):
    import torch
    text = args.prompt or DEFAULT_PROMPT
    ids = tok.encode(text) if tok is not None else [t % vocab for t in text.encode()]
    return torch.tensor([ids] * requests, dtype=torch.long)


def cmd_execute(args) -> None:
    from devices.profile import load_device
    from executor.execute import ensure_store, execute, model_arch, strip_experts
    from executor.io import StorageThrottle
    from sim.engine import Workload, build_online_policies, build_policies
    from sim.metrics import compute_metrics

    if args.prefetch == "oracle" and not args.trace:       # before a store build, not after
        raise MoelabError("--prefetch oracle reads the routing ahead from a trace: give --trace, or use "
                          "--prefetch last-use with the model's own router")
    model, tok, name = load_model(args)
    store = ensure_store(model, default_store_dir(args, name), args.format, quiet=args.quiet, **format_options(args))
    strip_experts(model)
    fmt, arch = store.format, model_arch(model, name)
    total = arch.layers * arch.experts * fmt.level_bytes(fmt.levels - 1)
    budget = parse_size(args.budget, "--budget") if args.budget else total // 4
    trace = None
    if args.trace:
        from workloads.importers import import_trace
        trace = import_trace(args.trace)
        w = Workload(arch, trace, fmt, batch=args.batch)
        policies = build_policies(w, budget, cache=args.policy, scheduler=args.scheduler, prefetch=args.prefetch)
    else:
        policies = build_online_policies(arch, fmt, budget, cache=args.policy, scheduler=args.scheduler,
                                         prefetch=args.prefetch)
    throttle = None
    if args.throttle:
        dev_name, _, storage = args.throttle.partition(":")
        throttle = StorageThrottle.from_profile(load_device(dev_name).storage_option(storage or None))
    prompts = prompt_tokens(args, tok, model.cfg.vocab, args.batch)
    run = execute(model, store, policies, prompts, args.tokens, trace=trace, batch=args.batch,
                  io_concurrency=args.io_concurrency, throttle=throttle, decompress_workers=args.decompress_workers,
                  torch_device=args.torch_device, torch_threads=args.torch_threads, quiet=args.quiet,
                  meta={"model": name, "device": f"host ({args.torch_device})", "format": fmt.name,
                        "budget_bytes": budget, "cache": args.policy, "scheduler": args.scheduler,
                        "prefetcher": args.prefetch})
    metrics = compute_metrics(run.timeline)
    metrics.update(model=name, format=fmt.name, policy=args.policy, scheduler=args.scheduler,
                   prefetch=args.prefetch, budget_bytes=budget,
                   expert_bytes_total=total, batch=args.batch, peak_rss_bytes=run.peak_rss_bytes,
                   read_mode=run.reader_mode, torch_device=args.torch_device,
                   throttle=args.throttle or None)
    if tok is not None:
        metrics["text"] = [tok.decode(row.tolist()) for row in run.tokens]
    print(f"moelab execute: {name}, {fmt.name} experts from {store.path}, {args.policy} cache, budget "
          f"{format_size(budget)} of {format_size(total)}, {args.prefetch} prefetch, batch {args.batch}, "
          f"reads: {run.reader_mode}"
          f"{', throttled like ' + args.throttle if args.throttle else ''}")
    print_table(summary_rows(metrics) + [("peak RSS", format_size(run.peak_rss_bytes))])
    if tok is not None and not args.quiet:
        print("  text:", repr(metrics["text"][0][-160:]))
    write_outputs(Path(args.out), run.timeline, metrics, args.quiet)


def cmd_trace_record(args) -> None:
    from executor.record import record_routing
    model, tok, name = load_model(args)
    prompts = prompt_tokens(args, tok, model.cfg.vocab, args.requests)
    trace = record_routing(model, prompts, args.tokens, model_name=name)
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k} "
          f"({args.requests} requests; replay it with `moelab simulate --trace {args.out} ...`)")


def add_model_args(p) -> None:
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--hf", help="a local Hugging Face MoE checkpoint folder (Mixtral, Qwen2-MoE, OLMoE)")


# -- parser -----------------------------------------------------------------------------------
def add_workload_args(p) -> None:
    p.add_argument("--model", default=DEFAULTS["model"], help="architecture from `moelab models`")
    p.add_argument("--trace", help="routing trace (.npz, .jsonl, .csv dir, .npy); default: synthetic")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="requests decoded in lockstep")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="output tokens per request (synthetic)")
    p.add_argument("--prompt", type=int, default=DEFAULTS["prompt"], help="prompt tokens per request (synthetic)")
    # defaults calibrated on public Mixtral-8x7B decode traces (peers.md): top-2 share ~0.35, reuse ~0.6
    p.add_argument("--skew", type=float, default=0.4, help="expert popularity skew (synthetic; 0 = uniform)")
    p.add_argument("--locality", type=float, default=0.15, help="per-slot reuse probability at the next token "
                                                                 "(synthetic)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moelab", description="On-device MoE serving policies: simulate, execute, compare.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(group, name, **kw):          # every subcommand takes --quiet
        return group.add_parser(name, parents=[common], **kw)

    p = add(sub, "simulate", help="simulate a (device, workload, policy) run")
    p.add_argument("--device", default=DEFAULTS["device"], help="profile from `moelab devices` or a YAML path")
    p.add_argument("--storage", help="storage option of the device (default: the profile's)")
    add_workload_args(p)
    p.add_argument("--policy", default=DEFAULTS["policy"], help="cache policy (see `moelab policies`)")
    p.add_argument("--scheduler", default="fifo", help="load scheduler")
    p.add_argument("--prefetch", default="none", help="prefetcher: none, last-use, oracle (needs the trace)")
    p.add_argument("--format", default="bf16", choices=["bf16", "mwq", "zip"], help="expert storage format")
    p.add_argument("--codec", help="zip format codec (lz4, lz4hc, zstd)")
    p.add_argument("--budget", help="memory budget for experts, e.g. 40GB (default: the device's)")
    p.add_argument("--out", default="runs/simulate", help="output folder")
    p.set_defaults(func=cmd_simulate)

    p = add(sub, "replay", help="hit ratio per cache capacity (experts), no timing")
    p.add_argument("--trace", required=True)
    p.add_argument("--policy", default="lru")
    p.add_argument("--capacities", default="8,16,32,64,128")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_replay)

    p = add(sub, "devices", help="list device profiles, or `devices show NAME`")
    p.add_argument("action", nargs="?", choices=["show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_devices)

    add(sub, "models", help="list the architecture catalog").set_defaults(func=cmd_models)
    add(sub, "policies", help="list the registered policies").set_defaults(func=cmd_policies)

    tp = add(sub, "trace", help="routing traces: stats, synth, import, record").add_subparsers(
        dest="trace_cmd", required=True)
    p = add(tp, "stats", help="per-layer skew and reuse statistics")
    p.add_argument("file")
    p.set_defaults(func=cmd_trace_stats)
    p = add(tp, "synth", help="write a seeded synthetic trace")
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--prompt", type=int, default=DEFAULTS["prompt"])
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    p.add_argument("--skew", type=float, default=0.4)
    p.add_argument("--locality", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_trace_synth)
    p = add(tp, "import", help="convert a JSONL / CSV / NumPy trace to .npz")
    p.add_argument("file")
    p.add_argument("--format", choices=["jsonl", "csv", "numpy", "npz"])
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="importer option, e.g. experts_field=topk_ids")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_trace_import)
    p = add(sub, "train", help="train the small MoE LM on the Python standard library's sources")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    sp = add(sub, "store", help="expert stores").add_subparsers(dest="store_cmd", required=True)
    p = add(sp, "build", help="write a model's experts as an on-disk store (resumable)")
    add_model_args(p)
    p.add_argument("--format", default="bf16", choices=["bf16", "mwq", "zip"])
    p.add_argument("--codec", help="zip codec: lz4, lz4hc, zstd")
    p.add_argument("--store", "--out", dest="store", help="store folder (default runs/stores/MODEL-FORMAT)")
    p.set_defaults(func=cmd_store_build)

    p = add(sub, "execute", help="run a real model with experts loaded on demand under a policy")
    add_model_args(p)
    p.add_argument("--format", default="bf16", choices=["bf16", "mwq", "zip"])
    p.add_argument("--codec", help="zip codec: lz4, lz4hc, zstd")
    p.add_argument("--store", help="store folder (default runs/stores/MODEL-FORMAT, built if missing)")
    p.add_argument("--policy", default="lru")
    p.add_argument("--scheduler", default="fifo")
    p.add_argument("--prefetch", default="none", help="prefetcher: none, last-use, oracle (with --trace)")
    p.add_argument("--budget", help="expert memory budget (default: a quarter of all experts)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--trace", help="force routing from this trace (as `moelab simulate --trace` replays it)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="make the disk behave like a device's storage")
    p.add_argument("--io-concurrency", type=int, default=2)
    p.add_argument("--decompress-workers", type=int, default=2)
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default on CPU: all cores but one, "
                                                     "left to the I/O and decompression workers)")
    p.add_argument("--out", default="runs/execute")
    p.set_defaults(func=cmd_execute)

    p = add(tp, "record", help="record a real model's routing as a trace")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_trace_record)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "devices" and args.action == "show" and not args.name:
        print("error: `moelab devices show NAME` needs a device name", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:          # `moelab ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
