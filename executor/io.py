"""The executor's real I/O path: cache-bypassing blob reads, I/O worker threads, an optional
throttle that makes the host disk behave like a device's storage, and the decompression pool.

- BlobReader reads a store's blobs with pread, bypassing the page cache so that a load
  costs a real storage read, as it would on a device whose cache cannot hold the experts:
  O_DIRECT with 4096-aligned buffers where the filesystem allows it, else
  posix_fadvise(DONTNEED) on the blob's range before (and after) a buffered read.
- IOWorkers: `concurrency` threads taking read requests from one FIFO queue, so reads
  start in submission (plan) order; pread releases the GIL, so reads overlap.
- StorageThrottle: a virtual clock holding each read until the time a StorageProfile's
  device would have finished it.
- DecompressPool: FIFO worker threads for decode tasks (ZipMoE's exponent chunks).

Every task is timestamped with time.perf_counter, the clock the executor's timeline uses.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from executor.store import ALIGN, Store, align_up, pread_full
from policies.base import Key

MODES = ("o_direct", "fadvise_dontneed", "buffered")


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, page-aligned buffer of at least `nbytes` (rounded up to 4096), as O_DIRECT needs."""
    return memoryview(mmap.mmap(-1, align_up(max(nbytes, 1))))


class BufferPool:
    """Page-aligned read buffers, recycled by size. A fresh anonymous mapping per read costs
    its page faults and an munmap on every load: on this 2-core VM ~190 us for a 124 KB blob
    (4 us a page, 46 us the munmap), as much as reading it. Thread-safe (list and dict
    operations are atomic under the GIL); free buffers are kept for the run."""

    def __init__(self):
        self._free: dict[int, list] = {}

    def take(self, nbytes: int) -> memoryview:
        free = self._free.get(align_up(max(nbytes, 1)))
        try:
            return free.pop() if free else aligned_buffer(nbytes)
        except IndexError:                  # another thread took the last one
            return aligned_buffer(nbytes)

    def give(self, buf: memoryview) -> None:
        self._free.setdefault(len(buf), []).append(buf)


def buffer_address(buf) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def probe_o_direct(path) -> bool:
    """Whether an aligned O_DIRECT read of `path` works (tmpfs and some FUSE filesystems refuse)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [aligned_buffer(ALIGN)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def drop_cache(path, offset: int = 0, length: int = 0) -> bool:
    """Ask the kernel to drop a file's cached pages (length 0: to the end). False if it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class BlobReader:
    """Reads a store's blobs bypassing the page cache. Thread-safe (pread on shared fds).

    mode: "auto" picks the first that works of o_direct, fadvise_dontneed, buffered;
    `reader.mode` says which one is in use."""

    def __init__(self, store: Store, mode: str = "auto", verify: bool = True):
        if mode not in ("auto",) + MODES:
            raise ValueError(f"BlobReader mode must be auto or one of {', '.join(MODES)}; got {mode!r}")
        self.store = store
        self.verify = verify
        first = store.file_path(store.files[0]) if store.files else None
        if mode == "auto":
            if first is not None and probe_o_direct(first):
                mode = "o_direct"
            elif hasattr(os, "posix_fadvise"):
                mode = "fadvise_dontneed"
            else:
                mode = "buffered"
        elif mode == "o_direct" and first is not None and not probe_o_direct(first):
            raise OSError(f"O_DIRECT reads do not work on {first}")
        self.mode = mode
        flags = os.O_RDONLY | (os.O_DIRECT if mode == "o_direct" else 0)
        self._fds = {name: os.open(store.file_path(name), flags) for name in store.files}

    def buffer_size(self, key) -> int:
        """Bytes of buffer a read of `key` needs (the blob rounded up to the alignment)."""
        return align_up(self.store.blob_info(key).length)

    def read(self, key, buf=None) -> memoryview:
        """The blob's bytes (a view of exactly its length, into `buf` when given). With O_DIRECT,
        `buf` must be page-aligned and hold buffer_size(key) bytes (use aligned_buffer)."""
        info = self.store.blob_info(key)
        if buf is None:
            buf = aligned_buffer(info.length)
        view = memoryview(buf).cast("B")
        fd = self._fds[info.file]
        if self.mode == "o_direct":
            n = align_up(info.length)  # blobs start aligned and are padded, so read whole pages
            if len(view) < n or buffer_address(view) % ALIGN:
                raise ValueError(f"O_DIRECT read of {info.describe()} needs a {ALIGN}-aligned buffer of "
                                 f"{n} bytes; got {len(view)} bytes (use aligned_buffer)")
            got = pread_full(fd, view[:n], info.offset, direct=True)
        else:
            if len(view) < info.length:
                raise ValueError(f"buffer of {len(view)} bytes is smaller than {info.describe()}")
            if self.mode == "fadvise_dontneed":
                os.posix_fadvise(fd, info.offset, info.length, os.POSIX_FADV_DONTNEED)
            got = pread_full(fd, view[: info.length], info.offset)
            if self.mode == "fadvise_dontneed":  # and leave nothing cached behind
                os.posix_fadvise(fd, info.offset, info.length, os.POSIX_FADV_DONTNEED)
        data = view[: info.length]
        if got < info.length or self.verify:
            self.store.check(info, data, min(got, info.length))
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StorageThrottle:
    """A virtual clock that makes a faster host disk behave like a device's storage.

    A request of n bytes issued at t may start once fewer than `queue_depth` requests are
    outstanding; its transfer starts `latency` later, but not before the previous transfer
    ends (transfers are serialised at `read_bandwidth`), and lasts n / read_bandwidth.
    `reserve` returns that completion time; an I/O worker sleeps until it after the real read.
    """

    def __init__(self, read_bandwidth: float, latency: float = 0.0, queue_depth: int = 1):
        if read_bandwidth <= 0 or latency < 0 or queue_depth < 1:
            raise ValueError(f"StorageThrottle needs read_bandwidth > 0, latency >= 0, queue_depth >= 1; got "
                             f"{read_bandwidth}, {latency}, {queue_depth}")
        self.read_bandwidth = float(read_bandwidth)
        self.latency = float(latency)
        self.queue_depth = int(queue_depth)
        self._lock = threading.Lock()
        self.reset()

    @classmethod
    def from_profile(cls, storage) -> "StorageThrottle":
        """From any object with read_bandwidth (bytes/s), latency (s) and queue_depth (a StorageProfile)."""
        return cls(storage.read_bandwidth, storage.latency, getattr(storage, "queue_depth", 1))

    def reset(self) -> None:
        self._channel_free = float("-inf")
        self._completions: deque[float] = deque(maxlen=self.queue_depth)

    def reserve(self, issue: float, nbytes: int) -> float:
        """Completion time of a read of `nbytes` issued at `issue` (reservations are taken in order)."""
        with self._lock:
            if len(self._completions) == self.queue_depth:  # wait for a queue slot
                issue = max(issue, self._completions[0])
            start = max(issue + self.latency, self._channel_free)
            done = start + nbytes / self.read_bandwidth
            self._channel_free = done
            self._completions.append(done)  # completions are increasing: the oldest frees first
            return done


