"""Statistics of a validation (`moelab validate`) a user can act on (issue 24, item 3), from the
rows of validation.csv (experiments/validate.py). TPOT throughout; per configuration:

- error e = (predicted - measured) / measured, measured = the median over the executor's runs;
- sigma = the standard deviation of those runs' TPOT (ddof 1; needs >= 2 runs);
- within 2 sigma: |predicted - measured| <= 2 sigma (configurations with fewer than 2 runs have no
  sigma and are left out of that count).

Per throttle regime and format (`format_stats`):

- bias: the median of the signed errors, with a 95% percentile-bootstrap confidence interval
  (the configurations resampled with replacement, N_BOOT times, seeded: the same rows give the
  same interval);
- |error|: the median and the maximum of the absolute errors;
- spread: the median of sigma / measured; within 2 sigma: how many of how many.

The same, at the profile's speed (`speed_points`): over only the runs whose host probe (taken as each
run ended, executor/host_probe.py) lay within the range of the profile's own probes. A shared VM's
speed moves beneath the executor (on this project's 2-vCPU VM one validation's runs probed from 23%
faster to 54% slower than the profile, and their TPOT over the prediction rose with it: Spearman
0.51 for bf16), and a bias the host's speed makes is no error of the model; the two figures side by
side say which it is. The range is the profile's own (no tolerance to choose).

Rank agreement, for choosing a policy (`rank_groups`, `rank_stats`): a group is the configurations
of one (throttle, format, budget, batch), which differ by cache and prefetcher (a group of one
configuration offers no choice and is left out). In each group:

- tau: Kendall's tau-b between predicted and measured TPOT (scipy.stats.kendalltau; None with
  fewer than 2 configurations or when either side is constant);
- the simulator's best: the configuration of least predicted TPOT (several tied: the one the
  executor measured slowest, so a tie never flatters the simulator); the executor's best: the
  least measured TPOT;
- same: the simulator's best is the executor's best; within noise: same, or its measured TPOT
  exceeds the best's by at most 2 sigma, sigma the larger of the two configurations' spreads;
- regret: measured TPOT of the simulator's best / the executor's best - 1 (what trusting the
  simulator costs in that group).
"""
from __future__ import annotations

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
TIE = 1e-9              # relative: predictions this close count as a tie


AT_SPEED = "at the profile's speed"     # the runs whose host probe lay within the profile's range


def _num(row: dict, key: str):
    v = row.get(key, "")
    return None if v in ("", None, "None") else float(v)


def _runs(row: dict) -> int:
    v = _num(row, "repeats")
    return int(v) if v is not None else 0


