"""Calibrate a host profile's contention by simulation: what `moelab profile` runs after the
executor's measurements (executor/profile_host.py), which cannot simulate (the executor never
imports the simulator, DESIGN.md). The storage channel's prediction of the measured burst of
reads, which the profile's comments set beside the measurement, is simulated here too.

The main thread and a reader thread slow each other down (they share the cores and the
interpreter), and the two effects cannot be told apart from one run's timeline: a read that
overlaps a call looks the same whichever of the two waited. So contention.read and .stall are,
per format, the pair (0 to 0.8 in steps of 0.1) with which the simulator, given every other
measured figure, best reproduces the profile's contention runs (same traces, same policies), run
by run: their expert-call time, read time and run time (least squares of the relative errors,
WEIGHTS). The validation (`moelab validate`) runs another trace and other policies.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

# weights of each run's relative errors of (expert-call time, read time, run time); the run time,
# what the simulator is used to predict, counts twice
WEIGHTS = np.array([1.0, 1.0, 2.0])
GRID = [round(0.1 * i, 1) for i in range(9)]


def measure_host(model_dir=None, store_root="runs/stores", quick: bool = False, quiet: bool = False,
                 throttle: str | None = None, torch_device: str = "cpu") -> dict:
    """Every figure of a host profile: the executor's measurements, then the calibration; with the
    cores it ran on and the load average it saw as its provenance (m["host"], m["provenance"])."""
    from executor.host_probe import probe_line, steadiness_line
    from executor.profile_host import measure
    load = os.getloadavg()
    m = measure(model_dir, store_root, quick=quick, quiet=quiet, throttle=throttle, torch_device=torch_device)
    predict_burst(m)
    calibrate(m)
    m["host"] = {"cpus": sorted(os.sched_getaffinity(0)), "torch_device": torch_device, "load": load,
                 "load_end": os.getloadavg()}
    m["provenance"] = (host_line(m["host"], m["torch_threads"]) + (QUICK_LINE if quick else "")
                       + "\n" + probe_line(m["probes"]) + "\n" + steadiness_line(m["steadiness"]))
    return m


# a quick profile says so (`moelab validate` reads it back: experiments/validate.py profile_is_quick)
QUICK_LINE = ("\n# samples: quick (`moelab profile --quick`: fewer token counts, repeats and reads; for tests, "
              "not for validating)")


def host_line(host: dict, threads: int) -> str:
    """The profile's comment line on the cores and the load (`moelab validate` reads the first
    part back: experiments/validate.py profile_cores)."""
    def avg(load):
        return "/".join(f"{x:.2f}" for x in load)
    return (f"# cores: {len(host['cpus'])} of {os.cpu_count()} (CPUs {','.join(map(str, host['cpus']))}; "
            f"os.sched_setaffinity, the whole process), torch device {host['torch_device']}, torch threads "
            f"{threads}; load average (1/5/15 min) at start {avg(host['load'])}, at end {avg(host['load_end'])} "
            f"(the end's includes the profile's own threads)")


def predict_burst(m: dict) -> None:
    """Set storage.burst.predicted of `m`: what the simulator's storage channel, with the measured
    latency, bandwidth and queue depth, predicts for the burst of reads the executor timed (the
    profile's comment on queue_depth sets the two side by side)."""
    from sim.servers import StorageChannel
    s = m["storage"]
    burst = s["burst"]
    ch = StorageChannel(s["read_bandwidth"], s["latency"], s["queue_depth"])
    burst["predicted"] = max(ch.reserve(0.0, burst["bytes"])[1] for _ in range(burst["reads"]))


def calibration_spec(cal: dict, fmt, cfg: dict, storage_name: str):
    """The run spec of one of the profiler's forced runs: its model and store, LRU with its prefetcher
    at its share of every expert's bytes, on the generator's routing the profiler ran (Zipf 1.0, 0.6
    locality; `output` decode steps after the prompt)."""
    from experiments.run import every_expert_bytes
    from experiments.spec import RunSpec
    budget = int(every_expert_bytes(cal["arch"], fmt) * cfg["budget_share"])
    return RunSpec.from_doc({"device": "host (calibration)", "storage": storage_name, "model": cal["model_dir"],
                             "format": fmt.name, "store": cal["stores"][fmt.name],
                             "policy": {"cache": "lru", "prefetch": cfg["prefetch"]}, "budget": budget,
                             "batch": cfg["requests"], "requests": cfg["requests"], "prompt_tokens": cfg["prompt"],
                             "tokens": cfg["output"] + (1 if cfg["prompt"] > 0 else 0), "skew": 1.0,
                             "locality": 0.6, "seed": cfg["seed"]}, "calibration run")


def calibrate(m: dict) -> None:
    """Set contention.read and .stall of each format in `m` (measure's dict) by simulation: each
    of the profiler's forced runs simulated again (experiments.run.simulate) on the profile with a
    trial (read, stall), the pair that best matches the measured times kept."""
    from executor.profile_host import write_profile
    from executor.profile_timeline import run_times
    from experiments.run import simulate
    cal = m["calibration"]
    with tempfile.TemporaryDirectory() as tmp:
        device = write_profile(Path(tmp) / "host.yaml", m, "moelab profile (calibration)")
    storage = cal["storage"] or device.storage_option(None)        # a throttled run: that storage
    measured = device.compute.measured
    for key, runs in cal["runs"].items():
        specs = [calibration_spec(cal, fmt, cfg, storage.name) for fmt, cfg, _ in runs]
        targets = [t for _, _, t in runs]

        def error(read: float, stall: float) -> float:
            cont = dict(measured.contention, **{key: replace(measured.contention[key], read=read, stall=stall)})
            # the calibrated model alone (with the host figures the simulator would charge the structural one)
            dev = replace(device, compute=replace(device.compute, measured=replace(measured, contention=cont,
                                                                                  host=None)))
            total = 0.0
            for spec, target in zip(specs, targets):
                got = run_times(simulate(spec, device=dev, storage=storage).timeline)
                total += float(np.sum(WEIGHTS * (got / target - 1) ** 2))
            return total
        dec = measured.contention[key].decompress          # read + decompress < 1: the main thread runs
        read, stall = min(((r, st) for r, st in itertools.product(GRID, GRID) if r + dec < 0.95),
                          key=lambda rs: error(*rs))
        m["contention"][key].update(read=read, stall=stall)
