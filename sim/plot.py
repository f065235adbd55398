"""Gantt chart of a timeline (matplotlib, no screen needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim.timeline import Timeline  # noqa: E402

COLORS = {"load": "tab:blue", "decompress": "tab:purple", "expert": "tab:orange", "dense": "tab:gray"}


def gantt(tl: Timeline, path, *, max_events: int = 20000, title: str | None = None) -> Path:
    """One row per resource; loads, decompressions and computes as bars. Long runs are
    cut to the first `max_events` timed events so the chart stays readable."""
    timed = [e for e in tl.events if e.resource != "cache" and e.end > e.start][:max_events]
    order = ("io", "decompress", "dense", "compute")
    def rank(res):
        base = res.split("[")[0]
        index = int(res[len(base) + 1:-1]) if "[" in res else 0
        return (order.index(base) if base in order else len(order), index)
    rows = sorted({e.resource for e in timed}, key=rank)
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * max(len(rows), 1)))
    for y, res in enumerate(rows):
        bars = [(e.start, e.end - e.start) for e in timed if e.resource == res]
        kind = next(e.kind for e in timed if e.resource == res)
        ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLORS.get(kind, "tab:green"), edgecolor="none")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{tl.meta.get('engine', '')} {tl.meta.get('model', '')} on {tl.meta.get('device', '')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
