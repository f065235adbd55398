"""The report of `moelab reproduce d2moe` (report.md): every published number beside moelab's under
both cost profiles with the relative difference, the paper's ranges beside moelab's ratios, and
what limits each number (experiments/d2moe_analysis.py)."""
from __future__ import annotations

from pathlib import Path

from experiments import d2moe_analysis as a
from experiments.d2moe_analysis import range_rel, ratios, rel, span
from experiments.d2moe_runs import (ABLATION_REQUESTS, BUDGETS_MB, ENVS, FIG10, HOST_RAM, MODELS, PROFILES,
                                         PUBLISHED, REQUESTS, RESIDENT, TOKENS, Run, row_of, tput)

# (label, numerator system, denominator system, model or None, low, high, numerator's / denominator's Run options)
RANGES = [
    ("+HEBF over +MWQ (Fig. 14)", "d2moe-hebf", "d2moe-mwq", None, 1.11, 1.21, {}, {}),
    ("+Budget over +HEBF (Fig. 14)", "d2moe", "d2moe-hebf", None, 1.06, 1.21, {}, {}),
    ("+MWQ over +Router (Fig. 14)", "d2moe-mwq", "d2moe-router", None, 1.91, 4.95, {}, {}),
    ("D²MoE over EdgeMoE, Mixtral", "d2moe", "edgemoe", "mixtral-8x7b", 1.14, 1.39, {}, {}),
    ("D²MoE over EdgeMoE, LLaMA-MoE", "d2moe", "edgemoe", "llama-moe-3.5b", 1.06, 1.16, {}, {}),
    ("D²MoE over MoQE-DynaIO (INT4 and INT8)", "d2moe", "moqe-dynaio-*", None, 1.42, 3.37, {}, {}),
]
RANK = {"levels": "capacity"}
EXTRA_RANGES = [   # the same claims with D²MoE's levels by rank capacity, and +Budget against a caching +HEBF
    ("D²MoE (rank capacity) over EdgeMoE, Mixtral", "d2moe", "edgemoe", "mixtral-8x7b", 1.14, 1.39, RANK, {}),
    ("D²MoE (rank capacity) over EdgeMoE, LLaMA-MoE", "d2moe", "edgemoe", "llama-moe-3.5b", 1.06, 1.16, RANK, {}),
    ("D²MoE (rank capacity) over MoQE-DynaIO", "d2moe", "moqe-dynaio-*", None, 1.42, 3.37, RANK, {}),
    ("+Budget over +HEBF with layer-lru", "d2moe", "d2moe-hebf", None, 1.06, 1.21, {}, {"cache": "layer-lru"}),
]


