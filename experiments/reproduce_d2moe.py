"""`moelab reproduce d2moe`: D²MoE's throughput, ablation and memory results in the simulator.

The paper's setups (papers.md, D²MoE §4): Env 1 = `rtx-3060-laptop-6gb`, Env 2 =
`jetson-agx-orin-64gb`; LLaMA-MoE-3.5B and Mixtral-8x7B shapes; 128 input and 128 output
tokens per request, all requests decoded together; budgets 200-1600 MB. Systems are the
named bundles of policies/presets.py. Routing is synthetic (seeded, moelab's defaults: the
paper's C4 routing is not public), so what is reproduced is the mechanism, not the trace.

Every run is one row of `results.csv` in the output folder, appended as it finishes and
keyed by its configuration, so an interrupted reproduction resumes where it stopped and a
second one reuses everything. Then: `report.md` (every published number beside moelab's,
with the relative difference; the paper's ranges beside moelab's ratios), and figures
(PNG and PDF): throughput against budget per system (Fig. 10), the ablation (Fig. 14),
peak memory, and one layer's Gantt with FIFO and with HEBF loads, bubbles marked (Fig. 3/8).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from experiments.plots import save
from experiments.resumable import append_runs

ENVS = {"env1": "rtx-3060-laptop-6gb", "env2": "jetson-agx-orin-64gb"}
MODELS = ("llama-moe-3.5b", "mixtral-8x7b")
BUDGETS_MB = (200, 400, 800, 1600)
REQUESTS = 32
TOKENS = 128
FIG10 = ("d2moe", "matryoshka-free", "edgemoe", "moqe-dynaio-int4", "moqe-dynaio-int8")
ABLATION = ("d2moe-router", "d2moe-mwq", "d2moe-hebf", "d2moe")
RESIDENT = ("hold-in-memory", "him-awq")
FIELDS = ("env", "model", "system", "requests", "budget_mb", "status", "throughput_tok_s", "tpot_ms",
          "peak_expert_mb", "bytes_read_mb", "compute_bubble", "bits_per_weight", "note")

# (label, env, model, system, budget MB or None, published tok/s); requests = 32 unless noted
PUBLISHED = [
    ("Fig. 10(c) LLaMA-MoE Env 2, 200 MB", "env2", "llama-moe-3.5b", "d2moe", 200, 66.45),
    ("Fig. 10(c) LLaMA-MoE Env 2, 1600 MB", "env2", "llama-moe-3.5b", "d2moe", 1600, 83.14),
    ("Env 1 LLaMA-MoE, 1600 MB", "env1", "llama-moe-3.5b", "d2moe", 1600, 89.14),
    ("Env 1 Mixtral (budget not stated; 1600 MB here)", "env1", "mixtral-8x7b", "d2moe", 1600, 38.07),
    ("Env 1 LLaMA-MoE HIM-AWQ (2500 MB resident)", "env1", "llama-moe-3.5b", "him-awq", None, 94.3),
]
# (label, numerator system, denominator system, model or None, low, high)
RANGES = [
    ("+HEBF over +MWQ (Fig. 14)", "d2moe-hebf", "d2moe-mwq", None, 1.11, 1.21),
    ("+Budget over +HEBF (Fig. 14)", "d2moe", "d2moe-hebf", None, 1.06, 1.21),
    ("+MWQ over +Router (Fig. 14)", "d2moe-mwq", "d2moe-router", None, 1.91, 4.95),
    ("D²MoE over EdgeMoE, Mixtral", "d2moe", "edgemoe", "mixtral-8x7b", 1.14, 1.39),
    ("D²MoE over EdgeMoE, LLaMA-MoE", "d2moe", "edgemoe", "llama-moe-3.5b", 1.06, 1.16),
    ("D²MoE over MoQE-DynaIO (INT4 and INT8)", "d2moe", "moqe-dynaio-*", None, 1.42, 3.37),
]


@dataclass(frozen=True)
class Run:
    env: str
    model: str
    system: str
    requests: int
    budget_mb: int | None       # None: the preset's own (every expert resident)

    def key(self) -> tuple:
        return (self.env, self.model, self.system, str(self.requests), str(self.budget_mb or "all"))


def grid() -> list[Run]:
    runs = []
    for env in ENVS:
        for model in MODELS:
            for system in dict.fromkeys(FIG10 + ABLATION):
                runs += [Run(env, model, system, REQUESTS, b) for b in BUDGETS_MB]
            runs += [Run(env, model, system, REQUESTS, None) for system in RESIDENT]
    return runs


def _workload(model_name: str, fmt, requests: int):
    from workloads.catalog import get_model
    from workloads.synthetic import synthetic_trace
    from workloads.workload import Workload
    model = get_model(model_name)
    trace = synthetic_trace(model, requests=requests, prompt_len=TOKENS, output_len=TOKENS, seed=0)
    return Workload(model, trace, fmt, batch=requests)


def simulate(run: Run, keep_timeline: bool = False):
    """One run -> (row, timeline or None). A budget the run cannot fit in is a row, not an error."""
    from devices.profile import load_device
    from policies import BudgetError, build_policies
    from policies.cost import CostModel
    from policies.presets import get_preset
    from sim.engine import Simulator
    from sim.metrics import compute_metrics
    from workloads.catalog import get_model
    from workloads.formats import make_format

    device, model, preset = load_device(ENVS[run.env]), get_model(run.model), get_preset(run.system)
    fmt = make_format(preset.format, model.expert_shapes, **preset.format_options())
    row = dict(zip(FIELDS, (run.env, run.model, run.system, run.requests, run.budget_mb or "all", "ok")))
    if run.budget_mb is None:
        budget = model.layers * model.experts * fmt.level_bytes(fmt.levels - 1)
        if budget > device.expert_budget_bytes:
            row.update(status="out of memory", peak_expert_mb=round(budget / 1e6),
                       note=f"needs {budget / 1e9:.1f} GB resident; the device's expert budget is "
                            f"{device.expert_budget_bytes / 1e9:.1f} GB")
            return row, None
    else:
        budget = run.budget_mb * 10**6
    w = _workload(run.model, fmt, run.requests)
    try:
        policies = build_policies(w, budget, cost=CostModel.build(device, model, fmt), **preset.policy_kwargs())
    except BudgetError as e:
        row.update(status="below minimum", note=str(e).split(" (")[0])
        return row, None
    tl = Simulator(device, w, policies).run()
    bits = [fmt.b1 + i for i in range(fmt.levels)] if hasattr(fmt, "b1") else [16] * fmt.levels
    m = compute_metrics(tl, level_bits=bits)
    row.update(throughput_tok_s=round(m["throughput_tok_s"], 3), tpot_ms=round(m["tpot_s_mean"] * 1e3, 3),
               peak_expert_mb=round(m["peak_expert_bytes"] / 1e6, 1), bytes_read_mb=round(m["bytes_read"] / 1e6),
               compute_bubble=round(m["compute_bubble_fraction"], 4), bits_per_weight=round(m["bits_per_weight"], 3))
    return row, (tl if keep_timeline else None)


def _simulate_row(run: Run) -> dict:
    return simulate(run)[0]


def load_results(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["env"], r["model"], r["system"], r["requests"], r["budget_mb"]): r for r in rows}


def run_grid(out: Path, jobs: int | None = None, quiet: bool = False) -> dict[tuple, dict]:
    """Run what `results.csv` does not have yet, appending each row as it finishes."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    done = load_results(path)
    todo = [r for r in grid() if r.key() not in done]
    append_runs(path, FIELDS, todo, _simulate_row, jobs=jobs, quiet=quiet, desc="reproduce d2moe")
    return load_results(path)


