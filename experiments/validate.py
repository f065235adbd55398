"""`moelab validate`: how far the simulator's prediction is from what the executor measures.

One forced trace (the trained model's own routing, `trace.npz` in the output folder), one
matrix of configurations: cache policy x budget x format x batch x prefetcher (CACHES, the
papers' caches with their formats: PAPER_CACHES). For each configuration the executor runs
`repeats` times on this host and the simulator once with the host's measured profile
(`moelab profile`); with a throttle, the executor's reads are held to a device's storage
(executor/io.py StorageThrottle) and the simulator is given that storage.

One row per configuration in validation.csv (appended as each finishes: a rerun skips the
rows there), then validation.md (the summary and the table) and validation.png (predicted
against measured TPOT and TTFT, the executor's spread as error bars). Per row: predicted
and measured (mean over repeats, with their standard deviation) TTFT, TPOT, throughput and
hit ratio, relative errors, busy-time errors per resource (I/O: union of reads; decompression
and compute: summed task time), and whether every repeat made the simulator's decisions.
"Measured" is the median over the repeats (one run stalled by the host does not move it);
the spread is their standard deviation, each repeat's TPOT is in the row, and the TPOT error
against their mean is reported beside it.

A configuration whose TPOT spread over its first `repeats` runs exceeds `spread_limit` (sd /
median) gets more runs, in further passes, up to `max_repeats` (decided once from those first
runs, so a rerun decides the same); its row then takes all of them (`repeats` column: how many).
The statistics validation.md and `moelab validate` report (bias with its bootstrap interval,
within the executor's 2 sigma, rank agreement) are experiments/validate_stats.py's.

The host: the CPUs the process may run on (`--cores N` pins it before the Validator starts) and
its torch device, kept in host.json: a rerun into the same folder on other cores is refused, and
so is a profile taken on another number of cores (its `# cores:` line, experiments/calibrate.py).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from devices.units import ConfigError
from executor.host_probe import (STEADY_SECONDS, at_speed, drift, drift_text, probe, profile_comment, profile_probe,
                                 profile_probe_range, profile_steadiness, steadiness, steadiness_text)

CACHES = ("fifo", "lru", "lfu", "belady")
PAPER_CACHES = {"mwq": ("d2moe-budget",), "zip": ("zipmoe",)}   # the papers' caches, on their formats
BUDGETS = (0.3, 0.5, 0.75)          # shares of all experts' bytes at the top level
FORMATS = ("bf16", "mwq", "zip")
BATCHES = (1, 4)
PREFETCH = ("none", "oracle")
QUICK = {"caches": ("lru", "belady"), "paper": False, "budgets": (0.5,), "formats": ("bf16", "zip"),
         "batches": (1, 2), "prefetch": ("none", "oracle")}
# --reduced: every format with LRU and its paper's cache at half the experts' bytes (20 configurations,
# the full trace): the host model's fidelity per format at a fraction of the full matrix's time
REDUCED = {"caches": ("lru",), "paper": True, "budgets": (0.5,), "formats": FORMATS, "batches": BATCHES,
           "prefetch": PREFETCH}
METRICS = ("ttft_s", "tpot_s_mean", "throughput_tok_s", "hit_ratio")
RESOURCES = ("io", "decompress", "compute")
KEY_FIELDS = ("throttle", "format", "cache", "budget_share", "batch", "prefetch")
PROMPT_SOURCE = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
                 "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
                 "        self.items.append(x)\nimport os\nfor root, dirs, files in os.walk('.'):\n    print(root)\n")


def fields() -> list[str]:
    out = list(KEY_FIELDS) + ["budget_bytes", "repeats"]
    for m in METRICS:
        out += [f"pred_{m}", f"meas_{m}", f"sd_{m}", f"err_{m}"]
    for r in RESOURCES:
        out += [f"pred_{r}_busy_s", f"meas_{r}_busy_s", f"err_{r}_busy"]
    return out + ["runs_tpot_s_mean", "runs_at_profile_speed", "err_tpot_vs_mean_of_runs", "decisions_identical",
                  "status"]


def matrix(quick: bool, reduced: bool = False) -> list[dict]:
    full = {"caches": CACHES, "paper": True, "budgets": BUDGETS, "formats": FORMATS, "batches": BATCHES,
            "prefetch": PREFETCH}
    q = QUICK if quick else REDUCED if reduced else full
    rows = []
    for fmt in q["formats"]:
        caches = tuple(q["caches"]) + (PAPER_CACHES.get(fmt, ()) if q["paper"] else ())
        for cache, share, batch, prefetch in itertools.product(caches, q["budgets"], q["batches"], q["prefetch"]):
            rows.append({"format": fmt, "cache": cache, "budget_share": share, "batch": batch, "prefetch": prefetch})
    return rows


def row_key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY_FIELDS)


def rel_err(pred, meas):
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def busy(tl) -> dict:
    """Seconds each resource was busy: I/O as the union of reads (they overlap at queue depth > 1),
    decompression and compute (experts and dense parts) as their summed task time."""
    from timeline.metrics import busy_time
    ev = [e for e in tl.events if e.resource != "cache"]
    return {"io": busy_time((e.start, e.end) for e in ev if e.resource == "io"),
            "decompress": sum(e.end - e.start for e in ev if e.resource.startswith("decompress")),
            "compute": sum(e.end - e.start for e in ev if e.resource in ("compute", "dense"))}


class Validator:
    def __init__(self, out, profile, *, throttle: str | None = None, quick: bool = False, repeats: int = 3,
                 requests: int | None = None, prompt: int | None = None, tokens: int | None = None,
                 store_root="runs/stores", model_dir=None, quiet: bool = False, io_concurrency: int = 2,
                 max_repeats: int | None = None, spread_limit: float = 0.15, torch_device: str = "cpu",
                 reduced: bool = False):
        from devices.profile import load_device
        from executor.model import model_arch
        from executor.train import DEFAULT_MODEL, load_trained
        self.out = Path(out)
        self.trace_path = self.out / "trace.npz"          # the model's own routing, recorded once
        self.profile = load_device(str(profile))
        self.speeds = profile_probe_range(profile)        # the host's speeds while it was profiled
        self.throttle = throttle
        self.storage = self.profile.storage_option(None)
        if throttle:
            dev, _, opt = throttle.partition(":")
            self.storage = load_device(dev).storage_option(opt or None)
        self.quick, self.reduced, self.repeats, self.quiet = quick, reduced, repeats, quiet
        self.max_repeats = repeats if max_repeats is None else max_repeats
        if self.max_repeats < repeats:
            raise ConfigError(f"--max-repeats {max_repeats} must be >= --repeats {repeats}")
        self.spread_limit = spread_limit
        self.host = host_state(torch_device)
        check_profile_host(profile, self.host)
        self.requests = requests or (2 if quick else 4)
        self.prompt = prompt or (8 if quick else 16)
        self.tokens = tokens or (6 if quick else 24)
        self.model_dir = Path(model_dir or DEFAULT_MODEL)
        self.name = self.model_dir.name
        self.model, self.tok, _ = load_trained(self.model_dir)
        self.arch = model_arch(self.model, self.name)
        m = self.profile.compute.measured
        if m is None or m.model != self.name:
            raise ConfigError(f"{profile}: not a measured profile of model {self.name} (compute.measured.model); "
                              f"run `moelab profile --out {profile}` first")
        self.store_root = Path(store_root)
        self.stores: dict = {}
        self.setups: dict = {}           # configuration key -> setup()
        # the executor runs with the profile's decompression workers and read concurrency (its
        # storage option's queue depth can be lower than the concurrency that measured it)
        self.io_concurrency = io_concurrency

    # -- inputs ------------------------------------------------------------------------
    def trace(self):
        from executor.record import record_routing
        from workloads.trace import RoutingTrace
        path = self.trace_path
        if path.exists():
            return RoutingTrace.load(path)
        ids = list(self.tok.encode(PROMPT_SOURCE)) if self.tok is not None else list(range(200))
        prompts = torch.tensor([ids[i * 7: i * 7 + self.prompt] for i in range(self.requests)])
        trace = record_routing(self.model, prompts, self.tokens, model_name=self.name)
        self.out.mkdir(parents=True, exist_ok=True)
        trace.save(path)
        return trace

    def store(self, fmt_name: str):
        from executor.store_build import ensure_store
        if fmt_name not in self.stores:
            self.stores[fmt_name] = ensure_store(self.model, self.store_root / f"{self.name}-{fmt_name}", fmt_name,
                                                 quiet=True)
        return self.stores[fmt_name]

    # -- one configuration ---------------------------------------------------------------
    def key(self, cfg: dict) -> tuple:
        return row_key(dict(cfg, throttle=self.throttle or ""))

    def setup(self, cfg: dict, trace):
        """(row so far, run spec) of a configuration, built once: the model's recorded trace, the
        format's store (its part sizes), the cache and prefetcher, the budget as a share of every
        expert's bytes, on the measured profile (with the throttled device's storage, if any)."""
        from experiments.run import every_expert_bytes
        from experiments.spec import RunSpec
        key = self.key(cfg)
        if key not in self.setups:
            store = self.store(cfg["format"])
            budget = int(every_expert_bytes(self.arch, store.format) * cfg["budget_share"])
            spec = RunSpec.from_doc({"device": str(self.profile.path), "storage": self.storage.name,
                                     "trace": str(self.trace_path), "format": cfg["format"],
                                     "policy": {"cache": cfg["cache"], "prefetch": cfg["prefetch"]}, "budget": budget,
                                     "batch": cfg["batch"], "store": str(store.path)}, f"validate {key}")
            self.setups[key] = (dict(cfg, throttle=self.throttle or "", budget_bytes=budget, repeats=self.repeats),
                                spec)
        row, spec = self.setups[key]
        return dict(row), spec

    def simulate(self, cfg: dict, trace) -> dict:
        """The simulator's prediction: {"metrics", "busy", "decisions"}, or {"status"} when the
        configuration cannot run (e.g. a budget below one decision point's demand)."""
        from experiments.run import simulate
        _, spec = self.setup(cfg, trace)
        try:
            run = simulate(spec, device=self.profile, storage=self.storage)
        except ConfigError as e:
            return {"status": f"skipped: {e}"}
        return {"metrics": run.metrics, "busy": busy(run.timeline), "decisions": run.timeline.decisions()}

    def execute_once(self, cfg: dict, trace, decisions) -> dict:
        """One executor run: {"metrics", "busy", "same"} (same: it made the simulator's decisions)."""
        from experiments.run_exec import HostOptions, execute
        _, spec = self.setup(cfg, trace)
        host = HostOptions(throttle=self.throttle, cost_device=(self.profile, self.storage),
                           decompress_workers=self.profile.decompress_workers, io_concurrency=self.io_concurrency,
                           torch_device=self.host["torch_device"], torch_threads=self.host["torch_threads"])
        run = execute(spec.with_(model=str(self.model_dir)), host, quiet=True)
        m = run.metrics
        return {"metrics": {k: m[k] for k in METRICS}, "busy": busy(run.timeline),
                "same": run.timeline.decisions() == decisions}

    def run_one(self, cfg: dict, trace) -> dict:
        """A configuration's row, its executor repeats run back to back."""
        sim = self.simulate(cfg, trace)
        if "status" in sim:
            return dict(self.setup(cfg, trace)[0], status=sim["status"])
        return self.row(cfg, trace, sim, [self.execute_once(cfg, trace, sim["decisions"])
                                          for _ in range(self.repeats)])

    def row(self, cfg: dict, trace, sim: dict, runs: list[dict]) -> dict:
        """Predicted against measured (the median over the executor's runs, their spread beside)."""
        row = self.setup(cfg, trace)[0]
        pred, pred_busy = sim["metrics"], sim["busy"]
        meas = [r["metrics"] for r in runs]
        for m in METRICS:
            vals = [x[m] for x in meas if x[m] is not None]
            mid = float(np.median(vals)) if vals else None
            row.update({f"pred_{m}": pred[m], f"meas_{m}": mid,
                        f"sd_{m}": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        f"err_{m}": rel_err(pred[m], mid)})
        timed = [r for r in runs if r["metrics"]["tpot_s_mean"] is not None]
        tpots = [r["metrics"]["tpot_s_mean"] for r in timed]
        row["runs_tpot_s_mean"] = ";".join(f"{t:.6g}" for t in tpots)
        speed = [at_speed(r.get("probe"), self.speeds) for r in timed]      # 1: the host ran at a profiled speed
        row["runs_at_profile_speed"] = "" if None in speed else ";".join(str(int(f)) for f in speed)
        row["err_tpot_vs_mean_of_runs"] = rel_err(pred["tpot_s_mean"], float(np.mean(tpots))) if tpots else None
        for r in RESOURCES:
            mid = float(np.median([x["busy"][r] for x in runs]))
            row.update({f"pred_{r}_busy_s": pred_busy[r], f"meas_{r}_busy_s": mid,
                        f"err_{r}_busy": rel_err(pred_busy[r], mid) if mid > 1e-9 else None})
        return dict(row, repeats=len(runs), decisions_identical=all(r["same"] for r in runs), status="ok")

    # -- the matrix ----------------------------------------------------------------------
    def run(self) -> list[dict]:
        """The matrix in `repeats` passes: each pass runs the executor once per configuration, so
        a configuration's repeats lie minutes apart and a slow spell of the host (another tenant,
        a stalled disk) spreads over many configurations' single runs instead of all the repeats
        of a few (their median would hide nothing); then, for the configurations whose spread is
        large (noisy), passes up to `max_repeats`. Each executor run is kept in runs.jsonl as it
        finishes; a configuration's row is written once its runs are all there (resumable)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.host["steadiness"] = [steadiness(STEADY_SECONDS[self.quick])]     # the host's speed flips (executor/host_probe.py)
        keep_host(self.out / "host.json", self.host)
        csv_path, runs_path = self.out / "validation.csv", self.out / "runs.jsonl"
        done = {row_key(r) for r in read_rows(csv_path)}
        trace = self.trace()
        todo = [c for c in matrix(self.quick, self.reduced) if self.key(c) not in done]
        for fmt in {c["format"] for c in todo}:
            self.store(fmt)
        kept = read_runs(runs_path)
        sims: dict = {}
        with tqdm(total=len(todo) * self.repeats, disable=self.quiet, desc="validate", unit="run") as bar:
            self.passes(todo, range(self.repeats), trace, kept, sims, bar)
            more = [c for c in todo if "status" not in sims[self.key(c)]
                    and noisy(kept[self.key(c)][:self.repeats], self.spread_limit)]
            if more and self.max_repeats > self.repeats:
                bar.total += len(more) * (self.max_repeats - self.repeats)
                bar.refresh()
                self.passes(more, range(self.repeats, self.max_repeats), trace, kept, sims, bar)
        noisy_keys = {self.key(c) for c in more}
        self.host["steadiness"].append(steadiness(STEADY_SECONDS[self.quick]))
        keep_host(self.out / "host.json", self.host)
        for cfg in todo:
            sim = sims[key := self.key(cfg)]
            n = self.max_repeats if key in noisy_keys else self.repeats
            row = (dict(self.setup(cfg, trace)[0], status=sim["status"]) if "status" in sim
                   else self.row(cfg, trace, sim, kept[key][:n]))
            append_row(csv_path, row)
        rows = read_rows(csv_path)
        write_report(self.out, rows, self.profile, self.host)
        return rows

    def passes(self, cfgs: list[dict], reps, trace, kept: dict, sims: dict, bar) -> None:
        """Passes `reps` over `cfgs`: each configuration's run of that pass unless runs.jsonl has it."""
        runs_path = self.out / "runs.jsonl"
        for rep in reps:
            for cfg in cfgs:
                key = self.key(cfg)
                if key not in sims:
                    sims[key] = self.simulate(cfg, trace)
                if "status" not in sims[key] and len(kept.get(key, [])) <= rep:
                    run = self.execute_once(cfg, trace, sims[key]["decisions"])
                    run["probe"] = probe()          # the host's speed as this run left it
                    append_run(runs_path, key, run)
                    kept.setdefault(key, []).append(run)
                bar.update(1)


def noisy(runs: list[dict], limit: float) -> bool:
    """A TPOT spread (sd / median over `runs`, at least 2) above `limit`: it gets more runs."""
    tpots = [r["metrics"]["tpot_s_mean"] for r in runs if r["metrics"].get("tpot_s_mean") is not None]
    if len(tpots) < 2 or float(np.median(tpots)) <= 0:
        return False
    return float(np.std(tpots, ddof=1)) / float(np.median(tpots)) > limit


# -- the host -------------------------------------------------------------------------------------
def host_state(torch_device: str = "cpu") -> dict:
    """The CPUs this process may run on, its torch device and threads, the load average now."""
    from executor.profile_host import host_torch_threads
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {"cores": len(cpus), "cpus": cpus, "torch_device": torch_device,
            "torch_threads": host_torch_threads(torch_device) if torch_device == "cpu" else None,
            "load": list(os.getloadavg())}


def profile_cores(path) -> tuple[int, str] | None:
    """(cores, torch device) a profile was measured on, from its `# cores:` line (None: not recorded)."""
    m = profile_comment(path, r"^# cores: (\d+) of \d+ .*?torch device (\w+)")
    return (int(m.group(1)), m.group(2)) if m else None


def profile_is_quick(path) -> bool:
    """Whether a profile was taken with `moelab profile --quick` (its `# samples: quick` line)."""
    return profile_comment(path, r"^# samples: quick") is not None


# why a quick profile is no ground for a validation (measured on this project's 2-vCPU VM, 2 cores)
QUICK_PROFILE = ("taken with `moelab profile --quick`: its figures come from few samples, and its predictions can "
                 "be far off (on a 2-vCPU VM a quick profile read the disk at 241 MB/s, a full one at 993 MB/s, "
                 "and bf16's TPOT bias went from -0.6% to +50%); validate against a full profile")


def host_drift(out: Path, profile_path) -> str:
    """How much slower the host ran during the executor's runs (their probes, runs.jsonl) than while
    it was profiled (the profile's `# probe:` line): a drift beyond the error one asks of the model
    measures the host, not the model."""
    runs = [r for rs in read_runs(Path(out) / "runs.jsonl").values() for r in rs]
    d = drift([r.get("probe") for r in runs], profile_probe(profile_path))
    if d is None:
        return "Host speed against the profile's: not known (a profile or runs without the probe, executor/host_probe.py)."
    return (f"Host speed during the executor's runs against the profile's (executor/host_probe.py, + is slower): "
            f"{drift_text(d)}.")


def host_steadiness(host: dict | None, profile_path) -> str:
    """How often the host ran at a reduced speed during this validation (its start and end) and while it
    was profiled (the profile's `# steadiness:` line)."""
    readings = (host or {}).get("steadiness")
    mine = steadiness_text(readings) if readings else "not timed"
    theirs = profile_steadiness(profile_path)
    return (f"Host steadiness during this validation: {mine}; while profiled: "
            + ("not recorded" if theirs is None else f"{100 * theirs:.1f}%") + ".")


def check_profile_host(path, host: dict) -> None:
    got = profile_cores(path)
    if got is not None and got != (host["cores"], host["torch_device"]):
        raise ConfigError(f"{path}: measured on {got[0]} cores with torch device {got[1]}, but this validation runs "
                          f"on {host['cores']} with {host['torch_device']}: profile with the same --cores and "
                          f"--torch-device (`moelab profile --cores {host['cores']}`), or validate with theirs")


def keep_host(path: Path, host: dict) -> None:
    """host.json: the cores and device of the folder's runs; another set of cores is refused."""
    from devices.atomic import atomic_write
    if path.exists():
        old = json.loads(path.read_text())
        if (old["cores"], old["torch_device"]) != (host["cores"], host["torch_device"]):
            raise ConfigError(f"{path.parent}: its runs ran on {old['cores']} cores ({old['torch_device']}), this "
                              f"one on {host['cores']} ({host['torch_device']}): give another --out")
    atomic_write(path, json.dumps(host) + "\n")


# -- CSV ----------------------------------------------------------------------------------------
def read_rows(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):                 # a torn last line from a crash
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(text.splitlines(keepends=True)))


