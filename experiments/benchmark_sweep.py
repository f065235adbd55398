"""`python -m experiments.benchmark_sweep`: how fast `moelab sweep` runs simulator runs.

1,000 runs of 128 new tokens each (mixtral-8x7b, batch 1, a 16-token prompt: 5 devices x 5 cache
policies x 8 budgets x 5 seeds) in local processes (default: the cores), written to a fresh
results file; prints one JSON line with the wall time and runs per second. Target: within 10
minutes on 2 cores. The budgets (3-6 GB) fit the smallest device's memory and hold a prefill's
experts, so every run runs. `--compare DIR` measures the checkout in DIR too, alternately
(sim/benchmark.py compare).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

GRID = """
tokens: 128
prompt_tokens: 16
grid:
  device: [jetson-agx-orin-64gb, jetson-orin-nx-16gb, jetson-orin-nano-8gb, raspberry-pi-5-8gb, rtx-3060-laptop-6gb]
  model: [mixtral-8x7b]
  policy: [lru, lfu, fifo, on-demand, belady]
  budget: [3GB, 3.5GB, 4GB, 4.5GB, 5GB, 5.25GB, 5.5GB, 6GB]
  seed: [0, 1, 2, 3, 4]
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=1000, help="a seeded sample of this many runs of the grid")
    ap.add_argument("--compare", metavar="DIR", help="also measure the checkout in DIR, alternately")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: measurements of each")
    args = ap.parse_args(argv)
    if args.compare:
        from sim.compare import compare
        print(json.dumps(compare(__file__, args.compare, args.rounds, ("--jobs", str(args.jobs), "--runs",
                                                                         str(args.runs)))))
        return
    from experiments.sweep import read_results, sweep
    with tempfile.TemporaryDirectory() as d:
        grid = Path(d) / "grid.yaml"
        grid.write_text(GRID + (f"sample: {{n: {args.runs}, seed: 0}}\n" if args.runs < 1000 else ""))
        t0 = time.perf_counter()
        done = sweep(grid, Path(d) / "r.csv", jobs=args.jobs, quiet=True)
        wall = time.perf_counter() - t0
        rows = read_results(Path(d) / "r.csv")
    print(json.dumps({"benchmark": "sweep", "runs": done["ran"], "jobs": args.jobs, "wall_s": round(wall, 1),
                      "runs_per_s": round(done["ran"] / wall, 2),
                      "ok": sum(r["status"] == "ok" for r in rows),
                      "target_met": wall <= 600}))


if __name__ == "__main__":
    main()
