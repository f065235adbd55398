"""The on-disk expert store: one checksummed blob per load item (layer, expert, part).

Layout of a store folder:

    index.json          the commit point: format (name, options, matrix shapes), arch fields,
                        and per blob: layer, expert, part, file, offset, length, resident, crc32
    layer_0000.bin ...  one append-only data file per layer; every blob starts at a
                        4096-byte-aligned offset (zero padding between blobs and at the end),
                        so O_DIRECT reads with aligned buffers work (executor/io.py)
    index.journal       only while a build is in progress: a header line, then one JSON line
                        per expert written; an interrupted build resumes from it

The header records what the store was built from ("source": a digest of the experts'
weights, see source_digest) beside the format options. build_store_atomic (used by
executor.execute.ensure_store) builds into a sibling folder and renames it into place, under
a lock, so a store folder is always one whole store; repair_store rewrites bad blobs.

A blob's length is exactly the format's `part_bytes[part]` (workloads/formats.py), so the
simulator and the executor agree on every load size.

Encoders turn an expert's weight tensors into the format's parts and back. They are
looked up by format name; `bf16` ships here, other formats call `register_encoder`.
An encoder is any object with

    encode(weights: Mapping[str, Tensor], fmt) -> list[bytes]          # one per part, sizes = fmt.part_bytes
    decode(parts: Sequence[buffer], fmt, level) -> dict[str, Tensor]   # the parts of fmt.parts_of(level), in order

where the weight names are `matrix_names(fmt)` ("w1", "w3", "w2" for SwiGLU experts,
"w1", "w2" for two-matrix FFNs), in the order of `fmt.shapes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from devices.atomic import atomic_write, fsync_dir
from devices.units import ConfigError, MoelabError
from policies.base import Key, LoadItem
from executor.weights import Weights, check_weights, matrix_names  # noqa: F401 (re-exported)
from workloads.formats import ExpertFormat, make_format

ALIGN = 4096
INDEX = "index.json"
JOURNAL = "index.journal"
STORE_VERSION = 1
_FILE_RE = re.compile(r"layer_\d{4,}\.bin")


class IntegrityError(MoelabError):
    """A blob on disk does not match its index entry (corrupted or truncated)."""


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def checksum(data) -> int:
    """crc32 of a bytes-like object: fast (~3 GB/s) and enough to catch corruption."""
    return zlib.crc32(data) & 0xFFFFFFFF


# -- encoders ------------------------------------------------------------------

class Encoder(Protocol):
    """A format's codec. encode: weights -> one bytes object per part (sizes = fmt.part_bytes).
    decode: the *resident* parts a level needs -> weights. A format whose parts carry a
    decompression task (fmt.decompress_bytes[p] > 0) also has
    decompress_part(part, stored_bytes, fmt) -> resident bytes, which engines run on the
    decompression workers."""
    def encode(self, weights: Weights, fmt: ExpertFormat) -> list[bytes]: ...

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]: ...


def resident_part(encoder: Encoder, fmt: ExpertFormat, part: int, data):
    """What a stored part becomes in memory: itself, or its decompressed bytes."""
    return encoder.decompress_part(part, data, fmt) if fmt.decompress_bytes[part] else data


_ENCODERS: dict[str, Encoder] = {}


def register_encoder(name: str, encoder: Encoder) -> None:
    """Make `encoder` the codec of format `name` (replaces an earlier one)."""
    _ENCODERS[name] = encoder


def get_encoder(name: str) -> Encoder:
    if name not in _ENCODERS:
        raise ConfigError(f"no encoder for format {name!r}; registered: {', '.join(sorted(_ENCODERS))}")
    return _ENCODERS[name]


class Bf16Encoder:
    """One part: the raw little-endian bf16 bytes of each matrix, concatenated."""

    def encode(self, weights: Weights, fmt: ExpertFormat) -> list[bytes]:
        chunks = [t.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy()
                  .astype("<i2", copy=False).tobytes() for t in check_weights(weights, fmt)]
        return [b"".join(chunks)]

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        # one copy: the caller's buffer may be reused for the next read
        flat = torch.from_numpy(np.frombuffer(parts[0], dtype="<i2", count=fmt.params).astype(np.int16))
        flat = flat.view(torch.bfloat16)
        out, at = {}, 0
        for name, (o, i) in zip(matrix_names(fmt), fmt.shapes):
            out[name] = flat[at: at + o * i].view(o, i)
            at += o * i
        return out


register_encoder("bf16", Bf16Encoder())


def _register_paper_formats() -> None:
    from executor.mwq import CopiesEncoder, MwqEncoder   # D²MoE nested bit-planes; per-width copies
    from executor.zipcodec import ZipEncoder             # ZipMoE lossless BF16
    register_encoder("mwq", MwqEncoder())
    register_encoder("copies", CopiesEncoder())
    register_encoder("zip", ZipEncoder())


# -- index ---------------------------------------------------------------------

@dataclass(frozen=True)
class BlobInfo:
    key: Key
    file: str
    offset: int
    length: int
    resident: int
    checksum: int

    def describe(self) -> str:
        k = self.key
        return f"blob (layer {k.layer}, expert {k.expert}, part {k.part}) in {self.file} at offset {self.offset}"

    def to_json(self) -> dict:
        k = self.key
        return {"layer": k.layer, "expert": k.expert, "part": k.part, "file": self.file, "offset": self.offset,
                "length": self.length, "resident": self.resident, "checksum": f"{self.checksum:08x}"}


def format_options(fmt: ExpertFormat) -> dict:
    """The constructor options that rebuild `fmt` with make_format (besides name and shapes)."""
    return {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt)
            if f.init and f.name not in ("shapes", "name")}


def _header(fmt: ExpertFormat, arch_info: Mapping, source: Mapping | None = None) -> dict:
    header = {"moelab_store": STORE_VERSION, "alignment": ALIGN, "checksum": "crc32",
              "format": {"name": fmt.name, "options": format_options(fmt), "shapes": [list(s) for s in fmt.shapes]},
              "arch": dict(arch_info)}
    if source is not None:
        header["source"] = dict(source)
    try:  # normalise (tuples -> lists) so headers compare equal after a JSON round trip
        return json.loads(json.dumps(header))
    except TypeError as e:
        raise ConfigError(f"arch_info must be JSON-serialisable: {e}") from None


def _field(obj: dict, name: str, kind, where: str, path: Path):
    if not isinstance(obj, dict) or name not in obj:
        raise ConfigError(f"{path}: missing field {where}{name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}: field {where}{name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _format_from_header(header: dict, path: Path) -> ExpertFormat:
    f = _field(header, "format", dict, "", path)
    name = _field(f, "name", str, "format.", path)
    options = _field(f, "options", dict, "format.", path)
    shapes = _field(f, "shapes", list, "format.", path)
    if not shapes or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s)
                             for s in shapes):
        raise ConfigError(f"{path}: field 'format.shapes' must be a list of [out, in] positive integers, got {shapes!r}")
    try:
        return make_format(name, shapes, **options)
    except ConfigError as e:
        raise ConfigError(f"{path}: field 'format': {e}") from None


def _blob_from_json(b: Any, i: int, fmt: ExpertFormat, path: Path) -> BlobInfo:
    where = f"blobs[{i}]."
    if not isinstance(b, dict):
        raise ConfigError(f"{path}: field 'blobs[{i}]' must be an object, got {b!r}")
    layer, expert, part, offset = (_field(b, n, int, where, path) for n in ("layer", "expert", "part", "offset"))
    length, resident = _field(b, "length", int, where, path), _field(b, "resident", int, where, path)
    file, crc = _field(b, "file", str, where, path), _field(b, "checksum", str, where, path)
    if layer < 0 or expert < 0:
        raise ConfigError(f"{path}: fields {where}layer/expert must be >= 0, got {layer}, {expert}")
    if not 0 <= part < fmt.n_parts:
        raise ConfigError(f"{path}: field {where}'part' must be in 0..{fmt.n_parts - 1} for format {fmt.name}, got {part}")
    if not _FILE_RE.fullmatch(file):  # plain names only: an index never points outside its folder
        raise ConfigError(f"{path}: field {where}'file' must look like 'layer_0000.bin', got {file!r}")
    if offset < 0 or offset % ALIGN:
        raise ConfigError(f"{path}: field {where}'offset' must be a non-negative multiple of {ALIGN}, got {offset}")
    if length != fmt.part_bytes[part]:
        raise ConfigError(f"{path}: field {where}'length' must be {fmt.part_bytes[part]} (format {fmt.name} part "
                          f"{part}), got {length}")
    if resident != fmt.resident_bytes[part]:
        raise ConfigError(f"{path}: field {where}'resident' must be {fmt.resident_bytes[part]}, got {resident}")
    if not re.fullmatch(r"[0-9a-f]{8}", crc):
        raise ConfigError(f"{path}: field {where}'checksum' must be 8 lowercase hex digits (crc32), got {crc!r}")
    return BlobInfo(Key(layer, expert, part), file, offset, length, resident, int(crc, 16))


def _parse_index(path: Path) -> tuple[dict, ExpertFormat, list[BlobInfo]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no index; not an expert store (or its build never finished)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    version = _field(data, "moelab_store", int, "", path)
    if version != STORE_VERSION:
        raise ConfigError(f"{path}: field 'moelab_store' is {version}; this moelab reads version {STORE_VERSION}")
    if _field(data, "alignment", int, "", path) != ALIGN:
        raise ConfigError(f"{path}: field 'alignment' must be {ALIGN}, got {data['alignment']}")
    if _field(data, "checksum", str, "", path) != "crc32":
        raise ConfigError(f"{path}: field 'checksum' must be 'crc32', got {data['checksum']!r}")
    _field(data, "arch", dict, "", path)
    fmt = _format_from_header(data, path)
    blobs = [_blob_from_json(b, i, fmt, path) for i, b in enumerate(_field(data, "blobs", list, "", path))]
    seen: set[Key] = set()
    for i, b in enumerate(blobs):
        if b.key in seen:
            raise ConfigError(f"{path}: field 'blobs[{i}]': key {tuple(b.key)} appears twice")
        seen.add(b.key)
    header = {k: v for k, v in data.items() if k != "blobs"}
    return header, fmt, blobs


def _index_text(header: dict, blobs: list[BlobInfo]) -> str:
    """index.json: the header pretty-printed, then one line per blob (diffable, compact)."""
    head = json.dumps(header, indent=1, sort_keys=True)[:-2]  # without the closing "\n}"
    rows = ",\n  ".join(json.dumps(b.to_json(), sort_keys=True) for b in blobs)
    return f'{head},\n "blobs": [\n  {rows}\n ]\n}}\n' if blobs else f'{head},\n "blobs": []\n}}\n'


# -- the store -----------------------------------------------------------------

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
        header, fmt, blobs = _parse_index(path / INDEX)
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


# -- building ------------------------------------------------------------------

ExpertSource = Iterable[tuple[int, int, Union[Weights, Callable[[], Weights]]]]


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def data_file(layer: int) -> str:
    return f"layer_{layer:04d}.bin"


def _read_journal(path: Path) -> tuple[dict | None, list[list[BlobInfo]]]:
    """The journal's header and expert entries; a torn last line (a crash mid-write) is ignored."""
    lines = path.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, []
    entries = []
    for line in lines[1:]:
        try:
            blobs = json.loads(line)["blobs"]
            if not blobs or len({(b["layer"], b["expert"]) for b in blobs}) != 1:
                break
            entries.append([BlobInfo(Key(b["layer"], b["expert"], b["part"]), b["file"], b["offset"], b["length"],
                                     b["resident"], int(b["checksum"], 16)) for b in blobs])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            break
    return header, entries


