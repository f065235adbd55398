"""Gantt chart of a timeline (matplotlib, no screen needed).

Two panels, so a long run stays readable and nothing is dropped silently:
- the detail window: every load, decompression and compute of a few steps (default the
  first 4) as bars, each at least a pixel or two wide (the chart says so);
- the summary lanes: the whole run, each resource's busy share per time bin (1/400 of the
  makespan), with the detail window marked.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from timeline.events import Timeline  # noqa: E402

COLORS = {"load": "tab:blue", "decompress": "tab:purple", "expert": "tab:orange", "dense": "tab:gray",
          "copy": "tab:green"}
ORDER = ("io", "decompress", "link", "dense", "compute", "cpu")    # link:host-ram>gpu, cpu: sim/tiers.py


def _rank(res: str):
    base = res.split("[")[0].split(":")[0]
    index = int(res[len(base) + 1:-1]) if "[" in res else 0
    return (ORDER.index(base) if base in ORDER else len(ORDER), index)


def busy_share(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per bin [edges[j], edges[j+1]): the busy time of the intervals in it / the bin width
    (overlapping intervals add up; clipped to 1). O((n + bins) log n)."""
    s, e = np.sort(starts), np.sort(ends)
    cs, ce = np.concatenate([[0.0], np.cumsum(s)]), np.concatenate([[0.0], np.cumsum(e)])
    ns, ne = np.searchsorted(s, edges), np.searchsorted(e, edges)
    covered = ns * edges - cs[ns] - (ne * edges - ce[ne])      # integral of the busy count up to each edge
    width = np.diff(edges)
    return np.clip(np.diff(covered) / np.where(width > 0, width, 1), 0.0, 1.0)


def window_span(tl: Timeline, timed, first_step: int, steps: int) -> tuple[float, float, list[int]]:
    """(start, end, steps shown) of the detail window: the work of steps first..first+steps-1."""
    ids = sorted({e.step for e in timed if e.step >= 0})
    shown = ids[first_step:first_step + steps] or ids[:steps]
    chosen = [e for e in timed if e.step in set(shown)] or timed
    return min(e.start for e in chosen), max(e.end for e in chosen), shown


def gantt(tl: Timeline, path, *, steps: int = 4, first_step: int | None = None, max_events: int = 20000,
          bins: int = 400, title: str | None = None) -> Path:
    """Write the chart to `path` (PNG). The detail window shows `steps` steps from `first_step`,
    cut at `max_events` bars (the chart says where); the summary lanes always cover every event.
    By default it starts at step 0, except on an executor's timeline with more steps than shown:
    there its first step is warm-up (first calls pay one-off costs that would dwarf the rest), so
    the window starts after it and says so."""
    warmup = first_step is None and tl.meta.get("engine") == "executor" and len(tl.meta.get("steps", [])) > steps
    first_step = (1 if warmup else 0) if first_step is None else first_step
    timed = [e for e in tl.events if e.resource != "cache" and e.end > e.start]
    rows = sorted({e.resource for e in timed}, key=_rank)
    fig, (ax, ax_sum) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.9 * max(len(rows), 1)),
                                     gridspec_kw={"height_ratios": [3, 2]})
    name = title or f"{tl.meta.get('engine', '')} {tl.meta.get('model', '')} on {tl.meta.get('device', '')}"
    if not timed:
        ax.set_title(f"{name}: no timed events")
        ax_sum.set_axis_off()
    else:
        t0, t1, shown = window_span(tl, timed, first_step, steps)
        in_window = [e for e in timed if e.end > t0 and e.start < t1]
        note = ""
        if len(in_window) > max_events:
            in_window.sort(key=lambda e: e.start)
            t1 = in_window[max_events].start
            in_window = in_window[:max_events]
            note = f"; window cut at {max_events} bars ({t1:.3g} s)"
        min_width = (t1 - t0) / 3000                  # ~1/3 px at this size: short computes stay visible
        for y, res in enumerate(rows):
            mine = [e for e in in_window if e.resource == res]
            if not mine:
                continue
            bars = [(e.start, max(e.end - e.start, min_width)) for e in mine]
            ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLORS.get(mine[0].kind, "tab:green"),
                           edgecolor="white" if res == "io" else "none", linewidth=0.3)   # loads back to back
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlim(t0, t1)
        ax.invert_yaxis()                             # the same row order as the summary lanes
        ax.set_xlabel("time (s)")
        n_steps = len(tl.meta.get("steps", [])) or len({e.step for e in timed})
        step_text = f"steps {shown[0]}-{shown[-1]}" if shown else "all events"
        step_text += " (after step 0, the warm-up)" if warmup else ""
        ax.set_title(f"{name}\ndetail: {step_text} of {n_steps} ({len(in_window)} of {len(timed)} timed events; "
                     f"bars widened to >= {min_width * 1e3:.2g} ms{note})", fontsize=9)

        end = max(e.end for e in timed)
        edges = np.linspace(0.0, end, bins + 1)
        share = np.zeros((len(rows), bins))
        for y, res in enumerate(rows):
            mine = [e for e in timed if e.resource == res]
            share[y] = busy_share(np.array([e.start for e in mine]), np.array([e.end for e in mine]), edges)
        img = ax_sum.imshow(share, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                            extent=(0.0, end, len(rows) - 0.5, -0.5))
        for edge in (t0, t1):              # outlined, not tinted: a tint would change the lanes' colours
            ax_sum.axvline(edge, color="tab:red", lw=1.2)
        ax_sum.set_yticks(range(len(rows)), rows)
        ax_sum.set_xlabel("time (s)")
        ax_sum.set_title(f"summary: the whole run, busy share per {end / bins:.3g} s bin (all {len(timed)} "
                         f"events; red lines: the detail window)", fontsize=9)
        fig.colorbar(img, ax=ax_sum, fraction=0.02, pad=0.01)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def layer_gantt(ax, tl: Timeline, step: int, layer: int) -> float:
    """One decision point's loads and computes on `ax` (ms from its first event), the compute
    bubbles (compute idle between the layer's first load and its last compute) shaded red, as
    D²MoE draws HEBF against FIFO. Returns the bubble time in seconds (also in the title)."""
    evs = [e for e in tl.events if e.step == step and e.layer == layer and e.resource in ("io", "compute")
           and e.end > e.start]
    if not evs:
        ax.set_title(f"step {step}, layer {layer}: nothing loaded or computed")
        return 0.0
    t0 = min(e.start for e in evs)
    for lane, res in ((1, "io"), (0, "compute")):
        for e in (e for e in evs if e.resource == res):
            ax.barh(lane, (e.end - e.start) * 1e3, left=(e.start - t0) * 1e3, height=0.6,
                    color=COLORS["load" if res == "io" else "expert"], edgecolor="k", linewidth=0.3)
    cursor = idle = 0.0
    for s, e in sorted((e.start - t0, e.end - t0) for e in evs if e.resource == "compute"):
        if s > cursor:
            ax.axvspan(cursor * 1e3, s * 1e3, ymin=0.02, ymax=0.48, color="red", alpha=0.18, lw=0)
            idle += s - cursor
        cursor = max(cursor, e)
    ax.set_yticks([0, 1], ["compute", "I/O"])
    ax.set_xlabel(f"time since step {step}, layer {layer} began loading (ms)")
    ax.set_title(f"compute bubbles (red): {idle * 1e3:.1f} of {cursor * 1e3:.1f} ms")
    return idle
