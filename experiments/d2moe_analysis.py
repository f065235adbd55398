"""The report's analyses (experiments/d2moe_report.py): the cost profiles and their calibration, HEBF
against FIFO with the flow-shop bound and Fig. 3, skew and batch as axes, +Budget against a baseline
that caches, and what limits each published number."""
from __future__ import annotations

from experiments.d2moe_bounds import PAPER_COMPUTE_S, PAPER_IO_S, PAPER_LAYER_S, needed_read_per_step, storage_bound
from experiments.d2moe_runs import (ABLATION_REQUESTS, AXIS_BUDGET_MB, AXIS_ENVS, AXIS_MODEL, BUDGETS_MB, CACHING, ENVS,
                                         FIFO, FIG10, GENERATORS, HEBF, MATCHED, MODELS, PROFILES, PUBLISHED,
                                         REQUESTS, TOKENS, Run, row_of, tput)

# Fig. 12 (Mixtral, V1): dequantization is 20.77% -> 16.77% of computation and 18.56% -> 5.3% of latency
# from 4 to 32 requests, so computation is 18.56 / 20.77 -> 5.3 / 16.77 of latency
FIG12 = {4: 18.56 / 20.77, 32: 5.3 / 16.77}


def _f(r: dict | None, key: str) -> float | None:
    return float(r[key]) if r and r["status"] == "ok" and r.get(key) not in (None, "") else None


def _ratio(r, a: str, b: str) -> float | None:
    x, y = _f(r, a), _f(r, b)
    return x / y if x is not None and y else None


