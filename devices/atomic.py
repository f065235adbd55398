"""One way to write a file so that a crash or a concurrent reader never sees half of it.

The bytes go to a hidden temp file in the same folder (a rename is atomic only within one
file system), are fsynced, renamed over the target, and the folder is fsynced so the
rename itself survives a power cut. On any error the temp file is removed.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Optional, Union


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb") -> Iterator[IO]:
    """A file object ("wb" or "w") whose contents replace `path` when the block ends without error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path, data: Union[bytes, str]) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return Path(path)


def save_safetensors_atomic(tensors: dict, path, metadata: Optional[dict] = None) -> Path:
    """Write torch tensors as a safetensors file, atomically (in memory first: the files the
    executor writes this way, models and bit routers, are small)."""
    from safetensors.torch import save  # imported here: devices/ stays torch-free for the simulator
    return atomic_write(path, save(tensors, metadata=metadata))
