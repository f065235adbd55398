"""`python -m sim.benchmark`: the simulator's own speed as users get it, as one JSON line.

- sim_metrics_tokens_per_s: simulated decode tokens per wall-clock second of a run and its
  metrics (metrics.json) through the policy objects, as a sweep or a study runs it (no events):
  mixtral-8x7b (32 layers, top-2, batch 1, LRU, bf16) on the default device;
- sim_fused_tokens_per_s: the same run on its fused loop (sim/fast.py), as `simulate` picks it;
- sim_timeline_tokens_per_s: the same run with its timeline (what `moelab simulate` writes) and
  its metrics, through the policy objects; sim_timeline_fused_tokens_per_s: on the fused loop (as
  `moelab simulate` runs it); sim_tokens_per_s: the run with its timeline alone, without its
  metrics (the figure this benchmark reported before it measured what users get);
- sim_simulate_tokens_per_s, sim_simulate_fused_tokens_per_s: the whole run function, from the
  spec to the metrics (`simulate(spec, timeline=False)`, with fast_path False / True): the above
  runs with their set-up (the trace, the cost model, the policies and their budget check);
- replay_accesses_per_s: cache-only LRU replay (the fast loop), expert accesses per second,
  beside libCacheSim's LRU on the same sequence (its own C loop via process_trace);
- replay_objects_accesses_per_s: the same replay through the decision point and the LRU
  policy object (the path of every policy without a fast loop), its set-up (building the
  policies) not timed; replay_objects_with_setup_accesses_per_s: with it;
- sweep_runs_per_s: short runs (128 tokens, a sample of experiments/benchmark_sweep.py's grid)
  one after another in this process, each a whole run as a sweep makes it (spec to results row);
  None in an older checkout whose loader refuses that grid (`python -m experiments.benchmark_sweep
  --compare DIR` compares sweeps, with the grid of this checkout).
Every figure is also given per million libCacheSim accesses/s (`*_per_libcachesim_maccess`): the
machines here differ by 1.6x, libCacheSim's loop by as much. The simulator's figures come as the
median of their repeats, the best, and `_cpu`: per second of this process's CPU time, which other
work on a shared host disturbs less than the wall clock.

`--compare DIR` runs this benchmark here and on the checkout in DIR (e.g. a `git worktree` of an
older commit) alternately, `--rounds` times each, and prints the medians and their ratios: the
host is shared and its speed swings, so only figures measured side by side compare.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time

import numpy as np

from policies import build_policies
from sim.engine import Simulator
from workloads.workload import Workload
from sim.replay import replay_policies, replay_units, unit_groups
from workloads.catalog import get_model
from workloads.formats import make_format
from workloads.synthetic import synthetic_trace


def bench_spec(tokens: int):
    """The benchmark's run: mixtral-8x7b decoding `tokens` tokens alone (no prompt) under LRU with
    room for 120 experts, on the generator's Zipf 1.0 / 0.6 locality routing."""
    from experiments.spec import RunSpec
    model = get_model("mixtral-8x7b")
    return RunSpec(device="jetson-agx-orin-64gb", model=model.name, tokens=tokens, prompt_tokens=0, skew=1.0,
                   locality=0.6, budget=120 * model.expert_bytes)


def _fused():
    """sim/fast.py's fused loop, or None in a checkout without one (--compare with an older one)."""
    try:
        from sim.fast import fused_for, run_fused
    except ImportError:
        return None
    return fused_for, run_fused


MODES = {  # mode -> figure: what is timed (see the module docstring)
    "metrics": "sim_metrics", "fused": "sim_fused", "timeline": "sim_timeline", "timeline-fused": "sim_timeline_fused",
    "engine": "sim", "simulate": "sim_simulate", "simulate-fused": "sim_simulate_fused"}


def _timed_run(tokens: int, mode: str) -> tuple[float, float, int]:
    """Wall and CPU seconds of one run in `mode` (MODES) and its events."""
    from experiments.run import prepare, run_metrics, simulate
    spec = bench_spec(tokens)
    if mode.startswith("simulate"):             # the whole run function: spec -> metrics
        options = {"fast_path": mode == "simulate-fused"} if "fast_path" in inspect.signature(simulate).parameters \
            else {}
        t0, c0 = time.perf_counter(), time.process_time()
        simulate(spec, timeline=False, **options)
        return time.perf_counter() - t0, time.process_time() - c0, 0
    p = prepare(spec, timeline=False)
    sim = Simulator(p.device, p.workload, p.policies, p.storage, cost=p.cost)
    metrics_only = "events" in inspect.signature(sim.run).parameters
    t0, c0 = time.perf_counter(), time.process_time()
    if mode in ("fused", "timeline-fused"):
        fused_for, run_fused = _fused()
        assert fused_for(sim), "the benchmark's bundle has a fused loop"
        tl = run_fused(sim, events=mode == "timeline-fused")
    elif mode == "metrics" and metrics_only:
        tl = sim.run(events=False)
    else:                                   # (an older engine records every event)
        tl = sim.run()
    if mode != "engine":
        run_metrics(p, tl)
    return time.perf_counter() - t0, time.process_time() - c0, len(tl.events)


