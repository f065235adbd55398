"""A speed probe of this host as the executor uses it, now (issue 24).

A shared VM's speed drifts with its neighbours: on this project's 2-vCPU VM two full profiles 25
minutes apart timed the same dense part at 399 us and 648 us, and the executor's TPOTs of one
matrix moved by 25% between two validations, at a load average near 0 (the load average does not
see another tenant). A profile is only a ground for a validation if the host runs at the speed it
was profiled at, so `moelab profile` times this probe at its start and end (its `# probe:` line)
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


def probe_line(start: dict, end: dict) -> str:
    """The profile's comment line (read back by profile_probe)."""
    def ms(p):
        return ", ".join(f"{k} {1e3 * p[k]:.2f} ms" for k in KINDS)
    return f"# probe: {ms(start)} at start; {ms(end)} at end (executor/host_probe.py)"


def profile_probe(path) -> dict[str, float] | None:
    """The profile's probe, the mean of its start and end ({kind: seconds}); None: not recorded."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(r"^# probe: python ([\d.]+) ms, torch ([\d.]+) ms at start; python ([\d.]+) ms, "
                  r"torch ([\d.]+) ms at end", text, re.M)
    if m is None:
        return None
    v = [float(x) / 1e3 for x in m.groups()]
    return {"python": (v[0] + v[2]) / 2, "torch": (v[1] + v[3]) / 2}


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
