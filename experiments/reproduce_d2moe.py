"""`moelab reproduce d2moe`: D²MoE's throughput, ablation and memory results in the simulator.

The paper's setups (papers.md, D²MoE §4): Env 1 = RTX 3060 laptop, Env 2 = Jetson AGX Orin 64 GB;
LLaMA-MoE-3.5B and Mixtral-8x7B shapes; 128 input and 128 output tokens per request, all requests
decoded together; budgets 200-1600 MB. Systems are the named bundles of policies/presets.py.
Routing is synthetic (seeded; the paper's C4 routing is not public), so what is reproduced is the
mechanism, not the trace.

Every system runs under two cost profiles of each environment's device, side by side:
- `roofline`: the hardware's limit (`rtx-3060-laptop-6gb`, `jetson-agx-orin-64gb`): one call per
  expert for all its tokens, flat in tokens at decode;
- `paper-impl`: the implementation the paper measured (`*-d2moe-impl`): one token per call, its
  time calibrated only from the paper's own figures (the YAMLs name each).

Levels: D²MoE's systems (and the ablation's, and Matryoshka-Free) get each token's level from the
learned router's measured shares (experiments/d2moe_levels.py, the `shares` allocator); D²MoE
also runs with the rank-capacity rule (`levels=capacity`) beside them. Fig. 10 and the published
numbers run at 32 requests; the ablation (Fig. 14) at 32 requests on every env, model and budget,
and at 4-32 requests on LLaMA-MoE at 800 MB in Env 2, where routing skew is an axis too (Zipf 0.5, 1, 2, 3
at the reproduction's locality 0.6, and the generator matched to real Mixtral decode statistics,
skew 0.4 / locality 0.15: top-2 of 8 take 34.4% of selections, an expert is reused at the next
token 63.3% of the time). +HEBF also runs with a layer-aware cache (`layer-lru`) instead of LRU,
the baseline +Budget is measured against.

Every run is one row of `results.csv` in the output folder, appended as it finishes and keyed by
its configuration, so an interrupted reproduction resumes where it stopped and a second one
reuses everything (a file of an older VERSION is set aside). Then `report.md`
(experiments/d2moe_report.py) and figures (experiments/d2moe_figures.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from experiments.d2moe_figures import figures
from experiments.d2moe_report import report
from experiments.d2moe_runs import run_grid


def reproduce(out, jobs: int | None = None, quiet: bool = False) -> str:
    """Run (or reuse) the grid, draw the figures and write the report; the text states this
    invocation's wall time and the summed time of every run in the results."""
    t0 = time.time()
    out = Path(out)
    results, ran = run_grid(out, jobs, quiet)
    figures(results, out)
    timing = {"wall_s": time.time() - t0, "ran": ran, "reused": len(results) - ran,
              "jobs": jobs or os.cpu_count() or 1}
    return report(results, out, timing)
