"""Energy per token across power modes (issue 25): Mixtral-8x7B and OLMoE on the Orin Nano and the
AGX Orin, every power mode x formats (bf16, zip lz4, MWQ INT4) x caches (LRU, LFU), batch 1.

    python experiments/studies/energy/study.py          # about a minute on 2 cores

Writes into this folder: grid.yaml (the runs: a mode belongs to its device, so the grid lists them),
results.csv (the sweep), energy-<model>.png/.pdf (tok/s against J/token per device, the Pareto front
ringed) and results.json (every number README.md quotes: the fronts, zip against bf16 per mode and
resource, and a check of the decompression-concurrency estimate on full timelines).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from devices.power import load_power, mode_powers      # noqa: E402
from devices.units import MoelabError                   # noqa: E402
from experiments.plots import pareto_front, plot        # noqa: E402
from experiments.results import load_results            # noqa: E402
from experiments.spec import RunSpec                    # noqa: E402
from experiments.sweep import sweep                     # noqa: E402

DEVICES = ("jetson-orin-nano-8gb", "jetson-agx-orin-64gb")
MODELS = ("mixtral-8x7b", "olmoe-1b-7b")
FORMATS = ("bf16", {"name": "zip", "codec": "lz4"}, {"name": "mwq", "ladder": "v1"})
CACHES = ("lru", "lfu")
BASE = {"tokens": 32, "prompt_tokens": 16, "batch": 1, "seed": 0}


def write_grid(path: Path) -> None:
    runs = [{"device": d, "power_mode": m, "model": model, "format": f, "policy": c}
            for d in DEVICES for m in load_power(d).modes for model in MODELS for f in FORMATS for c in CACHES]
    header = ("# Energy per token across power modes (experiments/studies/energy/study.py writes this file):\n"
              "# each device in each of its power modes x mixtral-8x7b / olmoe-1b-7b x bf16 / zip (lz4) / MWQ INT4\n"
              "# (ladder v1) x LRU / LFU, batch 1, 32 new tokens after a 16-token prompt, the device's own budget.\n")
    body = yaml.safe_dump(BASE, sort_keys=False) + "runs:\n" + "".join(
        f"- {yaml.safe_dump(r, sort_keys=False, default_flow_style=True, width=200).strip()}\n" for r in runs)
    path.write_text(header + body)


def joules(row: dict, resource: str | None = None) -> float:
    """J per token, in all or for one resource."""
    e = float(row["energy_per_token_j"])
    return e if resource is None else e * float(row[f"energy_share_{resource}"])


def fronts(rows: list[dict]) -> dict:
    out = {}
    for d in DEVICES:
        for model in MODELS:
            sub = [r for r in rows if r["device"] == d and r["model"] == model and r["status"] == "ok"]
            pts = [(joules(r), float(r["throughput_tok_s"])) for r in sub]
            out[f"{d} {model}"] = [{"mode": sub[i]["power_mode"], "format": sub[i]["format"], "cache": sub[i]["cache"],
                                    "j_per_token": round(pts[i][0], 3), "tok_s": round(pts[i][1], 3)}
                                   for i in pareto_front(pts)]
    return out


def zip_vs_bf16(rows: list[dict]) -> list[dict]:
    """Per device, model and mode (mean over the caches): what zip saves in reads and spends in
    decompression, per token, against bf16."""
    out = []
    for d in DEVICES:
        for mode in load_power(d).modes:
            for model in MODELS:
                pick = {f: [r for r in rows if (r["device"], r["power_mode"], r["model"], r["format"]) ==
                            (d, mode, model, f) and r["status"] == "ok"] for f in ("bf16", "zip")}
                if not all(pick.values()):       # a format the device's memory refuses (the rows say why)
                    continue

                def mean(f, res=None, key=None):
                    vals = [float(r[key]) if key else joules(r, res) for r in pick[f]]
                    return sum(vals) / len(vals)
                out.append({"device": d, "mode": mode, "model": model,
                            "bf16_j": round(mean("bf16"), 3), "zip_j": round(mean("zip"), 3),
                            "reads_saved_j": round(mean("bf16", "storage") - mean("zip", "storage"), 3),
                            "decompress_j": round(mean("zip", "decompress") - mean("bf16", "decompress"), 3),
                            "rest_j": round((mean("zip", "board") + mean("zip", "compute") + mean("zip", "memory"))
                                            - (mean("bf16", "board") + mean("bf16", "compute") + mean("bf16", "memory")), 3),
                            "bf16_tok_s": round(mean("bf16", key="throughput_tok_s"), 3),
                            "zip_tok_s": round(mean("zip", key="throughput_tok_s"), 3)})
    return out


def concurrency_check() -> list[dict]:
    """The energy model charges decompression as (the union of the workers' busy time) x (the mean
    workers busy at once, estimated per device). On full timelines the exact worker-seconds are known:
    how far the estimate is from them, per mode (zip, LRU)."""
    from experiments.run import simulate
    from workloads.formats import FormatSpec
    out = []
    for d in DEVICES:
        for mode in load_power(d).modes:
            for model in MODELS:
                try:
                    run = simulate(RunSpec(device=d, power_mode=mode, model=model,
                                           format=FormatSpec("zip", codec="lz4"), **BASE))
                except MoelabError:      # the device's memory refuses it (results.csv says why)
                    continue
                ev = [e for e in run.timeline.events if e.resource.startswith("decompress")]
                busy = mode_powers(d, mode, "nvme", run.prepared.device.decompress_workers)["decompress"][0]
                cores = min(load_power(d).concurrency, run.prepared.device.decompress_workers)
                exact = sum(e.end - e.start for e in ev) * busy / cores
                model_j = run.metrics["energy_j"] * run.metrics["energy_share_decompress"]
                out.append({"device": d, "mode": mode, "model": model, "workers": run.prepared.device.decompress_workers,
                            "modelled_decompress_j": round(model_j, 2), "exact_decompress_j": round(exact, 2),
                            "total_j": round(run.metrics["energy_j"], 2),
                            "error_of_total": round((model_j - exact) / run.metrics["energy_j"], 4)})
    return out


def main() -> None:
    grid, results = HERE / "grid.yaml", HERE / "results.csv"
    write_grid(grid)
    sweep(grid, results, quiet=True)
    rows = load_results(results)
    for model in MODELS:
        plot([r for r in rows if r["model"] == model], "energy", HERE / f"energy-{model}", facet="device",
             title=f"{model}: throughput against energy per token, every power mode x format x cache")
    out = {"fronts": fronts(rows), "zip_vs_bf16": zip_vs_bf16(rows), "concurrency_check": concurrency_check()}
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
