"""`moelab plot RESULTS --kind KIND`: figures from a sweep's results file (PNG and PDF).

Kinds:
- throughput: throughput (tok/s) against the expert budget, one line per policy bundle;
- mrc: the miss-ratio curve, demand miss ratio (1 - hit ratio) against the budget, per policy;
- tpot: TPOT distributions (box: p10 / p25 / p50 / p75 / p90, whisker to p99) per policy;
- speedup: a heatmap of throughput over a named baseline policy, device x policy (the
  geometric mean over the other axes where both ran);
- gantt: one run (the row of --row HASH, or the first) simulated again, one layer's loads
  and computes with the compute bubbles shaded (the picture D²MoE uses to explain HEBF);
- energy: throughput (tok/s) against energy per token (J), one point per configuration (colour:
  power mode, marker: format), the Pareto front (no other run both faster and cheaper per token)
  marked; rows without energy (a device with no power figures) are left out and counted.

`--where KEY=VALUE` keeps matching rows; `--facet KEY` draws one panel per value of a third
variable (default: device when there are several). Rows that did not run (status other
than ok) are left out and counted in the title.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from devices.units import ConfigError, format_size

KINDS = ("throughput", "mrc", "tpot", "speedup", "gantt", "energy")


def _f(row, key) -> float | None:
    v = row.get(key)
    return None if v in (None, "", "None") else float(v)


def filter_rows(rows: list[dict], where: list[tuple[str, str]]) -> list[dict]:
    for key, value in where:
        if rows and key not in rows[0]:
            raise ConfigError(f"--where {key}=...: no column {key!r}; columns: {', '.join(rows[0])}")
        rows = [r for r in rows if str(r.get(key)) == value]
    return rows


def _facets(rows, facet):
    if facet is None:
        devices = sorted({r["device"] for r in rows})
        facet = "device" if len(devices) > 1 else None
    if facet is None:
        return None, [("", rows)]
    if rows and facet not in rows[0]:
        raise ConfigError(f"--facet {facet}: no column {facet!r}; columns: {', '.join(rows[0])}")
    values = sorted({r[facet] for r in rows}, key=_natural)
    return facet, [(v, [r for r in rows if r[facet] == v]) for v in values]


def _natural(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _grid(n):
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot(rows: list[dict], kind: str, out_stem, *, facet: str | None = None, baseline: str | None = None,
         row_hash: str | None = None, title: str | None = None) -> list[Path]:
    """Draw `kind` from result rows; returns the PNG and PDF paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind}: unknown; kinds: {', '.join(KINDS)}")
    if not rows:
        raise ConfigError("no result rows to plot (check --where)")
    if kind == "gantt":
        fig = _gantt(rows, row_hash)
        return save(fig, out_stem)
    ok = [r for r in rows if r.get("status") == "ok"]
    if kind == "energy":                  # a device without power figures has no energy to plot
        ok = [r for r in ok if _f(r, "energy_per_token_j") is not None and _f(r, "throughput_tok_s")]
    skipped = len(rows) - len(ok)
    if not ok:
        raise ConfigError(f"none of the {len(rows)} rows ran (status: {sorted({r.get('status') for r in rows})})")
    if kind == "speedup":
        fig = _speedup(ok, baseline)
    else:
        facet, panels = _facets(ok, facet)
        nr, nc = _grid(len(panels))
        fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 3.9 * nr), squeeze=False)
        for ax, (value, prows) in zip(axes.ravel(), panels):
            {"throughput": _throughput, "mrc": _mrc, "tpot": _tpot, "energy": _energy}[kind](ax, prows)
            if facet:
                ax.set_title(f"{facet} = {value}", fontsize=9)
        for ax in axes.ravel()[len(panels):]:
            ax.axis("off")
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        rows_of_legend = math.ceil(len(labels) / 4)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05 * rows_of_legend / nr, 1, 0.95))
    note = f" ({skipped} rows did not run)" if skipped else ""
    fig.suptitle((title or {"throughput": "Throughput against budget", "mrc": "Miss-ratio curves",
                            "tpot": "TPOT per policy (box p25-p75, line p50, whiskers p10-p90, x p99)", "speedup": f"Speed-up over {baseline}",
                            "energy": "Throughput against energy per token (ringed: the Pareto front)"}[kind]) + note,
                 fontsize=10, y=1.0)
    return save(fig, out_stem)