def _recover(out: Path, header: dict, fmt: ExpertFormat) -> list[list[BlobInfo]]:
    """Experts already written by an earlier (possibly interrupted) build, verified, in write order."""
    journal, index = out / JOURNAL, out / INDEX
    old_header, entries = None, []
    if journal.exists():
        old_header, entries = _read_journal(journal)
    elif index.exists():
        old_header, _, blobs = _parse_index(index)
        for b in blobs:  # regroup by expert, keeping write order
            if entries and entries[-1][0].key[:2] == b.key[:2]:
                entries[-1].append(b)
            else:
                entries.append([b])
    if old_header is not None and old_header != header:
        raise ConfigError(f"{out}: holds a store (or a partial build) of a different format or arch; "
                          f"delete the folder or build elsewhere")
    # keep the longest prefix whose blobs are intact and sit where an append-only build puts them
    ends: dict[str, int] = {}
    kept: list[list[BlobInfo]] = []
    fds: dict[str, int] = {}
    try:
        for entry in entries:
            ok = True
            for b in entry:
                if (b.file != data_file(b.key.layer) or b.offset != ends.get(b.file, 0)
                        or not 0 <= b.key.part < fmt.n_parts or b.length != fmt.part_bytes[b.key.part]
                        or b.resident != fmt.resident_bytes[b.key.part] or not (out / b.file).exists()):
                    ok = False
                    break
                if b.file not in fds:
                    fds[b.file] = os.open(out / b.file, os.O_RDONLY)
                data = os.pread(fds[b.file], b.length, b.offset)
                if len(data) != b.length or checksum(data) != b.checksum:
                    ok = False
                    break
                ends[b.file] = align_up(b.offset + b.length)
            if not ok:
                break
            kept.append(entry)
    finally:
        for fd in fds.values():
            os.close(fd)
    # drop whatever lies past the kept blobs (a half-written expert, or stale files)
    kept_ends: dict[str, int] = {}
    for entry in kept:
        for b in entry:
            kept_ends[b.file] = align_up(b.offset + b.length)
    for p in out.glob("layer_*.bin"):
        os.truncate(p, kept_ends.get(p.name, 0))
    return kept


