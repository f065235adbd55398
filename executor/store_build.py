"""Building the expert store (its layout: executor/store.py): resumable builds, atomic rebuilds
under a lock, provenance and repair.

build_store writes each expert's blobs and records them in index.journal, so an interrupted
build resumes; index.json is written last. The header records what the store was built from
("source": a digest of the experts' weights, see source_digest) beside the format options.
build_store_atomic builds into a sibling folder and renames it into place, under a lock
(store_lock), so a store folder is always one whole store; repair_store rewrites bad blobs.
ensure_store puts them together for a model: the store of its experts, reused, built, rebuilt
or repaired.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import torch
from tqdm import tqdm

from devices.atomic import atomic_write, fsync_dir
from devices.units import ConfigError
from executor.encoders import get_encoder
from executor.model import MoETransformer, model_arch
from executor.store import BlobInfo, IntegrityError, Store, align_up, checksum, read_store_index
from executor.weights import Weights
from executor.zipcodec import encode_expert
from policies.base import Key
from workloads.formats import ZIP_HEADER_BYTES, ExpertFormat, describe_format, format_options, make_format
from workloads.store_index import (FILE_RE, INDEX, JOURNAL, index_header, index_text, is_complete, journal_line,
                                   read_journal)

ExpertSource = Iterable[tuple[int, int, Union[Weights, Callable[[], Weights]]]]


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _header(fmt: ExpertFormat, arch_info: Mapping, source: Mapping | None = None) -> dict:
    return index_header(describe_format(fmt), arch_info, source)


def data_file(layer: int) -> str:
    return f"layer_{layer:04d}.bin"


def _recover(out: Path, header: dict, fmt: ExpertFormat) -> list[list[BlobInfo]]:
    """Experts already written by an earlier (possibly interrupted) build, verified, in write order."""
    journal, index = out / JOURNAL, out / INDEX
    old_header, entries = None, []
    if journal.exists():
        old_header, entries = read_journal(journal, BlobInfo.from_row)
    elif index.exists():
        old_header, _, blobs = read_store_index(out)
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
    atomic_write(out / JOURNAL, "".join(journal_line(x) for x in [header] + [[b.row() for b in e] for e in kept]))
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
                journal.write(journal_line([b.row() for b in blobs]))
                journal.flush()
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    atomic_write(out / INDEX, index_text(header, [b.row() for e in entries for b in e]))
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


# a store's own files (and temp files)
_STORE_FILE = re.compile("|".join([re.escape(INDEX), re.escape(JOURNAL), FILE_RE.pattern, r".*\.tmp"]))


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
        old_header, _ = read_journal(tmp / JOURNAL)
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
        atomic_write(store.path / INDEX, index_text(header, [b.row() for b in blobs.values()]))
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


# -- the store of a model ---------------------------------------------------------------------

def model_experts(model: MoETransformer):
    """(layer, expert, weights) of every resident expert, for build_store."""
    for i, layer in enumerate(model.moe_layers):
        for j, expert in enumerate(layer.experts):
            yield i, j, expert.weights()


def ensure_store(model: MoETransformer, folder, fmt_name: str = "bf16", quiet: bool = False, *,
                 verify: bool = False, experts=None, **fmt_options) -> Store:
    """The store in `folder` of the model's experts in format `fmt_name`, built if needed.

    `experts`: a zero-argument callable returning (layer, expert, weights or a loader of them)
    for every expert; default: the model's resident experts (a checkpoint reader passes a lazy
    one, so only one expert is in memory at a time). The store records a digest of those weights:
    a store built from other weights is rebuilt; one of another format or options is refused.
    Builds go to a sibling folder renamed into place, under a lock (a concurrent build waits).
    verify=True (`moelab store build`) reads every blob and rewrites the bad ones.
    The returned store's build_info says what happened (reused / built / rebuilt / repaired)."""
    reset_peak_rss()            # build_info's peak covers this call only
    arch = model_arch(model)
    experts = experts or (lambda: model_experts(model))
    if fmt_name == "zip" and "exponent_ratio" not in fmt_options:
        fmt_options["exponent_ratio"] = measured_exponent_ratio(model, fmt_options.get("chunks", 3),
                                                                fmt_options.get("codec", "lz4hc"), experts=experts)
    fmt = make_format(fmt_name, arch.expert_shapes, **fmt_options)
    folder = Path(folder)
    source = {"digest": source_digest(experts())}

    def note(msg: str) -> None:
        if not quiet:
            print(f"store {folder}: {msg}", file=sys.stderr)

    with store_lock(folder, quiet):
        reason = "new"
        if is_complete(folder):
            try:
                store = Store.open(folder)
            except ConfigError as e:
                store, reason = None, f"unreadable ({e})"
            if store is not None and store.format != fmt:
                raise ConfigError(f"{folder}: holds a {store.format.name} store with options "
                                  f"{store.header['format']['options']} and shapes {store.header['format']['shapes']}; "
                                  f"asked for {fmt.name} with {format_options(fmt)} and shapes "
                                  f"{[list(x) for x in fmt.shapes]}: refusing to overwrite it; "
                                  f"use another --store folder (or delete this one)")
            if store is not None and store.header.get("source") == source:
                if not verify:
                    store.build_info = {"action": "reused"}
                    return store
                store, bad = repair_store(store, experts())
                store.build_info = {"action": "repaired" if bad else "verified", "blobs": len(store.blobs),
                                    "repaired": [list(b.key) for b in bad]}
                note(f"verified {len(store.blobs)} blobs" + (f"; rewrote {len(bad)} bad ones: "
                     + ", ".join(b.describe() for b in bad[:4]) + (" ..." if len(bad) > 4 else "") if bad else ""))
                return store
            if store is not None:
                old = store.header.get("source", {}).get("digest")
                store.close()
                reason = (f"built from other weights (digest {old}, the model's is {source['digest']})" if old
                          else "built before stores recorded their source weights")
        elif folder.exists() and any(folder.iterdir()):
            reason = "an unfinished build"
        if reason != "new":
            note(f"{reason}: rebuilding it")
        info = {"layers": arch.layers, "experts": arch.experts, "d_model": arch.d_model, "d_ff": arch.d_ff}
        t0 = time.perf_counter()
        store = build_store_atomic(folder, experts(), fmt, arch_info=info, source=source, quiet=quiet,
                                   total=arch.layers * arch.experts)
        store.build_info = {"action": "built" if reason == "new" else "rebuilt", "reason": reason,
                            "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
        note(f"built {len(store.blobs)} blobs in {store.build_info['seconds']:.1f} s, peak RSS "
             f"{store.build_info['peak_rss_bytes'] / 1e6:.0f} MB")
        return store


def measured_exponent_ratio(model: MoETransformer, chunks: int, codec: str, sample: int = 8,
                            margin: float = 1.03, experts=None) -> float:
    """ZipFormat's exponent_ratio for this model: the worst chunk's compressed/raw ratio over a
    sample of experts, plus a margin (every chunk must fit its fixed-size part). `experts`: as
    in ensure_store (default: the model's resident experts)."""
    worst = 0.0
    for i, (_, _, w) in enumerate(model_experts(model) if experts is None else experts()):
        if i >= sample:
            break
        w = w() if callable(w) else w
        mats = [w[k].to(torch.bfloat16) for k in ("w1", "w3", "w2") if k in w]
        parts = encode_expert(mats, chunks=chunks, codec=codec)
        n = sum(m.numel() for m in mats)
        raw = n / chunks
        worst = max(worst, max((len(p) - ZIP_HEADER_BYTES) / raw for p in parts[1:]))
    return min(1.1, worst * margin)
