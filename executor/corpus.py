"""The text a model is trained and scored on: the Python standard library's sources, as token
streams, and the windows and batches cut from them (executor/train.py, executor/bit_router.py,
executor/evaluate.py).

The corpus is on every machine with Python: the stdlib's *.py files (test suites and
site-packages left out), read in sorted path order; a file goes to the held-out split
when crc32(its relative path) % 100 < heldout_pct, so the split is fixed. Files are
joined with an end-of-text token.
"""
from __future__ import annotations

import hashlib
import platform
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from devices.units import ConfigError
from executor.tokenizer import ByteTokenizer

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Corpus:
    train: np.ndarray        # int16 token ids
    heldout: np.ndarray
    description: dict = field(default_factory=dict)


def stdlib_corpus(root: Optional[Union[str, Path]] = None, *, heldout_pct: int = 5,
                  tokenizer: Optional[ByteTokenizer] = None, max_bytes: Optional[int] = None) -> Corpus:
    """The stdlib's *.py sources as token streams (see module doc); max_bytes caps the train split."""
    tok = tokenizer or ByteTokenizer()
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise ConfigError(f"no *.py files under {root}")
    parts = {"train": [], "heldout": []}
    counts = {"train": [0, 0], "heldout": [0, 0]}  # files, bytes
    digest = hashlib.sha256()
    sep = np.array([tok.eot_id], np.int16)
    for rel in files:
        split = "heldout" if zlib.crc32(rel.encode()) % 100 < heldout_pct else "train"
        if split == "train" and max_bytes is not None and counts["train"][1] >= max_bytes:
            continue
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        parts[split] += [np.frombuffer(data, np.uint8).astype(np.int16), sep]
        counts[split][0] += 1
        counts[split][1] += len(data)
    if not parts["heldout"] or not parts["train"]:
        raise ConfigError(f"{root}: too few files for a train/held-out split")
    desc = {
        "source": "Python standard library *.py sources (test suites and site-packages excluded)",
        "root": str(root), "python": platform.python_version(),
        "split": f"held out: crc32(relative path) % 100 < {heldout_pct}",
        "train_files": counts["train"][0], "train_bytes": counts["train"][1],
        "heldout_files": counts["heldout"][0], "heldout_bytes": counts["heldout"][1],
        "sha256": digest.hexdigest(), "tokenizer": tok.to_dict(),
        "separator": "one end-of-text token after each file",
    }
    return Corpus(np.concatenate(parts["train"]), np.concatenate(parts["heldout"]), desc)


# -- windows and batches ---------------------------------------------------------------

def sample_batch(data: np.ndarray, batch: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` windows of seq tokens at random starts: (inputs, next-token targets)."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).numpy()
    win = np.stack([data[s: s + seq + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(win)
    return t[:, :-1], t[:, 1:]


def eval_windows(data: np.ndarray, seq: int, n: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows of seq+1 tokens; n of them evenly spaced (None: all)."""
    total = (len(data) - 1) // seq
    idx = np.arange(total) if n is None or n >= total else np.linspace(0, total - 1, n).round().astype(int)
    return torch.from_numpy(np.stack([data[i * seq: i * seq + seq + 1] for i in idx]).astype(np.int64))