def build_store(out_dir, experts_iter: ExpertSource, fmt: ExpertFormat, *, arch_info: Mapping,
                quiet: bool = False, total: int | None = None, source: Mapping | None = None,
                label: str | None = None) -> Store:
    """Encode and write every expert `experts_iter` yields as (layer, expert, weights) and return
    the opened store. `weights` is a dict of tensors (see matrix_names) or a zero-argument callable
    returning one, so a resumed build skips loading experts already on disk.

    Resumable: each written expert is recorded in index.journal; a rerun into the same folder
    (with the same format, arch and expert order) verifies what is there, skips it and ends with
    the same store a single run would have built. index.json is written last (temp + rename),
    after the data files are fsynced, so a store is either complete or not openable.
    `source` (e.g. {"digest": source_digest(...)}) is recorded in the header: what the store was
    built from, so a store of other weights is never reused (build_store_atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = _header(fmt, arch_info, source)
    encoder = get_encoder(fmt.name)
    kept = _recover(out, header, fmt)
    recovered = {entry[0].key[:2] for entry in kept}
    seen: set[tuple[int, int]] = set()
    ends: dict[str, int] = {}
    for entry in kept:
        for b in entry:
            ends[b.file] = align_up(b.offset + b.length)
    # restart the journal from the verified entries (drops a torn or unverified tail)
    atomic_write(out / JOURNAL, "".join(json.dumps(x, sort_keys=True) + "\n" for x in
                                         [header] + [{"blobs": [b.to_json() for b in e]} for e in kept]))
    entries = list(kept)
    fds: dict[str, int] = {}
    if total is None and hasattr(experts_iter, "__len__"):
        total = len(experts_iter)  # type: ignore[arg-type]
    try:
        with open(out / JOURNAL, "a") as journal:
            for layer, expert, weights in tqdm(experts_iter, total=total, disable=quiet, unit="expert",
                                               desc=f"store {label or out.name}"):
                if (layer, expert) in seen:
                    raise ConfigError(f"build_store: expert (layer {layer}, expert {expert}) given twice")
                seen.add((layer, expert))
                if (layer, expert) in recovered:
                    continue
                parts = encoder.encode(weights() if callable(weights) else weights, fmt)
                sizes = [len(p) for p in parts]
                if sizes != list(fmt.part_bytes):
                    raise ConfigError(f"encoder {fmt.name!r} produced parts of {sizes} bytes; "
                                      f"the format says {list(fmt.part_bytes)}")
                name = data_file(layer)
                if name not in fds:
                    fds[name] = os.open(out / name, os.O_WRONLY | os.O_CREAT, 0o644)
                blobs = []
                for p, data in enumerate(parts):
                    off = ends.get(name, 0)
                    pad = align_up(len(data)) - len(data)
                    _pwrite_all(fds[name], data, off)
                    _pwrite_all(fds[name], bytes(pad), off + len(data))
                    blobs.append(BlobInfo(Key(layer, expert, p), name, off, len(data), fmt.resident_bytes[p],
                                          checksum(data)))
                    ends[name] = off + len(data) + pad
                entries.append(blobs)
                journal.write(json.dumps({"blobs": [b.to_json() for b in blobs]}, sort_keys=True) + "\n")
                journal.flush()
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    atomic_write(out / INDEX, _index_text(header, [b for e in entries for b in e]))
    os.unlink(out / JOURNAL)
    fsync_dir(out)
    return Store.open(out)



# -- provenance, locking, atomic rebuilds, repair --------------------------------------

def source_digest(experts_iter: ExpertSource) -> str:
    """A digest of every expert's weights, in iteration order. Values are hashed as float32,
    so a bf16 checkpoint and the same weights loaded in float32 agree."""
    h = hashlib.blake2b(digest_size=16)
    for layer, expert, weights in experts_iter:
        w = weights() if callable(weights) else weights
        h.update(f"{layer},{expert};".encode())
        for name in sorted(w):
            t = w[name].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy())          # the buffer itself: no bytes copy
    return "blake2b-128:" + h.hexdigest()


@contextlib.contextmanager
def store_lock(folder, quiet: bool = False):
    """An exclusive flock on a file beside `folder` (beside, so it survives the folder being
    renamed): a second build of the same store waits for the first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"store {folder}: another process is building it; waiting", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_STORE_FILE = re.compile(r"index\.json|index\.journal|layer_\d{4,}\.bin|.*\.tmp")  # ours (and temp files)


