"""The runs of `moelab reproduce d2moe` (experiments/reproduce_d2moe.py says what they are): the grid
under both cost profiles, each run's spec (experiments.spec.RunSpec) run through
experiments.run.simulate, its row of results.csv, and the resumable runner."""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from experiments.d2moe_bounds import flow_shop_bound
from experiments.resumable import append_runs, keyed_rows

PROFILES = {"roofline": {"env1": "rtx-3060-laptop-6gb", "env2": "jetson-agx-orin-64gb"},
            "paper-impl": {"env1": "rtx-3060-laptop-6gb-d2moe-impl", "env2": "jetson-agx-orin-64gb-d2moe-impl"}}
ENVS = PROFILES["roofline"]
MODELS = ("llama-moe-3.5b", "mixtral-8x7b")
BUDGETS_MB = (200, 400, 800, 1600)
REQUESTS = 32                           # Fig. 10, the published numbers, peak memory
ABLATION_REQUESTS = (4, 8, 16, 32)      # Fig. 14: the paper's 4-32 requests
TOKENS = 128
FIG10 = ("d2moe", "matryoshka-free", "edgemoe", "moqe-dynaio-int4", "moqe-dynaio-int8")
ABLATION = ("d2moe-router", "d2moe-mwq", "d2moe-hebf", "d2moe")
RESIDENT = ("hold-in-memory", "him-awq")
HOST_RAM = "host-ram"           # the storage option holding the experts in host RAM (devices/*.yaml)
SKEW, LOCALITY = 1.0, 0.6       # the reproduction's generator (top-2 share 49%, reuse 94%)
MATCHED = (0.4, 0.15)           # matched to real Mixtral decode (peers.md; RunSpec's default)
GENERATORS = ((0.5, LOCALITY), (SKEW, LOCALITY), (2.0, LOCALITY), (3.0, LOCALITY), MATCHED)
AXIS_MODEL, AXIS_BUDGET_MB = "llama-moe-3.5b", 800
AXIS_ENVS = ("env2",)           # Fig. 10(c)'s env, and Fig. 3's calibration (one env keeps the grid's time)
AXIS_SYSTEMS = ("d2moe-mwq", "d2moe-hebf", "d2moe", "edgemoe")
FIFO, HEBF = "d2moe-mwq", "d2moe-hebf"          # +MWQ loads in expert-ID order (the paper's Fig. 3)
CACHING = "layer-lru"           # a baseline cache that gets hits under cyclic layer order
RANKED = ("d2moe", "d2moe-mwq", "d2moe-hebf", "d2moe-router", "matryoshka-free")   # capacity presets
# The paper models only the expert budget M; where its dense weights and KV cache live is not stated, and
# as stated they do not fit Env 1's 6 GB GPU beside M (LLaMA-MoE-3.5B: 4.82 GB of bf16 dense weights, 4.29 GB
# of KV for 32 requests x 256 tokens; workloads/memory.py). So the reproduction models the budget alone
# (kv budget-only) and reports, per run, whether the whole would fit (`fits`, README).
KV_MODE = "budget-only"
# Bump when a run's meaning changes: an older results.csv is set aside, not mixed.
VERSION = 5     # v5: attention's context term, the memory split reported (kv budget-only), online layer-lru
                # v4: two cost profiles, levels from the router, skew axes, the caching baseline
KEY_FIELDS = ("profile", "env", "model", "system", "levels", "cache", "requests", "budget_mb", "skew", "locality",
              "storage")
FIELDS = ("version", *KEY_FIELDS, "status", "throughput_tok_s", "tpot_ms", "peak_expert_mb", "bytes_read_mb",
          "decode_read_mb_per_step", "hit_ratio", "compute_bubble", "bits_per_weight", "expert_calls", "kernel_calls",
          "compute_busy_s", "dense_busy_s", "io_busy_s", "makespan_s", "layer_s", "bound_s", "run_s", "memory_need_mb",
          "fits_memory", "note")
# (label, env, model, system, budget MB or None, published tok/s); requests = 32
PUBLISHED = [
    ("Fig. 10(c) LLaMA-MoE Env 2, 200 MB", "env2", "llama-moe-3.5b", "d2moe", 200, 66.45),
    ("Fig. 10(c) LLaMA-MoE Env 2, 1600 MB", "env2", "llama-moe-3.5b", "d2moe", 1600, 83.14),
    ("Env 1 LLaMA-MoE, 1600 MB", "env1", "llama-moe-3.5b", "d2moe", 1600, 89.14),
    ("Env 1 Mixtral (budget not stated; 1600 MB here)", "env1", "mixtral-8x7b", "d2moe", 1600, 38.07),
    ("Env 1 LLaMA-MoE HIM-AWQ (2500 MB resident)", "env1", "llama-moe-3.5b", "him-awq", None, 94.3),
]


