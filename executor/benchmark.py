"""`python -m executor.benchmark`: the executor's figures, as one JSON line.

(a) I/O path vs a plain sequential reader of the same disk, same run (executor.benchmark_io);
(b) overlap: decode time against its lower bound max(total I/O time, total compute time)
    with the FIFO scheduler, unthrottled and with the disk throttled like a device's storage;
(c) tokens/s and peak RSS of the default `moelab execute` run (trained tiny-moe, LRU,
    a quarter of the experts' bytes as budget, 64 tokens).
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import tempfile
from pathlib import Path

from devices.profile import load_device
from executor import benchmark_io
from executor.execute import ensure_store, execute, model_arch, strip_experts
from executor.io import StorageThrottle
from executor.train import load_trained
from sim.engine import build_online_policies
from sim.metrics import busy_time, compute_metrics

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def overlap(timeline) -> dict:
    """Decode steps only: makespan vs max(I/O busy, compute busy)."""
    decode = {s["step"] for s in timeline.meta["steps"] if not s["prefill"]}
    ev = [e for e in timeline.events if e.step in decode and e.resource != "cache"]
    start, end = min(e.start for e in ev), max(e.end for e in ev)
    io = busy_time([(e.start, e.end) for e in ev if e.resource == "io"])
    comp = busy_time([(e.start, e.end) for e in ev if e.resource in ("compute", "dense")])
    bound = max(io, comp)
    # the expert phase of each layer (routing known -> last expert computed): what FIFO
    # loading can overlap; the dense part before it cannot overlap this layer's loads
    # without a cross-layer prefetcher
    phase = bound_phase = 0.0
    by_layer: dict = {}
    for e in ev:
        by_layer.setdefault((e.step, e.layer), []).append(e)
    for group in by_layer.values():
        dense_end = max(e.end for e in group if e.resource == "dense")
        work = [e for e in group if e.resource in ("io", "compute")]
        if not work:
            continue
        phase += max(e.end for e in work) - dense_end
        bound_phase += max(busy_time([(e.start, e.end) for e in work if e.resource == "io"]),
                           busy_time([(e.start, e.end) for e in work if e.resource == "compute"]))
    return {"decode_s": round(end - start, 4), "io_s": round(io, 4), "compute_s": round(comp, 4),
            "ratio_to_bound": round((end - start) / bound, 3),
            "expert_phase_ratio_to_bound": round(phase / bound_phase, 3)}


def run_once(model, tok, store, cache: str, budget: int, tokens: int, throttle=None, batch: int = 1):
    pol = build_online_policies(model_arch(model), store.format, budget, cache)
    import torch
    prompt = torch.tensor([tok.encode(PROMPT)] * batch)
    return execute(model, store, pol, prompt, tokens, batch=batch, io_concurrency=2, throttle=throttle, quiet=True)


def large_expert_overlap() -> dict:
    """Overlap with experts of a realistic size (6.3 MB bf16: d_model 512, d_ff 2048), random
    weights: overlap is a property of the runtime, not of the model's quality."""
    import torch
    from executor.model import MoEConfig, MoETransformer, init_weights
    cfg = MoEConfig(vocab=257, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, experts=8, top_k=2, d_ff=2048,
                    max_seq=128)
    model = init_weights(MoETransformer(cfg), seed=0).eval()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        store = ensure_store(model, Path(d) / "store", quiet=True)
        strip_experts(model)
        fmt, arch = store.format, model_arch(model)
        for batch in (1, 4):
            pol = build_online_policies(arch, fmt, arch.layers * arch.experts * fmt.expert_bytes, "on-demand")
            prompts = torch.randint(0, cfg.vocab, (batch, 16), generator=torch.Generator().manual_seed(1))
            r = execute(model, store, pol, prompts, 12, batch=batch, io_concurrency=1, quiet=True)
            out[f"6.3MB experts, host disk, batch {batch}"] = overlap(r.timeline)
    return out


def main() -> None:
    out = {"benchmark": "executor"}
    model, tok, _ = load_trained()
    with tempfile.TemporaryDirectory() as d:
        store = ensure_store(model, Path(d) / "store", quiet=True)
        strip_experts(model)
        fmt, arch = store.format, model_arch(model)
        total = arch.layers * arch.experts * fmt.expert_bytes
        budget = total // 4
        # first, so that peak RSS (a process-lifetime maximum) is the default run's own
        r = run_once(model, tok, store, "lru", budget, 64)
        m = compute_metrics(r.timeline)
        out["default_run"] = {"tokens_per_s": round(m["throughput_tok_s"], 2),
                              "tpot_ms_mean": round(m["tpot_s_mean"] * 1e3, 3),
                              "hit_ratio": round(m["hit_ratio"], 3), "budget_bytes": budget,
                              "expert_bytes_total": total, "bytes_read": m["bytes_read"],
                              "peak_expert_bytes": m["peak_expert_bytes"], "peak_rss_bytes": r.peak_rss_bytes,
                              "read_mode": r.reader_mode}
        runs = {}
        pi4 = load_device("raspberry-pi-4-8gb")
        for name, throttle, batch in [
                ("tiny-moe, host disk, batch 1", None, 1),
                ("tiny-moe, pi4 microsd throttle, batch 4", pi4.storage_option("microsd"), 4)]:
            th = StorageThrottle.from_profile(throttle) if throttle else None
            r = run_once(model, tok, store, "on-demand", total, 16, th, batch)
            runs[name] = overlap(r.timeline)
    runs.update(large_expert_overlap())
    out["overlap_fifo"] = runs
    with contextlib.redirect_stdout(_io.StringIO()):
        io_res = benchmark_io.main(["--quiet", "--repeats", "3"])
    out["io"] = {k: io_res[k] for k in ("mode", "cold", "sequential_MBps", "path_MBps", "ratio", "best_ratio",
                                          "target_met") if k in io_res}
    print(json.dumps(out))

if __name__ == "__main__":
    main()
