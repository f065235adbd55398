"""The on-disk expert store: one checksummed blob per load item (layer, expert, part).

Layout of a store folder:

    index.json          the commit point: format (name, options, matrix shapes), arch fields,
                        and per blob: layer, expert, part, file, offset, length, resident, crc32
    layer_0000.bin ...  one append-only data file per layer; every blob starts at a
                        4096-byte-aligned offset (zero padding between blobs and at the end),
                        so O_DIRECT reads with aligned buffers work (executor/io.py)
    index.journal       only while a build is in progress: a header line, then one JSON line
                        per expert written; an interrupted build resumes from it

The index and the journal are read and written by workloads/store_index.py only (the simulator
reads a store's format there too). This module reads a built store; executor/store_build.py
builds, resumes and repairs one, and executor/encoders.py turns experts into parts and back.

A blob's length is exactly the format's `part_bytes[part]` (workloads/formats.py), so the
simulator and the executor agree on every load size.
"""
from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from devices.units import ConfigError, MoelabError
from executor.encoders import get_encoder, resident_part
from policies.base import Key, LoadItem
from workloads.formats import ExpertFormat, format_from_index
from workloads.store_index import ALIGN, INDEX, blob_rows, header_of, read_index, row_json


class IntegrityError(MoelabError):
    """A blob on disk does not match its index entry (corrupted or truncated)."""


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def checksum(data) -> int:
    """crc32 of a bytes-like object: fast (~3 GB/s) and enough to catch corruption."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class BlobInfo:
    key: Key
    file: str
    offset: int
    length: int
    resident: int
    checksum: int

    @classmethod
    def from_row(cls, row: tuple) -> "BlobInfo":
        """From a workloads/store_index.py blob row (layer, expert, part, file, offset, length, resident, crc)."""
        return cls(Key(*row[:3]), *row[3:])

    def row(self) -> tuple:
        return (*self.key, self.file, self.offset, self.length, self.resident, self.checksum)

    def describe(self) -> str:
        k = self.key
        return f"blob (layer {k.layer}, expert {k.expert}, part {k.part}) in {self.file} at offset {self.offset}"

    def to_json(self) -> dict:
        return row_json(self.row())


def read_store_index(folder) -> tuple[dict, ExpertFormat, list[BlobInfo]]:
    """(header, format, blobs) of the index in `folder`, every field checked."""
    data = read_index(folder)
    fmt = format_from_index(data, Path(folder) / INDEX)
    blobs = [BlobInfo.from_row(r) for r in blob_rows(data, fmt, Path(folder) / INDEX)]
    return header_of(data), fmt, blobs


class Store:
    """A read-only view of a built store. Thread-safe: reads use pread on shared fds."""

    def __init__(self, path: Path, header: dict, fmt: ExpertFormat, blobs: list[BlobInfo]):
        self.path = Path(path)
        self.header = header
        self.format = fmt
        self.arch: dict = header.get("arch", {})
        self.blobs: dict[Key, BlobInfo] = {b.key: b for b in blobs}
        self.files: list[str] = sorted({b.file for b in blobs})
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.build_info: dict | None = None   # set by ensure_store: reused / built / rebuilt / repaired

    @classmethod
    def open(cls, path) -> "Store":
        path = Path(path)
        header, fmt, blobs = read_store_index(path)
        for name in sorted({b.file for b in blobs}):
            if not (path / name).is_file():
                raise ConfigError(f"{path / INDEX}: data file {name!r} named in 'blobs' is missing")
        return cls(path, header, fmt, blobs)

    def keys(self) -> list[Key]:
        """Every key, in the order the blobs were written."""
        return list(self.blobs)

    def blob_info(self, key) -> BlobInfo:
        try:
            return self.blobs[Key(*key)]
        except KeyError:
            raise KeyError(f"no blob for {tuple(key)} in store {self.path}") from None

    def item(self, key) -> LoadItem:
        b = self.blob_info(key)
        p = b.key.part
        return LoadItem(b.key, b.length, b.resident, self.format.decompress_bytes[p])

    def file_path(self, name: str) -> Path:
        return self.path / name

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        return fd

    def check(self, info: BlobInfo, data, got: int | None = None) -> None:
        """Raise IntegrityError unless `data` is the whole blob with the right checksum."""
        got = len(data) if got is None else got
        if got < info.length:
            raise IntegrityError(f"truncated {info.describe()} of store {self.path}: expected {info.length} bytes, "
                                 f"the file holds {got}")
        crc = checksum(data)
        if crc != info.checksum:
            raise IntegrityError(f"corrupted {info.describe()} of store {self.path}: crc32 {crc:08x}, "
                                 f"index says {info.checksum:08x}")

    def read(self, key, buf=None) -> memoryview:
        """The blob's bytes, checked (buffered pread; executor/io.py has the cache-bypassing reader).
        With `buf` (a writable buffer of at least the blob's length) the bytes land there."""
        info = self.blob_info(key)
        view = memoryview(bytearray(info.length) if buf is None else buf).cast("B")[: info.length]
        if len(view) < info.length:
            raise ValueError(f"buffer of {len(view)} bytes is smaller than {info.describe()} ({info.length} bytes)")
        got = pread_full(self._fd(info.file), view, info.offset)
        self.check(info, view, got)
        return view

    def load_expert(self, layer: int, expert: int, level: int | None = None) -> dict[str, torch.Tensor]:
        """Read and decode one expert at `level` (default: the highest)."""
        level = self.format.levels - 1 if level is None else level
        enc = get_encoder(self.format.name)
        parts = [resident_part(enc, self.format, p, self.read((layer, expert, p)))
                 for p in self.format.parts_of(level)]
        return enc.decode(parts, self.format, level)

    def verify(self) -> None:
        for key in self.blobs:
            self.read(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def pread_full(fd: int, view: memoryview, offset: int, direct: bool = False) -> int:
    """Read len(view) bytes at `offset` into `view`; returns how many were read (fewer at EOF)."""
    total = 0
    while total < len(view):
        n = os.preadv(fd, [view[total:]], offset + total)
        # an O_DIRECT read that stops short of an aligned size has hit EOF; retrying at an
        # unaligned offset would fail with EINVAL
        if n <= 0 or (direct and n % ALIGN):
            total += max(n, 0)
            break
        total += n
    return total
