"""`moelab`: the command line. Every subcommand is a thin layer over a library call.

Errors the user can fix (bad options, files, names) are one line, `error: ...`, exit 2;
Ctrl-C is one line, exit 130.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from devices.units import ConfigError, MoelabError, format_size, parse_size

FORMAT_NAMES = ["bf16", "mwq", "zip", "copies"]       # workloads/formats.py FORMATS (not imported at start-up)
DEFAULTS = {"device": "jetson-agx-orin-64gb", "model": "mixtral-8x7b", "policy": "lru", "batch": 1,
            "tokens": 64, "prompt": 16, "seed": 0}
SIZE_UNITS = "GB = 10^9 bytes, GiB = 2^30 bytes; also KB, MB, KiB, MiB, or a bare number of bytes"
TOKENS_HELP = ("new tokens per request: the prefill makes the first, each decode step one more "
               "(--tokens 1 is the prefill alone)")
RUN_FILES = ("metrics.json", "timeline.json", "gantt.png")


# -- argument types and checks (errors name the option; argparse prefixes "argument --X:") --
class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a MoelabError: one line, `error: ...`, exit 2."""

    def error(self, message):
        raise MoelabError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None / False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def size_arg(text: str) -> int:
    """A size in bytes ("3GB", "2.5MiB"): > 0 and finite."""
    try:
        value = parse_size(text, "size")
    except OverflowError:             # "1e400" reads as infinity
        value = None
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    if value is None or not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size between 1 byte and 2^63 bytes ({SIZE_UNITS})")
    return value


def capacities_arg(text: str) -> str:
    """Comma-separated positive integers, e.g. "8,16,32" (returned normalised)."""
    caps = []
    for c in (c.strip() for c in text.split(",")):
        if not c:
            continue
        try:
            caps.append(positive_int(c))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of experts >= 1, "
                                             f"e.g. 8,16,32; got {c!r} in {text!r}") from None
    if not caps:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of experts >= 1, got {text!r}")
    return ",".join(map(str, caps))


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. experts_field=topk_ids; got {text!r}")
    return key.strip(), value


def _probe_writable(folder: Path, option: str, target: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{option} {target}: cannot write in {folder} ({e.strerror})") from None


def _existing_ancestor(path: Path, option: str) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            return parent
    raise ConfigError(f"{option} {path}: no existing parent folder")


def check_out_dir(path, option: str = "--out", run_files: tuple[str, ...] | None = RUN_FILES) -> Path:
    """Before a run: `path` can become a folder we write. With run_files, an existing folder may
    hold only a previous run's outputs (it is replaced as a whole, never mixed)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path}: is a file; give a folder (new, or one a previous run wrote)")
        if run_files is not None:
            other = sorted(p.name for p in path.iterdir() if p.name not in run_files)
            if other:
                raise ConfigError(f"{option} {path}: holds other files ({', '.join(other[:3])}"
                                  f"{', ...' if len(other) > 3 else ''}); a run replaces its whole --out folder, "
                                  f"so give a new folder or one only a previous run wrote")
        _probe_writable(path if run_files is None else path.parent, option, path)
    else:
        _probe_writable(_existing_ancestor(path, option), option, path)
    return path


def check_out_file(path, option: str = "--out") -> Path:
    """Before a run: `path` can become a file we write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    _probe_writable(path.parent if path.parent.is_dir() else _existing_ancestor(path, option), option, path)
    return path


# -- shared helpers --------------------------------------------------------------------
def importer_options() -> dict[str, list[str]]:
    """The options each trace importer takes (`--option KEY=VALUE`), read from its signature."""
    import inspect

    from workloads import importers
    return {name: [p.name for p in inspect.signature(getattr(importers, f"import_{name}")).parameters.values()
                   if p.kind == p.KEYWORD_ONLY or (p.default is not p.empty and p.kind != p.VAR_KEYWORD)]
            for name in ("jsonl", "csv", "numpy")}


def import_trace_file(args):
    """The --trace file, read with the --option importer options (an error that names an
    option says how to give it from this command)."""
    from workloads.importers import import_trace
    options = dict(getattr(args, "option", None) or [])
    try:
        trace = import_trace(args.trace, **options)
    except ConfigError as e:
        import re
        names = {o for opts in importer_options().values() for o in opts}
        if "--option" in str(e) or Path(args.trace).suffix.lower() == ".npz" or \
                not any(re.search(rf"\b{n}\b", str(e)) for n in names):
            raise
        raise ConfigError(f"{e} (give importer options here as --option KEY=VALUE; "
                          f"`moelab trace import --help` lists them)") from None
    trace.metadata.setdefault("path", str(args.trace))
    return trace


def model_for(args, trace):
    """--model, else the model the trace names (its recorded architecture, or a catalog name),
    else the default."""
    from workloads.catalog import get_model, model_of_trace
    if args.model is not None:
        return get_model(args.model)
    named = model_of_trace(trace.metadata, str(args.trace)) if trace is not None else None
    return named or get_model(DEFAULTS["model"])


# one Event in memory (~0.2 KB), its Chrome-trace dict (~0.9 KB) and its JSON text (~0.3 KB),
# measured on `simulate` runs with tracemalloc; a run holds them all at once when it writes
BYTES_PER_EVENT = 1400
MEMORY_FRACTION = 0.5


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


def load_workload_trace(args, model, fmt=None):
    """The trace a run uses: a file if given, else a seeded synthetic one with --tokens new
    tokens per request (the prefill makes the first: prompt tokens + tokens - 1 decode tokens)."""
    from workloads.synthetic import synthetic_trace
    if args.trace:
        return import_trace_file(args)
    tokens, prompt = args.tokens or DEFAULTS["tokens"], DEFAULTS["prompt"] if args.prompt is None else args.prompt
    decode = tokens - 1 if prompt > 0 else tokens
    if fmt is not None:
        check_run_fits(model, fmt, args.batch * (prompt + decode), decode + 1, "--tokens or --batch")
    return synthetic_trace(model, requests=args.batch, prompt_len=prompt, output_len=decode,
                           skew=args.skew, locality=args.locality, seed=args.seed)


def check_trace_args(args) -> None:
    """--tokens / --prompt shape a synthetic trace; a trace file brings its own lengths."""
    if args.trace:
        given = [f"--{name}" for name in ("tokens", "prompt") if getattr(args, name, None) is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} cannot be used with --trace: the trace's own prompt and "
                              f"output lengths are used; drop {' and '.join(given)}")


