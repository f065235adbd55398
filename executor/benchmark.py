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
from policies import PolicyContext, make_allocator, make_cache, make_scheduler
from sim.engine import Policies
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
    return {"decode_s": round(end - start, 4), "io_s": round(io, 4), "compute_s": round(comp, 4),
            "ratio_to_bound": round((end - start) / bound, 3)}


def run_once(model, tok, store, cache: str, budget: int, tokens: int, throttle=None):
    fmt, arch = store.format, model_arch(model)
    ctx = PolicyContext(fmt, arch.layers, arch.experts, budget)
    pol = Policies(make_allocator("fixed", ctx), make_scheduler("fifo", ctx), make_cache(cache, ctx))
    import torch
    prompt = torch.tensor([tok.encode(PROMPT)])
    return execute(model, store, pol, prompt, tokens, io_concurrency=2, throttle=throttle, quiet=True)


def main() -> None:
    out = {"benchmark": "executor"}
    with contextlib.redirect_stdout(_io.StringIO()):
        io_res = benchmark_io.main(["--quiet", "--repeats", "3"])
    out["io"] = {k: io_res[k] for k in ("mode", "cold", "sequential_MBps", "path_MBps", "ratio", "best_ratio",
                                          "target_met") if k in io_res}

    model, tok, _ = load_trained()
    with tempfile.TemporaryDirectory() as d:
        store = ensure_store(model, Path(d) / "store", quiet=True)
        strip_experts(model)
        fmt, arch = store.format, model_arch(model)
        total = arch.layers * arch.experts * fmt.expert_bytes
        budget = total // 4
        runs = {}
        for name, cache, throttle in [
                ("on-demand", "on-demand", None),
                ("on-demand, pi5-nvme", "on-demand", load_device("raspberry-pi-5-8gb").storage_option("nvme")),
                ("on-demand, pi4-usb-ssd", "on-demand", load_device("raspberry-pi-4-8gb").storage_option(None))]:
            th = StorageThrottle.from_profile(throttle) if throttle else None
            r = run_once(model, tok, store, cache, total, 32, th)
            runs[name] = overlap(r.timeline)
        out["overlap_fifo"] = runs

        r = run_once(model, tok, store, "lru", budget, 64)
        m = compute_metrics(r.timeline)
        out["default_run"] = {"tokens_per_s": round(m["throughput_tok_s"], 2),
                              "tpot_ms_mean": round(m["tpot_s_mean"] * 1e3, 3),
                              "hit_ratio": round(m["hit_ratio"], 3), "budget_bytes": budget,
                              "expert_bytes_total": total, "bytes_read": m["bytes_read"],
                              "peak_expert_bytes": m["peak_expert_bytes"], "peak_rss_bytes": r.peak_rss_bytes,
                              "read_mode": r.reader_mode}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