# -- the report --------------------------------------------------------------------------------
def _tput(results, env, model, system, budget) -> float | None:
    r = results.get((env, model, system, str(REQUESTS), str(budget or "all")))
    return float(r["throughput_tok_s"]) if r and r["status"] == "ok" else None


def ratios(results, num: str, den: str, model: str | None) -> list[float]:
    """num's throughput over den's at every (env, model, budget) where both ran."""
    out = []
    dens = [d for d in FIG10 + ABLATION if d.startswith(den[:-1])] if den.endswith("*") else [den]
    for env in ENVS:
        for m in MODELS:
            if model and m != model:
                continue
            for b in BUDGETS_MB:
                a = _tput(results, env, m, num, b)
                for d in dens:
                    c = _tput(results, env, m, d, b)
                    if a and c:
                        out.append(a / c)
    return out


def report(results: dict, out: Path) -> str:
    lines = ["# D²MoE reproduced in moelab's simulator", "",
             f"{REQUESTS} requests x ({TOKENS} in + {TOKENS} out) tokens, synthetic routing (seed 0); "
             "throughput = generated tokens / makespan.", "",
             "## Published numbers", "", "| claim | published tok/s | moelab tok/s | moelab / published |",
             "|---|---|---|---|"]
    for label, env, model, system, budget, pub in PUBLISHED:
        got = _tput(results, env, model, system, budget)
        r = results.get((env, model, system, str(REQUESTS), str(budget or "all")))
        shown = f"{got:.2f}" if got else (r["status"] if r else "not run")
        lines.append(f"| {label} | {pub} | {shown} | {got / pub:.2f} |" if got else f"| {label} | {pub} | {shown} | - |")
    lines += ["", "## Published ranges", "", "| claim | paper | moelab (min - max over envs, models, budgets) | "
              "runs |", "|---|---|---|---|"]
    for label, num, den, model, lo, hi in RANGES:
        rs = ratios(results, num, den, model)
        got = f"{min(rs):.2f} - {max(rs):.2f}x" if rs else "no run fits both"
        lines.append(f"| {label} | {lo:.2f} - {hi:.2f}x | {got} | {len(rs)} |")
    lines += ["", "## Peak expert memory at the largest budget (MB)", "", "| env | model | " +
              " | ".join(FIG10 + RESIDENT) + " |", "|---|---|" + "---|" * len(FIG10 + RESIDENT)]
    for env in ENVS:
        for model in MODELS:
            cells = []
            for s in FIG10 + RESIDENT:
                r = results.get((env, model, s, str(REQUESTS), str(BUDGETS_MB[-1] if s in FIG10 else "all")))
                cells.append(f"{float(r['peak_expert_mb']):.0f}" + ("" if r["status"] == "ok" else f" ({r['status']})")
                             if r and r["peak_expert_mb"] else (r["status"] if r else "-"))
            lines.append(f"| {env} | {model} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "", "| " + " | ".join(FIELDS[:9]) + " |", "|" + "---|" * 9]
    for r in results.values():
        lines.append("| " + " | ".join(str(r[k]) for k in FIELDS[:9]) + " |")
    text = "\n".join(lines) + "\n"
    from devices.atomic import atomic_write
    atomic_write(out / "report.md", text)
    return text


# -- figures -------------------------------------------------------------------------------------
def figures(results: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, axes = plt.subplots(len(ENVS), len(MODELS), figsize=(11, 7.5), squeeze=False)
    for i, env in enumerate(ENVS):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            for system in FIG10:
                pts = [(b, _tput(results, env, model, system, b)) for b in BUDGETS_MB]
                pts = [(b, t) for b, t in pts if t]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=system)
            for label, penv, pmodel, system, budget, pub in PUBLISHED:
                if penv == env and pmodel == model and budget:
                    ax.scatter([budget], [pub], marker="*", s=120, color="k", zorder=5)
            ax.set_title(f"{ENVS[env]}, {model}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("expert memory budget (MB)")
            ax.set_ylabel("throughput (tok/s)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, title="black stars: published D²MoE", title_fontsize=7)
    fig.suptitle(f"Throughput against budget, {REQUESTS} requests (D²MoE Fig. 10)")
    fig.tight_layout()
    paths += save(fig, out / "fig10_throughput_vs_budget")
    fig, axes = plt.subplots(1, len(ENVS) * len(MODELS), figsize=(13, 3.6), squeeze=False)
    for k, (env, model) in enumerate((e, m) for e in ENVS for m in MODELS):
        ax = axes[0][k]
        width = 0.8 / len(ABLATION)
        for n, system in enumerate(ABLATION):
            ts = [_tput(results, env, model, system, b) or 0 for b in BUDGETS_MB]
            ax.bar([x + n * width for x in range(len(BUDGETS_MB))], ts, width, label=system)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(BUDGETS_MB))], [str(b) for b in BUDGETS_MB])
        ax.set_title(f"{ENVS[env]}, {model}", fontsize=8)
        ax.set_xlabel("budget (MB)")
        ax.set_ylabel("throughput (tok/s)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Ablation: +Router, +MWQ, +HEBF, +Budget (D²MoE Fig. 14)")
    fig.tight_layout()
    paths += save(fig, out / "fig14_ablation")
    paths += layer_gantt(out)
    return paths


