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
    if args.fit:
        trace = synth_fitted(args)
    else:
        d = RunSpec()
        spec = RunSpec(model=args.model, requests=args.requests, tokens=args.tokens,
                       prompt_tokens=args.prompt_tokens, skew=d.skew if args.skew is None else args.skew,
                       locality=d.locality if args.locality is None else args.locality, seed=args.seed)
        trace = synthetic_for(spec, get_model(args.model))
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")


def synth_fitted(args):
    """`trace synth --fit FIT.yaml` (or `--fit catalog`: the model's published statistics), with the
    token convention of every command: --tokens new tokens, the prefill making the first."""
    from workloads.catalog import get_model
    from workloads.fit import load_fit
    from workloads.fitted import synth_from_fit
    from workloads.synthetic import synthetic_trace
    decode = args.tokens - 1 if args.prompt_tokens > 0 else args.tokens
    if args.fit == "catalog":
        return synthetic_trace(get_model(args.model), requests=args.requests, prompt_len=args.prompt_tokens,
                               output_len=decode, seed=args.seed, fit="catalog")
    return synth_from_fit(load_fit(args.fit), args.requests, args.prompt_tokens, decode, args.seed)


def cmd_trace_import(args) -> None:
    from workloads.importers import import_trace
    check_out_file(args.out)
    trace = import_trace(args.file, args.format, **dict(args.option))
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")

def cmd_trace_record_hf(args) -> None:
    """A Hugging Face checkpoint's own routing, recorded through transformers (executor/hf_record.py)."""
    import torch

    from executor.hf_record import load_prompts, record_hf
    prompts = load_prompts(args.prompts, field=args.prompt_field) if args.prompts else None
    if prompts is None and args.prompt:
        prompts = [args.prompt] * args.requests
    result = record_hf(args.hf, args.out, prompts=prompts, requests=args.requests, new_tokens=args.tokens,
                       batch=args.batch, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, width=args.lookahead_width, max_prompt_tokens=args.max_prompt_tokens,
                       dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype],
                       device=args.torch_device, quiet=args.quiet)
    cut = " (interrupted: what was recorded is kept)" if result["interrupted"] else ""
    print(f"wrote {result['path']}: {result['tokens']} tokens x {result['layers']} layers{cut}; replay it with "
          f"`moelab simulate --trace {args.out}` (the trace names its architecture)")


def cmd_trace_compare(args) -> None:
    from workloads.compare import compare_traces, format_compare
    from workloads.importers import import_trace
    print(format_compare(compare_traces(import_trace(args.a), import_trace(args.b), batch=args.batch),
                         (args.a, args.b)))


def cmd_trace_fit(args) -> None:
    from tqdm import tqdm

    from workloads.fit import fit_trace, save_fit
    from workloads.importers import import_trace
    check_out_file(args.out)
    trace = import_trace(args.trace)
    with tqdm(total=args.iterations, disable=args.quiet, desc="fit", unit="round") as bar:
        fit = fit_trace(trace, iterations=args.iterations, topic_count=args.topics, seed=args.seed,
                        progress=lambda *_: bar.update())
    save_fit(fit, args.out)
    print(f"wrote {args.out}: the synthetic generator fitted to {args.trace} "
          f"(`moelab trace synth --fit {args.out}` generates routing like it)")


def cmd_trace_record(args) -> None:
    if args.hf:
        return cmd_trace_record_hf(args)
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
    from experiments.cli.args import (TOKENS_HELP, EpilogFormatter, capacities_arg, key_value,
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
    p.add_argument("--fit", metavar="FIT.yaml|catalog", help="generate like a fitted trace (`moelab trace fit`), or "
                                                             "like --model's published routing statistics (catalog)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=cmd_trace_synth)
    p = add(tp, "compare", help="two traces side by side, and the distance between their LRU miss-ratio curves")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--batch", type=positive_int, help="decision points as the engines batch them (default: "
                                                      "each token's layers)")
    p.set_defaults(func=cmd_trace_compare)
    p = add(tp, "fit", help="fit the synthetic generator to a trace (per-layer popularity, locality, cross-layer "
                            "correlation, request drift)")
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="the fit (YAML) to write")
    p.add_argument("--topics", type=positive_int, help="latent topics shared by the layers (default: chosen)")
    p.add_argument("--iterations", type=positive_int, default=16, help="calibration rounds at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit")
    p.set_defaults(func=cmd_trace_fit)
    p = add(tp, "import", help="convert a JSONL / CSV / NumPy trace to .npz", epilog=trace_import_epilog(),
            formatter_class=EpilogFormatter)
    p.add_argument("file")
    p.add_argument("--format", choices=["jsonl", "csv", "numpy", "npz"], help="default: from the file's extension")
    p.add_argument("--option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="importer option, e.g. experts_field=topk_ids (repeatable; listed below)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=cmd_trace_import)
    _add_record_parser(tp, add)


def _add_record_parser(tp, add) -> None:
    from experiments.cli.args import TOKENS_HELP, add_model_args, positive_int
    from experiments.spec import DEFAULT_TOKENS
    p = add(tp, "record", help="record a real model's routing as a trace")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text of every request (default: distinct built-in prompts)")
    p.add_argument("--requests", type=positive_int, default=1, help="requests (distinct prompts)")
    p.add_argument("--tokens", type=positive_int, default=DEFAULT_TOKENS, help=TOKENS_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the built-in prompts")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--bit-router", metavar="PATH", help="write this bit-width router's levels into the trace "
                                                        "(replay them with --format mwq --allocator trace-levels)")
    g = p.add_argument_group("with --hf (recorded through transformers)")
    g.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or JSONL with --prompt-field "
                                                     "(default: --requests seeded built-in prompts)")
    g.add_argument("--prompt-field", default="text", help="the JSONL field holding a prompt")
    g.add_argument("--batch", type=positive_int, default=1, help="requests decoded together")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's top-p")
    g.add_argument("--lookahead-width", type=positive_int, help="next-layer predictions kept per token "
                                                                "(default: 2 x top-k)")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=512, help="prompts cut to this many tokens")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    g.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    p.set_defaults(func=cmd_trace_record)