def _x(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def rel(got: float | None, want: float) -> str:
    return f"{got / want - 1:+.1%}" if got else "-"


def span(xs: list[float], unit: str = "x", digits: int = 2) -> str:
    return f"{min(xs):.{digits}f} - {max(xs):.{digits}f}{unit}" if xs else "-"


def range_rel(xs: list[float], lo: float, hi: float) -> str:
    """How moelab's span sits against the paper's: inside, or each end's relative difference."""
    if not xs:
        return "-"
    a, b = min(xs), max(xs)
    if lo <= a and b <= hi:
        return "inside"
    return f"min {a / lo - 1:+.0%}, max {b / hi - 1:+.0%}"


def ratios(results, num: str, den: str, model: str | None, profile: str, requests=None,
           num_kw: dict | None = None, den_kw: dict | None = None) -> list[float]:
    """num's throughput over den's at every (env, model, budget, requests) where both ran at the
    reproduction's generator (the axes' 4-16 requests exist only on LLaMA-MoE at 800 MB)."""
    out = []
    dens = [d for d in FIG10 if d.startswith(den[:-1])] if den.endswith("*") else [den]
    for env in ENVS:
        for m in MODELS:
            if model and m != model:
                continue
            for n in requests or ABLATION_REQUESTS:
                for b in BUDGETS_MB:
                    a = tput(results, Run(env, m, num, n, b, profile, **(num_kw or {})))
                    for d in dens:
                        c = tput(results, Run(env, m, d, n, b, profile, **(den_kw or {})))
                        if a and c:
                            out.append(a / c)
    return out


# -- cost profiles ---------------------------------------------------------------------------------
def call_times(device_name: str) -> list[str]:
    """One expert's compute (ms) at INT2 / INT4 for 1, 8, 32 and 4096 tokens, LLaMA-MoE and Mixtral."""
    from experiments.run import costs
    from experiments.spec import RunSpec
    from workloads.formats import FormatSpec
    cells = []
    for name in MODELS:
        _, _, cost = costs(RunSpec(device=device_name, model=name, format=FormatSpec("mwq")))
        for level in (0, 2):
            cells.append(" / ".join(f"{cost.expert_seconds(level, n) * 1e3:.3g}" for n in (1, 8, 32, 4096)))
    return cells


def profiles_section(results) -> list[str]:
    from devices.profile import load_device
    rate = {env: load_device(name).compute.kernels["mwq"].weight_bandwidth / 1e9
            for env, name in PROFILES["paper-impl"].items()}
    lines = ["## Cost profiles", "",
             "An expert call's time per profile (devices/kernels.py; the YAMLs source every figure). `roofline`: one "
             "call for all of an expert's tokens at one level, max(weight read, flops), plus a dequantization pass "
             "(BF16 written and read back) per call. `paper-impl`: the paper's formulation, B_jk x T_comp(k) with "
             "T_comp = dequantization + one-token execution: one token per call, the dequantization inside it, each "
             "call reading the level's planes at a rate calibrated from the paper (Env 1: an RTX 3060 expert "
             f"computes in 3.1 ms and transfers in ~20 ms at 3.5 GB/s, so {rate['env1']:.2f} GB/s; Env 2: Fig. 3's "
             "2.04 s of compute against 2.6 s of I/O in its setup, solved on the reproduction's +MWQ run "
             f"(experiments/d2moe_bounds.py fig3_weight_bandwidth), {rate['env2']:.1f} GB/s); a prefill's calls "
             "(33+ tokens of one expert at one level) run as one dequantize-then-GEMM call on the roofline.", "",
             "One expert, ms for 1 / 8 / 32 / 4096 tokens:", "",
             "| profile | env | kernel (mwq) | LLaMA-MoE INT2 | LLaMA-MoE INT4 | Mixtral INT2 | Mixtral INT4 |",
             "|---|---|---|---|---|---|---|"]
    for profile, envs in PROFILES.items():
        for env, name in envs.items():
            kernel = load_device(name).compute.kernels.get("mwq")
            lines.append(f"| {profile} | {env} | {kernel.describe() if kernel else 'roofline'} | "
                         + " | ".join(call_times(name)) + " |")
    lines += ["", "Each calibration against the other figure (Fig. 3's setup: +MWQ, LLaMA-MoE, 32 requests, "
              f"{AXIS_BUDGET_MB} MB; the paper's compute / I/O busy {PAPER_COMPUTE_S / PAPER_IO_S:.3f}):", "",
              "| profile | env | FIFO compute / I/O busy |", "|---|---|---|"]
    for profile in PROFILES:
        for env in ENVS:
            r = row_of(results, Run(env, AXIS_MODEL, FIFO, REQUESTS, AXIS_BUDGET_MB, profile))
            lines.append(f"| {profile} | {env} | {_x(_ratio(r, 'compute_busy_s', 'io_busy_s'))} |")
    return lines


# -- HEBF against FIFO ------------------------------------------------------------------------------
def _pair(results, env, model, n, b, profile, **kw) -> tuple | None:
    """(HEBF / FIFO throughput, FIFO layer / bound, HEBF layer / bound, FIFO compute / I/O busy)."""
    f = row_of(results, Run(env, model, FIFO, n, b, profile, **kw))
    h = row_of(results, Run(env, model, HEBF, n, b, profile, **kw))
    if not (f and h and f["status"] == h["status"] == "ok"):
        return None
    return (float(h["throughput_tok_s"]) / float(f["throughput_tok_s"]), _ratio(f, "layer_s", "bound_s"),
            _ratio(h, "layer_s", "bound_s"), _ratio(f, "compute_busy_s", "io_busy_s"))


def hebf_section(results) -> list[str]:
    lines = ["## HEBF against FIFO (Fig. 14's +HEBF over +MWQ)", "",
             f"FIFO is {FIFO} (loads in expert-ID order, the paper's Fig. 3 baseline), HEBF is {HEBF}; at 32 "
             f"requests every env, model and budget, at 4-16 requests {AXIS_MODEL} at {AXIS_BUDGET_MB} MB in "
             f"{', '.join(AXIS_ENVS)}. A layer's time runs from "
             "its first read to its last expert compute; its flow-shop bound is the least time any load order could "
             "take with one read stream feeding one compute stream (experiments/d2moe_bounds.py), summed over the "
             "run. The computes' durations are the profile's, so the bound holds under both; whether an order can "
             "gain depends on the kernel: FIFO's layer / bound is the most any order could shorten it.", "",
             "| profile | requests | runs | HEBF / FIFO throughput | FIFO layer / bound | HEBF layer / bound | "
             "FIFO compute / I/O busy |", "|---|---|---|---|---|---|---|"]
    for profile in PROFILES:
        for n in ABLATION_REQUESTS:
            pairs = [p for env in ENVS for m in MODELS for b in BUDGETS_MB
                     if (p := _pair(results, env, m, n, b, profile))]
            cols = [[p[i] for p in pairs if p[i] is not None] for i in range(4)]
            lines.append(f"| {profile} | {n} | {len(pairs)} | " + " | ".join(
                span(c, u, 3) for c, u in zip(cols, ("x", "x", "x", ""))) + " |")
    lines += ["", f"Fig. 3's FIFO layer (LLaMA-MoE, 32 requests, expert-ID order): compute {PAPER_COMPUTE_S} s, I/O "
              f"{PAPER_IO_S} s, the layer {PAPER_LAYER_S} s = 1.36x its I/O and 1.74x its compute (the paper's "
              "figures); its bound is at least its I/O. moelab's same "
              f"setup ({AXIS_BUDGET_MB} MB), layers summed over the run:", "",
              "| profile | env | FIFO compute / I/O | FIFO layer / I/O busy | FIFO layer / compute busy | FIFO layer / "
              "bound | HEBF / FIFO |", "|---|---|---|---|---|---|---|"]
    for profile in PROFILES:
        for env in ENVS:
            f = row_of(results, Run(env, AXIS_MODEL, FIFO, REQUESTS, AXIS_BUDGET_MB, profile))
            p = _pair(results, env, AXIS_MODEL, REQUESTS, AXIS_BUDGET_MB, profile)
            lines.append(f"| {profile} | {env} | {_x(_ratio(f, 'compute_busy_s', 'io_busy_s'))} | "
                         f"{_x(_ratio(f, 'layer_s', 'io_busy_s'))} | {_x(_ratio(f, 'layer_s', 'compute_busy_s'))} | "
                         f"{_x(p[1] if p else None)} | {_x(p[0] if p else None)} |")
    return lines + hebf_reading(results)


def hebf_reading(results) -> list[str]:
    out = []
    for profile in PROFILES:
        pairs = [p for env in ENVS for m in MODELS for b in BUDGETS_MB
                 if (p := _pair(results, env, m, REQUESTS, b, profile)) and p[1]]
        if not pairs:
            continue
        worst, gain = max(p[1] for p in pairs), max(p[0] for p in pairs)
        hb = max(p[2] for p in pairs if p[2])
        out.append(f"- {profile}: at 32 requests FIFO's layers are at most {worst:.3f}x their bound, so no load "
                   f"order can make them more than {100 * (1 - 1 / worst):.1f}% shorter; HEBF's are at most {hb:.3f}x "
                   f"it, and HEBF gains at most {gain:.3f}x in throughput (the dense parts do not change).")
    f = row_of(results, Run("env2", AXIS_MODEL, FIFO, REQUESTS, AXIS_BUDGET_MB, "paper-impl"))
    io, comp = _ratio(f, "layer_s", "io_busy_s"), _ratio(f, "layer_s", "compute_busy_s")
    if io and comp:
        explained = io >= 0.95 * PAPER_LAYER_S / PAPER_IO_S
        out.append(f"- Fig. 3's layer: at Fig. 3's own compute / I/O ratio (Env 2's paper-impl profile is calibrated "
                   f"to it) moelab's FIFO layer is {io:.2f}x its I/O busy time and {comp:.2f}x its compute (the paper: "
                   f"1.36x and 1.74x), so Fig. 3's idle time "
                   + ("is reproduced by token-linear compute in expert-ID order." if explained else
                      "stays unexplained: one read stream feeding one compute stream, moelab's model, leaves less "
                      "of it in expert-ID order than the paper measured, under every reading tried (flat compute, "
                      "token-linear compute calibrated to either of the paper's figures)."))
    return [""] + out


# -- skew and batch ------------------------------------------------------------------------------------
def generator_stats() -> dict[tuple, tuple[float, float]]:
    """(skew, locality) -> (top-2 share, reuse at the next token) of AXIS_MODEL's synthetic decode."""
    from workloads.catalog import get_model
    from workloads.stats import trace_stats
    from workloads.synthetic import synthetic_trace
    model, out = get_model(AXIS_MODEL), {}
    for skew, loc in GENERATORS:
        m = trace_stats(synthetic_trace(model, requests=REQUESTS, prompt_len=0, output_len=TOKENS, skew=skew,
                                        locality=loc, seed=0))["mean"]
        out[skew, loc] = (m["top2_share"], m["reuse_rate"])
    return out


def _gen(skew: float, loc: float, stats) -> str:
    t2, reuse = stats[skew, loc]
    tag = " (Mixtral-matched)" if (skew, loc) == MATCHED else ""
    return f"Zipf {skew:g}, locality {loc:g}{tag}: top-2 {t2:.1%}, reuse {reuse:.1%}"


def axes_section(results) -> list[str]:
    stats = generator_stats()
    lines = ["## Routing skew and batch", "",
             f"{AXIS_MODEL} at {AXIS_BUDGET_MB} MB, {', '.join(AXIS_ENVS)}. Each cell: HEBF / FIFO and D²MoE / "
             "EdgeMoE throughput. Real "
             "Mixtral-8x7B decode: top-2 of 8 take 34-35% of a layer's selections (uniform: 25%), an expert is reused "
             "at the next token 59-65% of the time (random: 46%); the last generator of each block is matched to "
             "them. Statistics of each generator's decode (32 requests):", ""]
    lines += [f"- {_gen(s, l, stats)}" for s, l in GENERATORS]
    lines += ["", "| profile | env | generator | " + " | ".join(f"{n} requests" for n in ABLATION_REQUESTS) + " |",
              "|---|---|---|" + "---|" * len(ABLATION_REQUESTS)]
    for profile in PROFILES:
        for env in AXIS_ENVS:
            for skew, loc in GENERATORS:
                cells = []
                for n in ABLATION_REQUESTS:
                    def t(system):
                        return tput(results, Run(env, AXIS_MODEL, system, n, AXIS_BUDGET_MB, profile, skew=skew,
                                                 locality=loc))
                    h, f, d, e = t(HEBF), t(FIFO), t("d2moe"), t("edgemoe")
                    cells.append(f"{h / f:.3f} / {d / e:.3f}" if h and f and d and e else "-")
                lines.append(f"| {profile} | {env} | Zipf {skew:g}, loc. {loc:g} | " + " | ".join(cells) + " |")
    return lines


# -- +Budget ----------------------------------------------------------------------------------------------
def budget_section(results) -> list[str]:
    lines = ["## +Budget against a baseline that caches", "",
             "+Budget is D²MoE's Algorithm 2 (free the previous layer's highest planes first). The paper does not "
             "say how +HEBF manages memory without it; its wording (the budget M is added, eviction then frees the "
             "previous layer's weights) implies a generic cache under the same M, which moelab reads as LRU, as "
             f"before. Under cyclic layer order LRU gets no hits below one step's working set, so that ratio is a "
             f"cache against none; `{CACHING}` (per-layer recency shares) is a baseline that does get hits. 32 "
             "requests, every env, model and budget:", "",
             "| profile | +Budget / +HEBF (LRU) | +Budget / +HEBF (layer-lru) | hit ratio +HEBF LRU | layer-lru | "
             "+Budget |", "|---|---|---|---|---|---|"]
    verdicts = []
    for profile in PROFILES:
        lru = ratios(results, "d2moe", HEBF, None, profile, (REQUESTS,))
        layered = ratios(results, "d2moe", HEBF, None, profile, (REQUESTS,), den_kw={"cache": CACHING})
        hits = []
        for kw, system in (({}, HEBF), ({"cache": CACHING}, HEBF), ({}, "d2moe")):
            xs = [_f(row_of(results, Run(e, m, system, REQUESTS, b, profile, **kw)), "hit_ratio")
                  for e in ENVS for m in MODELS for b in BUDGETS_MB]
            xs = [x for x in xs if x is not None]
            hits.append(span(xs, "", 3))
        lines.append(f"| {profile} | {span(lru)} | {span(layered)} | " + " | ".join(hits) + " |")
        fits = [name for name, xs in (("LRU", lru), (CACHING, layered)) if xs and min(xs) <= 1.21 and max(xs) >= 1.06]
        verdicts.append(f"{profile}: the paper's 1.06-1.21x overlaps +Budget over +HEBF with "
                        f"{' and with '.join(fits)}" if fits else f"{profile}: it overlaps neither")
    return lines + ["", "; ".join(verdicts) + "."]


# -- limits ------------------------------------------------------------------------------------------------
def limits_section(results) -> list[str]:
    from devices.profile import load_device
    bw = load_device(ENVS["env1"]).storage_option(None).read_bandwidth
    lines = ["## What limits each number", "",
             "Per published point (SSD, 32 requests): the read a decode step may take at the published rate; the "
             "storage bound of any policy (every expert is active, the budget holds at most budget / INT2 of them, "
             "the rest read at INT2 at least); moelab's own decode read per step (the same decisions under both "
             "profiles) and the rate the SSD allows it; and the compute bound per profile (generated tokens / "
             "(expert + dense compute busy): compute and dense parts run one after the other).", "",
             "| claim | published | may read / step | any-policy storage bound | moelab reads / step | its storage "
             "bound | compute bound, roofline | paper-impl |", "|---|---|---|---|---|---|---|---|"]
    for label, env, model, system, budget, pub in PUBLISHED:
        if budget is None:
            continue
        sb = storage_bound(model, budget, REQUESTS, bw)
        r = row_of(results, Run(env, model, system, REQUESTS, budget))
        read = _f(r, "decode_read_mb_per_step")
        cb = []
        for profile in PROFILES:
            x = row_of(results, Run(env, model, system, REQUESTS, budget, profile))
            busy = (_f(x, "compute_busy_s") or 0) + (_f(x, "dense_busy_s") or 0)
            generated = (_f(x, "throughput_tok_s") or 0) * (_f(x, "makespan_s") or 0)
            cb.append(f"{generated / busy:.1f}" if busy else "-")
        mine = (f"{read / 1e3:.2f} GB | {REQUESTS * bw / (read * 1e6):.1f} tok/s" if read else "- | -")
        lines.append(f"| {label} | {pub} | {needed_read_per_step(pub, REQUESTS, bw) / 1e9:.2f} GB | "
                     f"{sb['tok_s']:.1f} tok/s ({sb['read_bytes'] / 1e9:.2f} GB) | {mine} | " + " | ".join(cb) + " |")
    return lines + fig12_lines(results)


def fig12_lines(results) -> list[str]:
    lines = ["", "Fig. 12 (Mixtral, V1): computation is 18.56 / 20.77 = 0.894 of latency at 4 requests and 5.3 / 16.77 "
             "= 0.316 at 32 (its dequantization shares of latency over those of computation). moelab's D²MoE at "
             f"{BUDGETS_MB[-1]} MB, expert compute busy / makespan:", "",
             "| profile | env | 4 requests (paper 0.894) | 32 requests (paper 0.316) |", "|---|---|---|---|"]
    trends = []
    for profile in PROFILES:
        for env in ENVS:
            xs = [_ratio(row_of(results, Run(env, "mixtral-8x7b", "d2moe", n, BUDGETS_MB[-1], profile)),
                         "compute_busy_s", "makespan_s") for n in FIG12]
            lines.append(f"| {profile} | {env} | " + " | ".join(_x(x) for x in xs) + " |")
            if None not in xs:
                trends.append(f"{profile} {env} {'rises' if xs[1] > xs[0] else 'falls'}")
    if trends:
        lines += ["", "From 4 to 32 requests the paper's computation share of latency falls by "
                  f"{FIG12[4] / FIG12[32]:.1f}x; moelab's: " + ", ".join(trends) + "."]
    return lines
