"""`moelab trace stats|synth|import|record`, `replay` and `mrc`: routing traces and what caches make
of them without timing.
"""
from __future__ import annotations

from pathlib import Path

from devices.units import MoelabError
from experiments.cli.args import check_out_file

def cmd_replay(args) -> None:
    from sim.replay import replay_capacities
    from workloads.catalog import ModelArch
    from workloads.formats import make_format
    from workloads.importers import import_trace
    from workloads.workload import Workload
    trace = import_trace(args.trace)
    caps = [int(c) for c in args.capacities.split(",") if c.strip()]
    # capacities count whole experts, so any one-part expert size will do
    model = ModelArch("trace", layers=trace.layers, experts=trace.num_experts, top_k=trace.top_k, d_model=128,
                      d_ff=128, n_heads=1, n_kv_heads=1)
    workload = Workload(model, trace, make_format("bf16", model.expert_shapes), batch=args.batch)
    ratios = replay_capacities(workload, args.policy, caps)
    accesses = sum(len(set(trace.experts[s.tokens, layer].ravel().tolist()))
                   for s in workload.steps for layer in range(trace.layers))
    print(f"{'capacity':>10}  {'hit ratio':>9}   ({args.policy}, {accesses} accesses)")
    largest = max((len(set(trace.experts[s.tokens, layer].ravel().tolist()))
                   for s in workload.steps for layer in range(trace.layers)), default=0)
    for cap, r in ratios.items():
        print(f"{cap:>10}  {r:>9.4f}" if r is not None else
              f"{cap:>10}  {'-':>9}   (below the largest single-layer demand: {largest} experts)")

MRC_POLICIES = "lru,least-stale,layered-lru,layer-lru,layer-lfu,lfu,page-cache,belady"

def cmd_mrc(args) -> None:
    from policies import CACHES
    from sim.mrc import miss_ratio_curves, plot_mrc, stack_exact
    from workloads.catalog import ModelArch
    from workloads.formats import make_format
    from workloads.importers import import_trace
    from workloads.workload import Workload
    known = [n for n, c in CACHES.items() if "bf16" in getattr(c, "formats", ("bf16",))]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in known]
    if bad or not policies:
        raise MoelabError(f"--policies: unknown or not for whole experts: {', '.join(bad) or '(none given)'}; "
                          f"allowed: {', '.join(known)}")
    if args.out and not args.out.endswith(".png"):
        raise MoelabError(f"--out: expected a .png file name, got {args.out!r}")
    trace = import_trace(args.trace)
    model = ModelArch("trace", layers=trace.layers, experts=trace.num_experts, top_k=trace.top_k, d_model=128,
                      d_ff=128, n_heads=1, n_kv_heads=1)
    workload = Workload(model, trace, make_format("bf16", model.expert_shapes), batch=args.batch)
    keys = trace.layers * trace.num_experts
    caps = ([int(c) for c in args.capacities.split(",") if c.strip()] if args.capacities else
            sorted({max(1, round(keys * i / 24)) for i in range(1, 25)}))
    from tqdm import tqdm
    slow = [p for p in policies if not stack_exact(workload, p)]
    with tqdm(total=len(slow) * len(caps), disable=args.quiet, desc="mrc (replays)", unit="point") as bar:
        curves = miss_ratio_curves(workload, policies, caps, jobs=args.jobs, progress=bar.update)
    print(f"{'capacity':>10}  " + "  ".join(f"{p:>12}" for p in policies) + "   (hit ratio; - : cannot run)")
    for c in caps:
        print(f"{c:>10}  " + "  ".join(f"{curves[p][c]:>12.4f}" if curves[p][c] is not None else f"{'-':>12}"
                                      for p in policies))
    print(f"(capacities in experts; one token's working set = {trace.layers * trace.top_k}; "
          f"lru in one pass (Mattson), the rest replayed)")
    if args.out:
        import json
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot_mrc(curves, args.out, title=f"{args.trace} (batch {args.batch})")
        Path(args.out).with_suffix(".json").write_text(json.dumps({p: {str(c): r for c, r in cv.items()}
                                                                   for p, cv in curves.items()}, indent=1))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")

def cmd_trace_stats(args) -> None:
    from workloads.importers import import_trace
    from workloads.stats import format_stats, trace_stats
    print(format_stats(trace_stats(import_trace(args.file))))

def cmd_trace_synth(args) -> None:
    from experiments.run import synthetic_for
    from experiments.spec import RunSpec
    from workloads.catalog import get_model
    check_out_file(args.out)
    d = RunSpec()
    spec = RunSpec(model=args.model, requests=args.requests, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                   skew=d.skew if args.skew is None else args.skew,
                   locality=d.locality if args.locality is None else args.locality, seed=args.seed)
    trace = synthetic_for(spec, get_model(args.model))
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")


