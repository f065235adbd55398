"""`python -m executor.benchmark`: the executor's figures, as one JSON line.

(a) I/O path vs a plain sequential reader of the same disk, same run (executor.benchmark_io);
(b) overlap: decode time against its lower bound max(total I/O time, total compute time)
    with the FIFO scheduler, unthrottled and with the disk throttled like a device's storage,
    without a prefetcher (a layer's loads wait for its router), with last-use and with the
    oracle prefetcher (the next layer's loads overlap this layer's compute);
(c) tokens/s and peak RSS of the default `moelab execute` run (trained tiny-moe, LRU,
    a quarter of the experts' bytes as budget, 64 tokens).
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import tempfile
from pathlib import Path

import torch

from devices.profile import load_device
from executor import benchmark_io
from executor.execute import execute, strip_experts
from executor.io import StorageThrottle
from executor.model import model_arch
from executor.record import record_routing
from executor.store_build import ensure_store
from executor.train import load_trained
from policies import build_online_policies, build_policies
from workloads.workload import Workload
from timeline.metrics import busy_time, compute_metrics

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def overlap(timeline) -> dict:
    """Decode steps only: makespan vs max(I/O busy, compute busy)."""
    decode = {s["step"] for s in timeline.meta["steps"] if not s["prefill"]}
    ev = [e for e in timeline.events if e.step in decode and e.resource != "cache"]
    start, end = min(e.start for e in ev), max(e.end for e in ev)
    io = busy_time([(e.start, e.end) for e in ev if e.resource == "io"])
    comp = busy_time([(e.start, e.end) for e in ev if e.resource in ("compute", "dense")])
    out = {"decode_s": round(end - start, 4), "io_s": round(io, 4), "compute_s": round(comp, 4),
           "ratio_to_bound": round((end - start) / max(io, comp), 3)}
    if not timeline.of("cache", "prefetch"):
        # the expert phase of each layer (routing known -> last expert computed): all that
        # FIFO loading alone can overlap; the dense part before it cannot overlap this
        # layer's loads without a prefetcher
        phase = bound_phase = 0.0
        by_layer: dict = {}
        for e in ev:
            by_layer.setdefault((e.step, e.layer), []).append(e)
        for group in by_layer.values():
            dense_end = max(e.end for e in group if e.resource == "dense")
            work = [e for e in group if e.resource in ("io", "compute")]
            if work:
                phase += max(e.end for e in work) - dense_end
                bound_phase += max(busy_time([(e.start, e.end) for e in work if e.resource == "io"]),
                                   busy_time([(e.start, e.end) for e in work if e.resource == "compute"]))
        out["expert_phase_ratio_to_bound"] = round(phase / bound_phase, 3)
    return out


def prefetch_comparison(model, store, prompts, tokens: int, throttle=None) -> dict:
    """Every expert loaded on demand (on-demand cache, FIFO loads), with no prefetcher, with
    last-use (online) and with the oracle (the model's own routing, recorded first and
    forced: the same tokens). `model` still holds its experts (to record); runs use a copy
    without them."""
    import copy
    batch = prompts.shape[0]
    trace = record_routing(model, prompts, tokens)
    runner = strip_experts(copy.deepcopy(model))
    fmt, arch = store.format, model_arch(runner)
    budget = arch.layers * arch.experts * fmt.expert_bytes
    out = {}
    for prefetch in ("none", "last-use", "oracle"):
        if throttle is not None:
            throttle.reset()
        if prefetch == "oracle":
            pol = build_policies(Workload(arch, trace, fmt, batch=batch), budget, "on-demand", prefetch=prefetch)
            r = execute(runner, store, pol, prompts, tokens, trace=trace, batch=batch, io_concurrency=1,
                        throttle=throttle, quiet=True)
        else:
            pol = build_online_policies(arch, fmt, budget, "on-demand", prefetch=prefetch)
            r = execute(runner, store, pol, prompts, tokens, batch=batch, io_concurrency=1, throttle=throttle,
                        quiet=True)
        out[f"prefetch {prefetch}"] = overlap(r.timeline)
    return out


def run_once(model, tok, store, cache: str, budget: int, tokens: int):
    pol = build_online_policies(model_arch(model), store.format, budget, cache)
    return execute(model, store, pol, torch.tensor([tok.encode(PROMPT)]), tokens, io_concurrency=2, quiet=True)


def large_expert_overlap() -> dict:
    """Overlap with experts of a realistic size (6.3 MB bf16: d_model 512, d_ff 2048), random
    weights: overlap is a property of the runtime, not of the model's quality."""
    from executor.model import MoEConfig, MoETransformer, init_weights
    cfg = MoEConfig(vocab=257, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, experts=8, top_k=2, d_ff=2048,
                    max_seq=128)
    model = init_weights(MoETransformer(cfg), seed=0).eval()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        store = ensure_store(model, Path(d) / "store", quiet=True)
        for batch in (1, 4):
            prompts = torch.randint(0, cfg.vocab, (batch, 16), generator=torch.Generator().manual_seed(1))
            out[f"6.3MB experts, host disk, batch {batch}"] = prefetch_comparison(model, store, prompts, 12)
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
        model, tok, _ = load_trained()              # with its experts again, to record its routing
        pi4 = StorageThrottle.from_profile(load_device("raspberry-pi-4-8gb").storage_option("microsd"))
        for name, throttle, batch in [("tiny-moe, host disk, batch 1", None, 1),
                                      ("tiny-moe, pi4 microsd throttle, batch 4", pi4, 4)]:
            prompts = torch.tensor([tok.encode(PROMPT)] * batch)
            runs[name] = prefetch_comparison(model, store, prompts, 16, throttle)
    runs.update(large_expert_overlap())
    out["overlap_fifo"] = runs
    with contextlib.redirect_stdout(_io.StringIO()):
        io_res = benchmark_io.main(["--quiet", "--repeats", "5"])
    out["io"] = {k: io_res[k] for k in ("mode", "cold", "sequential_MBps", "path_MBps", "ratio", "best_ratio",
                                          "target_met") if k in io_res}
    print(json.dumps(out))

if __name__ == "__main__":
    main()
