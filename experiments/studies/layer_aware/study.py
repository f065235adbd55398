"""Layer-aware caching on real and synthetic routing (issue 12): miss-ratio curves for every
policy, per-layer hit ratios, the TPOT each policy gives on two edge devices, and the gate
lookahead's prediction accuracy and prefetch coverage.

    python experiments/studies/layer_aware/study.py            # ~7 minutes on 2 cores

Writes into this folder: real.npz (routing recorded from the bundled tiny-moe, with its gate
lookahead predictions), mrc-*.png and results.json (every number the README quotes).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from devices.units import MoelabError                            # noqa: E402
from policies import build_policies                              # noqa: E402
from policies.bundle import workload_routings                    # noqa: E402
from policies.lookahead import prediction_accuracy               # noqa: E402
from sim.mrc import miss_ratio_curves, plot_mrc                  # noqa: E402
from workloads.catalog import ModelArch, get_model               # noqa: E402
from workloads.formats import make_format                        # noqa: E402
from workloads.synthetic import synthetic_trace                  # noqa: E402
from workloads.trace import RoutingTrace                         # noqa: E402
from workloads.workload import Workload                          # noqa: E402

POLICIES = ["lru", "least-stale", "layered-lru", "layer-lru", "layer-lfu", "lfu", "fifo", "page-cache", "belady"]
DEVICES = ["jetson-orin-nano-8gb", "raspberry-pi-5-8gb"]
PREFETCHERS = ["none", "last-use", "gate-lookahead", "gate-topk", "gate-last-use", "oracle"]


def record_real(path: Path) -> RoutingTrace:
    """8 distinct prompts, 48 new tokens each, through the bundled model; and the lookahead's
    accuracy per layer distance on the same decode."""
    import torch
    from executor.record import lookahead_accuracy, record_routing
    from executor.train import DEFAULT_MODEL, load_trained
    from experiments.prompts import prompt_texts
    model, tok, _ = load_trained(DEFAULT_MODEL)
    ids = [tok.encode(t) for t in prompt_texts(8, 0)]
    width = min(map(len, ids))
    prompts = torch.tensor([row[:width] for row in ids])
    trace = record_routing(model, prompts, 48, model_name="tiny-moe")
    trace.save(path)
    acc = lookahead_accuracy(model, prompts, 48, distances=(1, 2, 3))
    return RoutingTrace.load(path), acc


def decode_only(trace: RoutingTrace) -> RoutingTrace:
    """The decode tokens of a recorded trace: a prefill step's demand is (nearly) every expert of
    every layer, which no budget below the whole model can run; the cache study is about decode."""
    keep = ~trace.prompt
    pred = None if trace.predicted is None else trace.predicted[keep]
    return RoutingTrace(trace.experts[keep], trace.scores[keep], trace.request_ids[keep], trace.prompt[keep],
                        dict(trace.metadata), None, pred, None if pred is None else trace.predicted_scores[keep])


def unit_workload(trace: RoutingTrace, batch: int = 1) -> Workload:
    m = ModelArch("trace", layers=trace.layers, experts=trace.num_experts, top_k=trace.top_k, d_model=128,
                  d_ff=128, n_heads=1, n_kv_heads=1)
    return Workload(m, trace, make_format("bf16", m.expert_shapes), batch=batch)


def per_layer_hits(w: Workload, policy: str, cap: int) -> list[float]:
    p = build_policies(w, cap * w.fmt.expert_bytes, cache=policy)
    hits, acc = np.zeros(w.model.layers), np.zeros(w.model.layers)
    for _, layer, routing in workload_routings(w):
        d = p.decide(layer, routing)
        hits[layer] += d.hits
        acc[layer] += len(d.keys)
        p.finish(layer)
    return [round(float(h / a), 4) if a else None for h, a in zip(hits, acc)]


def tpot(model_name: str | None, trace_path: Path, device: str, policy: str, cap: int, prefetch: str = "none") -> dict:
    """One simulator run through the run function: the trace file on `device`, `cap` experts of room."""
    from experiments.run import simulate
    from experiments.spec import RunSpec
    model = get_model(model_name) if model_name else ModelArch(**RoutingTrace.load(trace_path).metadata["arch"])
    spec = RunSpec.from_doc({"device": device, "model": model_name, "trace": str(trace_path),
                             "policy": {"cache": policy, "prefetch": prefetch}, "budget": cap * model.expert_bytes})
    try:
        m = simulate(spec, timeline=False).metrics
    except MoelabError as e:        # the device's memory cannot hold this budget (beside its dense weights)
        return {"refused": str(e).split(";")[0]}
    return {"tpot_s": m["tpot_s_mean"], "hit_ratio": m["hit_ratio"], "coverage": m.get("prefetch_coverage")}


def main() -> None:
    out: dict = {}
    real, acc = record_real(HERE / "real.npz")
    out["lookahead_accuracy_by_distance"] = {name: {d: {"precision": v["precision"], "recall": v["recall"]}
                                                    for d, v in by_d.items()} for name, by_d in acc.items()}
    out["trace_prediction_accuracy"] = {
        "top-k": {k: v for k, v in prediction_accuracy(real).items() if k != "per_layer"},
        "2k>=0.1": {k: v for k, v in prediction_accuracy(real, width=2 * real.top_k, threshold=0.1).items()
                    if k != "per_layer"}}
    traces = {"tiny-moe (recorded, decode)": (None, decode_only(real))}
    for name, tokens in (("mixtral-8x7b", 200), ("olmoe-1b-7b", 100)):
        traces[f"{name} (synthetic)"] = (name, synthetic_trace(get_model(name), requests=2, prompt_len=0,
                                                               output_len=tokens, seed=0))
    scratch = tempfile.mkdtemp(prefix="layer-aware-")
    for label, (model_name, trace) in traces.items():
        w = unit_workload(trace)
        keys, ws = trace.layers * trace.num_experts, trace.layers * trace.top_k
        caps = sorted({max(trace.top_k, round(keys * i / 20)) for i in range(1, 21)} | {ws // 2, 3 * ws // 4, ws})
        curves = miss_ratio_curves(w, POLICIES, caps)
        slug = label.split()[0]
        plot_mrc(curves, HERE / f"mrc-{slug}.png", title=f"{label}: one token's working set = {ws} experts")
        at = 3 * ws // 4
        entry = {"working_set": ws, "curves": {p: {str(c): r for c, r in cv.items()} for p, cv in curves.items()},
                 "at_working_set": {p: curves[p][ws] for p in POLICIES},
                 "at_three_quarters": {p: curves[p][at] for p in POLICIES},
                 "per_layer_at_three_quarters": {p: per_layer_hits(w, p, at)
                                                 for p in ("lru", "least-stale", "layered-lru", "layer-lru")}}
        path = trace.save(Path(scratch) / f"{slug}.npz")       # a run spec names its routing by file
        if model_name:                      # TPOT on the devices, experts of the real model's size
            entry["tpot"] = {dev: {p: tpot(model_name, path, dev, p, at) for p in POLICIES} for dev in DEVICES}
        else:                               # the recorded trace: prefetchers, with their predictions
            entry["prefetch"] = {dev: {pf: tpot(None, path, dev, "least-stale", at, pf) for pf in PREFETCHERS}
                                 for dev in DEVICES}
        out[label] = entry
        print(label, json.dumps({k: entry[k] for k in ("at_working_set", "at_three_quarters")}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    (HERE / "results.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
