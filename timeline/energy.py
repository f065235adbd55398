"""Energy from a timeline: each resource's power integrated over its busy and idle time.

Resources and the time each is busy on the timeline (timeline/metrics.py Figures, the same figures
for a full timeline and a metrics-only run, so `simulate` and a sweep give the same energy):

- board: the module and carrier at idle, drawn over the whole makespan;
- compute: the engine of the experts and dense parts (a Jetson's GPU and the thread driving it),
  busy while any compute or dense event runs (the union);
- memory: DRAM streaming weights, busy while compute is;
- decompress: the decompression cores, busy while any decompression worker is (the union; the
  power is that of the cores busy at once on average, which the device's figures state);
- storage: busy while any read is in flight.

    energy = board x makespan + sum over resources (busy W x busy s + idle W x (makespan - busy s))

The powers come in as `Powers` (devices/power.py `mode_powers` builds the mapping): this package
does not read device files. `power_track` turns a timeline's events into the same power as a step
function (a Chrome-trace counter track, timeline/events.py), whose integral is the energy.
"""
from __future__ import annotations

from dataclasses import dataclass

from timeline.events import Timeline
from timeline.metrics import Figures, busy_time

RESOURCES = ("board", "compute", "memory", "decompress", "storage")
BUSY = ("compute", "memory", "decompress", "storage")
ENERGY_KEYS = ("energy_j", "energy_per_token_j", "average_power_w", "energy_idle_share",
               *(f"energy_share_{r}" for r in RESOURCES))


@dataclass(frozen=True)
class Powers:
    """Watts each resource draws: the board always, the others (busy, idle)."""
    board: float
    compute: tuple[float, float]
    memory: tuple[float, float]
    decompress: tuple[float, float]
    storage: tuple[float, float]
    mode: str = ""

    @classmethod
    def of(cls, doc: dict) -> "Powers":
        return cls(**{k: doc[k] for k in ("board", *BUSY)}, mode=doc.get("mode", ""))


def busy_seconds(f: Figures) -> dict[str, float]:
    """Seconds each resource is busy (module docstring)."""
    return {"compute": f.compute_busy, "memory": f.compute_busy, "decompress": f.decompress_busy,
            "storage": f.io_busy}


def energy_split(f: Figures, powers: Powers) -> tuple[dict[str, float], float]:
    """(joules per resource, joules drawn while idle: the board and every idle term)."""
    T = f.makespan
    busy = busy_seconds(f)
    out = {"board": powers.board * T}
    idle = out["board"]
    for r in BUSY:
        on, off = getattr(powers, r)
        out[r] = on * busy[r] + off * (T - busy[r])
        idle += off * (T - busy[r])
    return out, idle


def activity(tl: Timeline) -> Figures | "_Activity":
    """What the energy reads of a timeline: its metrics-only figures, or, from its events, the
    makespan and busy times computed as timeline/metrics.py figures_of computes them (the same
    floats) without the rest of the figures."""
    if tl.figures is not None:
        return tl.figures
    work = [e for e in tl.events if e.resource != "cache"]
    return _Activity(max((e.end for e in work), default=0.0),
                     busy_time((e.start, e.end) for e in work if e.resource == "io"),
                     busy_time((e.start, e.end) for e in work if e.resource in ("compute", "dense")),
                     busy_time((e.start, e.end) for e in work if e.resource.startswith("decompress")))


@dataclass(frozen=True)
class _Activity:
    makespan: float
    io_busy: float
    compute_busy: float
    decompress_busy: float


def energy_metrics(tl: Timeline, powers: Powers | None, tokens: int, reason: str | None = None) -> dict:
    """The energy metrics of a run (None with the reason when there are no powers or no time)."""
    if powers is None:
        return null_energy(reason or "no power figures")
    f = activity(tl)
    joules, idle = energy_split(f, powers)
    total = sum(joules.values())
    if f.makespan <= 0 or total <= 0:
        return null_energy("the run took no time")
    return {"energy_j": total, "energy_per_token_j": total / tokens if tokens else None,
            "average_power_w": total / f.makespan, "energy_idle_share": idle / total,
            **{f"energy_share_{r}": joules[r] / total for r in RESOURCES}, "energy_reason": None}


def null_energy(reason: str) -> dict:
    return {**{k: None for k in ENERGY_KEYS}, "energy_reason": reason}


def power_track(tl: Timeline, powers: Powers) -> dict:
    """The run's power as a step function of time, from its events: at each point, the watts of
    every resource from then on (the last point, at the makespan, is zero). Its integral over the
    makespan is energy_j."""
    spans: dict[str, list[tuple[float, float]]] = {r: [] for r in ("compute", "storage", "decompress")}
    for e in tl.events:
        if e.end > e.start:
            r = ("compute" if e.resource in ("compute", "dense") else "storage" if e.resource == "io" else
                 "decompress" if e.resource.startswith("decompress") else None)
            if r is not None:
                spans[r].append((e.start, e.end))
    edges: list[tuple[float, int, str]] = []
    for r, intervals in spans.items():
        for start, end in _merged(intervals):
            for kind in (("compute", "memory") if r == "compute" else (r,)):
                edges += [(start, 1, kind), (end, -1, kind)]
    edges.sort(key=lambda x: (x[0], x[1]))
    makespan = max((e.end for e in tl.events if e.resource != "cache"), default=0.0)
    column = {r: i + 2 for i, r in enumerate(BUSY)}           # a point is [t, board, compute, memory, ...]
    active = dict.fromkeys(BUSY, 0)
    points = [[0.0, powers.board] + [getattr(powers, r)[1] for r in BUSY]]
    for t, step, r in edges:
        before = active[r]
        active[r] += step
        if (before == 0) == (active[r] == 0):
            continue                                          # still busy (or still idle): no change
        row = list(points[-1])
        row[0], row[column[r]] = t, getattr(powers, r)[0 if active[r] else 1]
        if row[1:] == points[-1][1:]:
            continue
        if points[-1][0] == t:
            points[-1] = row
        else:
            points.append(row)
    end = [makespan] + [0.0] * len(RESOURCES)
    if points[-1][0] >= makespan and len(points) > 1:
        points[-1] = end
    else:
        points.append(end)
    return {"name": "power (W)", "resources": list(RESOURCES), "points": points}


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def track_energy(track: dict) -> float:
    """The integral of a power track (joules)."""
    pts = track["points"]
    return sum((b[0] - a[0]) * sum(a[1:]) for a, b in zip(pts, pts[1:]))