def _by_policy(rows):
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["policy"], []).append(r)
    return out


def budget_unit(rows) -> tuple[str, float]:
    """The size unit that fits the budgets on the axis (a few MB read as MB, not 0.0010 GB)."""
    top = max((float(r["budget_bytes"]) for r in rows if r["budget_bytes"] not in ("all", "")), default=1e9)
    return next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if top >= s), ("B", 1.0))


def _lines(ax, rows, y):
    unit, scale = budget_unit(rows)
    for policy, prs in sorted(_by_policy(rows).items()):
        pts = {}
        for r in prs:            # several rows at one budget (other axes): their mean
            v = y(r)
            if v is not None and r["budget_bytes"] != "all":
                pts.setdefault(float(r["budget_bytes"]) / scale, []).append(v)
        xs = sorted(pts)
        ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", ms=3, label=policy)
    ax.set_xlabel(f"expert memory budget ({unit})")
    ax.grid(alpha=0.3)


def _throughput(ax, rows):
    _lines(ax, rows, lambda r: _f(r, "throughput_tok_s"))
    ax.set_ylabel("throughput (tok/s)")


def _mrc(ax, rows):
    _lines(ax, rows, lambda r: None if _f(r, "hit_ratio") is None else 1 - _f(r, "hit_ratio"))
    ax.set_ylabel("demand miss ratio")
    ax.set_ylim(0, 1.02)


def _tpot(ax, rows):
    stats, labels = [], []
    for policy, prs in sorted(_by_policy(rows).items()):
        r = prs[0] if len(prs) == 1 else min(prs, key=lambda r: _f(r, "tpot_s_p50") or math.inf)
        q = {p: _f(r, f"tpot_s_p{p}") for p in (10, 25, 50, 75, 90, 99)}
        if q[50] is None:
            continue
        stats.append({"whislo": q[10] * 1e3, "q1": q[25] * 1e3, "med": q[50] * 1e3, "q3": q[75] * 1e3,
                      "whishi": q[90] * 1e3, "fliers": [q[99] * 1e3], "label": policy})
        labels.append(policy)
    if stats:
        ax.bxp(stats, showfliers=True, flierprops={"marker": "x"})
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.set_ylabel("TPOT (ms)")
    ax.grid(alpha=0.3, axis="y")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (J/token, tok/s) points no other point beats on both (cheaper and at least as
    fast, or faster and at most as costly), by increasing energy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


MARKERS = "os^DvP*X<>"


def _mode_order(mode: str):
    """Power modes by their watts (7W < 15W < 25W), the uncapped ones (MAXN...) last."""
    m = re.match(r"(\d+(?:\.\d+)?)W$", mode)
    return (0, float(m.group(1)), "") if m else (1, 0.0, mode)


def _energy(ax, rows):
    from matplotlib.lines import Line2D
    pts = [(_f(r, "energy_per_token_j"), _f(r, "throughput_tok_s")) for r in rows]
    modes = sorted({r.get("power_mode") or "default" for r in rows}, key=_mode_order)
    formats = sorted({r["format"] for r in rows})
    colors = {m: f"C{i % 10}" for i, m in enumerate(modes)}
    marks = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(formats)}
    for (x, y), r in zip(pts, rows):
        ax.scatter(x, y, s=22, c=colors[r.get("power_mode") or "default"], marker=marks[r["format"]], alpha=0.8)
    front = pareto_front(pts)
    fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="k", lw=0.8, alpha=0.6)
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="k", lw=1.0)
    for k, i in enumerate(front):         # name the front's points: mode / format / cache
        ax.annotate(f"{rows[i].get('power_mode') or 'default'} {rows[i]['format']} {rows[i].get('cache', '')}",
                    pts[i], textcoords="offset points", xytext=(6, -10 - 7 * (k % 3)), fontsize=6)
    if max(fx + [x for x, _ in pts]) > 8 * min(x for x, _ in pts):
        ax.set_xscale("log")
    ax.set_xlabel("energy per token (J)")
    ax.set_ylabel("throughput (tok/s)")
    ax.grid(alpha=0.3, which="both")
    # a legend per panel (modes differ between devices), so none for the whole figure
    handles = [Line2D([], [], ls="", marker="o", color=colors[m]) for m in modes]
    handles += [Line2D([], [], ls="", marker=marks[f], color="0.4") for f in formats]
    handles.append(Line2D([], [], color="k", lw=0.8))
    ax.legend(handles, [f"mode {m}" for m in modes] + [f"format {f}" for f in formats] + ["Pareto front"],
              fontsize=6, loc="best")