def check_codec(args) -> None:
    if args.codec and args.format != "zip":
        raise ConfigError(f"--codec {args.codec}: only --format zip has a codec (this run is --format {args.format}); "
                          f"drop --codec or use --format zip")


def make_format_for(model, name: str, codec: str | None = None, ladder: str = "v1"):
    from workloads.formats import make_format
    opts = {}
    if name in ("mwq", "copies"):
        opts["ladder"] = ladder
    if name == "zip" and codec:
        opts["codec"] = codec
    return make_format(name, model.expert_shapes, **opts)


def level_bits(fmt) -> list[int]:
    """Nominal bits per weight of each precision level (MWQ: INT b1..bK; bf16/zip: 16)."""
    if hasattr(fmt, "b1"):
        return [fmt.b1 + i for i in range(fmt.levels)]
    return [16] * fmt.levels


def report_rows(m: dict) -> list[tuple[str, str]]:
    """Rows for the policies' own counters (Policies.report)."""
    if "resident_first_asked" in m:
        return [("resident-first", f"{m['resident_first_substituted']} of {m['resident_first_asked']} expert "
                                   f"uses at a resident lower level ({m['resident_first_fraction']:.3f})")]
    return []


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_rows(m: dict) -> list[tuple[str, str]]:
    ttft = f"{_ms(m['ttft_s'])} ms (mean over {len(m['ttft_s_per_request'])} requests; cold start: " \
           f"{_ms(m['ttft_s_cold'])} ms)"
    rows = [
        ("TTFT", ttft),
        ("TPOT mean / p50 / p99", f"{_ms(m['tpot_s_mean'])} / {_ms(m['tpot_s_p50'])} / {_ms(m['tpot_s_p99'])} ms"),
        ("throughput", "-" if m["throughput_tok_s"] is None else
         f"{m['throughput_tok_s']:.2f} tok/s ({m['generated_tokens']} new tokens)"),
        ("peak expert memory", format_size(m["peak_expert_bytes"])),
        ("bytes read", format_size(m["bytes_read"])),
        ("hit ratio (demand)", _ratio(m["hit_ratio"])),
    ]
    if m["prefetches"]:
        rows.append(("prefetch coverage / waste", f"{_ratio(m['prefetch_coverage'])} of needed parts / "
                                                  f"{format_size(m['prefetch_waste_bytes'])} never used "
                                                  f"({m['prefetches']} prefetched loads)"))
    if m.get("bits_per_weight") is not None:
        rows.append(("precision", f"{m['bits_per_weight']:.2f} bits per weight (token-weighted)"))
    rows += [("compute bubble", _ratio(m["compute_bubble_fraction"])),
             ("I/O busy", _ratio(m["io_busy_fraction"]))]
    return rows


def hit_ratio_note(m: dict, timeline, budget: int, fmt) -> str | None:
    """Why a run hit nothing, when the budget is the reason."""
    if m["hit_ratio"] != 0 or not m["accesses"]:
        return None
    per_step: dict[int, set] = {}
    for e in timeline.events:
        if e.resource == "compute":
            per_step.setdefault(e.step, set()).add((e.layer, e.expert))
    need = min(map(len, per_step.values()))
    fit = budget // max(fmt.level_bytes(fmt.levels - 1), 1)
    if fit >= need:
        return "  note: hit ratio 0: no part was resident before its layer asked for it"
    return (f"  note: hit ratio 0: the budget holds {fit} experts, fewer than the {need} that even the smallest "
            f"step computes across its layers, so each expert is evicted before the next step asks for it "
            f"again; a larger --budget shows the policies apart")