def _swap_in(new: Path, folder: Path) -> None:
    """Rename the complete store `new` to `folder`; an old `folder` is moved aside first and
    then deleted. A crash leaves `folder` whole (old or new) or absent, never mixed."""
    old = None
    if folder.exists():
        foreign = sorted(p.name for p in folder.iterdir() if not _STORE_FILE.fullmatch(p.name))
        if foreign:
            raise ConfigError(f"{folder}: holds files that are not a store's ({', '.join(foreign[:5])}); "
                              f"refusing to replace it; use another --store folder")
        old = folder.parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(new, folder)
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_store_atomic(folder, experts_iter: ExpertSource, fmt: ExpertFormat, *, arch_info: Mapping,
                       source: Mapping | None = None, quiet: bool = False, total: int | None = None) -> Store:
    """build_store into a sibling folder (resumable there), then rename it to `folder`,
    replacing what was there. Call under store_lock(folder)."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.building"
    if (tmp / JOURNAL).exists():  # a partial build of something else is dropped, not resumed
        old_header, _ = _read_journal(tmp / JOURNAL)
        if old_header != _header(fmt, arch_info, source):
            shutil.rmtree(tmp)
    build_store(tmp, experts_iter, fmt, arch_info=arch_info, quiet=quiet, total=total, source=source,
                label=folder.name).close()
    _swap_in(tmp, folder)
    return Store.open(folder)


def bad_blobs(store: Store) -> list[BlobInfo]:
    """Blobs whose bytes on disk are truncated or fail their checksum."""
    bad = []
    buf = bytearray(max((b.length for b in store.blobs.values()), default=0))
    for info in store.blobs.values():
        try:
            store.read(info.key, buf)
        except IntegrityError:
            bad.append(info)
    return bad


def repair_store(store: Store, experts_iter: ExpertSource) -> tuple[Store, list[BlobInfo]]:
    """Verify every blob and re-encode the experts of the bad ones in place (a blob's offset and
    length are fixed by the format). Returns the reopened store and the blobs rewritten. Meant
    for a store whose recorded source matches `experts_iter` (so the bytes come out the same)."""
    bad = bad_blobs(store)
    if not bad:
        return store, []
    todo = {b.key[:2] for b in bad}
    encoder, fmt = get_encoder(store.format.name), store.format
    blobs = dict(store.blobs)
    fds: dict[str, int] = {}
    try:
        for layer, expert, weights in experts_iter:
            if (layer, expert) not in todo:
                continue
            todo.discard((layer, expert))
            for p, data in enumerate(encoder.encode(weights() if callable(weights) else weights, fmt)):
                info = blobs[Key(layer, expert, p)]
                if info.file not in fds:
                    fds[info.file] = os.open(store.path / info.file, os.O_WRONLY | os.O_CREAT, 0o644)
                _pwrite_all(fds[info.file], data + bytes(align_up(len(data)) - len(data)), info.offset)
                blobs[info.key] = dataclasses.replace(info, checksum=checksum(data))
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    if todo:
        raise ConfigError(f"{store.path}: cannot repair experts {sorted(todo)}: the source does not have them")
    header = store.header
    store.close()
    if any(blobs[k].checksum != store.blobs[k].checksum for k in blobs):  # re-encoding changed bytes
        atomic_write(store.path / INDEX, _index_text(header, list(blobs.values())))
    return Store.open(store.path), bad


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak RSS since reset_peak_rss (VmHWM), else since the process started."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_register_paper_formats()