def layer_gantt(out: Path, env: str = "env2", model: str = "llama-moe-3.5b", budget_mb: int = 800,
                step: int = 5, layer: int = 3) -> list[Path]:
    """One decode layer's loads and computes under FIFO (+MWQ) and HEBF (+HEBF), compute
    bubbles shaded (sim/plot.py layer_gantt)."""
    import matplotlib.pyplot as plt
    from sim.plot import layer_gantt as draw
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.2))
    for ax, system in zip(axes, ("d2moe-mwq", "d2moe-hebf")):
        _, tl = simulate(Run(env, model, system, REQUESTS, budget_mb), keep_timeline=True)
        if tl is not None:
            draw(ax, tl, step, layer)
            ax.set_title(f"{system} ({'FIFO' if system == 'd2moe-mwq' else 'HEBF'} loads): " + ax.get_title(),
                         fontsize=9)
    fig.suptitle(f"One layer ({model}, {ENVS[env]}, budget {budget_mb} MB, decode step {step}, layer {layer})",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, out / "fig3_layer_gantt_fifo_vs_hebf")


def reproduce(out, jobs: int | None = None, quiet: bool = False) -> str:
    out = Path(out)
    results = run_grid(out, jobs, quiet)
    text = report(results, out)
    figures(results, out)
    return text
