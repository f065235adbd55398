"""The timeline both engines emit: one Event per load, decompression, compute, dense part
and cache decision. Metrics, Chrome traces and Gantt charts read only this.

Resources: "io", "decompress[i]", "compute", "dense", and "cache" (zero-length
decision records: kind "admit", "evict", "prefetch", at the decision time; a prefetch
record is an admission for a later decision point, with that point's layer). Hits are not
recorded: every part a compute needed was either admitted at that decision point or a hit
(possibly prefetched), so metrics derive them (meta["level_parts"] says how many parts each level needs).
`step` is the index of the batch step (prefill or decode) the event belongs to;
`tokens` is how many tokens a compute covered.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Event(NamedTuple):
    resource: str
    kind: str
    start: float
    end: float
    layer: int = -1
    expert: int = -1
    level: int = -1     # precision level of a compute; part index of a load / cache record
    bytes: int = 0
    step: int = -1
    tokens: int = 0


@dataclass
class Timeline:
    events: list[Event] = field(default_factory=list)
    meta: dict = field(default_factory=dict)   # engine, batch, steps (list of {"step", "prefill", "tokens"}), ...
    # a metrics-only run records no events: what the metrics need, accumulated as it ran
    # (timeline/metrics.py Figures; None: compute it from the events)
    figures: object | None = field(default=None, repr=False, compare=False)

    def of(self, resource_prefix: str, kind: str | None = None) -> list[Event]:
        return [e for e in self.events
                if e.resource.startswith(resource_prefix) and (kind is None or e.kind == kind)]

    def decisions(self) -> list[tuple[str, int, int, int, int]]:
        """The (kind, step, layer, expert, part) sequence of admissions and evictions: what two
        engines given the same trace and policy must agree on."""
        return [(e.kind, e.step, e.layer, e.expert, e.level) for e in self.events
                if e.resource == "cache" and e.kind in ("admit", "evict", "prefetch")]

    # -- files -----------------------------------------------------------------
    def to_json(self) -> dict:
        return {"meta": self.meta, "fields": list(Event._fields), "events": [list(e) for e in self.events]}

    @classmethod
    def from_json(cls, data: dict) -> "Timeline":
        return cls([Event(*row) for row in data["events"]], data.get("meta", {}))

    def chrome_trace(self) -> dict:
        """Chrome trace-event JSON (open in Perfetto or chrome://tracing); times in microseconds."""
        tids = {}
        out = []
        for e in self.events:
            tid = tids.setdefault(e.resource, len(tids))
            args = {"layer": e.layer, "expert": e.expert, "level": e.level, "bytes": e.bytes,
                    "step": e.step, "tokens": e.tokens}
            name = e.kind if e.expert < 0 else f"{e.kind} L{e.layer}E{e.expert}"
            if e.end > e.start:
                out.append({"name": name, "cat": e.resource, "ph": "X", "ts": e.start * 1e6,
                            "dur": (e.end - e.start) * 1e6, "pid": 0, "tid": tid, "args": args})
            else:
                out.append({"name": name, "cat": e.resource, "ph": "i", "s": "t", "ts": e.start * 1e6,
                            "pid": 0, "tid": tid, "args": args})
        out += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": res}}
                for res, tid in tids.items()]
        track = self.meta.get("power_track")       # timeline/energy.py power_track: a counter track
        out += counter_events(track)
        meta = self.meta if track is None else {k: v for k, v in self.meta.items() if k != "power_track"}
        return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta}


def counter_events(track: dict | None) -> list[dict]:
    """Chrome-trace counter events ("ph": "C") of a track {name, resources, points: [[t, w...]]}:
    Perfetto draws them as one counter track with a series per resource, under the lanes."""
    if not track:
        return []
    names = track["resources"]
    return [{"name": track.get("name", "power (W)"), "ph": "C", "ts": row[0] * 1e6, "pid": 0,
             "args": dict(zip(names, row[1:]))} for row in track["points"]]


def write_json_atomic(path, data) -> Path:
    """Write JSON to a temp file beside `path`, then rename: a crash never leaves half a file."""
    from devices.atomic import atomic_open
    with atomic_open(path, "w") as f:
        json.dump(data, f)
    return Path(path)
