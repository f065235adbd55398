"""Write a routing trace as it is recorded, in bounded memory: `TraceWriter`.

Rows (tokens) are appended in any number of small batches; every `chunk_tokens` rows the buffer
goes to a chunk file (plain .npy, in a hidden folder beside the output), so memory holds at most
one chunk plus one append. `close(metadata)` assembles the chunks into the .npz RoutingTrace.load
reads (workloads/trace.py), streaming each array into its zip member chunk by chunk (the whole
trace is never in memory either), written atomically; the chunk folder is then removed.
`abort()` removes everything. A writer closed after an interrupted recording writes a valid,
shorter trace: rows are only ever whole tokens.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from devices.atomic import atomic_open
from devices.units import ConfigError

# array name -> dtype; shapes [tokens, layers, k] or [tokens, layers, P] or [tokens]
FIELDS = {"experts": np.int32, "scores": np.float32, "request_ids": np.int32, "prompt": np.bool_,
          "predicted": np.int32, "predicted_scores": np.float32}


class TraceWriter:
    def __init__(self, path, chunk_tokens: int = 4096):
        self.path = Path(path)
        self.chunk_tokens = int(chunk_tokens)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.chunks."))
        self._buf: dict[str, list[np.ndarray]] = {name: [] for name in FIELDS}
        self._buffered = 0
        self._chunks = 0
        self._shapes: dict[str, tuple] = {}
        self.tokens = 0
        self.peak_buffered = 0          # the most rows held in memory at once (tests check the bound)

    def append(self, **arrays) -> None:
        """Rows of every field in FIELDS (predicted ones optional, but always or never)."""
        n = len(arrays["experts"])
        for name, dtype in FIELDS.items():
            a = arrays.get(name)
            if a is None:
                continue
            a = np.asarray(a, dtype)
            if len(a) != n or self._shapes.setdefault(name, a.shape[1:]) != a.shape[1:]:
                raise ConfigError(f"trace writer: {name} rows of shape {a.shape} do not match the others")
            self._buf[name].append(a)
        self._buffered += n
        self.tokens += n
        self.peak_buffered = max(self.peak_buffered, self._buffered)
        if self._buffered >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """The buffered rows to a chunk file."""
        if not self._buffered:
            return
        for name, parts in self._buf.items():
            if parts:
                np.save(self._dir / f"{self._chunks:06d}.{name}.npy", np.concatenate(parts))
                parts.clear()
        self._chunks += 1
        self._buffered = 0

    def close(self, metadata: dict) -> Path:
        """Assemble the chunks into `path` (atomically) and remove them; the path written."""
        self.flush()
        try:
            if not self.tokens:
                raise ConfigError(f"{self.path}: nothing was recorded (no token went through the model)")
            with atomic_open(self.path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                for name, dtype in FIELDS.items():
                    if name in self._shapes:
                        self._member(zf, name, np.dtype(dtype))
                meta = io.BytesIO()
                np.save(meta, np.array(json.dumps(metadata)))
                zf.writestr("metadata.npy", meta.getvalue())
        finally:
            self.abort()
        return self.path

    def _member(self, zf: zipfile.ZipFile, name: str, dtype: np.dtype) -> None:
        """One .npy member: its header for the whole array, then each chunk's bytes in order."""
        shape = (self.tokens,) + tuple(self._shapes[name])
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_2_0(out, header)
            for i in range(self._chunks):
                out.write(np.ascontiguousarray(np.load(self._dir / f"{i:06d}.{name}.npy"), dtype).tobytes())

    def abort(self) -> None:
        """Drop the chunks (the output, if any, stays)."""
        shutil.rmtree(self._dir, ignore_errors=True)