def tpot_points(rows: list[dict]) -> list[dict]:
    """Rows that ran, as {row, pred, meas, sd, runs} (TPOT)."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        pred, meas = _num(r, "pred_tpot_s_mean"), _num(r, "meas_tpot_s_mean")
        if pred is None or meas is None or meas <= 0:
            continue
        out.append({"row": r, "pred": pred, "meas": meas, "sd": _num(r, "sd_tpot_s_mean") or 0.0, "runs": _runs(r)})
    return out


def speed_points(rows: list[dict]) -> list[dict]:
    """tpot_points over only the runs taken while the host ran at a speed it was profiled at (each run's
    probe within the profile's range, `runs_at_profile_speed`): measured, sigma and runs from those
    runs; rows without the flags or with no such run are left out."""
    out = []
    for p in tpot_points(rows):
        flags = (p["row"].get("runs_at_profile_speed") or "").split(";")
        tpots = [float(t) for t in (p["row"].get("runs_tpot_s_mean") or "").split(";") if t]
        kept = [t for t, f in zip(tpots, flags) if f == "1"]
        if len(flags) != len(tpots) or not kept:          # not marked (an older row), or none at speed
            continue
        out.append(dict(p, meas=float(np.median(kept)), runs=len(kept),
                        sd=float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0))
    return out


def within_2sigma(p: dict) -> bool | None:
    """|predicted - measured| <= 2 sigma; None without a sigma (fewer than 2 runs)."""
    if p["runs"] < 2:
        return None
    return abs(p["pred"] - p["meas"]) <= 2 * p["sd"] + TIE * p["meas"]


def bootstrap_ci(values, stat=np.median, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of `stat` over `values` (resampled with replacement, seeded)."""
    x = np.asarray(values, float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    boots = stat(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _key(row: dict, *fields) -> tuple:
    return tuple(str(row.get(f, "")) for f in fields)


def format_stats(rows: list[dict], seed: int = 0, n_boot: int = N_BOOT, at_speed: bool = False) -> list[dict]:
    """Per (throttle, format): configs, runs, bias (median signed error) and its CI, |error| median and
    max, spread median, within 2 sigma (count, of), identical decisions; `at_speed`: over the runs
    taken at a profiled speed alone (speed_points)."""
    by: dict[tuple, list] = {}
    for p in (speed_points if at_speed else tpot_points)(rows):
        by.setdefault(_key(p["row"], "throttle", "format"), []).append(p)
    out = []
    for (regime, fmt), ps in sorted(by.items()):
        errs = np.array([(p["pred"] - p["meas"]) / p["meas"] for p in ps])
        within = [w for w in map(within_2sigma, ps) if w is not None]
        out.append({"throttle": regime or "none", "format": fmt, "configs": len(ps), "runs": sum(p["runs"] for p in ps),
                    "bias": float(np.median(errs)), "bias_ci": bootstrap_ci(errs, seed=seed, n_boot=n_boot),
                    "abs_median": float(np.median(np.abs(errs))), "abs_max": float(np.max(np.abs(errs))),
                    "spread": float(np.median([p["sd"] / p["meas"] for p in ps])),
                    "within": sum(within), "with_sigma": len(within),
                    "identical": sum(p["row"].get("decisions_identical") in ("True", True) for p in ps)})
    return out


def label(row: dict) -> str:
    return f"{row.get('cache')}/{row.get('prefetch')}"


def rank_agreement(ps: list[dict]) -> dict:
    """One group's agreement (module docstring): tau, the two bests, same, within noise, regret."""
    from scipy.stats import kendalltau
    pred = np.array([p["pred"] for p in ps])
    meas = np.array([p["meas"] for p in ps])
    tau = None
    if len(ps) >= 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0:
        tau = float(kendalltau(pred, meas).statistic)
    tied = [i for i in range(len(ps)) if pred[i] <= pred.min() * (1 + TIE)]
    sim = max(tied, key=lambda i: meas[i])
    ex = int(np.argmin(meas))
    sigma = max(ps[sim]["sd"], ps[ex]["sd"])
    same = bool(meas[sim] <= meas[ex] * (1 + TIE))
    return {"configs": len(ps), "tau": tau, "sim_best": label(ps[sim]["row"]), "exec_best": label(ps[ex]["row"]),
            "same": same, "within": same or bool(meas[sim] - meas[ex] <= 2 * sigma),
            "regret": float(meas[sim] / meas[ex] - 1)}


def rank_groups(rows: list[dict]) -> list[dict]:
    """Every (throttle, format, budget, batch) group's agreement, with its key fields (groups of at
    least 2 configurations)."""
    by: dict[tuple, list] = {}
    for p in tpot_points(rows):
        by.setdefault(_key(p["row"], "throttle", "format", "budget_share", "batch", "budget_bytes"), []).append(p)
    out = []
    for (regime, fmt, share, batch, budget), ps in sorted(by.items()):
        if len(ps) < 2:
            continue
        out.append(dict(rank_agreement(ps), throttle=regime or "none", format=fmt, budget_share=share, batch=batch,
                        budget_bytes=budget))
    return out


def summarize_groups(groups: list[dict]) -> dict:
    """Over groups: how many, tau median and min (groups with a tau), same, within noise, regret."""
    taus = [g["tau"] for g in groups if g["tau"] is not None]
    regrets = [g["regret"] for g in groups]
    return {"groups": len(groups), "tau_median": float(np.median(taus)) if taus else None,
            "tau_min": min(taus) if taus else None, "same": sum(g["same"] for g in groups),
            "within": sum(g["within"] for g in groups),
            "regret_median": float(np.median(regrets)) if regrets else None,
            "regret_max": max(regrets) if regrets else None}


def rank_stats(rows: list[dict]) -> list[dict]:
    """summarize_groups per (throttle, format)."""
    by: dict[tuple, list] = {}
    for g in rank_groups(rows):
        by.setdefault((g["throttle"], g["format"]), []).append(g)
    return [dict(summarize_groups(gs), throttle=k[0], format=k[1]) for k, gs in sorted(by.items())]


def rank_for_pick(rows: list[dict], fmt: str, batch, budget_bytes=None) -> dict | None:
    """The rank agreement `moelab pick` prints: the validated groups of the picked format and batch
    at its budget (bytes) if one was validated (`budget_matched`), else at every validated budget."""
    groups = [g for g in rank_groups(rows) if g["format"] == fmt and str(g["batch"]) == str(batch)]
    if not groups:
        return None
    exact = [g for g in groups if budget_bytes is not None and g["budget_bytes"] == str(budget_bytes)]
    return dict(summarize_groups(exact or groups), budget_matched=bool(exact))


# -- text -----------------------------------------------------------------------------------------
def pct(v, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}%" if sign else f"{100 * v:.1f}%"


def ci_text(ci) -> str:
    return "-" if ci is None else f"[{pct(ci[0], True)}, {pct(ci[1], True)}]"


def tau_text(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def rank_text(s: dict) -> str:
    return (f"{s['groups']} groups, Kendall tau median {tau_text(s['tau_median'])} (min {tau_text(s['tau_min'])}); "
            f"the simulator's best is the executor's best in {s['same']}/{s['groups']}, within its 2 sigma in "
            f"{s['within']}/{s['groups']}; regret median {pct(s['regret_median'])}, max {pct(s['regret_max'])}")


def summary_lines(rows: list[dict], seed: int = 0) -> list[str]:
    """One line per (throttle, format): what `moelab validate` prints."""
    ranks = {(s["throttle"], s["format"]): s for s in rank_stats(rows)}
    speeds = _speed_stats(rows, seed)
    out = []
    for s in format_stats(rows, seed):
        r = ranks.get((s["throttle"], s["format"]))
        out.append(f"throttle {s['throttle']}, {s['format']}: {s['configs']} configurations; TPOT bias "
                   f"{pct(s['bias'], True)} (95% CI {ci_text(s['bias_ci'])}), |error| median {pct(s['abs_median'])} "
                   f"max {pct(s['abs_max'])}, within the executor's 2 sigma {s['within']}/{s['with_sigma']} (spread "
                   f"median {pct(s['spread'])}); ranks: "
                   + (rank_text(r) if r else "no group of 2 or more configurations"))
        if (a := speeds.get((s["throttle"], s["format"]))) is not None:
            out.append(f"  {AT_SPEED} ({a['runs']} of {s['runs']} runs): {a['configs']} configurations; TPOT bias "
                       f"{pct(a['bias'], True)} (95% CI {ci_text(a['bias_ci'])}), |error| median "
                       f"{pct(a['abs_median'])} max {pct(a['abs_max'])}, within their 2 sigma "
                       f"{a['within']}/{a['with_sigma']}")
    return out


def _speed_stats(rows: list[dict], seed: int) -> dict:
    return {(s["throttle"], s["format"]): s for s in format_stats(rows, seed, at_speed=True)}


def report_sections(rows: list[dict], seed: int = 0) -> list[str]:
    """validation.md's statistics: per format and regime, then every group's rank agreement."""
    ranks = {(s["throttle"], s["format"]): s for s in rank_stats(rows)}
    lines = ["## TPOT per format and regime", "",
             "Bias: median of (predicted - measured) / measured, 95% bootstrap CI over configurations "
             f"({N_BOOT} resamples, seed {seed}). Within 2 sigma: |predicted - measured| <= 2 x the sd of the "
             "executor's runs (configurations with >= 2 runs). Rank agreement per (format, budget, batch) group: "
             "Kendall's tau between predicted and measured TPOT; the simulator's best configuration against the "
             "executor's best (within noise: at most 2 sigma slower); regret: how much slower it measured.", "",
             "| throttle | format | configs | bias (95% CI) | abs. median / max | spread median | within 2 sigma | "
             "groups | tau median (min) | best same | best within 2 sigma | regret median / max |",
             "|" + "---|" * 12]
    for s in format_stats(rows, seed):
        r = ranks.get((s["throttle"], s["format"])) or summarize_groups([])
        lines.append(f"| {s['throttle']} | {s['format']} | {s['configs']} | {pct(s['bias'], True)} "
                     f"{ci_text(s['bias_ci'])} | {pct(s['abs_median'])} / {pct(s['abs_max'])} | {pct(s['spread'])} | "
                     f"{s['within']} / {s['with_sigma']} | {r['groups']} | {tau_text(r['tau_median'])} "
                     f"({tau_text(r['tau_min'])}) | {r['same']} / {r['groups']} | {r['within']} / {r['groups']} | "
                     f"{pct(r['regret_median'])} / {pct(r['regret_max'])} |")
    speeds = _speed_stats(rows, seed)
    if speeds:
        lines += ["", f"### {AT_SPEED[0].upper() + AT_SPEED[1:]}", "",
                  "The same statistics over only the executor's runs whose host probe (taken as each run ended) "
                  "lay within the range of the profile's probes: what the model misses when the host runs at a "
                  "speed it was measured at, apart from how far the host's speed moved.", "",
                  "| throttle | format | runs | configs | bias (95% CI) | abs. median / max | within 2 sigma |",
                  "|" + "---|" * 7]
        for a in speeds.values():
            lines.append(f"| {a['throttle']} | {a['format']} | {a['runs']} | {a['configs']} | {pct(a['bias'], True)} "
                         f"{ci_text(a['bias_ci'])} | {pct(a['abs_median'])} / {pct(a['abs_max'])} | "
                         f"{a['within']} / {a['with_sigma']} |")
    lines += ["", "## Rank agreement per group", "",
              "| throttle | format | budget | batch | configs | tau | simulator's best | executor's best | same | "
              "within 2 sigma | regret |", "|" + "---|" * 11]
    for g in rank_groups(rows):
        lines.append(f"| {g['throttle']} | {g['format']} | {g['budget_share']} | {g['batch']} | {g['configs']} | "
                     f"{tau_text(g['tau'])} | {g['sim_best']} | {g['exec_best']} | {g['same']} | {g['within']} | "
                     f"{pct(g['regret'])} |")
    return lines + [""]