def _speedup(rows, baseline):
    import matplotlib.pyplot as plt
    import numpy as np
    policies = sorted({r["policy"] for r in rows})
    if baseline is None or baseline not in policies:
        raise ConfigError(f"--baseline: name one of the policies in the results: {', '.join(policies)}")
    devices = sorted({r["device"] for r in rows})
    # runs compared with the baseline's run of the same workload and budget (a bundle's format is its own)
    rest = [k for k in ("storage", "model", "trace", "budget_bytes", "batch", "tokens", "prompt", "requests",
                        "skew", "locality", "seed") if k in rows[0]]
    base = {(r["device"], *(r[k] for k in rest)): _f(r, "throughput_tok_s") for r in rows if r["policy"] == baseline}
    grid = np.full((len(devices), len(policies)), np.nan)
    for i, d in enumerate(devices):
        for j, p in enumerate(policies):
            ratios = [_f(r, "throughput_tok_s") / base[key] for r in rows if r["device"] == d and r["policy"] == p
                      for key in [(d, *(r[k] for k in rest))] if base.get(key)]
            if ratios:
                grid[i, j] = float(np.exp(np.mean(np.log(ratios))))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(policies), 1.2 + 0.6 * len(devices)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=min(0.5, np.nanmin(grid)), vmax=max(2.0, np.nanmax(grid)), aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}x", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(devices)), devices, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"throughput / {baseline} (geometric mean)")
    fig.tight_layout()
    return fig


def _gantt(rows, row_hash):
    import matplotlib.pyplot as plt
    from experiments.spec import row_spec
    from experiments.sweep import run_config
    from timeline.gantt import layer_gantt
    if row_hash:
        row = next((r for r in rows if r["config_hash"] == row_hash), None)
        if row is None:
            raise ConfigError(f"--row {row_hash}: no row with that config_hash")
    else:                                 # the first run that ran: a row below the minimum has no timeline
        row = next((r for r in rows if r.get("status") == "ok"), None)
        if row is None:
            raise ConfigError("no row ran (every status is below minimum or failed): nothing to draw")
    _, tl = run_config(row_spec(row, f"row {row['config_hash']}"), keep_timeline=True)
    if tl is None:
        raise ConfigError(f"row {row['config_hash']} did not run ({row.get('status')})")
    fig, ax = plt.subplots(figsize=(10, 2.6))
    steps = tl.meta["steps"]
    step = next((s["step"] for s in steps if not s["prefill"]), steps[0]["step"])
    layer_gantt(ax, tl, step, layer=min(1, tl.meta.get("layers", 2) - 1))
    ax.set_title(f"{row['policy']} on {row['device']}, {row['model']}, budget {format_size(float(row['budget_bytes']))}, "
                 f"batch {row['batch']}: " + ax.get_title(), fontsize=9)
    fig.tight_layout()
    return fig


def save(fig, stem) -> list[Path]:
    import matplotlib.pyplot as plt
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        final = stem.with_suffix(f".{ext}")
        tmp = final.with_name(f".{final.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        os.replace(tmp, final)
        paths.append(final)
    plt.close(fig)
    return paths