def read_runs(path) -> dict:
    """runs.jsonl: configuration key -> its executor runs so far (a torn last line is dropped)."""
    import json
    path = Path(path)
    out: dict = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:              # a crash mid-line
            continue
        out.setdefault(tuple(r["key"]), []).append(r["run"])
    return out


def append_run(path: Path, key: tuple, run: dict) -> None:
    import json
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        if torn:                                   # end a line cut by a crash: it is skipped on reading
            f.write("\n")
        f.write(json.dumps({"key": list(key), "run": run}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields():
            raise ConfigError(f"{path}: written by another version of `moelab validate` (other columns); "
                              f"give another --out or move it away")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields())
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields()})
        f.flush()
        os.fsync(f.fileno())


def num(row: dict, key: str):
    v = row.get(key, "")
    return None if v in ("", None, "None") else float(v)


# -- report -------------------------------------------------------------------------------------
def summary(rows: list[dict]) -> list[dict]:
    """Per throttle regime: how many configurations, the median and max |error| of each metric
    and busy time, the executor's median spread (sd / mean of TPOT) and identical decisions."""
    out = []
    for regime in sorted({r["throttle"] for r in rows}):
        ok = [r for r in rows if r["throttle"] == regime and r["status"] == "ok"]
        if not ok:
            continue
        s = {"throttle": regime or "none", "configs": len(ok),
             "skipped": sum(1 for r in rows if r["throttle"] == regime and r["status"] != "ok"),
             "identical": sum(r["decisions_identical"] == "True" for r in ok)}
        for m in [f"err_{m}" for m in METRICS] + [f"err_{r}_busy" for r in RESOURCES] + ["err_tpot_vs_mean_of_runs"]:
            errs = [abs(num(r, m)) for r in ok if num(r, m) is not None]
            s[m] = (float(np.median(errs)), float(np.max(errs))) if errs else (None, None)
        spread = [num(r, "sd_tpot_s_mean") / num(r, "meas_tpot_s_mean") for r in ok if num(r, "meas_tpot_s_mean")]
        s["tpot_spread"] = (float(np.median(spread)), float(np.max(spread))) if spread else (None, None)
        out.append(s)
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def write_report(out: Path, rows: list[dict], profile=None, host: dict | None = None) -> None:
    from devices.atomic import atomic_write
    from experiments.validate_stats import report_sections
    lines = ["# Simulator vs executor on this host", ""]
    if profile is not None:
        lines += [f"Profile: `{profile.path}` ({profile.name}). Errors are (predicted - measured) / measured; "
                  "measured = median over the executor's repeats, spread = their standard deviation / median "
                  "(TPOT error against the repeats' mean in its own column).", ""]
        if profile_is_quick(profile.path):
            lines += [f"**The profile was {QUICK_PROFILE}.**", ""]
        lines += [host_drift(out, profile.path), ""]
        lines += [host_steadiness(host, profile.path), ""]
    if host is not None:
        lines += [f"Host: {host['cores']} of {os.cpu_count()} CPUs (CPUs {','.join(map(str, host['cpus']))}), torch "
                  f"device {host['torch_device']}, torch threads {host['torch_threads'] or 'default'}; load average "
                  f"(1/5/15 min) {'/'.join(f'{x:.2f}' for x in host['load'])} when this validation (its last "
                  "invocation) began.", ""]
    lines += ["| throttle | configs | decisions identical | TPOT median / max | TTFT median / max | "
              "throughput median / max | hit ratio median / max | I/O busy | decompress busy | compute busy | "
              "TPOT vs mean of repeats | executor TPOT spread median / max |", "|" + "---|" * 12]
    for s in summary(rows):
        def mm(k):
            return f"{_pct(s[k][0])} / {_pct(s[k][1])}"
        lines.append(f"| {s['throttle']} | {s['configs']} (+{s['skipped']} skipped) | {s['identical']} | "
                     f"{mm('err_tpot_s_mean')} | {mm('err_ttft_s')} | {mm('err_throughput_tok_s')} | "
                     f"{mm('err_hit_ratio')} | {mm('err_io_busy')} | {mm('err_decompress_busy')} | "
                     f"{mm('err_compute_busy')} | {mm('err_tpot_vs_mean_of_runs')} | {mm('tpot_spread')} |")
    lines += [""] + report_sections(rows)
    lines += ["## Every configuration", "",
              "| throttle | format | cache | budget | batch | prefetch | TPOT pred / meas (ms) | TPOT err | "
              "spread | TTFT err | hit pred / meas | I/O err | decomp err | compute err | same decisions |",
              "|" + "---|" * 15]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['throttle'] or 'none'} | {r['format']} | {r['cache']} | {r['budget_share']} | "
                         f"{r['batch']} | {r['prefetch']} | {r['status']} |" + " |" * 8)
            continue
        sp = num(r, "sd_tpot_s_mean") / num(r, "meas_tpot_s_mean") if num(r, "meas_tpot_s_mean") else None
        lines.append(
            f"| {r['throttle'] or 'none'} | {r['format']} | {r['cache']} | {r['budget_share']} | {r['batch']} | "
            f"{r['prefetch']} | {1e3 * num(r, 'pred_tpot_s_mean'):.3f} / {1e3 * num(r, 'meas_tpot_s_mean'):.3f} | "
            f"{_pct(num(r, 'err_tpot_s_mean'))} | {_pct(sp)} | {_pct(num(r, 'err_ttft_s'))} | "
            f"{num(r, 'pred_hit_ratio'):.3f} / {num(r, 'meas_hit_ratio'):.3f} | {_pct(num(r, 'err_io_busy'))} | "
            f"{_pct(num(r, 'err_decompress_busy'))} | {_pct(num(r, 'err_compute_busy'))} | "
            f"{r['decisions_identical']} |")
    atomic_write(out / "validation.md", "\n".join(lines) + "\n")
    plot(out / "validation.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    colors = {"bf16": "tab:blue", "mwq": "tab:orange", "zip": "tab:green"}
    for ax, m, label in ((axes[0], "tpot_s_mean", "TPOT (ms)"), (axes[1], "ttft_s", "TTFT (ms)")):
        lo, hi = float("inf"), 0.0
        for r in ok:
            p, x, sd = num(r, f"pred_{m}"), num(r, f"meas_{m}"), num(r, f"sd_{m}") or 0.0
            if p is None or x is None:
                continue
            marker = "s" if r["throttle"] else "o"
            lo_bar = min(sd, 0.9 * x)                              # a log axis: keep the bar above 0
            ax.errorbar(1e3 * x, 1e3 * p, xerr=[[1e3 * lo_bar], [1e3 * sd]], fmt=marker, color=colors.get(r["format"], "gray"),
                        ms=4, alpha=0.7, elinewidth=1)
            lo, hi = min(lo, x, p), max(hi, x, p)
        if hi > 0:
            ax.plot([1e3 * lo * 0.9, 1e3 * hi * 1.1], [1e3 * lo * 0.9, 1e3 * hi * 1.1], "k--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"measured {label} (executor, median; bars: sd over repeats)")
        ax.set_ylabel(f"predicted {label} (simulator)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker="s", ls="", label="throttled storage")]
    axes[0].legend(handles=handles, loc="upper left", fontsize=8)
    fig.suptitle("moelab: simulator prediction vs executor measurement, one point per configuration")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- fidelity for `moelab pick` -------------------------------------------------------------------
def cache_family(cache: str) -> str:
    """Caches grouped as pick reports them: the papers' own families, else the cache itself."""
    if cache.startswith("zipmoe"):
        return "zipmoe"
    if cache.startswith("d2moe"):
        return "d2moe"
    return cache


def fidelity(rows: list[dict], fmt: str, cache: str, batch: int) -> dict | None:
    """Measured TPOT error of the validated configurations of the same class: same format,
    cache family and batch (any throttle, budget, prefetcher). None when none was validated."""
    ok = [r for r in rows if r["status"] == "ok" and r["format"] == fmt and str(r["batch"]) == str(batch)
          and cache_family(r["cache"]) == cache_family(cache) and num(r, "err_tpot_s_mean") is not None]
    if not ok:
        return None
    errs = [abs(num(r, "err_tpot_s_mean")) for r in ok]
    return {"configs": len(ok), "median": statistics.median(errs), "max": max(errs),
            "identical": sum(r["decisions_identical"] == "True" for r in ok)}
