"""`moelab reproduce zipmoe`: ZipMoE's Table 1 as its released scripts run it, in the simulator, in
the cache's released and corrected modes (policies/zipmoe.py), with the released budget mapping
(policies/zipmoe_released.py) swept across the LRU cliff, and the full share each planner picks.

The released scripts (evaluation/evaluate.py, evaluate_batch_tps.sh, evaluate_mem_latency.sh;
papers.md, ZipMoE §3) on the paper's device (`jetson-agx-orin-64gb`, NVMe; LZ4HC, K = 3, L = 6,
margin 0.1; greedy decoding):

- a warm-up (a 13-token prompt, 10 new tokens), then the prompts in sequential batches with the
  cache kept warm; each batch decodes until its longest request stops (finished rows still run,
  as in HF generate); a batch's throughput is its generated tokens (to each request's end of
  sequence) over its time; the rank counts restart after every batch;
- the batch script: batch {4, 16} x 64 new tokens at a 20 GB footprint (96 prompts); the latency
  script: batch 1 x 32 new tokens at 5 GB (20 prompts); footprint F GB -> device_memory_ratio
  (MEMORY_MAP) x the device's memory for the pools, the docks (one per expert of a layer) beside.

Table 1 runs the batch script at batch 16: every Qwen row of Table 1 has tok/s x E2E = 1024 =
16 x 64 (DeepSeek's 904-937 say some requests stop early). Its Basic is not a released
configuration: Basic is run with each of the released rules LRU, LFU and FIFO; +C with full
shares 0.6 (ZipMoEConfig) and 0.95 (the eval script; the released code overwrites either with
PlanCache's share whenever the rule is ZipMoE's own, which is +C+P here).

Stand-ins (ShareGPT and the models' routing are not here): prompt lengths log-normal (median 120
tokens, sigma 1, seed 321) truncated at 4..512; an end-of-sequence draw after every generated token
with probability 1/338 (ShareGPT's mean output length as vLLM's paper reports it: an assumption,
not fitted to any Table 1 number), capped at the batch's new tokens; routing from moelab's
synthetic generator (the catalog's default for the model where it has one); PlanCache's
statistics from a separate plan trace of the model (1000 prompts of 19 tokens, seed 7919). Prompts
are fewer than the scripts' (PROMPTS) to keep the reproduction in minutes; each batch is warm
either way. Every run is a RunSpec (its routing a trace file under runs/traces/zipmoe) and one row
of `results.csv`, appended as it finishes: an interrupted reproduction resumes.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.resumable import append_runs, keyed_rows
from experiments.zipmoe_report import (BASIC, BATCH4, DEVICE, EOS_P, FIELDS, FOOTPRINTS, LATENCY, MODELS,  # noqa: F401
                                       MODES, PLUS_C, PROMPTS, PUBLISHED, ROW_OF, SWEEP_PROMPTS, SWEEP_SYSTEMS, SYSTEMS,
                                       TABLE1,
                                       figures, released_budget_of, report)

TRACES = Path("runs") / "traces" / "zipmoe"
WARMUP = (13, 10)                  # warm-up prompt tokens, new tokens
PROMPT_SEED, ROUTING_SEED = 321, 0


@dataclass(frozen=True)
class Run:
    model: str
    system: str
    mode: str           # the zipmoe cache's mode; "-" for bf16-lru
    batch: int
    tokens: int         # new tokens a request at most
    footprint_gb: int   # the released scripts' memory footprint
    prompts: int

    def key(self) -> tuple:
        return (self.model, self.system, self.mode, str(self.batch), str(self.tokens), str(self.footprint_gb),
                str(self.prompts))


def _runs(model, systems, batch, tokens, footprint, prompts=None) -> list[Run]:
    return [Run(model, s, m, batch, tokens, footprint, prompts or PROMPTS[batch]) for s in systems
            for m in (("-",) if s == "bf16-lru" else MODES)]


def grid() -> list[Run]:
    """Table 1 (batch 16) for every system; batch 4 and the latency script for Basic-LRU, +C 0.95 and
    +C+P; the footprint sweep at Table 1's batch for those three. Shared configurations once."""
    runs = []
    for m in MODELS:
        runs += _runs(m, SYSTEMS, *TABLE1)
        runs += _runs(m, SWEEP_SYSTEMS, *BATCH4) + _runs(m, SWEEP_SYSTEMS, *LATENCY)
        for f in FOOTPRINTS:
            runs += _runs(m, SWEEP_SYSTEMS, TABLE1[0], TABLE1[1], f, SWEEP_PROMPTS)
    return list(dict.fromkeys(runs))