def bench_engine(tokens: int = 2000, repeats: int = 5) -> dict:
    """Median and best of `repeats` runs of each mode, interleaved: this benchmark's host is a shared
    VM whose speed swings; `_cpu`: the median per second of this process's CPU time, which the
    other work on the host disturbs less. Except in the simulate modes, each run is prepared by the
    run function (experiments/run.py), untimed."""
    modes = [m for m in MODES if _fused() or m not in ("fused", "timeline-fused", "simulate-fused")]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    events = 0
    for _ in range(repeats):
        for mode in modes:
            wall, seconds, n = _timed_run(tokens, mode)
            rates[mode].append(tokens / wall)
            cpu[mode].append(tokens / seconds)
            events = max(events, n)
    out = {"sim_tokens": tokens, "sim_events": events, "sim_repeats": repeats}
    for mode, name in MODES.items():
        r = rates.get(mode)
        out[f"{name}_tokens_per_s"] = r and round(float(np.median(r)), 1)
        out[f"{name}_tokens_per_s_best"] = r and round(max(r), 1)
        out[f"{name}_tokens_per_s_cpu"] = r and round(float(np.median(cpu[mode])), 1)
    return out


def libcachesim_lru_rate(seq: list[int], capacity: int, repeats: int = 3) -> float | None:
    """Accesses per second of libCacheSim's LRU over `seq`, read from a text trace by its C reader
    (the median of `repeats`)."""
    try:
        import libcachesim as lcs
    except ImportError:
        return None
    rates = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seq.txt")
        np.savetxt(path, np.asarray(seq), fmt="%d")
        for _ in range(repeats):
            reader = lcs.TraceReader(path, trace_type=lcs.TraceType.PLAIN_TXT_TRACE)
            cache = lcs.LRU(cache_size=capacity)
            t0 = time.perf_counter()
            cache.process_trace(reader)
            rates.append(len(seq) / (time.perf_counter() - t0))
    return float(np.median(rates))


def bench_replay(tokens: int = 20000, capacity: int = 96, repeats: int = 3) -> dict:
    model = get_model("mixtral-8x7b")
    trace = synthetic_trace(model, requests=1, prompt_len=0, output_len=tokens, seed=1)
    from workloads.batching import batch_steps
    groups = unit_groups(trace, batch_steps(trace, 1))
    accesses = sum(map(len, groups))
    t0 = time.perf_counter()
    hit = replay_units(groups, "lru", [capacity])[capacity]
    ours = accesses / (time.perf_counter() - t0)
    ref = libcachesim_lru_rate([k for g in groups for k in g], capacity)
    # the same accesses through the decision point and the policy objects (what every policy
    # without a proven fast loop replays with), on a fifth of the tokens
    w = Workload(model, synthetic_trace(model, requests=1, prompt_len=0, output_len=tokens // 5, seed=1),
                 make_format("bf16", model.expert_shapes))
    loop, whole = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policies = build_policies(w, capacity * model.expert_bytes, cache="lru")
        t1 = time.perf_counter()
        objects = replay_policies(w, policies)
        t2 = time.perf_counter()
        loop.append(objects["accesses"] / (t2 - t1))
        whole.append(objects["accesses"] / (t2 - t0))
    return {"replay_accesses": accesses, "replay_hit_ratio": round(hit, 4),
            "replay_accesses_per_s": round(ours), "libcachesim_lru_accesses_per_s": ref and round(ref),
            "replay_vs_libcachesim": ref and round(ours / ref, 3),
            "replay_objects_accesses_per_s": round(float(np.median(loop))),
            "replay_objects_with_setup_accesses_per_s": round(float(np.median(whole)))}


def bench_sweep(runs: int = 40) -> dict:
    """Runs per second of a seeded sample of the sweep benchmark's grid (experiments/benchmark_sweep.py),
    one after another here: each run as a sweep makes it, from its spec to its results row."""
    from experiments.benchmark_sweep import GRID
    from experiments.sweep import load_grid, run_config
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "grid.yaml")
        with open(path, "w") as f:
            f.write(GRID + f"sample: {{n: {runs}, seed: 0}}\n")
        try:
            specs = load_grid(path)
        except Exception as e:              # an older checkout whose grid its own loader refuses
            return {"sweep_runs": 0, "sweep_runs_per_s": None, "sweep_error": str(e)[:200]}
    t0 = time.perf_counter()
    for spec in specs:
        run_config(spec)
    return {"sweep_runs": len(specs), "sweep_runs_per_s": round(len(specs) / (time.perf_counter() - t0), 2)}


RATES = (*(f"{name}_tokens_per_s" for name in MODES.values()), "replay_objects_accesses_per_s",
         "replay_objects_with_setup_accesses_per_s", "sweep_runs_per_s")


def measure() -> dict:
    out = {"benchmark": "sim"}
    out.update(bench_engine())
    out.update(bench_replay())
    out.update(bench_sweep())
    ref = out["libcachesim_lru_accesses_per_s"]
    for key in RATES:                       # per million libCacheSim accesses/s
        if ref and out.get(key):
            out[key.replace("_per_s", "_per_libcachesim_maccess")] = round(out[key] / (ref / 1e6), 3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", metavar="DIR", help="also measure the checkout in DIR, alternately")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: measurements of each")
    args = ap.parse_args(argv)
    if args.compare:
        from sim.compare import compare
        print(json.dumps(compare(__file__, args.compare, args.rounds)))
    else:
        print(json.dumps(measure()))


if __name__ == "__main__":
    main()
