"""The figures of `moelab reproduce d2moe` (PNG and PDF), one set per cost profile: throughput against
budget per system (Fig. 10), the ablation (Fig. 14), and one layer's Gantt with expert-ID FIFO and
with HEBF loads under both profiles, bubbles marked (Fig. 3/8)."""
from __future__ import annotations

from pathlib import Path

from experiments.d2moe_runs import (ABLATION, AXIS_BUDGET_MB, AXIS_MODEL, BUDGETS_MB, ENVS, FIFO, FIG10, HEBF,
                                    MODELS, PROFILES, PUBLISHED, REQUESTS, Run, simulate, tput)
from experiments.plots import save


def figures(results: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    paths = []
    for profile in PROFILES:
        paths += fig10(results, out, profile)
        paths += fig14(results, out, profile)
    return paths + layer_gantt(out)


def fig10(results, out: Path, profile: str) -> list[Path]:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(ENVS), len(MODELS), figsize=(11, 7.5), squeeze=False)
    for i, env in enumerate(ENVS):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            for system in FIG10:
                pts = [(b, tput(results, Run(env, model, system, REQUESTS, b, profile))) for b in BUDGETS_MB]
                pts = [(b, t) for b, t in pts if t]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=system)
            for _, penv, pmodel, _, budget, pub in PUBLISHED:
                if penv == env and pmodel == model and budget:
                    ax.scatter([budget], [pub], marker="*", s=120, color="k", zorder=5)
            ax.set_title(f"{PROFILES[profile][env]}, {model}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("expert memory budget (MB)")
            ax.set_ylabel("throughput (tok/s)")
            ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7, title="black stars: published D²MoE", title_fontsize=7)
    fig.suptitle(f"Throughput against budget, {REQUESTS} requests, {profile} profile (D²MoE Fig. 10)")
    fig.tight_layout()
    paths = save(fig, out / f"fig10_throughput_vs_budget_{profile}")
    plt.close(fig)
    return paths


def fig14(results, out: Path, profile: str) -> list[Path]:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ENVS) * len(MODELS), figsize=(13, 3.6), squeeze=False)
    width = 0.8 / len(ABLATION)
    for k, (env, model) in enumerate((e, m) for e in ENVS for m in MODELS):
        ax = axes[0][k]
        for n, system in enumerate(ABLATION):
            ts = [tput(results, Run(env, model, system, REQUESTS, b, profile)) or 0 for b in BUDGETS_MB]
            ax.bar([x + n * width for x in range(len(BUDGETS_MB))], ts, width, label=system)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(BUDGETS_MB))], [str(b) for b in BUDGETS_MB])
        ax.set_title(f"{PROFILES[profile][env]}, {model}", fontsize=8)
        ax.set_xlabel("budget (MB)")
        ax.set_ylabel("throughput (tok/s)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Ablation: +Router, +MWQ, +HEBF, +Budget, {REQUESTS} requests, {profile} profile (D²MoE Fig. 14)")
    fig.tight_layout()
    paths = save(fig, out / f"fig14_ablation_{profile}")
    plt.close(fig)
    return paths


def layer_gantt(out: Path, env: str = "env2", step: int = 5, layer: int = 3) -> list[Path]:
    """One decode layer's loads and computes under FIFO in expert-ID order (+MWQ) and HEBF (+HEBF),
    compute bubbles shaded (timeline/gantt.py layer_gantt), under each profile. Redrawn only when
    missing or older than results.csv (its four runs are simulated again: results keep no timelines)."""
    import matplotlib.pyplot as plt
    from timeline.gantt import layer_gantt as draw
    stem = out / "fig3_layer_gantt_fifo_vs_hebf"
    done = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    csv = out / "results.csv"
    fresh = all(p.exists() for p in done) and (not csv.exists() or
                                                min(p.stat().st_mtime for p in done) >= csv.stat().st_mtime)
    if fresh:
        return done
    runs = [Run(env, AXIS_MODEL, system, REQUESTS, AXIS_BUDGET_MB, profile) for profile in PROFILES
            for system in (FIFO, HEBF)]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.1 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        _, tl = simulate(run, keep_timeline=True)
        if tl is not None:
            draw(ax, tl, step, layer)
            loads = "FIFO, expert-ID order" if run.system == FIFO else "HEBF"
            ax.set_title(f"{run.system} ({loads}, {run.profile}): " + ax.get_title(), fontsize=9)
    fig.suptitle(f"One layer ({AXIS_MODEL}, {ENVS[env]}, {REQUESTS} requests, budget {AXIS_BUDGET_MB} MB, decode "
                 f"step {step}, layer {layer})", fontsize=10)
    fig.tight_layout()
    paths = save(fig, stem)
    plt.close(fig)
    return paths