@dataclass(frozen=True)
class Run:
    env: str
    model: str
    system: str
    requests: int
    budget_mb: int | None       # None: the preset's own (every expert resident)
    profile: str = "roofline"   # a key of PROFILES
    levels: str = ""            # router | capacity for the capacity presets (default router); "" for others
    cache: str = ""             # a cache instead of the preset's ("": the preset's)
    skew: float = SKEW
    locality: float = LOCALITY
    storage: str = ""           # the device's storage option ("": its default, the SSD)

    def __post_init__(self):
        if self.system in RANKED and not self.levels:
            object.__setattr__(self, "levels", "router")
        assert (self.system in RANKED) == bool(self.levels) and self.levels in ("", "router", "capacity"), self

    def key(self) -> tuple:
        return tuple(_text(getattr(self, f)) for f in KEY_FIELDS)

    @property
    def device(self) -> str:
        return PROFILES[self.profile][self.env]


def _text(value) -> str:
    if value is None:
        return "all"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def profile_grid(profile: str) -> list[Run]:
    """Every run of one cost profile (module doc)."""
    runs = []
    for env in ENVS:
        for model in MODELS:
            for b in BUDGETS_MB:
                runs += [Run(env, model, s, REQUESTS, b, profile) for s in dict.fromkeys(FIG10 + ABLATION)]
                runs.append(Run(env, model, "d2moe", REQUESTS, b, profile, levels="capacity"))
                runs.append(Run(env, model, HEBF, REQUESTS, b, profile, cache=CACHING))
            runs += [Run(env, model, s, REQUESTS, None, profile) for s in RESIDENT]
        runs.append(Run(env, "mixtral-8x7b", "d2moe", 4, BUDGETS_MB[-1], profile))     # Fig. 12's 4 requests
    for env in AXIS_ENVS:
        for skew, loc in GENERATORS:
            runs += [Run(env, AXIS_MODEL, s, n, AXIS_BUDGET_MB, profile, skew=skew, locality=loc)
                     for n in ABLATION_REQUESTS for s in AXIS_SYSTEMS]
        runs += [Run(env, AXIS_MODEL, "d2moe-router", n, AXIS_BUDGET_MB, profile) for n in ABLATION_REQUESTS]
    # the published points again with the experts read from host RAM instead of the SSD (the
    # published Mixtral figure is above what the SSD can feed; see the report)
    runs += [Run(env, model, system, REQUESTS, budget, profile, storage=HOST_RAM)
             for _, env, model, system, budget, _ in PUBLISHED if budget is not None]
    return list(dict.fromkeys(runs))


def grid() -> list[Run]:
    """Every run, the most expensive first (the pool then ends on short runs)."""
    runs = [r for p in PROFILES for r in profile_grid(p)]
    return sorted(runs, key=lambda r: -r.requests)


def run_spec(run: Run):
    """The run spec of one reproduction run: the preset's format and bundle (its allocator the
    router's shares, or its cache replaced, where the run says) on the environment's device under
    the run's profile, a seeded synthetic trace of `requests` requests of TOKENS prompt tokens and
    TOKENS decode steps (TOKENS + 1 new tokens: the prefill makes the first)."""
    from experiments.d2moe_levels import shares_option
    from experiments.spec import RunSpec
    from policies.presets import get_preset
    from policies.spec import PolicySpec
    preset = get_preset(run.system)
    bundle = preset.bundle
    if run.levels == "router":
        bundle = replace(bundle, allocator=PolicySpec.make("allocator", "shares", shares_option(preset.format.ladder)))
    if run.cache:
        bundle = replace(bundle, cache=PolicySpec.make("cache", run.cache))
    doc = {"device": run.device, "storage": run.storage or None, "model": run.model,
           "policy": {"preset": run.system} if bundle == preset.bundle else bundle.to_doc(),
           "skew": run.skew, "locality": run.locality, "requests": run.requests, "batch": run.requests,
           "prompt_tokens": TOKENS, "tokens": TOKENS + 1, "seed": 0, "kv": KV_MODE,
           "budget": "all" if run.budget_mb is None else run.budget_mb * 10**6}
    if "preset" not in doc["policy"]:
        doc["format"] = preset.format.to_doc()
    return RunSpec.from_doc(doc, f"run {run}")


def simulate(run: Run, keep_timeline: bool = False):
    """One run -> (row, timeline or None). A budget the run cannot fit in is a row, not an error."""
    from devices.profile import load_device
    from experiments.run import every_expert_bytes
    from experiments.run import simulate as simulate_spec
    from policies import BudgetError
    from workloads.catalog import get_model

    t0 = time.time()
    spec = run_spec(run)
    device, model = load_device(spec.device), get_model(run.model)
    fmt = spec.format.make(model.expert_shapes)
    row = dict(zip(("version", *KEY_FIELDS), (VERSION, *run.key())), status="ok")
    if run.budget_mb is None and every_expert_bytes(model, fmt) > device.expert_budget_bytes:
        budget = every_expert_bytes(model, fmt)
        row.update(status="out of memory", peak_expert_mb=round(budget / 1e6),
                   note=f"needs {budget / 1e9:.1f} GB resident; the device's expert budget is "
                        f"{device.expert_budget_bytes / 1e9:.1f} GB")
        return row, None
    try:
        sim = simulate_spec(spec, timeline=True, device=device)
    except BudgetError as e:
        row.update(status="below minimum", note=str(e).split(" (")[0])
        return row, None
    row.update(run_metrics(run, sim))
    row["run_s"] = round(time.time() - t0, 2)
    return row, (sim.timeline if keep_timeline else None)