def cmd_trace_import(args) -> None:
    from workloads.importers import import_trace
    check_out_file(args.out)
    trace = import_trace(args.file, args.format, **dict(args.option))
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")

def cmd_trace_record(args) -> None:
    from executor.record import record_routing
    from experiments.prompts import prompt_tokens
    from experiments.run_exec import HostOptions, load_model
    from experiments.spec import RunSpec
    check_out_file(args.out)
    model, tok, name = load_model(RunSpec(model=args.model_dir), HostOptions(hf=args.hf))
    prompts = prompt_tokens(args.prompt, tok, model.cfg.vocab, args.requests, args.seed)
    router = None
    if args.bit_router:                # its ladder is its own: it writes levels, nothing checks a format
        from executor.bit_router import load_bit_router
        router = load_bit_router(args.bit_router, model)
    trace = record_routing(model, prompts, args.tokens, model_name=name, level_fn=router,
                           level_meta=router and {"path": str(args.bit_router), "ladder": router.ladder})
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k} "
          f"({args.requests} requests, {len(set(map(tuple, prompts.tolist())))} distinct prompts; replay it with "
          f"`moelab simulate --trace {args.out}`: the trace names its model)")


def add_parsers(sub, add) -> None:
    from experiments.cli.args import (TOKENS_HELP, EpilogFormatter, add_model_args, capacities_arg, key_value,
                                          positive_int, trace_import_epilog)
    from experiments.spec import DEFAULT_MODEL, DEFAULT_PROMPT_TOKENS, DEFAULT_TOKENS, RunSpec
    p = add(sub, "replay", help="hit ratio per cache capacity (experts), no timing")
    p.add_argument("--trace", required=True, help="routing trace (.npz, .jsonl, .csv dir, .npy)")
    p.add_argument("--policy", default="lru", help="cache policy (see `moelab policies`)")
    p.add_argument("--capacities", type=capacities_arg, default="8,16,32,64,128",
                   help="cache capacities to try, in experts, comma-separated")
    p.add_argument("--batch", type=positive_int, default=1, help="requests decoded in lockstep")
    p.set_defaults(func=cmd_replay)

    p = add(sub, "mrc", help="miss-ratio curves: hit ratio against capacity for several policies, belady the bound")
    p.add_argument("--trace", required=True, help="routing trace (.npz, .jsonl, .csv dir, .npy)")
    p.add_argument("--policies", default=MRC_POLICIES, help="cache policies, comma-separated")
    p.add_argument("--capacities", type=capacities_arg,
                   help="capacities in experts, comma-separated (default: 24 points up to every expert)")
    p.add_argument("--batch", type=positive_int, default=1, help="requests decoded in lockstep")
    p.add_argument("--jobs", type=positive_int, help="processes for the replayed policies (default: CPU count)")
    p.add_argument("--out", help="plot to this .png, and the curves to the .json beside it (default: print only)")
    p.set_defaults(func=cmd_mrc)

    tp = add(sub, "trace", help="routing traces: stats, synth, import, record").add_subparsers(
        dest="trace_cmd", required=True)
    p = add(tp, "stats", help="per-layer skew and reuse statistics")
    p.add_argument("file")
    p.set_defaults(func=cmd_trace_stats)
    d = RunSpec()
    p = add(tp, "synth", help="write a seeded synthetic trace")
    p.add_argument("--model", default=DEFAULT_MODEL, help="architecture from `moelab models`")
    p.add_argument("--requests", type=positive_int, default=1, help="requests in the trace")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, help="prompt tokens per request")
    p.add_argument("--tokens", type=positive_int, default=DEFAULT_TOKENS, help=TOKENS_HELP)
    p.add_argument("--skew", type=float, default=d.skew, help="expert popularity skew (0 = uniform)")
    p.add_argument("--locality", type=float, default=d.locality, help="per-slot reuse probability at the next token")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the generator")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=cmd_trace_synth)
    p = add(tp, "import", help="convert a JSONL / CSV / NumPy trace to .npz", epilog=trace_import_epilog(),
            formatter_class=EpilogFormatter)
    p.add_argument("file")
    p.add_argument("--format", choices=["jsonl", "csv", "numpy", "npz"], help="default: from the file's extension")
    p.add_argument("--option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="importer option, e.g. experts_field=topk_ids (repeatable; listed below)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=cmd_trace_import)
    p = add(tp, "record", help="record a real model's routing as a trace")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text of every request (default: distinct built-in prompts)")
    p.add_argument("--requests", type=positive_int, default=1, help="requests (distinct prompts)")
    p.add_argument("--tokens", type=positive_int, default=DEFAULT_TOKENS, help=TOKENS_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the built-in prompts")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--bit-router", metavar="PATH", help="write this bit-width router's levels into the trace "
                                                        "(replay them with --format mwq --allocator trace-levels)")
    p.set_defaults(func=cmd_trace_record)
