"""`moelab sweep GRID.yaml`: what-if sweeps in the simulator, resumable, local or on Dask.

A grid file (YAML, safe_load) names the axes; every combination is one simulator run:

    tokens: 128                 # new tokens per request (synthetic traces); also prompt, skew,
    prompt: 16                  #   locality, seed, requests (default: the batch size)
    grid:                       # the cartesian product of these lists (a scalar is a 1-list)
      device: [jetson-orin-nano-8gb, raspberry-pi-5-8gb]
      storage: [nvme]           # default: each device's own
      model: [mixtral-8x7b]
      trace: [synthetic]        # or paths of routing traces (any format `moelab trace import` reads)
      policy: [lru, lfu, {preset: d2moe}, {cache: lru, prefetch: last-use}]
      budget: [2GB, 4GB]
      batch: [1, 16]
      format: [bf16, {name: mwq, ladder: v2}, {name: zip, codec: zstd}]
      seed: [0, 1, 2]           # the scalars (tokens, prompt, requests, skew, locality, seed) may vary too

Instead of `grid`, `runs:` lists configurations one by one, and `sample: {n: 50, seed: 1}`
beside a grid runs a seeded random subset of it. A policy is a cache name or a mapping
with cache / scheduler / allocator / prefetch / allocator_options / scheduler_options, or
a `preset` (policies/presets.py; a preset brings its own format and, for the
hold-in-memory systems, its budget). Everything is checked before anything runs; an error
names the file and the key path.

Each run is one row of the results CSV (every config field, every metric, the moelab
version and commit, a hash of the config, the wall time), appended and fsynced as it
finishes: a crash or Ctrl-C loses nothing, and a rerun skips the rows already there. Runs
go to local processes (`jobs`) or to a Dask cluster (`cluster`): the rows are the same
either way, timing columns aside.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from devices.units import ConfigError, parse_size

AXES = ("device", "storage", "model", "trace", "policy", "budget", "batch", "format")
SCALARS = {"tokens": 128, "prompt": 16, "requests": None, "skew": 0.4, "locality": 0.15, "seed": 0}
POLICY_KEYS = ("cache", "scheduler", "allocator", "prefetch", "allocator_options", "scheduler_options", "preset")
FORMAT_KEYS = ("name", "ladder", "codec")
CONFIG_FIELDS = ("config_hash", "device", "storage", "model", "trace", "policy", "preset", "cache", "scheduler",
                 "allocator", "prefetch", "allocator_options", "scheduler_options", "budget_bytes", "batch",
                 "format", "ladder", "codec", *SCALARS)
METRIC_FIELDS = ("status", "ttft_s", "ttft_s_cold", "tpot_s_mean", "tpot_s_p10", "tpot_s_p25", "tpot_s_p50",
                 "tpot_s_p75", "tpot_s_p90", "tpot_s_p99", "throughput_tok_s", "makespan_s", "generated_tokens",
                 "peak_expert_bytes", "bytes_read", "loads", "prefetches", "hit_ratio", "prefetch_coverage",
                 "prefetch_waste_bytes", "bits_per_weight", "compute_bubble_fraction", "io_busy_fraction",
                 "decompress_busy_fraction")
RUN_FIELDS = ("moelab_version", "commit", "wall_s", "note")
FIELDS = CONFIG_FIELDS + METRIC_FIELDS + RUN_FIELDS


# -- the grid file -----------------------------------------------------------------------------
def load_grid(path) -> list[dict]:
    """The run configurations of a grid file, each normalised and checked (ConfigError naming
    the file and the key path otherwise), without duplicates."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such grid file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with `grid:` or `runs:`")
    known = {"grid", "runs", "sample", "name", "description", *SCALARS}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; keys: {', '.join(sorted(known))}")
    base = {k: doc.get(k, v) for k, v in SCALARS.items()}
    if ("grid" in doc) == ("runs" in doc):
        raise ConfigError(f"{path}: give exactly one of `grid:` (a product of axes) or `runs:` (a list)")
    if "grid" in doc:
        grid = doc["grid"]
        if not isinstance(grid, dict):
            raise ConfigError(f"{path}: grid: must map axes ({', '.join(AXES)}) to lists")
        for key in grid:
            if key not in (*AXES, *SCALARS):
                raise ConfigError(f"{path}: grid.{key}: unknown axis; axes: {', '.join((*AXES, *SCALARS))}")
        axes = {k: grid[k] if isinstance(grid[k], list) else [grid[k]] for k in grid}
        for k, values in axes.items():
            if not values:
                raise ConfigError(f"{path}: grid.{k}: an empty list gives no runs")
        names = list(axes)
        raw = [(dict(zip(names, combo)), "grid." + "/".join(f"{n}[{axes[n].index(v)}]" for n, v in zip(names, combo)))
               for combo in itertools.product(*axes.values())]
        if "sample" in doc:
            raw = _sample(raw, doc["sample"], path)
    else:
        if not isinstance(doc["runs"], list) or not doc["runs"]:
            raise ConfigError(f"{path}: runs: must be a non-empty list of mappings")
        raw = []
        for i, entry in enumerate(doc["runs"]):
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: runs[{i}]: must be a mapping of {', '.join(AXES)}")
            raw.append((entry, f"runs[{i}]"))
    configs, seen = [], set()
    for entry, where in raw:
        cfg = normalise({**base, **entry}, f"{path}: {where}")
        if cfg["config_hash"] not in seen:
            seen.add(cfg["config_hash"])
            configs.append(cfg)
    return configs


