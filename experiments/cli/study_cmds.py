"""`moelab sweep`, `plot`, `pick`, `reproduce`: many simulator runs and what to make of them.
"""
from __future__ import annotations

from pathlib import Path

from devices.units import ConfigError
from experiments.cli.args import key_value, positive_int, size_arg

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
    """The rows of a sweep's results file (each config once, saying so), or a one-line error."""
    from experiments.results import load_results
    return load_results(path)

def cmd_plot(args) -> None:
    from experiments.plots import filter_rows, plot
    rows = results_rows(args.results)
    rows = filter_rows(rows, args.where)
    stem = Path(args.out) if args.out else Path(args.results).with_name(f"{Path(args.results).stem}-{args.kind}")
    paths = plot(rows, args.kind, stem, facet=args.facet, baseline=args.baseline, row_hash=args.row)
    print("wrote " + ", ".join(map(str, paths)))

def cmd_pick(args) -> None:
    from experiments.pick import pick, write_policy
    rows = results_rows(args.results)
    row = pick(rows, args.metric, args.device, args.budget, args.constraint, args.where, args.allow_offline)
    path = write_policy(args.out, row, args.metric, args.results)
    from experiments.pick import METRICS
    column = METRICS[args.metric][0]
    print(f"picked {row['policy']} ({row['format']}{' ' + row['ladder'] if row['ladder'] else ''}) on "
          f"{row['device']}, budget {row['budget_bytes']}, batch {row['batch']}: {column} = {float(row[column]):.4g}")
    print(f"wrote {path}; rerun it with `moelab simulate --spec {path}`, deploy its bundle with "
          f"`moelab execute --policy {path}`")
    print(fidelity_line(row, args.validation))


def fidelity_line(row: dict, path) -> str:
    """The measured simulator error of the picked configuration's class (format, cache family,
    batch) from a validation.csv (`moelab validate`), or why there is none; on a second line, the
    rank agreement of its group (format, batch, and its budget where that was validated)."""
    from experiments.validate import fidelity, read_rows
    from experiments.validate_stats import rank_for_pick, rank_text
    rows = read_rows(path)
    if not rows:
        return (f"fidelity: no host validation results yet (looked for {path}; run `moelab validate`), so no "
                f"measured simulator error is shown for this configuration class")
    cache = row.get("cache") or row["policy"]
    f = fidelity(rows, row["format"], cache, int(row["batch"]))
    if f is None:
        line = (f"fidelity: {path} has no validated configuration of this class ({row['format']}, "
                f"{cache} cache family, batch {row['batch']})")
    else:
        line = (f"fidelity: {f['configs']} validated configurations of this class ({row['format']}, {cache} "
                f"cache family, batch {row['batch']}) in {path}: |TPOT error| median {100 * f['median']:.1f}%, max "
                f"{100 * f['max']:.1f}%; identical decisions in {f['identical']}")
    r = rank_for_pick(rows, row["format"], row["batch"], row.get("budget_bytes"))
    if r is None:
        return line + f"\nrank agreement: no validated group of {row['format']} at batch {row['batch']} in {path}"
    where = "at this budget" if r["budget_matched"] else "at every validated budget (this one was not)"
    return line + f"\nrank agreement ({row['format']}, batch {row['batch']}, {where}): {rank_text(r)}"


def cmd_reproduce(args) -> None:
    if args.paper == "zipmoe":
        from experiments.reproduce_zipmoe import reproduce
    else:
        from experiments.reproduce_d2moe import reproduce
    out = Path(args.out or f"runs/reproduce-{args.paper}")
    text = reproduce(out, jobs=args.jobs, quiet=args.quiet)
    print(text.split("## Every run")[0].rstrip())
    print(f"\nwrote {out / 'results.csv'} (resumable), {out / 'report.md'} and figures (PNG, PDF) in {out}")


def add_parsers(sub, add) -> None:
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
    p.add_argument("--baseline", metavar="POLICY", help="the policy label to divide by (needed by --kind speedup)")
    p.add_argument("--row", metavar="CONFIG_HASH", help="gantt: the run to draw (default: the first row that ran)")
    p.add_argument("--out", help="output path without extension (default: beside the results)")
    p.set_defaults(func=cmd_plot)

    from experiments.pick import METRICS
    p = add(sub, "pick", help="the best run of a sweep under constraints, written as a run spec")
    p.add_argument("results", help="results CSV of `moelab sweep`")
    p.add_argument("--device", help="only runs on this device")
    p.add_argument("--budget", type=size_arg, metavar="SIZE", help="only runs whose expert memory fits in this")
    p.add_argument("--metric", default="throughput", choices=list(METRICS), help="what to optimise")
    p.add_argument("--constraint", action="append", default=[], metavar="COLUMN<=VALUE",
                   help="e.g. tpot_s_p99<=0.25 or peak_expert_bytes<=2GB (repeatable)")
    p.add_argument("--where", action="append", default=[], type=key_value, metavar="COLUMN=VALUE",
                   help="only rows with this value (repeatable), e.g. model=mixtral-8x7b")
    p.add_argument("--allow-offline", action="store_true", help="also pick offline bounds (belady, static-hot, "
                                                                "oracle prefetch), which no device can run")
    p.add_argument("--out", default="runs/picked-policy.yaml", help="the run spec file to write")
    p.add_argument("--validation", default="runs/validate/validation.csv",
                   help="`moelab validate` results whose measured error is shown for the picked class")
    p.set_defaults(func=cmd_pick)

    p = add(sub, "reproduce", help="reproduce a paper's results in the simulator (reuses earlier runs)")
    p.add_argument("paper", choices=["d2moe", "zipmoe"])
    p.add_argument("--out", help="output folder (default runs/reproduce-PAPER)")
    p.add_argument("--jobs", type=positive_int, help="parallel processes (default: the cores)")
    p.set_defaults(func=cmd_reproduce)
