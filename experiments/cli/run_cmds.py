"""`moelab simulate` and `moelab execute`: one run each, stated as a run spec (experiments/spec.py)
and carried out by the engine's run function (experiments/run.py, experiments/run_exec.py).

The outputs are written before the summary is printed, so a closed stdout (`| head`) never loses
a run or reports one that wrote nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from devices.units import format_size
from experiments.cli.args import (SIZE_UNITS, TOKENS_HELP, add_dense_bits_arg, add_format_args, add_kv_arg,
                                      add_model_args, add_policy_args, add_spec_arg, add_trace_option_arg,
                                      add_workload_args, budget_arg, check_out_dir, check_torch_device, device_storage, positive_int)
from experiments.cli.output import hit_ratio_note, print_table, report_rows, summary_rows, write_outputs
from experiments.cli.spec_args import spec_from_args


def cmd_simulate(args) -> None:
    from experiments.run import simulate
    spec = spec_from_args(args)
    check_out_dir(args.out)
    run = simulate(spec, timeline=True, quiet=args.quiet, fast_path=not args.no_fast_path)
    m, p = run.metrics, run.prepared
    write_outputs(Path(args.out), run.timeline, m, quiet=True)
    b = p.spec.policy
    print(f"moelab simulate: {p.model.name} on {p.device.name} ({p.storage.name}), {p.fmt.name} experts, "
          f"{b.label()} ({b.cache.name} cache, {b.scheduler.name} loads, {b.prefetch.name} prefetch), budget "
          f"{format_size(p.budget)}, batch {p.spec.batch}, {m['generated_tokens']} new tokens")
    print_table(summary_rows(m) + report_rows(m))
    print(f"  {p.memory.summary()}")
    note = hit_ratio_note(m, run.timeline, p.budget, p.fmt)
    if note:
        print(note)
    print(f"wrote {Path(args.out) / 'metrics.json'}, timeline.json (Chrome trace: open in Perfetto), gantt.png")


def host_options(args):
    from experiments.run_exec import HostOptions
    for option in ("throttle", "cost_profile"):      # device names, before a store is built
        if getattr(args, option):
            setattr(args, option, ":".join(device_storage(getattr(args, option))))
    return HostOptions(hf=args.hf, prompt=args.prompt, throttle=args.throttle, cost_profile=args.cost_profile,
                       io_concurrency=args.io_concurrency, decompress_workers=args.decompress_workers,
                       torch_device=args.torch_device, torch_threads=args.torch_threads, bit_router=args.bit_router)


def cmd_execute(args) -> None:
    from experiments.cli.host_cmds import busy_host_warning
    from experiments.run_exec import check_spec, execute
    args.model = args.model_dir
    spec = spec_from_args(args)
    host = host_options(args)
    check_spec(spec, host)                # every check before a store build, not after
    check_torch_device(args.torch_device)
    check_out_dir(args.out)
    busy = busy_host_warning()
    if busy:
        print(busy, file=sys.stderr)
    run = execute(spec, host, quiet=args.quiet)
    m = run.metrics
    write_outputs(Path(args.out), run.timeline, m, quiet=True)
    print(f"moelab execute: {m['model']}, {m['format']} experts, {m['policy']} ({m['cache']} cache, "
          f"{m['prefetch']} prefetch), budget {format_size(m['budget_bytes'])} of "
          f"{format_size(m['expert_bytes_total'])}, batch {m['batch']}, reads: {m['read_mode']}"
          f"{', throttled like ' + host.throttle if host.throttle else ''}")
    print_table(summary_rows(m) + report_rows(m) + [("peak RSS", format_size(m["peak_rss_bytes"]))])
    if run.text is not None and not args.quiet:
        print("  text:", repr(run.text[0][-160:]))
    print(f"wrote {Path(args.out) / 'metrics.json'}, timeline.json (Chrome trace: open in Perfetto), gantt.png")


def add_parsers(sub, add) -> None:
    p = add(sub, "simulate", help="simulate a (device, workload, policy) run")
    p.add_argument("--device", help="profile from `moelab devices` or a YAML path (default: jetson-agx-orin-64gb)")
    p.add_argument("--storage", help="storage option of the device (default: the profile's)")
    p.add_argument("--power-mode", metavar="NAME",
                   help="the device's power mode, e.g. 15W (`moelab devices show DEVICE` lists them): its caps scale "
                        "the compute figures and set the powers of the energy metrics (default: the mode the "
                        "profile's figures are stated at)")
    add_workload_args(p)
    add_policy_args(p)
    add_format_args(p)
    p.add_argument("--budget", type=budget_arg, metavar="SIZE|all",
                   help=f"memory budget for experts, e.g. 3GB ({SIZE_UNITS}), or all (every expert resident); "
                        f"default: the device's expert budget")
    add_kv_arg(p)
    add_dense_bits_arg(p)
    add_spec_arg(p)
    p.add_argument("--out", default="runs/simulate", help="output folder (replaced as a whole by each run)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="run the policy objects even where a fused loop proven equal to them would (sim/fast.py): "
                        "the same outputs, slower; to compare")
    p.add_argument("--store", help="an expert store whose part sizes to use (default: runs/stores/MODEL-FORMAT "
                                   "when it exists, as `moelab execute` builds it)")
    p.set_defaults(func=cmd_simulate)

    p = add(sub, "execute", help="run a real model with experts loaded on demand under a policy",
            epilog="execute runs on this host: it has no --device; --throttle DEVICE[:STORAGE] makes the disk "
                   "behave like a device's storage, --cost-profile DEVICE[:STORAGE] sets the costs planning "
                   "policies read")
    add_model_args(p)
    add_format_args(p)
    p.add_argument("--store", help="store folder (default: runs/stores/MODEL-FORMAT, built if missing)")
    add_policy_args(p)
    p.add_argument("--budget", type=budget_arg, metavar="SIZE|all",
                   help=f"expert memory budget ({SIZE_UNITS}), or all; default: a quarter of all experts' bytes")
    add_kv_arg(p)
    p.add_argument("--batch", type=positive_int, help="requests decoded in lockstep (default: 1)")
    p.add_argument("--tokens", type=positive_int, help=f"{TOKENS_HELP} (default: 64; with --trace, the trace's own)")
    p.add_argument("--prompt", help="prompt text of every request (default: distinct built-in prompts)")
    p.add_argument("--trace", help="force routing from this trace (as `moelab simulate --trace` replays it)")
    add_trace_option_arg(p)
    add_spec_arg(p)
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="make the disk behave like a device's storage")
    p.add_argument("--cost-profile", metavar="DEVICE[:STORAGE]",
                   help="device profile whose costs planning policies read (default: the --throttle device, else "
                        "the --spec's device)")
    p.add_argument("--io-concurrency", type=positive_int, default=2, help="reads in flight")
    p.add_argument("--decompress-workers", type=positive_int, default=2, help="decompression threads (zip)")
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"], help="where experts compute")
    p.add_argument("--torch-threads", type=positive_int,
                   help="torch intra-op threads (default: on CPU: all cores but one, left to the I/O and "
                        "decompression workers)")
    p.add_argument("--out", default="runs/execute", help="output folder (replaced as a whole by each run)")
    p.add_argument("--bit-router", metavar="PATH", help="a bit-width router (`moelab train-bit-router`) choosing "
                                                        "each token's MWQ level; use with --allocator learned")
    p.set_defaults(func=cmd_execute)

