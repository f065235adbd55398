"""Resumable grids of simulator runs for the paper reproductions: each finished run is one
CSV row, appended and fsynced as it finishes, so an interrupted reproduction resumes."""
from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm


def append_runs(path: Path, fields: Sequence[str], todo: list, simulate_row: Callable, *, jobs: int | None,
                quiet: bool, desc: str) -> None:
    """Run simulate_row(run) for every run of `todo` in `jobs` processes (default: the cores),
    appending each returned row to the CSV at `path` (with its header if the file is new)."""
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new_file:
            writer.writeheader()
        with ProcessPoolExecutor(jobs or os.cpu_count() or 1) as pool, \
                tqdm(total=len(todo), disable=quiet or not todo, desc=desc, unit="run") as bar:
            for row in pool.map(simulate_row, todo):
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
