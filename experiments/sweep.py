"""`moelab sweep GRID.yaml`: what-if sweeps in the simulator, resumable, local or on Dask.

A grid file (YAML, safe_load) names the axes; every combination is one run spec
(experiments/spec.py: its keys are the axes), run by the one run function (experiments/run.py):

    tokens: 128                 # any run-spec key beside `grid` is the base of every run
    prompt_tokens: 16
    grid:                       # the cartesian product of these lists (a scalar is a 1-list)
      device: [jetson-orin-nano-8gb, raspberry-pi-5-8gb]
      storage: [nvme]           # default: each device's own
      model: [mixtral-8x7b]
      trace: [synthetic]        # or paths of routing traces (any format `moelab trace import` reads)
      policy: [lru, lfu, {preset: d2moe}, {cache: lru, prefetch: last-use},
               {cache: zipmoe, cache_options: {split: 0.6}}]
      budget: [2GB, 4GB]
      batch: [1, 16]
      format: [bf16, {name: mwq, ladder: v2}, {name: zip, codec: zstd}]
      seed: [0, 1, 2]

Instead of `grid`, `runs:` lists run specs one by one (a `moelab pick` file is one), and
`sample: {n: 50, seed: 1}` beside a grid runs a seeded random subset of it. A policy is a bundle
(policies/spec.py): a cache name, a mapping of roles and their options, or a `preset` (which
brings its own format, so a grid's format axis does not apply to it, and, for the hold-in-memory
systems, its budget). Everything is checked
before anything runs, by the checks the run itself makes; an error names the file and the key path.

Each run is one row of the results CSV (every config field, every metric, the moelab
version and commit, the spec's hash, the wall time), appended and fsynced as it finishes: a
crash or Ctrl-C loses nothing, and a rerun skips the rows already there. Runs go to local
processes (`jobs`) or to a Dask cluster (`cluster`): the rows are the same either way, timing
columns aside.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from devices.units import ConfigError
from experiments.spec import KEYS, ROW_FIELDS, RunSpec, read_yaml, spec_row

METRIC_FIELDS = ("status", "ttft_s", "ttft_s_cold", "tpot_s_mean", "tpot_s_p10", "tpot_s_p25", "tpot_s_p50",
                 "tpot_s_p75", "tpot_s_p90", "tpot_s_p99", "throughput_tok_s", "makespan_s", "generated_tokens",
                 "peak_expert_bytes", "bytes_read", "loads", "prefetches", "hit_ratio", "prefetch_coverage",
                 "prefetch_waste_bytes", "bits_per_weight", "compute_bubble_fraction", "io_busy_fraction",
                 "decompress_busy_fraction", "energy_j", "energy_per_token_j", "average_power_w", "energy_idle_share",
                 "energy_share_board", "energy_share_compute", "energy_share_memory", "energy_share_decompress",
                 "energy_share_storage", "energy_reason", "host_hit_ratio", "host_peak_bytes", "cpu_token_share",
                 "cpu_busy_fraction")
RUN_FIELDS = ("moelab_version", "commit", "wall_s", "note")
FIELDS = ROW_FIELDS + METRIC_FIELDS + RUN_FIELDS
GRID_KEYS = ("grid", "runs", "sample", "name", "description")


# -- the grid file -----------------------------------------------------------------------------
def load_grid(path) -> list[RunSpec]:
    """The run specs of a grid file, resolved and checked as their runs check them (ConfigError
    naming the file and the key path otherwise), without duplicates."""
    path = Path(path)
    doc = _read_grid(path)
    base = {k: v for k, v in doc.items() if k in KEYS}
    specs, seen = [], set()
    for entry, where in _entries(doc, path):
        spec = _checked({**base, **entry}, f"{path}: {where}")
        if spec.config_hash() not in seen:
            seen.add(spec.config_hash())
            specs.append(spec)
    return specs


def _read_grid(path: Path) -> dict:
    doc = read_yaml(path, "grid")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with `grid:` or `runs:`")
    for key in doc:
        if key not in GRID_KEYS and key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; keys: {', '.join(GRID_KEYS + KEYS)}")
    if ("grid" in doc) == ("runs" in doc):
        raise ConfigError(f"{path}: give exactly one of `grid:` (a product of axes) or `runs:` (a list)")
    return doc


def _entries(doc: dict, path: Path) -> list[tuple[dict, str]]:
    """(entry, key path) of every run the grid or the list names."""
    if "runs" in doc:
        if not isinstance(doc["runs"], list) or not doc["runs"]:
            raise ConfigError(f"{path}: runs: must be a non-empty list of run specs")
        for i, entry in enumerate(doc["runs"]):
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: runs[{i}]: must be a mapping of {', '.join(KEYS)}")
        return [(entry, f"runs[{i}]") for i, entry in enumerate(doc["runs"])]
    grid = doc["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid: must map axes ({', '.join(KEYS)}) to lists; an empty grid gives no runs")
    for key in grid:
        if key not in KEYS:
            raise ConfigError(f"{path}: grid.{key}: unknown axis; axes: {', '.join(KEYS)}")
    axes = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    for k, values in axes.items():
        if not values:
            raise ConfigError(f"{path}: grid.{k}: an empty list gives no runs")
    names = list(axes)
    raw = [(_preset_format(dict(zip(names, combo))), "grid." + "/".join(f"{n}[{i}]" for n, i in zip(names, idx)))
           for combo, idx in zip(itertools.product(*axes.values()),
                                 itertools.product(*(range(len(v)) for v in axes.values())))]
    return _sample(raw, doc["sample"], path) if "sample" in doc else raw


def _preset_format(entry: dict) -> dict:
    """In a grid, a preset brings its own format: the format axis does not apply to its runs (they
    collapse to one per preset). In a single run spec, a preset beside another format is an error."""
    if isinstance(entry.get("policy"), dict) and "preset" in entry["policy"]:
        entry.pop("format", None)
    return entry


def _sample(raw, spec, path):
    if not isinstance(spec, dict) or set(spec) - {"n", "seed"} or not isinstance(spec.get("n"), int) or spec["n"] < 1:
        raise ConfigError(f"{path}: sample: must be {{n: COUNT >= 1, seed: INT}}, got {spec!r}")
    rng = np.random.default_rng(spec.get("seed", 0))
    picks = rng.choice(len(raw), size=min(spec["n"], len(raw)), replace=False)
    return [raw[i] for i in sorted(picks)]


def _checked(entry: dict, where: str) -> RunSpec:
    """One entry as a resolved run spec, with every check the run makes before it runs."""
    from experiments.run import check_spec
    spec = RunSpec.from_doc(entry, where)
    try:
        return check_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# -- one run ------------------------------------------------------------------------------------
def run_config(spec: RunSpec, keep_timeline: bool = False):
    """One simulator run -> its results row (and its timeline if asked). A budget below the
    workload's minimum is a row with status "below minimum", not an error."""
    from experiments.run import OverMemory, simulate
    from policies import BudgetError
    t0 = time.perf_counter()
    from experiments.spec import trace_model
    name = None if spec.model is not None or spec.synthetic else trace_model(spec.trace).name
    row = spec_row(spec, name) | {"moelab_version": _version(), "commit": _commit()}
    try:
        run = simulate(spec, timeline=keep_timeline)
    except BudgetError as e:
        status = "over memory" if isinstance(e, OverMemory) else "below minimum"
        row.update(status=status, note=str(e), wall_s=round(time.perf_counter() - t0, 4))
        return (row, None) if keep_timeline else row
    m = run.metrics
    row.update({k: m.get(k) for k in METRIC_FIELDS if k != "status"}, status="ok",
               wall_s=round(time.perf_counter() - t0, 4))
    if spec.budget == "all":
        row["note"] = f"budget: every expert resident ({run.prepared.budget} B)"
    elif run.prepared.memory.note:      # the budget the run had is not budget_bytes (capped to fit)
        row["note"] = f"{run.prepared.memory.note} ({run.prepared.budget} B)"
    return (row, run.timeline) if keep_timeline else row


@lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version
        return version("moelab")
    except Exception:           # running from a checkout that is not installed
        return "unknown"


@lru_cache(maxsize=1)
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the results file and where the runs execute: experiments/results.py, experiments/pool.py --
from contextlib import closing  # noqa: E402

from experiments.pool import execute, stop_on_signals  # noqa: E402
from experiments.results import open_results, read_results, results_lock  # noqa: E402 (read_results: imported from here)


def sweep(grid_path, out, jobs: int | None = None, cluster: str | None = None, quiet: bool = False) -> dict:
    """Run every configuration of the grid not yet in `out` (a CSV), appending rows as they
    finish. Returns counts: runs in the grid, done before, run now, seconds. The file is locked
    for the whole sweep (a second writer is refused); Ctrl-C or SIGTERM stops every run at once."""
    configs = load_grid(grid_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with stop_on_signals(), results_lock(out):
        f, writer = open_results(out, FIELDS)
        done = {r["config_hash"] for r in read_results(out)}
        todo = [c for c in configs if c.config_hash() not in done]
        t0 = time.perf_counter()
        # closing(): an interruption here, between rows, stops the runs too
        with f, closing(execute(run_config, todo, jobs, cluster)) as rows, \
                tqdm(total=len(todo), disable=quiet or not todo, desc="sweep", unit="run", smoothing=0.1) as bar:
            for row in rows:
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    return {"runs": len(configs), "done_before": len(configs) - len(todo), "ran": len(todo),
            "seconds": time.perf_counter() - t0}
