"""Resumable grids of simulator runs for the paper reproductions: each finished run is one
CSV row, appended and fsynced as it finishes, so an interrupted reproduction resumes."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm


def append_runs(path: Path, fields: Sequence[str], todo: list, simulate_row: Callable, *, jobs: int | None,
                quiet: bool, desc: str) -> None:
    """Run simulate_row(run) for every run of `todo` in `jobs` processes (default: the cores),
    appending each returned row to the CSV at `path` (with its header if the file is new). The
    processes are the sweep's (experiments/pool.py): Ctrl-C or SIGTERM stops every run at once."""
    from contextlib import closing

    from experiments.pool import execute, stop_on_signals
    new_file = not path.exists()
    with stop_on_signals(), open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new_file:
            writer.writeheader()
        with closing(execute(simulate_row, todo, jobs)) as rows, \
                tqdm(total=len(todo), disable=quiet or not todo, desc=desc, unit="run") as bar:
            for row in rows:
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)


def keyed_rows(path: Path, key: Sequence[str]) -> dict[tuple, dict]:
    """The rows of a reproduction's results CSV by their key columns (none if there is no file)."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {tuple(r[k] for k in key): r for r in csv.DictReader(f)}