def json_safe(value):
    """NaN / inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(out: Path, timeline, metrics: dict, quiet: bool = False) -> None:
    """metrics.json, timeline.json and gantt.png as one unit: written into a temporary folder
    beside `out`, renamed into place; a previous run's folder is replaced only then."""
    from timeline.gantt import gantt
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        (tmp / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False) + "\n")
        with open(tmp / "timeline.json", "w") as f:
            json.dump(timeline.chrome_trace(), f)
        gantt(timeline, tmp / "gantt.png")
        os.chmod(tmp, 0o755)
        for _ in range(5):            # a concurrent run may put its folder there between our renames
            try:
                os.rename(tmp, out)
                break
            except OSError:
                if not out.exists():
                    raise
                old = old or Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.rename(out, old / f"{len(list(old.iterdir()))}")
        else:
            raise ConfigError(f"--out {out}: other runs keep writing this folder; give another --out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if not quiet:
        print(f"wrote {out / 'metrics.json'}, {out / 'timeline.json'} (Chrome trace: open in Perfetto), "
              f"{out / 'gantt.png'}")


# -- subcommands -------------------------------------------------------------------------
def cmd_simulate(args) -> None:
    from devices.profile import load_device
    from policies import build_policies
    from policies.cost import CostModel
    from sim.engine import Simulator
    from workloads.workload import Workload
    from timeline.metrics import compute_metrics

    apply_preset(args)
    check_codec(args)
    check_trace_args(args)
    device = load_device(args.device)
    storage = device.storage_option(args.storage)
    if args.budget and args.budget > device.memory_bytes:
        raise ConfigError(f"--budget {format_size(args.budget)} is more than {device.name}'s memory "
                          f"({format_size(device.memory_bytes)}); give a smaller --budget or another --device")
    check_out_dir(args.out)
    trace = import_trace_file(args) if args.trace else None
    model = model_for(args, trace)
    fmt = make_format_for(model, args.format, args.codec, args.ladder)
    fmt = store_format_for(args, model, fmt)
    trace = load_workload_trace(args, model, fmt) if trace is None else trace
    if args.trace:
        check_run_fits(model, fmt, trace.tokens, trace.tokens, "the trace (fewer requests or tokens)")
    workload = Workload(model, trace, fmt, batch=args.batch)
    budget = parse_size(args.budget, "--budget") if args.budget else device.expert_budget_bytes
    if args.budget is None and getattr(args, "budget_all", False):     # a hold-in-memory preset
        budget = model.layers * model.experts * fmt.level_bytes(fmt.levels - 1)
    cost = CostModel.build(device, model, fmt, storage)
    policies = build_policies(workload, budget, cost=cost, **policy_kwargs(args))
    timeline = Simulator(device, workload, policies, storage).run(quiet=args.quiet)
    metrics = compute_metrics(timeline, level_bits=level_bits(fmt))
    metrics.update(timeline.meta.get("policy_report", {}))
    metrics.update(device=device.name, storage=storage.name, model=model.name, format=fmt.name,
                   policy=args.policy, scheduler=args.scheduler, prefetch=args.prefetch, budget_bytes=budget,
                   batch=args.batch)
    print(f"moelab simulate: {model.name} on {device.name} ({storage.name}), {fmt.name} experts, "
          f"{args.policy} cache, {args.scheduler} loads, {args.prefetch} prefetch, budget {format_size(budget)}, "
          f"batch {args.batch}, "
          f"{metrics['generated_tokens']} new tokens")
    print_table(summary_rows(metrics) + report_rows(metrics))
    note = hit_ratio_note(metrics, timeline, budget, fmt)
    if note:
        print(note)
    write_outputs(Path(args.out), timeline, metrics, args.quiet)


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
    from policies.presets import PRESETS
    for title, table in (("cache", CACHES), ("scheduler", SCHEDULERS), ("allocator", ALLOCATORS),
                         ("prefetch", PREFETCHERS)):
        print(f"  {title + ':':<11} {', '.join(table)}")
    print("  presets (--preset NAME; D²MoE and its baselines):")
    for p in PRESETS.values():
        print(f"    {p.name:<18} {p.description}")


def cmd_sweep(args) -> None:
    from experiments.sweep import load_grid, sweep
    out = Path(args.out or Path("runs") / "sweeps" / (Path(args.grid).stem + ".csv"))
    if args.check:
        configs = load_grid(args.grid)
        print(f"{args.grid}: {len(configs)} runs, all valid")
        return
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the results file (e.g. {out / 'results.csv'})")
    done = sweep(args.grid, out, jobs=args.jobs, cluster=args.cluster, quiet=args.quiet)
    rate = done["ran"] / done["seconds"] if done["seconds"] > 0 and done["ran"] else 0
    print(f"{args.grid}: {done['runs']} runs, {done['done_before']} already in {out}, {done['ran']} run now in "
          f"{done['seconds']:.1f} s ({rate:.1f} runs/s); results: {out}")


def results_rows(path) -> list[dict]:
    """The rows of a sweep's results file, or a clear error."""
    from experiments.sweep import read_results
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such results file (`moelab sweep GRID.yaml --out {path}` writes one)")
    rows = read_results(path)
    if not rows:
        raise ConfigError(f"{path}: no result rows (run `moelab sweep` first)")
    return rows


def cmd_plot(args) -> None:
    from experiments.plots import filter_rows, plot
    rows = results_rows(args.results)
    rows = filter_rows(rows, args.where)
    stem = Path(args.out) if args.out else Path(args.results).with_name(f"{Path(args.results).stem}-{args.kind}")
    paths = plot(rows, args.kind, stem, facet=args.facet, baseline=args.baseline, row_hash=args.row)
    print("wrote " + ", ".join(map(str, paths)))


def cmd_pick(args) -> None:
    from experiments.pick import pick, policy_document, write_policy
    rows = results_rows(args.results)
    row = pick(rows, args.metric, args.device, args.budget, args.constraint, args.where)
    doc = policy_document(row, args.metric, args.results)
    path = write_policy(args.out, doc)
    p = doc["picked"]
    print(f"picked {row['policy']} ({row['format']}{' ' + row['ladder'] if row['ladder'] else ''}) on "
          f"{row['device']}, budget {row['budget_bytes']}, batch {row['batch']}: {p['metric']} = {p['value']:.4g}")
    print(f"wrote {path}; deploy it with `moelab execute --policy {path}` (or check it: `moelab simulate "
          f"--policy {path}`)")
    print(fidelity_line(row, args.validation))


def fidelity_line(row: dict, path) -> str:
    """The measured simulator error of the picked configuration's class (format, cache family,
    batch) from a validation.csv (`moelab validate`), or why there is none."""
    from experiments.validate import fidelity, read_rows
    rows = read_rows(path)
    if not rows:
        return (f"fidelity: no host validation results yet (looked for {path}; run `moelab validate`), so no "
                f"measured simulator error is shown for this configuration class")
    cache = row.get("cache") or row["policy"]
    f = fidelity(rows, row["format"], cache, int(row["batch"]))
    if f is None:
        return (f"fidelity: {path} has no validated configuration of this class ({row['format']}, "
                f"{cache} cache family, batch {row['batch']})")
    return (f"fidelity: {f['configs']} validated configurations of this class ({row['format']}, {cache} "
            f"cache family, batch {row['batch']}) in {path}: |TPOT error| median {100 * f['median']:.1f}%, max "
            f"{100 * f['max']:.1f}%; identical decisions in {f['identical']}")


def cmd_reproduce(args) -> None:
    if args.paper == "zipmoe":
        from experiments.reproduce_zipmoe import reproduce
    else:
        from experiments.reproduce_d2moe import reproduce
    out = Path(args.out or f"runs/reproduce-{args.paper}")
    text = reproduce(out, jobs=args.jobs, quiet=args.quiet)
    print(text.split("## Every run")[0].rstrip())
    print(f"\nwrote {out / 'results.csv'} (resumable), {out / 'report.md'} and figures (PNG, PDF) in {out}")


def cmd_trace_stats(args) -> None:
    from workloads.importers import import_trace
    from workloads.stats import format_stats, trace_stats
    print(format_stats(trace_stats(import_trace(args.file))))


def cmd_trace_synth(args) -> None:
    from workloads.catalog import get_model
    from workloads.synthetic import synthetic_trace
    check_out_file(args.out)
    model = get_model(args.model)
    decode = args.tokens - 1 if args.prompt > 0 else args.tokens     # the prefill makes the first new token
    trace = synthetic_trace(model, requests=args.requests, prompt_len=args.prompt, output_len=decode,
                            skew=args.skew, locality=args.locality, seed=args.seed)
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k}")


def cmd_trace_import(args) -> None:
    from workloads.importers import import_trace
    check_out_file(args.out)
    trace = import_trace(args.file, args.format, **dict(args.option))
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


def store_format_for(args, model, fmt):
    """The format of the model's expert store (--store, or the default folder `execute` builds),
    when one exists for this format: its part sizes are the executor's, byte for byte."""
    from workloads.formats import stored_format
    folder = Path(args.store) if args.store else Path("runs") / "stores" / f"{Path(model.name).name}-{fmt.name}"
    found = stored_format(folder)
    if found is None:
        if args.store:
            raise ConfigError(f"--store {args.store}: no store there (build one with `moelab store build`)")
        if fmt.name == "zip" and not args.quiet:
            print(f"note: no zip store in {folder}: part sizes assume an exponent ratio of {fmt.exponent_ratio}; "
                  f"for a real model's measured sizes (what `execute` reads), build its store first "
                  f"(`moelab store build --format zip`) or give --store", file=sys.stderr)
        return fmt
    if found.name != fmt.name or found.shapes != fmt.shapes:
        if args.store:
            raise ConfigError(f"--store {args.store} holds {found.name} experts of shapes {list(found.shapes)}; "
                              f"the run asks for {fmt.name} experts of shapes {list(fmt.shapes)}")
        return fmt
    if not args.quiet:
        print(f"part sizes from the store {folder} ({format_size(found.expert_bytes)} per expert)")
    return found