def run_metrics(run: Run, sim) -> dict:
    """The row's measured columns from a finished run."""
    tl, m, fmt, cost, storage = sim.timeline, sim.metrics, sim.prepared.fmt, sim.prepared.cost, sim.prepared.storage
    computes = tl.of("compute")
    prefill = {s["step"] for s in tl.meta["steps"] if s["prefill"]}
    decode_steps = max(1, len(tl.meta["steps"]) - len(prefill))
    decode_read = sum(e.bytes for e in tl.of("io") if e.step not in prefill)
    out = dict(throughput_tok_s=round(m["throughput_tok_s"], 3), tpot_ms=round(m["tpot_s_mean"] * 1e3, 3),
               peak_expert_mb=round(m["peak_expert_bytes"] / 1e6, 1), bytes_read_mb=round(m["bytes_read"] / 1e6),
               decode_read_mb_per_step=round(decode_read / decode_steps / 1e6, 2),
               hit_ratio=round(m["hit_ratio"], 4), compute_bubble=round(m["compute_bubble_fraction"], 4),
               bits_per_weight=round(m["bits_per_weight"], 3), expert_calls=len(computes),
               kernel_calls=sum(cost.expert_calls(e.tokens) for e in computes),
               compute_busy_s=round(sum(e.end - e.start for e in computes), 6),
               dense_busy_s=round(sum(e.end - e.start for e in tl.of("dense")), 6),
               io_busy_s=round(m["io_busy_fraction"] * m["makespan_s"], 6), makespan_s=round(m["makespan_s"], 6))
    mem = sim.prepared.memory      # modelled: the budget alone (KV_MODE); what the whole would need
    out.update(memory_need_mb=round((mem.reserved + mem.dense + mem.kv_peak + mem.budget) / 1e6),
               fits_memory=mem.meta()["fits"])
    # the bound models one read stream feeding one compute stream (no prefetch, no decompression):
    # recorded for the HEBF / FIFO pair, whose layers it explains
    if run.system in (FIFO, HEBF):
        layer_s, bound_s = flow_shop_bound(tl.events, fmt.level_parts, storage.latency, storage.read_bandwidth)
        out.update(layer_s=round(layer_s, 6), bound_s=round(bound_s, 6))
    return out


def _simulate_row(run: Run) -> dict:
    return simulate(run)[0]


def load_results(path: Path) -> dict[tuple, dict]:
    return keyed_rows(path, KEY_FIELDS)


def retire_old_results(path: Path) -> Path | None:
    """A results file written by another version of this reproduction (other columns, or rows
    of another version) is renamed aside, so that its runs are never mixed with these."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        current = tuple(reader.fieldnames or ()) == FIELDS and all(r["version"] == str(VERSION) for r in reader)
    if current:
        return None
    n = 1
    while (aside := path.with_name(f"{path.stem}.old-{n}{path.suffix}")).exists():
        n += 1
    path.rename(aside)
    return aside


def run_grid(out: Path, jobs: int | None = None, quiet: bool = False) -> tuple[dict[tuple, dict], int]:
    """Run what `results.csv` does not have yet, appending each row as it finishes. Returns the
    results and how many runs ran now."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    aside = retire_old_results(path)
    if aside and not quiet:
        print(f"{path}: written by an older version of this reproduction; moved to {aside.name}, running afresh")
    done = load_results(path)
    todo = [r for r in grid() if r.key() not in done]
    append_runs(path, FIELDS, todo, _simulate_row, jobs=jobs, quiet=quiet, desc="reproduce d2moe")
    return load_results(path), len(todo)


def row_of(results: dict, run: Run) -> dict | None:
    return results.get(run.key())


def tput(results: dict, run: Run) -> float | None:
    r = results.get(run.key())
    return float(r["throughput_tok_s"]) if r and r["status"] == "ok" else None


RUN_FIELDS = tuple(f.name for f in fields(Run))


def fig3_run(env: str = "env2"):
    """A run_fifo for d2moe_bounds.fig3_weight_bandwidth: Fig. 3's setup as this reproduction runs it
    (+MWQ, LLaMA-MoE, 32 requests, 800 MB, levels from the router, the default generator) on a device."""
    from experiments.run import simulate as simulate_spec

    def run_fifo(device):
        spec = run_spec(Run(env, AXIS_MODEL, FIFO, REQUESTS, AXIS_BUDGET_MB))
        sim = simulate_spec(spec, timeline=True, device=device)
        return sim.timeline, sim.metrics, sim.prepared.fmt
    return run_fifo
