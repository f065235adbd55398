"""An expert store's index (index.json) and build journal (index.journal): their names and their
schema, read and written here only (the store's layout: executor/store.py).

Torch-free and below the formats' constructor, so that the simulator reads a store's format
(workloads/formats.py stored_format) from the same reader the executor opens stores with.

    index.json      the header pretty-printed (store version, alignment, checksum kind, format,
                    arch, source), then one line per blob: layer, expert, part, file, offset,
                    length, resident, checksum (crc32, 8 hex digits)
    index.journal   while a build is in progress: the header on the first line, then one line
                    {"blobs": [...]} per expert written

A blob row here is the tuple (layer, expert, part, file, offset, length, resident, checksum);
the executor's BlobInfo is built from it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from devices.units import ConfigError

ALIGN = 4096
INDEX = "index.json"
JOURNAL = "index.journal"
STORE_VERSION = 1
FILE_RE = re.compile(r"layer_\d{4,}\.bin")
ROW_FIELDS = ("layer", "expert", "part", "file", "offset", "length", "resident", "checksum")


def index_field(obj: Any, name: str, kind, where: str, path: Path):
    """obj[name], which must be a `kind` (a bool is no int); else a ConfigError naming the field."""
    if not isinstance(obj, dict) or name not in obj:
        raise ConfigError(f"{path}: missing field {where}{name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}: field {where}{name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def is_complete(folder) -> bool:
    """The folder holds a finished store: an index and no build in progress."""
    folder = Path(folder)
    return (folder / INDEX).exists() and not (folder / JOURNAL).exists()


# -- the header ----------------------------------------------------------------------------------

def index_header(fmt_description: Mapping, arch_info: Mapping, source: Mapping | None = None) -> dict:
    """The header of a store of the format described by `fmt_description` (workloads/formats.py
    describe_format), normalised (tuples -> lists) so headers compare equal after a JSON round trip."""
    header = {"moelab_store": STORE_VERSION, "alignment": ALIGN, "checksum": "crc32",
              "format": dict(fmt_description), "arch": dict(arch_info)}
    if source is not None:
        header["source"] = dict(source)
    try:
        return json.loads(json.dumps(header))
    except TypeError as e:
        raise ConfigError(f"arch_info must be JSON-serialisable: {e}") from None


def read_index(folder) -> dict:
    """The parsed index.json of the store in `folder`, its top-level fields checked (the format's
    are checked by workloads/formats.py format_from_index, the blobs' by blob_rows)."""
    path = Path(folder) / INDEX
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no index; not an expert store (or its build never finished)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    version = index_field(data, "moelab_store", int, "", path)
    if version != STORE_VERSION:
        raise ConfigError(f"{path}: field 'moelab_store' is {version}; this moelab reads version {STORE_VERSION}")
    if index_field(data, "alignment", int, "", path) != ALIGN:
        raise ConfigError(f"{path}: field 'alignment' must be {ALIGN}, got {data['alignment']}")
    if index_field(data, "checksum", str, "", path) != "crc32":
        raise ConfigError(f"{path}: field 'checksum' must be 'crc32', got {data['checksum']!r}")
    index_field(data, "arch", dict, "", path)
    return data


def header_of(data: Mapping) -> dict:
    """An index without its blobs: what a build compares against the header it would write."""
    return {k: v for k, v in data.items() if k != "blobs"}


# -- blob rows -----------------------------------------------------------------------------------

def row_json(row: tuple) -> dict:
    """A blob row as it is written (the checksum as 8 hex digits)."""
    out = dict(zip(ROW_FIELDS, row))
    out["checksum"] = f"{row[7]:08x}"
    return out


def row_from_json(b: Mapping) -> tuple:
    """A blob row as written by row_json, unchecked (KeyError, TypeError, ValueError if malformed)."""
    return (*(b[f] for f in ROW_FIELDS[:7]), int(b["checksum"], 16))


def blob_rows(data: Mapping, fmt, path: Path) -> list[tuple]:
    """The checked blob rows of an index read by read_index, for a store of format `fmt`."""
    rows = [_check_row(b, i, fmt, path) for i, b in enumerate(index_field(data, "blobs", list, "", path))]
    seen: set[tuple] = set()
    for i, r in enumerate(rows):
        if r[:3] in seen:
            raise ConfigError(f"{path}: field 'blobs[{i}]': key {r[:3]} appears twice")
        seen.add(r[:3])
    return rows


def _check_row(b: Any, i: int, fmt, path: Path) -> tuple:
    where = f"blobs[{i}]."
    if not isinstance(b, dict):
        raise ConfigError(f"{path}: field 'blobs[{i}]' must be an object, got {b!r}")
    layer, expert, part, offset = (index_field(b, n, int, where, path) for n in ("layer", "expert", "part", "offset"))
    length, resident = index_field(b, "length", int, where, path), index_field(b, "resident", int, where, path)
    file, crc = index_field(b, "file", str, where, path), index_field(b, "checksum", str, where, path)
    if layer < 0 or expert < 0:
        raise ConfigError(f"{path}: fields {where}layer/expert must be >= 0, got {layer}, {expert}")
    if not 0 <= part < fmt.n_parts:
        raise ConfigError(f"{path}: field {where}'part' must be in 0..{fmt.n_parts - 1} for format {fmt.name}, got {part}")
    if not FILE_RE.fullmatch(file):  # plain names only: an index never points outside its folder
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
    return layer, expert, part, file, offset, length, resident, int(crc, 16)


# -- writing ------------------------------------------------------------------------------------

def index_text(header: Mapping, rows: list[tuple]) -> str:
    """index.json: the header pretty-printed, then one line per blob (diffable, compact)."""
    head = json.dumps(header, indent=1, sort_keys=True)[:-2]  # without the closing "\n}"
    lines = ",\n  ".join(json.dumps(row_json(r), sort_keys=True) for r in rows)
    return f'{head},\n "blobs": [\n  {lines}\n ]\n}}\n' if rows else f'{head},\n "blobs": []\n}}\n'


def journal_line(header_or_rows) -> str:
    """One journal line: the header (a dict), or the blob rows of one expert (a list)."""
    obj = header_or_rows if isinstance(header_or_rows, dict) else {"blobs": [row_json(r) for r in header_or_rows]}
    return json.dumps(obj, sort_keys=True) + "\n"


def read_journal(path: Path, entry: Callable[[tuple], Any] = tuple) -> tuple[dict | None, list[list]]:
    """The journal's header and, per expert written, [entry(row) for its rows]; reading stops at the
    first line that is torn (a crash mid-write) or malformed."""
    lines = Path(path).read_bytes().split(b"\n")
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
            entries.append([entry(row_from_json(b)) for b in blobs])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            break
    return header, entries