@dataclass(frozen=True)
class ReadResult:
    key: Key
    data: memoryview
    t_start: float   # when a worker took the request (perf_counter)
    t_end: float     # when its bytes were ready (after the throttle, if any)
    worker: int


@dataclass(frozen=True)
class TaskResult:
    tag: Any
    value: Any
    t_start: float
    t_end: float
    worker: int


_STOP = object()


class _FifoPool:
    """Threads taking tasks from one FIFO queue: tasks start in submission order."""

    def __init__(self, workers: int, name: str):
        if workers < 1:
            raise ValueError(f"{name}: need at least one worker, got {workers}")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"{name}[{i}]", daemon=True)
                         for i in range(workers)]
        self._closed = False
        for t in self._threads:
            t.start()

    def _put(self, *task) -> Future:
        if self._closed:
            raise RuntimeError("pool is closed")
        fut: Future = Future()
        self._queue.put((fut,) + task)
        return fut

    def _loop(self, worker: int) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            fut, *args = task
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._run(worker, *args))
            except BaseException as e:  # the caller sees it on the future
                fut.set_exception(e)

    def _run(self, worker: int, *args):
        raise NotImplementedError

    def close(self, wait: bool = True) -> None:
        """Finish the queued tasks, then stop the threads."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
        if wait:
            for t in self._threads:
                t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IOWorkers(_FifoPool):
    """`concurrency` reader threads; submit(key) -> Future[ReadResult]. Use
    future.add_done_callback for a completion callback (it runs on the worker thread)."""

    def __init__(self, reader: BlobReader, concurrency: int = 1, throttle: StorageThrottle | None = None):
        self.reader = reader
        self.throttle = throttle
        super().__init__(concurrency, "io")

    def submit(self, key, buf=None) -> Future:
        return self._put(Key(*key), buf)

    def _run(self, worker: int, key: Key, buf) -> ReadResult:
        t_start = time.perf_counter()
        done = self.throttle.reserve(t_start, self.reader.store.blob_info(key).length) if self.throttle else None
        data = self.reader.read(key, buf)
        if done is not None:
            wait = done - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        return ReadResult(key, data, t_start, time.perf_counter(), worker)


class DecompressPool(_FifoPool):
    """`workers` threads running decode callables in FIFO order; submit -> Future[TaskResult].
    Codecs (zstd, lz4) and numpy release the GIL, so tasks run in parallel."""

    def __init__(self, workers: int = 1):
        super().__init__(workers, "decompress")

    def submit(self, fn: Callable, *args, tag: Any = None, **kwargs) -> Future:
        return self._put(fn, args, kwargs, tag)

    def _run(self, worker: int, fn: Callable, args: tuple, kwargs: dict, tag: Any) -> TaskResult:
        t_start = time.perf_counter()
        value = fn(*args, **kwargs)
        return TaskResult(tag, value, t_start, time.perf_counter(), worker)