def default_store_dir(args, name: str) -> Path:
    return Path(args.store) if args.store else Path("runs") / "stores" / f"{name}-{args.format}"


PRESET_FIELDS = {"format": "format", "ladder": "ladder", "policy": "cache", "scheduler": "scheduler",
                 "allocator": "allocator", "prefetch": "prefetch"}


def cache_or_file(text: str) -> str:
    """--policy: a registered cache policy, or a policy file (`moelab pick` writes one)."""
    from policies import CACHES
    if text in CACHES or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a cache policy ({', '.join(CACHES)}) nor a policy file")


def apply_policy_file(args) -> None:
    """--policy FILE (from `moelab pick`) sets the format and the bundle, and the budget unless
    --budget is given; naming them as well is a conflict."""
    from policies import CACHES
    if args.policy in CACHES:
        return
    from experiments.pick import load_policy
    doc = load_policy(args.policy)
    given = [f"--{flag}" for flag in ("format", "ladder", "codec", "scheduler", "allocator", "prefetch", "preset",
                                      "allocator-option", "scheduler-option", "prefetch-option")
             if any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in args.argv)]
    if given:
        raise MoelabError(f"--policy {args.policy} sets {', '.join(given)}: give one or the other")
    args.format = doc.get("format", args.format)
    args.ladder = doc.get("ladder") or args.ladder
    if doc.get("codec") and args.format == "zip":
        args.codec = doc["codec"]
    for key in ("scheduler", "allocator", "prefetch"):
        setattr(args, key, doc.get(key, getattr(args, key)))
    args.allocator_option = list((doc.get("allocator_options") or {}).items())
    args.scheduler_option = list((doc.get("scheduler_options") or {}).items())
    if args.budget is None and "budget" in doc:
        if doc["budget"] == "all":
            args.budget_all = True
        else:
            args.budget = doc["budget"]
    args.policy = doc.get("cache", "lru")


def apply_preset(args) -> None:
    """--preset NAME fills the format and the policy bundle (policies/presets.py); naming one of
    them as well is a conflict, not a silent override. A policy file (--policy FILE) likewise."""
    apply_policy_file(args)
    if not getattr(args, "preset", None):
        return
    from policies.presets import get_preset
    preset = get_preset(args.preset)
    given = [f"--{flag}" for flag in PRESET_FIELDS if any(a == f"--{flag}" or a.startswith(f"--{flag}=")
                                                         for a in args.argv)]
    if given:
        raise MoelabError(f"--preset {preset.name} sets {', '.join(given)}: give one or the other "
                          f"(`moelab policies` lists what each preset sets)")
    for flag, field in PRESET_FIELDS.items():
        value = getattr(preset, field)
        if value is not None:
            setattr(args, flag, value)
    args.allocator_option = list(preset.allocator_options.items()) + list(args.allocator_option)
    args.scheduler_option = list(preset.scheduler_options.items()) + list(args.scheduler_option)
    args.budget_all = preset.budget == "all"


def policy_kwargs(args) -> dict:
    """The policy bundle the command line names, for policies.build_policies."""
    return dict(cache=args.policy, scheduler=args.scheduler, prefetch=args.prefetch, allocator=args.allocator,
                scheduler_options=dict(args.scheduler_option), prefetch_options=dict(args.prefetch_option),
                **dict(args.allocator_option))


def format_options(args) -> dict:
    if args.format in ("mwq", "copies"):
        return {"ladder": getattr(args, "ladder", "v1")}
    if args.format == "zip":
        return {"codec": args.codec or "lz4hc"}
    return {}


def check_torch_device(device: str) -> None:
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"--torch-device cuda: {why} (torch {torch.__version__}); use --torch-device cpu")


def cmd_train(args) -> None:
    from executor.train import train
    check_out_dir(args.out, run_files=None)       # before training, so a trained model is never lost
    log = train(args.out, minutes=args.minutes, seed=args.seed, quiet=args.quiet)
    print(json.dumps({k: v for k, v in log.items() if k not in ("history", "losses")}, indent=1, default=str))


def cmd_store_build(args) -> None:
    """Build the store, or check every blob of an existing one and rewrite the bad ones."""
    if args.hf:          # expert by expert: memory is the dense weights plus about one expert
        from executor.hf_checkpoint import build_hf_store
        _, store = build_hf_store(args.hf, default_store_dir(args, Path(args.hf).name), args.format,
                                  quiet=args.quiet, verify=True, **format_options(args))
    else:
        from executor.execute import ensure_store
        model, _, name = load_model(args)
        store = ensure_store(model, default_store_dir(args, name), args.format, quiet=args.quiet, verify=True,
                             **format_options(args))
    fmt, info = store.format, store.build_info or {}
    action = info.get("action", "reused")
    detail = {"built": f" in {info.get('seconds', 0):.1f} s", "rebuilt": f" ({info.get('reason')})",
              "repaired": f": rewrote {len(info.get('repaired', []))} bad blobs"}.get(action, "")
    peak = f", peak RSS {format_size(info['peak_rss_bytes'])}" if "peak_rss_bytes" in info else ""
    print(f"store {store.path}: {action}{detail}{peak}; {fmt.name}, {len(store.keys())} blobs, "
          f"{format_size(fmt.expert_bytes)} per expert ({fmt.n_parts} parts)")


# prompts of distinct requests: Python function heads like the model's training text (its stdlib)
PROMPT_HEADS = [
    ("parse_header(line)", "Split an HTTP header line into a name and a value."),
    ("merge_sorted(a, b)", "Merge two sorted lists into one sorted list."),
    ("read_config(path)", "Read an INI file and return its sections as a dict."),
    ("flatten(items)", "Yield the leaves of a nested list, depth first."),
    ("word_count(text)", "Count how often each word occurs in the text."),
    ("is_prime(n)", "Return True if n is a prime number."),
    ("to_snake_case(name)", "Convert a CamelCase name to snake_case."),
    ("chunked(seq, size)", "Split a sequence into lists of at most size items."),
    ("median(values)", "Return the median of a non-empty list of numbers."),
    ("unique_lines(path)", "Return the distinct lines of a file, in order."),
    ("retry(func, attempts)", "Call func until it succeeds, at most attempts times."),
    ("quote_arg(arg)", "Quote a shell argument if it contains spaces."),
]


