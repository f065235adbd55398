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


def summary(probes: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per kind, (median, min, max) seconds over `probes`."""
    return {k: (statistics.median(p[k] for p in probes), min(p[k] for p in probes), max(p[k] for p in probes))
            for k in KINDS}


def spread(probes: list[dict]) -> float:
    """How far the host's speed moved over `probes`: the largest max / min - 1 of a kind."""
    return max(hi / lo - 1 for _, lo, hi in summary(probes).values())


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


def profile_probe(path) -> dict[str, float] | None:
    """The profile's probe ({kind: seconds}, the median over its stages); None: not recorded."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(r"^# probe: python ([\d.]+) ms, torch ([\d.]+) ms \(median", text, re.M)
    return None if m is None else {"python": float(m.group(1)) / 1e3, "torch": float(m.group(2)) / 1e3}


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