def published_section(results) -> list[str]:
    lines = ["## Published numbers", "",
             "32 requests. moelab reads experts from each env's SSD (3.5 GB/s); the host-RAM columns read them "
             f"from host RAM (the `{HOST_RAM}` storage option of the env's profile) instead. Relative difference = "
             "moelab / published - 1.", "",
             "| claim | published tok/s | roofline | rel. diff | paper-impl | rel. diff | host RAM, roofline | "
             "rel. diff | host RAM, paper-impl | rel. diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, env, model, system, budget, pub in PUBLISHED:
        cells = []
        for storage in ("", HOST_RAM):
            for profile in PROFILES:
                run = Run(env, model, system, REQUESTS, budget, profile, storage=storage)
                got, r = tput(results, run), row_of(results, run)
                cells += [f"{got:.2f}" if got else (r["status"] if r else "-"), rel(got, pub)]
        lines.append(f"| {label} | {pub} | " + " | ".join(cells) + " |")
    return lines


def ranges_section(results) -> list[str]:
    lines = ["## Published ranges", "",
             "moelab's ratios span every env, model and budget at 32 requests, and (Fig. 14's) LLaMA-MoE at 800 MB "
             f"in Env 2 at {', '.join(map(str, ABLATION_REQUESTS[:-1]))} requests too, at the reproduction's "
             "generator. "
             "D²MoE's levels come from the learned router's shares unless the row says rank capacity.", "",
             "| claim | paper | roofline | vs paper | paper-impl | vs paper | runs |", "|---|---|---|---|---|---|---|"]
    for label, num, den, model, lo, hi, nk, dk in RANGES + EXTRA_RANGES:
        cells, n = [], 0
        for profile in PROFILES:
            rs = ratios(results, num, den, model, profile, num_kw=nk, den_kw=dk)
            cells += [span(rs) if rs else "no run fits both", range_rel(rs, lo, hi)]
            n = max(n, len(rs))
        lines.append(f"| {label} | {lo:.2f} - {hi:.2f}x | " + " | ".join(cells) + f" | {n} |")
    lines += ["", "At 32 requests only (the paper's Fig. 10 setting; the check of its ranges under each profile):", "",
              "| claim | paper | roofline | vs paper | paper-impl | vs paper |", "|---|---|---|---|---|---|"]
    for label, num, den, model, lo, hi, nk, dk in RANGES + EXTRA_RANGES:
        cells = []
        for p in PROFILES:
            rs = ratios(results, num, den, model, p, (REQUESTS,), nk, dk)
            cells += [span(rs), range_rel(rs, lo, hi)]
        lines.append(f"| {label} | {lo:.2f} - {hi:.2f}x | " + " | ".join(cells) + " |")
    return lines


def levels_section(results) -> list[str]:
    from experiments.d2moe_levels import describe
    lines = ["## Levels: the learned router's shares against rank capacity", "", describe() + ".", "",
             "Rank capacity applies the capacities by rank inside each expert's tokens of a step: every expert with "
             "two or more tokens then needs its top plane. D²MoE at 32 requests, mean over the budgets "
             "(decode MB read per step; throughput on the roofline / paper-impl):", "",
             "| env | model | levels | bits per weight | decode MB read per step | roofline tok/s | paper-impl tok/s |",
             "|---|---|---|---|---|---|---|"]
    for env in ENVS:
        for model in MODELS:
            for levels in ("router", "capacity"):
                rows = [row_of(results, Run(env, model, "d2moe", REQUESTS, b, "roofline", levels=levels))
                        for b in BUDGETS_MB]
                rows = [r for r in rows if r and r["status"] == "ok"]
                if not rows:
                    continue
                t = [_mean([tput(results, Run(env, model, "d2moe", REQUESTS, b, p, levels=levels)) for b in BUDGETS_MB])
                     for p in PROFILES]
                bits = _mean([float(r["bits_per_weight"]) for r in rows])
                lines.append(f"| {env} | {model} | {levels} | {bits:.2f} | "
                             f"{_mean([float(r['decode_read_mb_per_step']) for r in rows]):.0f} | " +
                             " | ".join(f"{x:.2f}" if x else "-" for x in t) + " |")
    return lines


def _mean(xs) -> float | None:
    xs = [x for x in xs if x]
    return sum(xs) / len(xs) if xs else None


def memory_section(results) -> list[str]:
    lines = ["## Peak expert memory at the largest budget (MB, roofline profile)", "",
             "| env | model | " + " | ".join(FIG10 + RESIDENT) + " |", "|---|---|" + "---|" * len(FIG10 + RESIDENT)]
    for env in ENVS:
        for model in MODELS:
            cells = []
            for s in FIG10 + RESIDENT:
                r = row_of(results, Run(env, model, s, REQUESTS, BUDGETS_MB[-1] if s in FIG10 else None))
                cells.append(f"{float(r['peak_expert_mb']):.0f}" + ("" if r["status"] == "ok" else f" ({r['status']})")
                             if r and r["peak_expert_mb"] else (r["status"] if r else "-"))
            lines.append(f"| {env} | {model} | " + " | ".join(cells) + " |")
    return lines


def every_run(results) -> list[str]:
    shown = ("profile", "env", "model", "system", "levels", "cache", "requests", "budget_mb", "skew", "locality",
             "storage", "status", "throughput_tok_s", "bytes_read_mb", "hit_ratio", "compute_busy_s", "io_busy_s")
    lines = ["## Every run", "", "| " + " | ".join(shown) + " | layer / bound |", "|" + "---|" * (len(shown) + 1)]
    for r in results.values():
        b = float(r["layer_s"]) / float(r["bound_s"]) if r["status"] == "ok" and r["bound_s"] else None
        lines.append("| " + " | ".join(str(r[k]) for k in shown) + f" | {f'{b:.3f}' if b else '-'} |")
    return lines


def header(timing: dict | None) -> list[str]:
    lines = ["# D²MoE reproduced in moelab's simulator", "",
             f"{REQUESTS} requests x ({TOKENS} in + {TOKENS} out) tokens (the ablation also at "
             f"{', '.join(map(str, ABLATION_REQUESTS[:-1]))} requests), synthetic routing (seed 0); throughput = "
             "generated tokens / makespan. Every system under two cost profiles of each env's device: `roofline` "
             f"({', '.join(PROFILES['roofline'].values())}: the hardware's limit) and `paper-impl` "
             f"({', '.join(PROFILES['paper-impl'].values())}: the implementation the paper measured, from its own "
             "figures; see Cost profiles)."]
    if timing:
        lines += ["", f"This invocation: {timing['ran']} runs simulated, {timing['reused']} reused from results.csv, "
                      f"wall time {timing['wall_s']:.0f} s on {timing['jobs']} processes (the rows' own run times, "
                      f"when they ran, add up to {timing.get('run_s', 0):.0f} s)."]
    return lines


def report(results: dict, out: Path, timing: dict | None = None) -> str:
    if timing is not None:
        timing = dict(timing, run_s=sum(float(r["run_s"] or 0) for r in results.values()))
    sections = [header(timing), a.profiles_section(results), published_section(results), ranges_section(results),
                levels_section(results), a.hebf_section(results), a.axes_section(results), a.budget_section(results),
                a.limits_section(results), memory_section(results), every_run(results)]
    text = "\n".join(line for s in sections for line in s + [""])
    from devices.atomic import atomic_write
    atomic_write(out / "report.md", text)
    return text
