"""Memory tiers and expert placement on D²MoE's Env 1 (issue 26): a 6 GB laptop GPU in a 32 GB
machine, host RAM as a cache level in front of the SSD, and missed experts computed on the CPU.

    python experiments/studies/memory-tiers/study.py          # resumable; ~10 minutes on 2 cores

Part A (placement): llama-moe-3.5b and mixtral-8x7b deployed as llama.cpp users run them (every
weight at 4 bits: INT4 expert copies, dense_bits 4), VRAM expert budget x host-RAM budget x placement
x batch. The baseline is llama.cpp's static split (`--n-cpu-moe N`: `cpu-static layers=N`, N the
fewest layers whose experts must stay on the CPU for the others to fit the VRAM budget), against
gpu-only (load misses over PCIe), cpu-when-faster (Fiddler), hot-on-gpu (kTransformers-like) and the
one-level run (no host level: every miss from the SSD).

Part B (the published points): D²MoE's two Env 1 points (LLaMA-MoE and Mixtral, 1600 MB, 32
requests x 128 tokens, the d2moe preset as `moelab reproduce d2moe` runs it) from the SSD, from an
everything-in-RAM storage, and with a host-RAM cache level (its default 24 GB budget, LRU) in front
of the SSD, under both cost profiles.

Writes results.csv (one row per run, appended as each finishes), results.json (what README.md
quotes) and placement.png.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from experiments.resumable import append_runs, keyed_rows     # noqa: E402

DEVICE = "rtx-3060-laptop-6gb"
MODELS = ("llama-moe-3.5b", "mixtral-8x7b")
VRAM_MB = (500, 1000, 1500)
HOST_GB = (4, 24)                   # a RAM-starved host and the profile's default
BATCHES = (1, 8)
PLACEMENTS = ("one-level", "llama.cpp", "gpu-only", "cpu-when-faster", "hot-on-gpu")
TOKENS, PROMPT = 32, 16
KEY = ("part", "profile", "model", "vram_mb", "host_gb", "placement", "batch", "storage")
FIELDS = (*KEY, "status", "throughput_tok_s", "tpot_ms", "ttft_ms", "hit_ratio", "host_hit_ratio",
          "cpu_token_share", "ssd_read_gb", "link_gb", "cpu_busy", "link_busy", "n_cpu_moe", "note")


@dataclass(frozen=True)
class Run:
    part: str
    profile: str
    model: str
    vram_mb: int
    host_gb: int            # 0: no host level
    placement: str
    batch: int
    storage: str = ""

    def key(self) -> tuple:
        return tuple(str(v) for v in asdict(self).values())


def n_cpu_moe(model_name: str, vram_bytes: int) -> int:
    """llama.cpp's --n-cpu-moe N for a VRAM budget: the first N layers' experts stay on the CPU, the
    other layers' experts all resident on the GPU, so N is the fewest layers that leave the rest fitting."""
    from workloads.catalog import get_model
    from workloads.formats import FormatSpec
    m = get_model(model_name)
    layer = m.experts * FormatSpec("copies", ladder="int4").make(m.expert_shapes).expert_bytes
    return max(0, m.layers - vram_bytes // layer)


def spec_of(run: Run):
    from experiments.d2moe_runs import Run as D2Run, run_spec
    from experiments.spec import RunSpec
    if run.part == "B":
        base = run_spec(D2Run("env1", run.model, "d2moe", 32, 1600, profile=run.profile,
                              storage=run.storage or ""))
        return base.with_(host_budget=run.host_gb * 10**9) if run.host_gb else base
    doc = {"device": DEVICE, "model": run.model, "format": {"name": "copies", "ladder": "int4"}, "dense_bits": 4,
           "budget": run.vram_mb * 10**6, "batch": run.batch, "requests": run.batch, "tokens": TOKENS,
           "prompt_tokens": PROMPT, "skew": 0.4, "locality": 0.15, "seed": 0}
    if run.placement != "one-level":
        doc["host_budget"] = run.host_gb * 10**9
        if run.placement == "llama.cpp":
            doc["placement"] = {"name": "cpu-static", "options": {"layers": n_cpu_moe(run.model, run.vram_mb * 10**6)}}
        else:
            doc["placement"] = run.placement
    return RunSpec.from_doc(doc, f"run {run}")


def simulate_row(run: Run) -> dict:
    from experiments.run import OverMemory, simulate
    from policies import BudgetError
    row = dict(zip(KEY, run.key()), status="ok", note="")
    try:
        m = simulate(spec_of(run), timeline=False).metrics
    except (OverMemory, BudgetError) as e:
        return {**row, "status": "refused", "note": str(e)[:300]}
    links, busy = m.get("link_bytes") or {}, m.get("link_busy_fraction") or {}    # per link (one here)
    row.update(throughput_tok_s=m["throughput_tok_s"], tpot_ms=1e3 * (m["tpot_s_mean"] or 0),
               ttft_ms=1e3 * m["ttft_s"], hit_ratio=m["hit_ratio"], host_hit_ratio=m.get("host_hit_ratio"),
               cpu_token_share=m.get("cpu_token_share"), ssd_read_gb=m["bytes_read"] / 1e9,
               link_gb=sum(links.values()) / 1e9, cpu_busy=m.get("cpu_busy_fraction"),
               link_busy=max(busy.values(), default=None),
               n_cpu_moe=n_cpu_moe(run.model, run.vram_mb * 10**6) if run.placement == "llama.cpp" else "")
    return row


def runs() -> list[Run]:
    a = [Run("A", "roofline", model, vram, 0 if p == "one-level" else host, p, batch)
         for model in MODELS for vram in VRAM_MB for batch in BATCHES for p in PLACEMENTS
         for host in ((HOST_GB[-1],) if p == "one-level" else HOST_GB)]
    b = [Run("B", profile, model, 1600, host, "d2moe", 32, storage)
         for profile in ("roofline", "paper-impl") for model in MODELS
         for host, storage in ((0, ""), (0, "host-ram"), (24, ""))]
    return list(dict.fromkeys(a + b))


def main() -> None:
    results = HERE / "results.csv"
    done = keyed_rows(results, KEY)
    todo = [r for r in runs() if r.key() not in done]
    append_runs(results, FIELDS, todo, simulate_row, jobs=None, quiet=False, desc="memory-tiers")
    rows = list(keyed_rows(results, KEY).values())
    summary = summarise(rows)
    (HERE / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, HERE / "placement.png")
    print(json.dumps(summary["part_a_best"], indent=1))


def _f(row, key):
    v = row.get(key)
    return None if v in (None, "", "None") else float(v)


def summarise(rows: list[dict]) -> dict:
    """Per (model, VRAM, host, batch): every placement's throughput against llama.cpp's static split;
    the best per group; part B beside the published numbers."""
    from experiments.d2moe_runs import PUBLISHED
    a = [r for r in rows if r["part"] == "A"]
    groups: dict[tuple, dict] = {}
    for r in a:
        host = r["host_gb"] if r["placement"] != "one-level" else None
        for h in ((host,) if host is not None else HOST_GB):
            g = groups.setdefault((r["model"], r["vram_mb"], str(h), r["batch"]), {})
            g[r["placement"]] = _f(r, "throughput_tok_s") if r["status"] == "ok" else None
    table = []
    for (model, vram, host, batch), g in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[0][1]),
                                                                                  int(kv[0][2]), int(kv[0][3]))):
        base = g.get("llama.cpp")
        ok = {p: t for p, t in g.items() if t}
        best = max(ok, key=ok.get) if ok else None
        table.append({"model": model, "vram_mb": int(vram), "host_gb": int(host), "batch": int(batch),
                      **{p: None if g.get(p) is None else round(g[p], 3) for p in PLACEMENTS},
                      "best": best, "best_vs_llama_cpp": round(ok[best] / base, 2) if best and base else None})
    pub = {(env, model): v for _, env, model, system, budget, v in PUBLISHED if system == "d2moe" and env == "env1"}
    b = [{"profile": r["profile"], "model": r["model"],
          "source": "host level 24 GB" if r["host_gb"] != "0" else (r["storage"] or "nvme"),
          "tok_s": _f(r, "throughput_tok_s"), "published": pub.get(("env1", r["model"])),
          "of_published": round(_f(r, "throughput_tok_s") / pub[("env1", r["model"])], 2)
          if r["status"] == "ok" and ("env1", r["model"]) in pub else None,
          "host_hit_ratio": _f(r, "host_hit_ratio"), "ssd_read_gb": _f(r, "ssd_read_gb"), "status": r["status"]}
         for r in rows if r["part"] == "B"]
    return {"part_a": table, "part_a_best": {f"{t['model']} {t['vram_mb']}MB host {t['host_gb']}GB batch {t['batch']}":
                                             (t["best"], t["best_vs_llama_cpp"]) for t in table},
            "part_b": b}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(MODELS), len(BATCHES), figsize=(11, 7), squeeze=False)
    for i, model in enumerate(MODELS):
        for j, batch in enumerate(BATCHES):
            ax = axes[i][j]
            for p in PLACEMENTS:
                for host, style in ((HOST_GB[-1], "-"), (HOST_GB[0], ":")):
                    if p == "one-level" and host != HOST_GB[-1]:
                        continue
                    pts = sorted((int(r["vram_mb"]), _f(r, "throughput_tok_s")) for r in rows
                                 if r["part"] == "A" and r["model"] == model and int(r["batch"]) == batch
                                 and r["placement"] == p and r["status"] == "ok"
                                 and (p == "one-level" or int(r["host_gb"]) == host))
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{p}" + ("" if p == "one-level" else f", RAM {host} GB"))
            ax.set_title(f"{model}, batch {batch}", fontsize=9)
            ax.set_xlabel("VRAM expert budget (MB)")
            ax.set_ylabel("tok/s")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{DEVICE}: placement x VRAM budget x host RAM (INT4 experts, 4-bit dense weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
