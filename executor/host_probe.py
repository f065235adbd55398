"""A speed probe of this host as the executor uses it, now (issue 24).

A shared VM's speed drifts with its neighbours: on this project's 2-vCPU VM two full profiles 25
minutes apart timed the same dense part at 399 us and 648 us, and the executor's TPOTs of one
matrix moved by 25% between two validations, at a load average near 0 (the load average does not
see another tenant). A profile is only a ground for a validation if the host runs at the speed it
was profiled at, so `moelab profile` times this probe as each of its stages begins and at its end
(its `# probe:` line: the median, the range; it warns when the speed moved more than SPREAD_LIMIT)
and `moelab validate` after each executor run (runs.jsonl), and the report sets them side by side.

The probe is the executor's two kinds of work: the interpreter (a pure-Python loop, as the
executor's dispatch and policies run) and a small torch kernel (float32 matmuls, as its expert
calls run on one thread), each the median of a few repeats of about 10 ms.

A median of 10 ms repeats misses a host whose speed flips within a second. On this project's
2-vCPU VM, 0.6 ms slices of a Python loop ran at 0.56-0.61 ms in most seconds and near 1.0 ms
(1.75x) in bursts of a few hundred ms (a hyper-thread sibling busy on the machine beneath,
which neither the load average nor the steal time shows), while the per-second medians held
within 8%. `steadiness` times such slices back to back for a few seconds and reports the
share that ran SLOW_FACTOR slower than the host's fast slices: an executor run of a few
hundred ms takes as many of those bursts as fall in it, so its spread, and the error a
validation can resolve, follow that share (`moelab profile` and `moelab validate` time it at
their start and end).
"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

REPEATS = 5
PY_ITERATIONS = 200_000
MATMULS, SIZE = 40, 192
KINDS = ("python", "torch")


def _python() -> None:
    x = 0
    for i in range(PY_ITERATIONS):
        x += i & 7


def probe() -> dict[str, float]:
    """Seconds of each kind of work now: {"python": s, "torch": s} (medians of REPEATS)."""
    a, b = torch.randn(SIZE, SIZE), torch.randn(SIZE, SIZE)

    def kernel():
        for _ in range(MATMULS):
            a @ b

    out = {}
    for kind, work in (("python", _python), ("torch", kernel)):
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            work()
            times.append(time.perf_counter() - t)
        out[kind] = statistics.median(times)
    return out


# steadiness: Python slices of about 0.3 ms, timed back to back for STEADY_SECONDS (a full, a quick
# profile or validation: at its start and its end); a slice SLOW_FACTOR slower than the fast slices
# (their 10th percentile: the host's full speed, robust to a few lucky slices) ran at a reduced speed
SLICE_ITERATIONS = 10_000
STEADY_SECONDS = {False: 2.0, True: 0.5}
SLOW_FACTOR = 1.3
UNSTEADY_LIMIT = 0.05       # a host with more slow slices than this is no ground for a validation


def slow_share(times: list[float], factor: float = SLOW_FACTOR) -> float:
    """The share of slice `times` at least `factor` x their 10th percentile."""
    if not times:
        raise ValueError("slow_share: no slice times")
    fast = float(sorted(times)[(len(times) - 1) // 10])
    return sum(t >= factor * fast for t in times) / len(times)


def _slice() -> None:
    x = 0
    for i in range(SLICE_ITERATIONS):
        x += i & 7


def steadiness(seconds: float = STEADY_SECONDS[False]) -> dict[str, float]:
    """{"slow_share": share of slow slices, "slice": the median slice's seconds, "slices": count}."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while not times or time.perf_counter() < end:
        t = time.perf_counter()
        _slice()
        times.append(time.perf_counter() - t)
    return {"slow_share": slow_share(times), "slice": statistics.median(times), "slices": len(times)}


def mean_slow_share(readings: list[dict]) -> float:
    return statistics.mean(r["slow_share"] for r in readings)


def steadiness_text(readings: list[dict]) -> str:
    """'4.1% of ... (readings 1.2%, 7.0%)': the readings' shares of slow slices, their mean first."""
    mean = mean_slow_share(readings)
    each = ", ".join(f"{100 * r['slow_share']:.1f}%" for r in readings)
    return (f"{100 * mean:.1f}% of {SLICE_ITERATIONS}-iteration Python slices ran >= {SLOW_FACTOR}x the host's "
            f"fast ones (readings {each}; executor/host_probe.py steadiness)")


def steadiness_line(readings: list[dict]) -> str:
    """The profile's comment line (read back by profile_steadiness)."""
    return "# steadiness: " + steadiness_text(readings)


def profile_steadiness(path) -> float | None:
    """The mean share of slow slices a profile recorded (its `# steadiness:` line); None: not recorded."""
    m = profile_comment(path, r"^# steadiness: ([\d.]+)% of")
    return None if m is None else float(m.group(1)) / 100


def unsteady_warning(readings: list[dict], what: str) -> str | None:
    """The warning `moelab profile` / `validate` print when the host's speed flips (None: steady)."""
    mean = mean_slow_share(readings)
    if mean <= UNSTEADY_LIMIT:
        return None
    return (f"warning: this host ran {100 * mean:.0f}% of the time at a reduced speed while {what} (short Python "
            f"slices at >= {SLOW_FACTOR}x its fast ones; another tenant of the machine beneath? neither the load "
            f"average nor the steal time sees one): executor runs take as much of it as falls in them, so expect "
            f"their spread, and the error a validation can resolve, to grow with it")


def summary(probes: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per kind, (median, min, max) seconds over `probes`."""
    return {k: (statistics.median(p[k] for p in probes), min(p[k] for p in probes), max(p[k] for p in probes))
            for k in KINDS}


def spread(probes: list[dict]) -> float:
    """How far the host's speed moved over `probes`: the largest max / min - 1 of a kind."""
    return max(hi / lo - 1 for _, lo, hi in summary(probes).values())


LINE_ROUNDING = 5e-6       # probe_line writes milliseconds with 2 decimals: a figure there is +-5 us


def probe_line(probes: list[dict]) -> str:
    """The profile's comment line (read back by profile_probe): the probe at each stage's start and at
    the end, its median and range."""
    s = summary(probes)
    return ("# probe: " + ", ".join(f"{k} {1e3 * s[k][0]:.2f} ms" for k in KINDS) + f" (median of {len(probes)}: "
            "each profiling stage's start and the end; range " +
            ", ".join(f"{k} {1e3 * s[k][1]:.2f}-{1e3 * s[k][2]:.2f} ms" for k in KINDS) +
            f", the host's speed moved {100 * spread(probes):.0f}%; executor/host_probe.py)")


# a profile whose probes moved more than this mixes the host's speeds: it says so (moelab profile)
SPREAD_LIMIT = 0.15


def profile_comment(path, pattern: str) -> re.Match | None:
    """The match of `pattern` on one of a profile's comment lines (None: no such line, or no file)."""
    try:
        return re.search(pattern, Path(path).read_text(), re.M)
    except OSError:
        return None


def profile_probe(path) -> dict[str, float] | None:
    """The profile's probe ({kind: seconds}, the median over its stages); None: not recorded."""
    m = profile_comment(path, r"^# probe: python ([\d.]+) ms, torch ([\d.]+) ms \(median")
    return None if m is None else {"python": float(m.group(1)) / 1e3, "torch": float(m.group(2)) / 1e3}


def profile_probe_range(path) -> dict[str, tuple[float, float]] | None:
    """Per kind, the (fastest, slowest) seconds of the profile's probes: the speeds its figures were
    measured at (its `# probe:` line's range); None: not recorded."""
    m = profile_comment(path, r"^# probe: .*; range python ([\d.]+)-([\d.]+) ms, torch ([\d.]+)-([\d.]+) ms")
    if m is None:
        return None
    lo_py, hi_py, lo_t, hi_t = (float(x) / 1e3 for x in m.groups())
    return {"python": (lo_py, hi_py), "torch": (lo_t, hi_t)}


def at_speed(run_probe: dict | None, speeds: dict | None) -> bool | None:
    """Whether a run's probe lies within the profile's range for every kind (the host ran at a speed
    the profile measured it at); None: either is unknown. A reading within the line's rounding of an
    end counts as inside."""
    if not run_probe or not speeds:
        return None
    return all(lo - LINE_ROUNDING <= run_probe[k] <= hi + LINE_ROUNDING for k, (lo, hi) in speeds.items())


def drift(probes: list[dict], reference: dict) -> dict[str, tuple[float, float, float]] | None:
    """Per kind, how much slower the host ran than at the reference: (median, min, max) of
    probe / reference - 1 over `probes` (None without probes or a reference)."""
    probes = [p for p in probes if p]
    if not probes or not reference:
        return None
    out = {}
    for k in KINDS:
        r = [p[k] / reference[k] - 1 for p in probes]
        out[k] = (statistics.median(r), min(r), max(r))
    return out


def drift_text(d: dict) -> str:
    return "; ".join(f"{k} {100 * m:+.0f}% (range {100 * lo:+.0f}% to {100 * hi:+.0f}%)" for k, (m, lo, hi) in d.items())