def prompt_texts(requests: int, seed: int = 0) -> list[str]:
    """`requests` distinct prompts: the default one first, then function heads in a seeded order."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(len(PROMPT_HEADS))
    texts = [DEFAULT_PROMPT]
    for i in range(requests - 1):
        head, doc = PROMPT_HEADS[order[i % len(order)]]
        if i >= len(order):                       # more requests than heads: number the copies
            name, _, rest = head.partition("(")
            head = f"{name}_{i // len(order) + 1}({rest}"
        texts.append(f'def {head}:\n    """{doc}"""\n')
    return texts


def prompt_tokens(args, tok, vocab: int, requests: int, seed: int = 0):
    """[requests, P] token ids: --prompt for every request, else distinct prompts cut to the
    shortest one's length (requests decode in lockstep)."""
    import torch
    texts = [args.prompt] * requests if args.prompt else prompt_texts(requests, seed)
    ids = [tok.encode(t) if tok is not None else [b % vocab for b in t.encode()] for t in texts]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids], dtype=torch.long)


def cmd_execute(args) -> None:
    from devices.profile import load_device
    from executor.execute import ensure_store, execute, model_arch, strip_experts
    from executor.io import StorageThrottle
    from policies import build_online_policies, build_policies
    from policies.cost import CostModel
    from timeline.metrics import compute_metrics
    from workloads.workload import Workload

    # every check before a store build, not after
    apply_preset(args)
    if args.prefetch == "oracle" and not args.trace:
        raise MoelabError("--prefetch oracle reads the routing ahead from a trace: give --trace, or use "
                          "--prefetch last-use with the model's own router")
    check_codec(args)
    check_trace_args(args)
    check_torch_device(args.torch_device)
    check_out_dir(args.out)
    from devices.profile import load_device as _load_device
    for option in ("throttle", "cost_profile"):     # device names, before the store build
        if getattr(args, option, None):
            dev_name, _, storage = getattr(args, option).partition(":")
            _load_device(dev_name).storage_option(storage or None)
    args.tokens = DEFAULTS["tokens"] if args.tokens is None else args.tokens
    forced = import_trace_file(args) if args.trace else None
    model, tok, name = load_model(args)
    level_fn = bit_router_arg(args, model, forced)
    store = ensure_store(model, default_store_dir(args, name), args.format, quiet=args.quiet, **format_options(args))
    strip_experts(model)
    fmt, arch = store.format, model_arch(model, name)
    total = arch.layers * arch.experts * fmt.level_bytes(fmt.levels - 1)
    budget = parse_size(args.budget, "--budget") if args.budget else total // 4
    if args.budget is None and getattr(args, "budget_all", False):     # a hold-in-memory preset
        budget = total
    throttle = cost = None
    if args.throttle:
        dev_name, _, storage = args.throttle.partition(":")
        throttled = load_device(dev_name).storage_option(storage or None)
        throttle = StorageThrottle.from_profile(throttled)
    if args.cost_profile or args.throttle:      # what planning policies read (policies/cost.py)
        dev_name, _, storage = (args.cost_profile or args.throttle).partition(":")
        cost = CostModel.build(load_device(dev_name), arch, fmt, storage or None)
    trace = None
    if args.trace:
        trace = forced
        w = Workload(arch, trace, fmt, batch=args.batch)
        policies = build_policies(w, budget, cost=cost, **policy_kwargs(args))
    else:
        policies = build_online_policies(arch, fmt, budget, cost=cost, **policy_kwargs(args))
    prompts = prompt_tokens(args, tok, model.cfg.vocab, args.batch)
    run = execute(model, store, policies, prompts, args.tokens, trace=trace, batch=args.batch,
                  io_concurrency=args.io_concurrency, throttle=throttle, decompress_workers=args.decompress_workers,
                  torch_device=args.torch_device, torch_threads=args.torch_threads, quiet=args.quiet, level_fn=level_fn,
                  meta={"model": name, "device": f"host ({args.torch_device})", "format": fmt.name,
                        "budget_bytes": budget, "cache": args.policy, "scheduler": args.scheduler,
                        "prefetcher": args.prefetch})
    metrics = compute_metrics(run.timeline, level_bits=level_bits(fmt))
    metrics.update(run.timeline.meta.get("policy_report", {}))
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
    print_table(summary_rows(metrics) + report_rows(metrics) + [("peak RSS", format_size(run.peak_rss_bytes))])
    if tok is not None and not args.quiet:
        print("  text:", repr(metrics["text"][0][-160:]))
    write_outputs(Path(args.out), run.timeline, metrics, args.quiet)


DEFAULT_HOST_PROFILE = "runs/host.yaml"


def cmd_profile(args) -> None:
    from devices.profile import load_device
    from executor.profile_host import write_profile
    from experiments.calibrate import measure_host
    out = check_out_file(args.out)
    busy = busy_host_warning()
    if busy:
        print(busy, file=sys.stderr)
    if args.throttle:
        dev_name, _, storage = args.throttle.partition(":")
        load_device(dev_name).storage_option(storage or None)       # a wrong name fails before measuring
    m = measure_host(args.model_dir, quick=args.quick, quiet=args.quiet, throttle=args.throttle)
    device = write_profile(out, m, "moelab " + " ".join(args.argv))
    print(device.describe())