def _sample(raw, spec, path):
    if not isinstance(spec, dict) or set(spec) - {"n", "seed"} or not isinstance(spec.get("n"), int) or spec["n"] < 1:
        raise ConfigError(f"{path}: sample: must be {{n: COUNT >= 1, seed: INT}}, got {spec!r}")
    rng = np.random.default_rng(spec.get("seed", 0))
    picks = rng.choice(len(raw), size=min(spec["n"], len(raw)), replace=False)
    return [raw[i] for i in sorted(picks)]


def normalise(entry: dict, where: str) -> dict:
    """One run's configuration, every field explicit and checked; with its hash."""
    from devices.profile import load_device
    from policies import ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS, lookup
    from policies.presets import get_preset
    from workloads.formats import FORMATS

    for key in entry:
        if key not in (*AXES, *SCALARS):
            raise ConfigError(f"{where}: unknown key {key!r}; keys: {', '.join((*AXES, *SCALARS))}")

    def check(key, fn):
        try:
            return fn()
        except ConfigError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None

    cfg = {k: entry.get(k, v) for k, v in SCALARS.items()}
    for k in ("tokens", "prompt", "seed") + (("requests",) if cfg["requests"] is not None else ()):
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < (0 if k in ("seed", "prompt") else 1):
            raise ConfigError(f"{where}: {k}: must be an integer >= {0 if k in ('seed', 'prompt') else 1}, "
                              f"got {cfg[k]!r}")
    for k in ("skew", "locality"):
        if not isinstance(cfg[k], (int, float)) or cfg[k] < 0:
            raise ConfigError(f"{where}: {k}: must be a number >= 0, got {cfg[k]!r}")
    device = check("device", lambda: load_device(str(entry.get("device", "jetson-agx-orin-64gb"))))
    cfg["device"] = device.name if not device.path or Path(device.path).stem == device.name else device.path
    cfg["storage"] = check("storage", lambda: device.storage_option(entry.get("storage")).name)
    trace = str(entry.get("trace", "synthetic"))
    if trace != "synthetic" and not Path(trace).exists():
        raise ConfigError(f"{where}: trace: no such file {trace!r} (or `synthetic`)")
    cfg["trace"] = trace
    # a catalog name or a model folder; with a trace file, by default the model the trace names
    cfg["model"] = str(entry.get("model", "mixtral-8x7b" if trace == "synthetic" else "from-trace"))
    check("model", lambda: run_model(cfg))
    batch = entry.get("batch", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError(f"{where}: batch: must be an integer >= 1, got {batch!r}")
    cfg["batch"] = batch

    policy = entry.get("policy", "lru")
    policy = {"cache": policy} if isinstance(policy, str) else policy
    if not isinstance(policy, dict):
        raise ConfigError(f"{where}: policy: a cache name or a mapping of {', '.join(POLICY_KEYS)}")
    for key in policy:
        if key not in POLICY_KEYS:
            raise ConfigError(f"{where}: policy.{key}: unknown key; keys: {', '.join(POLICY_KEYS)}")
    fmt = entry.get("format", "bf16")
    fmt = {"name": fmt} if isinstance(fmt, str) else fmt
    if not isinstance(fmt, dict) or "name" not in fmt or set(fmt) - set(FORMAT_KEYS):
        raise ConfigError(f"{where}: format: a format name ({', '.join(FORMATS)}) or a mapping of "
                          f"{', '.join(FORMAT_KEYS)}, got {fmt!r}")
    budget_all = False
    if policy.get("preset"):
        preset = check("policy.preset", lambda: get_preset(policy["preset"]))
        if set(policy) - {"preset"}:
            raise ConfigError(f"{where}: policy: a preset sets the whole bundle; give `preset` alone")
        policy = {k: getattr(preset, k) for k in ("cache", "scheduler", "allocator", "prefetch")} | {
            "allocator_options": dict(preset.allocator_options), "scheduler_options": dict(preset.scheduler_options),
            "preset": preset.name}
        fmt = {"name": preset.format, "ladder": preset.ladder}          # a preset brings its format
        budget_all = preset.budget == "all"
    for key, table, default in (("cache", CACHES, "lru"), ("scheduler", SCHEDULERS, "fifo"),
                                ("allocator", ALLOCATORS, "fixed"), ("prefetch", PREFETCHERS, "none")):
        cfg[key] = str(policy.get(key, default))
        check(f"policy.{key}", lambda: lookup(table, key, cfg[key]))
    for key in ("allocator_options", "scheduler_options"):
        opts = policy.get(key) or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: policy.{key}: must be a mapping, got {opts!r}")
        cfg[key] = json.dumps({k: opts[k] for k in sorted(opts)})
    cfg["preset"] = policy.get("preset") or ""
    cfg["policy"] = policy_label(cfg)
    if fmt["name"] not in FORMATS:
        raise ConfigError(f"{where}: format: unknown format {fmt['name']!r}; known: {', '.join(FORMATS)}")
    cfg["format"] = fmt["name"]
    cfg["ladder"] = fmt.get("ladder") or ("v1" if fmt["name"] in ("mwq", "copies") else "")
    cfg["codec"] = fmt.get("codec") or ("lz4hc" if fmt["name"] == "zip" else "")
    check("format", lambda: make_run_format(cfg))
    if budget_all:
        cfg["budget_bytes"] = "all"
    else:
        budget = entry.get("budget")
        cfg["budget_bytes"] = (device.expert_budget_bytes if budget is None else
                               check("budget", lambda: parse_size(budget, "budget")))
    cfg["config_hash"] = config_hash(cfg)
    return cfg


def policy_label(cfg: dict) -> str:
    """A short name of the bundle: the preset, else the non-default choices joined by '+'."""
    if cfg.get("preset"):
        return cfg["preset"]
    parts = [cfg["cache"]] + [cfg[k] for k, d in (("scheduler", "fifo"), ("allocator", "fixed"), ("prefetch", "none"))
                              if cfg[k] != d]
    for key in ("allocator_options", "scheduler_options"):
        opts = json.loads(cfg[key]) if isinstance(cfg[key], str) else cfg[key]
        parts += [f"{k}={v}" for k, v in opts.items()]
    return "+".join(parts)


def config_hash(cfg: dict) -> str:
    body = {k: cfg[k] for k in CONFIG_FIELDS if k not in ("config_hash", "policy")}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_model(cfg: dict):
    """The run's architecture: a catalog name, a model folder, or `from-trace` (the one its trace names)."""
    from workloads.catalog import get_model, model_of_trace
    if cfg["model"] != "from-trace":
        return get_model(cfg["model"])
    from workloads.importers import import_trace
    model = model_of_trace(import_trace(cfg["trace"]).metadata, cfg["trace"])
    if model is None:
        raise ConfigError(f"{cfg['trace']}: the trace names no model; give `model:`")
    return model


def make_run_format(cfg: dict):
    from workloads.formats import make_format
    opts = {}
    if cfg["format"] in ("mwq", "copies"):
        opts["ladder"] = cfg["ladder"]
    if cfg["format"] == "zip":
        opts["codec"] = cfg["codec"]
    return make_format(cfg["format"], run_model(cfg).expert_shapes, **opts)


# -- one run ------------------------------------------------------------------------------------
def build_run(cfg: dict):
    """(device, storage, workload, policies) of a configuration, exactly as `moelab simulate`
    would run it."""
    from devices.profile import load_device
    from policies import build_policies
    from policies.cost import CostModel
    from workloads.importers import import_trace
    from workloads.synthetic import synthetic_trace
    from workloads.workload import Workload

    device, model = load_device(cfg["device"]), run_model(cfg)
    storage = device.storage_option(cfg["storage"])
    fmt = make_run_format(cfg)
    if cfg["trace"] == "synthetic":
        trace = synthetic_trace(model, requests=cfg["requests"] or cfg["batch"], prompt_len=cfg["prompt"],
                                output_len=cfg["tokens"], skew=cfg["skew"], locality=cfg["locality"], seed=cfg["seed"])
    else:
        trace = import_trace(cfg["trace"])
    workload = Workload(model, trace, fmt, batch=cfg["batch"])
    budget = (model.layers * model.experts * fmt.level_bytes(fmt.levels - 1) if cfg["budget_bytes"] == "all"
              else int(cfg["budget_bytes"]))
    policies = build_policies(workload, budget, cache=cfg["cache"], scheduler=cfg["scheduler"],
                              allocator=cfg["allocator"], prefetch=cfg["prefetch"],
                              cost=CostModel.build(device, model, fmt, storage),
                              scheduler_options=json.loads(cfg["scheduler_options"]),
                              **json.loads(cfg["allocator_options"]))
    return device, storage, workload, policies


def run_config(cfg: dict, keep_timeline: bool = False):
    """One simulator run -> its results row (and its timeline if asked). A budget below the
    workload's minimum is a row with status "below minimum", not an error."""
    from policies import BudgetError
    from sim.engine import Simulator
    from timeline.metrics import compute_metrics
    t0 = time.perf_counter()
    row = {k: cfg[k] for k in CONFIG_FIELDS} | {"moelab_version": _version(), "commit": _commit()}
    try:
        device, storage, workload, policies = build_run(cfg)
    except BudgetError as e:
        row.update(status="below minimum", note=str(e), wall_s=round(time.perf_counter() - t0, 4))
        return (row, None) if keep_timeline else row
    tl = Simulator(device, workload, policies, storage).run()
    fmt = workload.fmt
    m = compute_metrics(tl, level_bits=[fmt.b1 + i for i in range(fmt.levels)] if hasattr(fmt, "b1")
                        else [16] * fmt.levels)
    row.update({k: m.get(k) for k in METRIC_FIELDS if k != "status"}, status="ok",
               wall_s=round(time.perf_counter() - t0, 4))
    if cfg["budget_bytes"] == "all":
        row["note"] = f"budget: every expert resident ({policies.cache.capacity} B)"
    return (row, tl) if keep_timeline else row


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


# -- the results file -----------------------------------------------------------------------------
def read_results(path) -> list[dict]:
    """The rows of a results CSV (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(text.splitlines(keepends=True)))


def _open_results(path: Path):
    """The results file ready to append to: a torn last line is cut off, a new file gets its header."""
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header and header != list(FIELDS):
            raise ConfigError(f"{path}: written by another moelab version (other columns); give another --out")
    new = not path.exists() or path.stat().st_size == 0
    f = open(path, "a", newline="")
    writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
    if new:
        writer.writeheader()
        f.flush()
    return f, writer


def sweep(grid_path, out, jobs: int | None = None, cluster: str | None = None, quiet: bool = False) -> dict:
    """Run every configuration of the grid not yet in `out` (a CSV), appending rows as they
    finish. Returns counts: runs in the grid, done before, run now, seconds."""
    configs = load_grid(grid_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["config_hash"] for r in read_results(out)}
    todo = [c for c in configs if c["config_hash"] not in done]
    f, writer = _open_results(out)
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(todo), disable=quiet or not todo, desc="sweep", unit="run", smoothing=0.1) as bar:
            for row in _execute(todo, jobs, cluster):
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    finally:
        f.close()
    return {"runs": len(configs), "done_before": len(configs) - len(todo), "ran": len(todo),
            "seconds": time.perf_counter() - t0}


def _execute(todo: list[dict], jobs: int | None, cluster: str | None):
    """Rows as runs finish: on a Dask cluster, in local processes, or here (one job)."""
    if not todo:
        return
    if cluster:
        try:
            from dask.distributed import Client, as_completed
        except ImportError:
            raise ConfigError("--cluster needs dask.distributed: pip install 'moelab[cluster]'") from None
        try:
            client = Client(cluster, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--cluster {cluster}: cannot connect ({e})") from None
        try:
            for fut in as_completed(client.map(run_config, todo, pure=False)):
                yield fut.result()
        finally:
            client.close()
        return
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        yield from map(run_config, todo)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed as done_first
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_config, c) for c in todo]
        try:
            for fut in done_first(futures):
                yield fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
