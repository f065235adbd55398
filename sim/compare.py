"""A benchmark measured here and in another checkout, alternately (`--compare DIR` of
`python -m sim.benchmark` and `python -m experiments.benchmark_sweep`).

The hosts here are shared and their speed swings by more than the changes measured: only
figures taken side by side, in turns, compare. DIR is typically a `git worktree` of an older
commit; the benchmark's script runs there as it is here, with that checkout's packages first
on the path, so it must only use what both have (sim/benchmark.py checks for what may be
missing).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def compare(script: str, other: str, rounds: int, args: tuple = ()) -> dict:
    """A benchmark `script`'s JSON line here and in the checkout `other`, measured alternately
    `rounds` times each: the medians and their ratios (here / other)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict]] = {"here": [], "other": []}
    with tempfile.TemporaryDirectory() as d:
        # the script, run from a folder of its own (nothing beside it to shadow a module) in each
        # checkout, whose packages then come first on the path
        copy = shutil.copy(os.path.abspath(script), os.path.join(d, "benchmark_script.py"))
        for _ in range(rounds):
            for name, root in (("here", here), ("other", os.path.abspath(other))):
                done = subprocess.run([sys.executable, copy, *args], cwd=root, env=dict(os.environ, PYTHONPATH=root),
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{script} in {root} failed:\n{done.stderr[-3000:]}")
                runs[name].append(json.loads(done.stdout.splitlines()[-1]))
    first = runs["here"][0]
    keys = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    med = {name: {k: float(np.median([r[k] for r in rs if r.get(k) is not None] or [np.nan])) for k in keys}
           for name, rs in runs.items()}
    ratio = {k: round(med["here"][k] / med["other"][k], 2) for k in keys
             if med["other"][k] == med["other"][k] and med["other"][k]}
    return {"benchmark": f"{first.get('benchmark')}-compare", "other": other, "rounds": rounds,
            "here": med["here"], "other_figures": med["other"], "ratio": ratio}