def busy_host_warning(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when other work already keeps the host's cores busy: the executor's runs would
    then measure that work too (a quick validation beside a 2-process sweep measured 2-3x the
    profile's times)."""
    load = os.getloadavg()[0] if load is None else load
    cores = (os.cpu_count() or 1) if cores is None else cores
    if load < 0.5 * cores:
        return None
    return (f"warning: the host is busy (load average {load:.1f} on {cores} cores): the executor's runs will "
            f"measure that work too; validate (and profile) on a quiet host")


def cmd_validate(args) -> None:
    from devices.profile import load_device
    from experiments.validate import Validator, summary
    if args.throttle:
        dev_name, _, storage = args.throttle.partition(":")
        load_device(dev_name).storage_option(storage or None)
    busy = busy_host_warning()
    if busy:
        print(busy, file=sys.stderr)
    if not Path(args.profile).exists():
        from executor.profile_host import write_profile
        from experiments.calibrate import measure_host
        print(f"no host profile at {args.profile}: measuring it first (`moelab profile --out {args.profile}`)",
              file=sys.stderr)
        write_profile(args.profile, measure_host(args.model_dir, quick=args.quick, quiet=args.quiet),
                      f"moelab profile --out {args.profile}" + (" --quick" if args.quick else ""))
    rows = Validator(args.out, args.profile, throttle=args.throttle, quick=args.quick, repeats=args.repeats,
                     model_dir=args.model_dir, quiet=args.quiet).run()
    for s in summary(rows):
        med, mx = s["err_tpot_s_mean"]
        print(f"throttle {s['throttle']}: {s['configs']} configurations, decisions identical in {s['identical']}; "
              f"|TPOT error| median {100 * med:.1f}%, max {100 * mx:.1f}% (executor spread median "
              f"{100 * s['tpot_spread'][0]:.1f}%)")
    print(f"wrote {Path(args.out) / 'validation.csv'}, validation.md, validation.png")


def cmd_trace_record(args) -> None:
    from executor.record import record_routing
    check_out_file(args.out)
    model, tok, name = load_model(args)
    prompts = prompt_tokens(args, tok, model.cfg.vocab, args.requests, args.seed)
    router = bit_router_arg(args, model)
    trace = record_routing(model, prompts, args.tokens, model_name=name, level_fn=router,
                           level_meta=router and {"path": str(args.bit_router), "ladder": router.ladder})
    print(f"wrote {trace.save(args.out)}: {trace.tokens} tokens x {trace.layers} layers x top-{trace.top_k} "
          f"({args.requests} requests, {len(set(map(tuple, prompts.tolist())))} distinct prompts; replay it with "
          f"`moelab simulate --trace {args.out}`: the trace names its model)")


def bit_router_arg(args, model, trace=None):
    """--bit-router PATH loaded and checked against the model and --format/--ladder (None without
    it); `--allocator learned` without a router or a trace with levels is refused here."""
    from executor.bit_router import check_ladder, load_bit_router
    from workloads.formats import MWQ_LADDERS
    path = getattr(args, "bit_router", None)
    if getattr(args, "allocator", None) == "learned" and not path and getattr(trace, "levels", None) is None:
        raise MoelabError("--allocator learned needs --bit-router PATH (`moelab train-bit-router` writes one) "
                          "or a --trace recorded with one")
    if not path:
        return None
    router = load_bit_router(path, model)
    fmt = getattr(args, "format", "mwq")
    if fmt not in ("mwq", "copies"):
        raise MoelabError(f"--bit-router chooses MWQ levels: use --format mwq or copies, not {fmt}")
    ladder = getattr(args, "ladder", router.ladder) if hasattr(args, "format") else router.ladder
    check_ladder(router, *MWQ_LADDERS.get(ladder, (None, None)), where=f"--bit-router {path} (--ladder {ladder})")
    return router


def cmd_eval(args) -> None:
    from executor.evaluate import run_eval
    check_out_dir(args.out, run_files=None)
    run_eval(args.model_dir, args.out, windows=args.windows, ladders=args.ladders or ("v1", "v2"),
             base_fit=args.base_fit, bit_routers=args.bit_router, quiet=args.quiet)


def cmd_train_bit_router(args) -> None:
    from executor.bit_router import default_path, save_bit_router, train_bit_router
    from executor.train import DEFAULT_MODEL, load_trained
    out = Path(args.out) if args.out else default_path(args.model_dir or DEFAULT_MODEL, args.ladder)
    check_out_file(str(out))
    model, _, _ = load_trained(args.model_dir)
    router = train_bit_router(model, args.ladder, minutes=args.minutes, steps=args.steps, alpha=args.alpha,
                              base_fit=args.base_fit, seed=args.seed, quiet=args.quiet)
    save_bit_router(router, out)
    m = router.meta
    print(f"wrote {out}: ladder {m['ladder']}, {m['steps']} steps in {m['train_seconds']} s, KL {m['final_kl_ema']}, "
          f"level fractions {m['calibration']['level_fractions']} (capacities {m['capacities']})")


def add_model_args(p) -> None:
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--hf", help="a local Hugging Face MoE checkpoint folder (Mixtral, Qwen2-MoE, OLMoE)")


# -- parser -----------------------------------------------------------------------------------
def add_policy_args(p) -> None:
    """Names checked against the registries (policies/__init__.py) when the command line is read,
    so a typo fails before any trace is read or store is built."""
    from policies import ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS
    p.add_argument("--policy", default=DEFAULTS["policy"], type=cache_or_file, metavar="NAME|FILE",
                   help=f"cache policy: {', '.join(CACHES)}; or a policy file (YAML) from `moelab pick`, which "
                        f"sets the format and the whole bundle")
    p.add_argument("--scheduler", default="fifo", choices=list(SCHEDULERS), metavar="NAME",
                   help=f"load scheduler: {', '.join(SCHEDULERS)}")
    p.add_argument("--prefetch", default="none", choices=list(PREFETCHERS), metavar="NAME",
                   help=f"prefetcher: {', '.join(PREFETCHERS)} (oracle reads the trace ahead: needs --trace)")
    p.add_argument("--allocator", default="fixed", choices=list(ALLOCATORS), metavar="NAME",
                   help=f"bit allocator: {', '.join(ALLOCATORS)} (fixed: every token at the format's top level; "
                        f"trace-levels: the levels a trace carries)")
    p.add_argument("--allocator-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="allocator option, repeatable: fixed level=0 (the lowest); gate-score thresholds=0.25,0.5 "
                        "top1_highest=true; capacity capacities=0.3,0.4,0.3 (lowest level first); resident-first "
                        "base=capacity max_drop=1")
    p.add_argument("--scheduler-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="scheduler option, repeatable: fifo order=router|expert-id; hebf count=exact|cumulative")
    p.add_argument("--prefetch-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="prefetcher option, repeatable: gate-topk width=N threshold=0.1")
    p.add_argument("--ladder", default="v1", choices=["v1", "v2", "int4", "int8"],
                   help="bit-width ladder of mwq and copies: v1 = INT2-4, v2 = INT5-8 (D²MoE); int4, int8: one width")
    p.add_argument("--preset", metavar="NAME",
                   help="a named bundle (format + policies): d2moe, its ablations and baselines (`moelab policies`)")


def add_trace_option_arg(p) -> None:
    p.add_argument("--option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="importer option for a --trace that is not .npz (repeatable; "
                        "`moelab trace import --help` lists them)")


def add_workload_args(p) -> None:
    p.add_argument("--model", help="architecture from `moelab models`, or a trained model folder "
                                   f"(default: the model the --trace names, else {DEFAULTS['model']})")
    p.add_argument("--trace", help="routing trace (.npz, .jsonl, .csv dir, .npy); default: synthetic")
    add_trace_option_arg(p)
    p.add_argument("--batch", type=positive_int, default=DEFAULTS["batch"],
                   help="requests (synthetic) decoded in lockstep")
    p.add_argument("--tokens", type=positive_int,
                   help=f"{TOKENS_HELP} (synthetic; default: {DEFAULTS['tokens']})")
    p.add_argument("--prompt", type=int, help=f"prompt tokens per request (synthetic; default: {DEFAULTS['prompt']})")
    # defaults calibrated on public Mixtral-8x7B decode traces (peers.md): top-2 share ~0.35, reuse ~0.6
    p.add_argument("--skew", type=float, default=0.4, help="expert popularity skew (synthetic; 0 = uniform)")
    p.add_argument("--locality", type=float, default=0.15, help="per-slot reuse probability at the next token "
                                                                 "(synthetic)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the synthetic trace")


def trace_import_epilog() -> str:
    lines = ["importer options (--option KEY=VALUE; also taken by `simulate` and `execute` with --trace):"]
    for fmt, names in importer_options().items():
        lines.append(f"  {fmt + ':':<7} {', '.join(names)}")
    lines.append("  npz:    none (moelab's own format)")
    return "\n".join(lines)


class EpilogFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="moelab", description="On-device MoE serving policies: simulate, execute, compare. "
                                           f"Sizes: {SIZE_UNITS}.", formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(group, name, **kw):          # every subcommand takes --quiet and shows its defaults
        kw.setdefault("formatter_class", HelpFormatter)
        return group.add_parser(name, parents=[common], **kw)

    p = add(sub, "simulate", help="simulate a (device, workload, policy) run")
    p.add_argument("--device", default=DEFAULTS["device"], help="profile from `moelab devices` or a YAML path")
    p.add_argument("--storage", help="storage option of the device (default: the profile's)")
    add_workload_args(p)
    add_policy_args(p)
    p.add_argument("--format", default="bf16", choices=FORMAT_NAMES,
                   help="expert storage format (copies: one standalone INT copy per width, D²MoE's Matryoshka-Free)")
    p.add_argument("--codec", choices=["lz4", "lz4hc", "zstd"], help="codec of --format zip (default: lz4hc)")
    p.add_argument("--budget", type=size_arg, metavar="SIZE",
                   help=f"memory budget for experts, e.g. 3GB ({SIZE_UNITS}; default: the device's expert budget)")
    p.add_argument("--out", default="runs/simulate", help="output folder (replaced as a whole by each run)")
    p.add_argument("--store", help="an expert store whose part sizes to use (default: runs/stores/MODEL-FORMAT "
                                   "when it exists, as `moelab execute` builds it)")
    p.set_defaults(func=cmd_simulate)

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
    p.add_argument("--out", help="plot to this .png (and the curves to the .json beside it)")
    p.set_defaults(func=cmd_mrc)

    p = add(sub, "sweep", help="run a grid of simulations (resumable; local processes or a Dask cluster)")
    p.add_argument("grid", help="grid file (YAML): see experiments/sweep.py or the README")
    p.add_argument("--out", help="results CSV (default runs/sweeps/GRID.csv); rows already there are skipped")
    p.add_argument("--jobs", type=positive_int, help="local processes (default: the cores)")
    p.add_argument("--cluster", metavar="tcp://HOST:8786", help="run on this Dask scheduler instead")
    p.add_argument("--check", action="store_true", help="only check the grid file and count its runs")
    p.set_defaults(func=cmd_sweep)

    from experiments.plots import KINDS
    p = add(sub, "plot", help="figures from a sweep's results (PNG and PDF)")
    p.add_argument("results", help="results CSV of `moelab sweep`")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--where", action="append", default=[], type=key_value, metavar="COLUMN=VALUE",
                   help="keep only matching rows (repeatable)")
    p.add_argument("--facet", metavar="COLUMN", help="one panel per value of this column (default: device, if "
                                                     "there are several)")
    p.add_argument("--baseline", metavar="POLICY", help="speedup: the policy label to divide by")
    p.add_argument("--row", metavar="CONFIG_HASH", help="gantt: the run to draw (default: the first row)")
    p.add_argument("--out", help="output path without extension (default: beside the results)")
    p.set_defaults(func=cmd_plot)

    from experiments.pick import METRICS
    p = add(sub, "pick", help="the best policy bundle of a sweep under constraints, as a policy file")
    p.add_argument("results", help="results CSV of `moelab sweep`")
    p.add_argument("--device", help="only runs on this device")
    p.add_argument("--budget", type=size_arg, metavar="SIZE", help="only runs whose expert memory fits in this")
    p.add_argument("--metric", default="throughput", choices=list(METRICS))
    p.add_argument("--constraint", action="append", default=[], metavar="COLUMN<=VALUE",
                   help="e.g. tpot_s_p99<=0.25 or peak_expert_bytes<=2GB (repeatable)")
    p.add_argument("--where", action="append", default=[], type=key_value, metavar="COLUMN=VALUE",
                   help="only rows with this value (repeatable), e.g. model=mixtral-8x7b")
    p.add_argument("--out", default="runs/picked-policy.yaml", help="the policy file to write")
    p.add_argument("--validation", default="runs/validate/validation.csv",
                   help="`moelab validate` results whose measured error is shown for the picked class")
    p.set_defaults(func=cmd_pick)

    p = add(sub, "reproduce", help="reproduce a paper's results in the simulator (reuses earlier runs)")
    p.add_argument("paper", choices=["d2moe", "zipmoe"])
    p.add_argument("--out", help="output folder (default runs/reproduce-PAPER)")
    p.add_argument("--jobs", type=positive_int, help="parallel processes (default: the cores)")
    p.set_defaults(func=cmd_reproduce)

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
    p.add_argument("--model", default=DEFAULTS["model"], help="architecture from `moelab models`")
    p.add_argument("--requests", type=positive_int, default=1)
    p.add_argument("--prompt", type=int, default=DEFAULTS["prompt"], help="prompt tokens per request")
    p.add_argument("--tokens", type=positive_int, default=DEFAULTS["tokens"], help=TOKENS_HELP)
    p.add_argument("--skew", type=float, default=0.4, help="expert popularity skew (0 = uniform)")
    p.add_argument("--locality", type=float, default=0.15, help="per-slot reuse probability at the next token")
    p.add_argument("--seed", type=int, default=0)
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
    p = add(sub, "train", help="train the small MoE LM on the Python standard library's sources")
    p.add_argument("--out", required=True, help="model folder to write (checked writable before training)")
    p.add_argument("--minutes", type=positive_float, default=15.0, help="training time in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    sp = add(sub, "store", help="expert stores").add_subparsers(dest="store_cmd", required=True)
    p = add(sp, "build", help="write a model's experts as an on-disk store (resumable)")
    add_model_args(p)
    p.add_argument("--format", default="bf16", choices=FORMAT_NAMES,
                   help="expert storage format (copies: one standalone INT copy per width, D²MoE's Matryoshka-Free)")
    p.add_argument("--codec", choices=["lz4", "lz4hc", "zstd"], help="codec of --format zip (default: lz4hc)")
    p.add_argument("--store", "--out", dest="store", help="store folder (default: runs/stores/MODEL-FORMAT)")
    p.set_defaults(func=cmd_store_build)

    p = add(sub, "execute", help="run a real model with experts loaded on demand under a policy")
    add_model_args(p)
    p.add_argument("--format", default="bf16", choices=FORMAT_NAMES,
                   help="expert storage format (copies: one standalone INT copy per width, D²MoE's Matryoshka-Free)")
    p.add_argument("--codec", choices=["lz4", "lz4hc", "zstd"], help="codec of --format zip (default: lz4hc)")
    p.add_argument("--store", help="store folder (default: runs/stores/MODEL-FORMAT, built if missing)")
    add_policy_args(p)
    p.add_argument("--budget", type=size_arg, metavar="SIZE",
                   help=f"expert memory budget ({SIZE_UNITS}; default: a quarter of all experts' bytes)")
    p.add_argument("--batch", type=positive_int, default=1, help="requests decoded in lockstep")
    p.add_argument("--tokens", type=positive_int, help=f"{TOKENS_HELP} (default: {DEFAULTS['tokens']}; "
                                                       f"with --trace, the trace's own)")
    p.add_argument("--prompt", help="prompt text of every request (default: distinct built-in prompts)")
    p.add_argument("--trace", help="force routing from this trace (as `moelab simulate --trace` replays it)")
    add_trace_option_arg(p)
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="make the disk behave like a device's storage")
    p.add_argument("--cost-profile", metavar="DEVICE[:STORAGE]",
                   help="device profile whose costs planning policies read (default: the --throttle device)")
    p.add_argument("--io-concurrency", type=positive_int, default=2, help="reads in flight")
    p.add_argument("--decompress-workers", type=positive_int, default=2, help="decompression threads (zip)")
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"], help="where experts compute")
    p.add_argument("--torch-threads", type=positive_int,
                   help="torch intra-op threads (default on CPU: all cores but one, left to the I/O and "
                        "decompression workers)")
    p.add_argument("--out", default="runs/execute", help="output folder (replaced as a whole by each run)")
    p.add_argument("--bit-router", metavar="PATH", help="a bit-width router (`moelab train-bit-router`) choosing "
                                                        "each token's MWQ level; use with --allocator learned")
    p.set_defaults(func=cmd_execute)

    p = add(tp, "record", help="record a real model's routing as a trace")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text of every request (default: distinct built-in prompts)")
    p.add_argument("--requests", type=positive_int, default=1)
    p.add_argument("--tokens", type=positive_int, default=64, help=TOKENS_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the built-in prompts")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--bit-router", metavar="PATH", help="write this bit-width router's levels into the trace "
                                                        "(replay them with --format mwq --allocator trace-levels)")
    p.set_defaults(func=cmd_trace_record)

    p = add(sub, "eval", help="held-out perplexity of the trained model at every expert precision (D²MoE Table 3)")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--windows", type=positive_int, default=128, help="held-out windows (256 bytes each)")
    p.add_argument("--ladder", dest="ladders", action="append", choices=["v1", "v2"],
                   help="MWQ ladder (repeatable; default: v1 and v2)")
    p.add_argument("--base-fit", choices=["topgrid", "own"],
                   help="MWQ base fit of the allocator rows (default: the quantizer's; the level rows show both)")
    p.add_argument("--bit-router", action="append", default=[], metavar="PATH",
                   help="bit router for the learned rows (repeatable; default: bit_router-LADDER.safetensors "
                        "beside the model)")
    p.add_argument("--out", default="runs/eval", help="folder for eval.csv and eval.md")
    p.set_defaults(func=cmd_eval)

    p = add(sub, "train-bit-router", help="train D²MoE's bit-width router on the trained model")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--ladder", default="v1", choices=["v1", "v2"], help="MWQ ladder whose levels it chooses")
    p.add_argument("--minutes", type=positive_float, default=15.0, help="training time in minutes")
    p.add_argument("--steps", type=positive_int, help="train this many steps instead of --minutes")
    p.add_argument("--alpha", type=float, default=1e-4, help="weight of the expected-bits term of the loss (per bit)")
    p.add_argument("--base-fit", choices=["topgrid", "own"], help="MWQ base fit (default: the quantizer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="file to write (default: bit_router-LADDER.safetensors beside the model)")
    p.set_defaults(func=cmd_train_bit_router)

    p = add(sub, "profile", help="measure this host as the executor uses it; write a device profile YAML")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--out", default=DEFAULT_HOST_PROFILE, help="profile YAML to write")
    p.add_argument("--quick", action="store_true", help="fewer token counts and repeats (tests)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]",
                   help="hold the forced runs' reads to a device's storage: the run figures (dense, decision path, "
                        "contention) measured in that regime, for `validate --throttle` with the same storage")
    p.set_defaults(func=cmd_profile)

    p = add(sub, "validate", help="the simulator's prediction against the executor's measurement on this host")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--profile", default=DEFAULT_HOST_PROFILE,
                   help="measured host profile (`moelab profile`; measured first if missing)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="hold the executor's reads to a device's storage "
                                                                  "(and simulate that storage)")
    p.add_argument("--repeats", type=positive_int, default=3, help="executor runs per configuration")
    p.add_argument("--quick", action="store_true", help="a small matrix and a short trace (tests)")
    p.add_argument("--out", default="runs/validate", help="folder for validation.csv / .md / .png (resumable)")
    p.set_defaults(func=cmd_validate)
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command == "devices" and args.action == "show" and not args.name:
            raise MoelabError("`moelab devices show NAME` needs a device name")
        args.func(args)
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing more was written", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `moelab ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
