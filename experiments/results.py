"""A sweep's results file: one CSV row per finished run, appended and fsynced as it finishes.

A sweep holds an exclusive lock beside the file for its whole length: two sweeps appending
to one file would each run every missing row and write it twice, so the second is refused
at once, naming the holder's pid. A file that is not a sweep's (binary, other columns) is
refused by name and never trimmed or appended to.

Two readers: `load_results` is the strict one (`moelab pick`, `moelab plot`): one-line
errors for a missing, binary, foreign or empty file, and rows repeated by an earlier double
writer dropped (the first of each config hash kept, the count said on stderr).
`read_results` is the lenient one for the resume path and for a reader beside a live sweep:
a missing or empty file is no rows, a torn last row (a crash mid-write) is ignored.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from devices.units import ConfigError

REQUIRED = ("config_hash", "status", "device", "policy")     # what every sweep wrote and pick/plot key on


# -- reading ----------------------------------------------------------------------------------------
def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def _decode(path: Path, data: bytes, hint: str = "") -> tuple[str, str]:
    """(the whole lines, a torn last line: a crash mid-row) of the file; ConfigError if it is
    not text, the torn line checked too."""
    text = None
    for cut in range(4):          # a row torn by a crash may end inside a character (at most 3 bytes of it)
        try:
            text = data[: len(data) - cut].decode("utf-8-sig")      # -sig: a spreadsheet's byte-order mark
            break
        except UnicodeDecodeError:
            continue
    if text is None or "\0" in text:           # NUL: valid UTF-8, but no CSV holds it
        raise ConfigError(f"{path}: not a text CSV (binary data){hint}")
    end = text.rfind("\n") + 1
    return text[:end], text[end:]


def _header(path: Path, text: str, torn: str, hint: str = "") -> list[str] | None:
    """The column names (None for an empty file, or one whose header was torn); ConfigError if
    a sweep's columns are missing."""
    header = next(csv.reader(text.splitlines()[:1]), None)
    if header is None and (REQUIRED[0].startswith(torn) or torn.startswith(REQUIRED[0])):
        return None               # nothing, or the start of our own header (FIELDS opens with config_hash)
    missing = [c for c in REQUIRED if c not in (header or [])]
    if missing:
        raise ConfigError(f"{path}: not a sweep results file (no {', '.join(missing)} "
                          f"column{'s' if len(missing) > 1 else ''}){hint}")
    return header


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines(keepends=True)))


def read_results(path) -> list[dict]:
    """The rows of a results CSV, leniently: no file or an empty one is no rows, a torn last
    line is ignored, repeated rows are kept. A file that is not a sweep's is still an error."""
    path = Path(path)
    if not path.exists():
        return []
    text, torn = _decode(path, _read(path))
    _header(path, text, torn)
    return _rows(text)


def load_results(path) -> list[dict]:
    """The rows of a sweep's results file for `pick` and `plot`, each config once, or a
    one-line ConfigError naming the file and what it lacks."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a results file (`moelab sweep GRID.yaml --out FILE.csv`)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file (`moelab sweep GRID.yaml --out {path}` writes one)")
    text, torn = _decode(path, _read(path))
    _header(path, text, torn)
    rows = _rows(text)
    if not rows:
        raise ConfigError(f"{path}: no result rows (run `moelab sweep` first)")
    return unique_rows(path, rows)


def unique_rows(path, rows: list[dict]) -> list[dict]:
    """The first row of each config hash (two sweeps that once wrote one file repeated rows)."""
    seen, kept = set(), []
    for r in rows:
        if r["config_hash"] not in seen:
            seen.add(r["config_hash"])
            kept.append(r)
    if len(kept) < len(rows):
        n = len(rows) - len(kept)
        print(f"{path}: {n} duplicate row{'s' if n > 1 else ''} (a config_hash seen before) ignored; "
              f"the first of each is kept", file=sys.stderr)
    return kept


# -- writing --------------------------------------------------------------------------------------
def open_results(path, fields: Sequence[str]):
    """(file, csv writer) to append rows to. An existing file is checked first, so that a file
    that is not this sweep's is refused and left as it was; then a torn last row is cut off.
    A new (or empty) file gets its header."""
    path = Path(path)
    hint = "; give another --out"
    if path.exists():
        data = _read(path)
        header = _header(path, *_decode(path, data, hint), hint)
        if header and header != list(fields):
            raise ConfigError(f"{path}: written by another moelab version (other columns){hint}")
        if data and not data.endswith(b"\n"):
            with open(path, "rb+") as f:
                f.truncate(data.rfind(b"\n") + 1)
    new = not path.exists() or path.stat().st_size == 0
    f = open(path, "a", newline="", encoding="utf-8")
    writer = csv.DictWriter(f, fields, extrasaction="ignore")
    if new:
        writer.writeheader()
        f.flush()
    return f, writer


@contextlib.contextmanager
def results_lock(path) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside the results file (as the store's build lock in
    executor/store_build.py), held while a sweep writes it. A second writer is refused at once:
    one that waited would then find nothing new to run, and a refusal names whom to wait for."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        f = open(lock, "a+")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write its lock file {lock} ({e.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{path}: another sweep (pid {_holder(f)}) is writing it; wait for it to "
                              f"finish or give another --out") from None
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            f.truncate(0)                     # still ours: no stale pid for the next reader
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f) -> str:
    """The pid the lock's holder wrote (it writes it just after locking: wait a moment for it)."""
    for _ in range(25):
        f.seek(0)
        pid = f.read().strip()
        if pid:
            return pid
        time.sleep(0.02)
    return "unknown"
