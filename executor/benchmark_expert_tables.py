"""How reproducible `moelab profile`'s expert-call tables are, timed back to back per cell (as they
once were) against interleaved (executor/profile_experts.py), alternating the two orders in one run
so both see the same host. Prints one JSON line:

- spread: per cell, the standard deviation of its figure over the tables of one order / their mean;
  the median and the maximum over cells;
- dips: adjacent token counts of a row where the figure falls by more than DIP (a row of a call's
  time against its token count cannot fall by much: more tokens never take less work);
- seconds: each order's time per table set.

    python -m executor.benchmark_expert_tables [--tables 4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from executor.profile_experts import expert_tables
from executor.profile_host import FORMATS, HostProfiler

DIP = 0.05


def cells(tables: dict) -> np.ndarray:
    return np.array([t for key in sorted(tables) for row in tables[key] for t in row])


def dips(tables: dict) -> int:
    return sum(b < (1 - DIP) * a for rows in tables.values() for row in rows for a, b in zip(row, row[1:]))


def summary(sets: list[dict], seconds: list[float]) -> dict:
    x = np.stack([cells(t) for t in sets])
    spread = x.std(axis=0, ddof=1) / x.mean(axis=0)
    return {"spread_median": round(float(np.median(spread)), 4), "spread_max": round(float(spread.max()), 4),
            "dips_per_table": round(float(np.mean([dips(t) for t in sets])), 2),
            "seconds_per_table": round(float(np.mean(seconds)), 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", type=int, default=4, help="table sets per order (default 4)")
    ap.add_argument("--quick", action="store_true", help="the quick profile's token counts and samples")
    args = ap.parse_args(argv)
    if args.tables < 2:
        ap.error(f"--tables {args.tables}: need at least 2 table sets per order to measure their spread")
    p = HostProfiler(quick=args.quick, quiet=True)
    got: dict = {"blocked": ([], []), "interleaved": ([], [])}
    with torch.no_grad():
        for i in range(args.tables):
            for name in ("blocked", "interleaved"):
                t0 = time.perf_counter()
                got[name][0].append(expert_tables(p, FORMATS, interleaved=name == "interleaved", seed=i))
                got[name][1].append(time.perf_counter() - t0)
    print(json.dumps({"benchmark": "expert_tables", "tables": args.tables, "quick": args.quick,
                      **{name: summary(*v) for name, v in got.items()}}))


if __name__ == "__main__":
    main()