# -- the workload ---------------------------------------------------------------------------------
def request_lengths(prompts: int, tokens: int, seed: int = PROMPT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, generated tokens) of each request: log-normal prompts (median 120, sigma 1)
    truncated at 4..512; generation stops at an end-of-sequence draw (probability EOS_P after every
    token, the end-of-sequence token counted) or at `tokens`."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(120), 1.0, prompts)), 4, 512).astype(int)
    generated = np.minimum(rng.geometric(EOS_P, prompts), tokens).astype(int)
    return lengths, generated


def released_trace(model, batch: int, tokens: int, prompts: int):
    """The routing of a run as the released evaluation makes it (module docstring): the warm-up in
    every row of the first batch (one prompt: the same routing in each), then the prompts, `batch`
    at a time, each row decoded until its batch's longest request ends. Metadata `counted`: the
    tokens each request generates up to its end of sequence (the warm-up's are not measured)."""
    from policies.zipmoe_plan import _routing_trace
    from workloads.trace import RoutingTrace
    lengths, generated = request_lengths(prompts, tokens)
    P = int(max(lengths.max(), WARMUP[0]))
    t = _routing_trace(model, prompts + 1, P, tokens - 1, ROUTING_SEED)
    span = P + tokens - 1

    def rows(r: int, prompt: int, decode: int) -> np.ndarray:
        return r * span + np.arange(P - prompt, P + decode)
    parts, ids, flags = [], [], []
    groups = [(0, [WARMUP[0]] * batch, [WARMUP[1]] * batch)] + [
        (g + 1, lengths[g * batch:(g + 1) * batch], generated[g * batch:(g + 1) * batch])
        for g in range(-(-prompts // batch))]
    for g, plens, gens in groups:
        decode = int(max(gens)) - 1                       # every row runs to the batch's longest
        for i, n in enumerate(plens):
            source = 0 if g == 0 else (g - 1) * batch + i + 1
            idx = rows(source, int(n), decode)
            parts.append(idx)
            ids.append(np.full(len(idx), len(ids)))
            flags.append(np.arange(len(idx)) < n)
    keep = np.concatenate(parts)
    counted = [int(x) for x in generated]
    return RoutingTrace(t.experts[keep], t.scores[keep], np.concatenate(ids), np.concatenate(flags),
                        dict(t.metadata, counted=counted, warmup_requests=batch, batch=batch,
                             prompt_lengths="log-normal(median 120, sigma 1), seed 321, 4..512",
                             eos=f"p = {EOS_P:.5f} a token, capped at {tokens}"))


def routing_version(model_name: str) -> str:
    """Which routing the generator makes for the model: a digest of the catalog's default for it
    ("gen": the generator's own defaults). Trace files carry it in their names, so a new default
    makes new files, and a results.csv of another routing is set aside (`run_grid`)."""
    import hashlib
    import json
    try:
        from workloads.catalog import synthetic_default
        fit = synthetic_default(model_name)
    except ImportError:
        fit = None
    return "gen" if fit is None else hashlib.sha1(json.dumps(fit, sort_keys=True, default=str).encode()).hexdigest()[:8]


def trace_file(run: Run) -> Path:
    """The run's routing, written once (a user can inspect it or rerun a row from its spec)."""
    from workloads.catalog import get_model
    path = TRACES / f"{run.model}-{routing_version(run.model)}-b{run.batch}-t{run.tokens}-p{run.prompts}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        released_trace(get_model(run.model), run.batch, run.tokens, run.prompts).save(path)
    return path


def plan_trace_file(model_name: str) -> Path:
    """PlanCache's statistics: the model's routing synthesised on its own (policies/zipmoe_plan.py
    `default_plan_trace`), written as a file the run spec names."""
    from policies.zipmoe_plan import default_plan_trace
    from workloads.catalog import get_model
    path = TRACES / f"plan-{model_name}-{routing_version(model_name)}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        default_plan_trace(get_model(model_name)).save(path)
    return path


def budget_of(run: Run) -> tuple[int, int]:
    """(budget, dock) of the released mapping: the pools, plus the docks outside them."""
    return released_budget_of(run.model, run.footprint_gb)


def run_spec(run: Run):
    """The run spec of one reproduction run: the preset (its cache in the run's mode, the docks
    and, for +C+P, the plan trace), the released budget, the run's routing as a trace file."""
    from experiments.spec import RunSpec
    from policies.presets import get_preset
    budget, dock = budget_of(run)
    doc = {"device": DEVICE, "model": run.model, "trace": str(trace_file(run)), "batch": run.batch,
           "budget": budget}
    if run.system == "bf16-lru":
        doc["policy"] = {"preset": run.system}
    else:
        p = get_preset(run.system)
        options = {**p.bundle.cache.opts, "mode": run.mode, "dock": dock}
        if run.system == "zipmoe":
            options["plan_trace"] = str(plan_trace_file(run.model))
        doc["policy"] = dict(p.bundle.with_options("cache", options).to_doc())
        doc["format"] = p.format.to_doc()
    return RunSpec.from_doc(doc, f"run {run}")


# -- one run --------------------------------------------------------------------------------------
def batch_spans(tl) -> list[tuple[int, float, float]]:
    """(group, start, end) of every batch after the warm-up, from the timeline (its events, or the
    figures of a metrics-only run)."""
    from timeline.metrics import step_spans
    group_of = {s["step"]: s["group"] for s in tl.meta["steps"]}
    spans = step_spans(tl) if tl.events else tl.figures.spans
    out: dict[int, list[float]] = {}
    for step, (a, b) in spans.items():
        g = group_of.get(step)
        if g:
            s = out.setdefault(g, [a, b])
            s[0], s[1] = min(s[0], a), max(s[1], b)
    return [(g, a, b) for g, (a, b) in sorted(out.items())]


def measure(tl, counted: list[int], batch: int) -> dict:
    """The released metric per batch (its counted tokens over its time), averaged over batches."""
    spans = batch_spans(tl)
    tok = [sum(counted[(g - 1) * batch:g * batch]) for g, _, _ in spans]
    dur = [b - a for _, a, b in spans]
    return {"tok_s": float(np.mean([t / d for t, d in zip(tok, dur)])), "e2e_s": float(np.mean(dur)),
            "tok_s_all": sum(tok) / sum(dur)}


def simulate(run: Run, keep_timeline: bool = False):
    """One run -> (row, timeline or None): the run function (experiments/run.py), metrics-only
    unless the timeline is kept. A budget the run cannot fit in is a row, not an error."""
    from experiments.run import simulate as simulate_spec
    from policies import BudgetError
    row = dict(zip(FIELDS, (*run.key()[:7], "ok")))
    try:
        sim = simulate_spec(run_spec(run), timeline=keep_timeline)
    except BudgetError as e:
        row.update(status="below minimum", split_source=str(e).split(" (")[0])
        return row, None
    p, tl, m = sim.prepared, sim.record, sim.metrics
    rep = p.policies.report()
    row.update({k: round(v, 4) for k, v in measure(tl, p.trace.metadata["counted"], run.batch).items()})
    row.update(ttft_s=round(m["ttft_s_warm"] or m["ttft_s"], 4), tpot_s=round(m["tpot_s_mean"] or 0, 5),
               hit_ratio=round(m["hit_ratio"], 4), io_busy=round(m["io_busy_fraction"], 4),
               bytes_read_gb=round(m["bytes_read"] / 1e9, 2), budget_bytes=p.budget,
               full_share=rep.get("zipmoe_full_share", ""), plan_k=rep.get("zipmoe_plan_k") or "",
               smcache=rep.get("zipmoe_decisions_smcache", ""), type2_hits=rep.get("zipmoe_type2_hits", ""),
               split_source=rep.get("zipmoe_split_source", ""))
    return row, (tl if keep_timeline else None)


def _simulate_row(run: Run) -> dict:
    return simulate(run)[0]


def load_results(path: Path) -> dict[tuple, dict]:
    return keyed_rows(path, FIELDS[:7])


def run_grid(out: Path, jobs: int | None = None, quiet: bool = False, runs: list[Run] | None = None) -> dict:
    """Run what `results.csv` does not have yet, appending each row as it finishes (longest first).
    A results.csv of another layout (an older reproduction) is set aside, not mixed in."""
    import json
    out.mkdir(parents=True, exist_ok=True)
    path, routing = out / "results.csv", out / "routing.json"
    versions = {m: routing_version(m) for m in MODELS}
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        known = json.loads(routing.read_text()) if routing.exists() else None
        if tuple(header) != FIELDS or known not in (None, versions):
            path.rename(path.with_suffix(f".old-{len(list(out.glob('results.old-*')))}.csv"))
    routing.write_text(json.dumps(versions))
    done = load_results(path)
    todo = sorted((r for r in (runs or grid()) if r.key() not in done), key=lambda r: -r.batch * r.prompts)
    for r in todo:                                      # the traces once, before the processes start
        trace_file(r)
        if r.system == "zipmoe":
            plan_trace_file(r.model)
    append_runs(path, FIELDS, todo, _simulate_row, jobs=jobs, quiet=quiet, desc="reproduce zipmoe")
    return load_results(path)


# -- the planners' shares ----------------------------------------------------------------------------
def planner_shares(batches=(1, 4, 16), footprints=FOOTPRINTS) -> list[dict]:
    """The full share each planner picks for each model, batch and footprint, from the plan trace
    (no simulation), with its k."""
    from experiments.run import costs
    from experiments.spec import RunSpec
    from policies.zipmoe_plan import layer_delay, plan_split, plan_statistics
    from policies.zipmoe_released import released_delay, released_plan, released_rank_dist
    from workloads.formats import FormatSpec
    out = []
    for name in MODELS:
        model, fmt, cost = costs(RunSpec(device=DEVICE, model=name, format=FormatSpec("zip")))
        full, sm = sum(fmt.resident_bytes), fmt.resident_bytes[0]
        path = str(plan_trace_file(name))
        for b in batches:
            dist = released_rank_dist(plan_statistics(path, model, b, 64, "counts"), b)
            p = plan_statistics(path, model, b, 64, "inclusion")
            for f in footprints:
                budget, dock = budget_of(Run(name, "zipmoe", "released", b, 64, f, 1))
                room = budget - dock
                r_share, feasible, r_info = released_plan(dist, model.top_k, model.layers, model.experts, room, full,
                                                          sm, released_delay(fmt, cost))
                c_share, c_info = plan_split(p, model.layers, model.experts, room, full, sm, layer_delay(fmt, cost))
                out.append({"model": name, "batch": b, "footprint_gb": f, "released": r_share if feasible else None,
                            "released_k": r_info["k"], "corrected": c_share, "corrected_k": c_info["k"]})
    return out


def reproduce(out, jobs: int | None = None, quiet: bool = False) -> str:
    out = Path(out)
    results = run_grid(out, jobs, quiet)
    shares = planner_shares()
    text = report(results, shares, out)
    figures(results, out)
    return text


if __name__ == "__main__":
    import sys
    print(reproduce(sys.argv[1] if len(sys.argv) > 1 else "runs/reproduce-zipmoe").split("## Every run")[0])
