"""The real I/O path: cache-bypassing reader, I/O workers, throttle arithmetic, decompression pool."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from executor.io import (MODES, BlobReader, DecompressPool, IOWorkers, StorageThrottle, aligned_buffer,
                         buffer_address, probe_o_direct)
from executor.store import ALIGN, IntegrityError
from executor.store_build import build_store
from executor.weights import matrix_names
from workloads.formats import make_format

SHAPES = [(96, 40), (96, 40), (40, 96)]  # 23040 bytes per expert: not a multiple of 4096


def _weights(layer, expert, fmt):
    g = torch.Generator().manual_seed(100 * layer + expert)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in zip(matrix_names(fmt), fmt.shapes)}


@pytest.fixture
def store(tmp_path):
    fmt = make_format("bf16", SHAPES)
    src = ((l, e, _weights(l, e, fmt)) for l in range(2) for e in range(8))
    return build_store(tmp_path, src, fmt, arch_info={"name": "toy"}, quiet=True)


def supported_modes(store) -> list[str]:
    modes = ["buffered"]
    if hasattr(os, "posix_fadvise"):
        modes.append("fadvise_dontneed")
    if probe_o_direct(store.file_path(store.files[0])):
        modes.append("o_direct")
    return modes


def test_reader_returns_the_same_bytes_in_every_mode(store):
    want = {k: bytes(store.read(k)) for k in store.keys()}
    for mode in supported_modes(store):
        with BlobReader(store, mode) as r:
            assert r.mode == mode
            for k in store.keys():
                assert bytes(r.read(k)) == want[k], (mode, k)
            buf = aligned_buffer(r.buffer_size((1, 3, 0)))
            assert bytes(r.read((1, 3, 0), buf)) == want[(1, 3, 0)]
    with BlobReader(store) as auto:
        assert auto.mode in MODES and auto.mode in supported_modes(store)


def test_aligned_buffer_and_o_direct_buffer_check(store):
    buf = aligned_buffer(5000)
    assert len(buf) == 2 * ALIGN and buffer_address(buf) % ALIGN == 0
    if "o_direct" not in supported_modes(store):
        pytest.skip("O_DIRECT does not work on this filesystem")
    with BlobReader(store, "o_direct") as r:
        with pytest.raises(ValueError, match="aligned"):
            # one byte past an aligned address: misaligned always (a sliced bytearray's copy may land
            # on an aligned address by chance)
            size = r.buffer_size((0, 0, 0))
            r.read((0, 0, 0), memoryview(aligned_buffer(size + ALIGN))[1:size + 1])


def test_reader_detects_corruption_and_truncation_in_every_mode(store):
    info = store.blob_info((0, 5, 0))
    with open(store.file_path(info.file), "r+b") as f:
        f.seek(info.offset + 3)
        f.write(b"\x00\x01\x02")
    last = store.blob_info((1, 7, 0))
    os.truncate(store.file_path(last.file), last.offset + last.length - 1)
    for mode in supported_modes(store):
        with BlobReader(store, mode) as r:
            with pytest.raises(IntegrityError, match=r"corrupted blob \(layer 0, expert 5, part 0\) in layer_0000"):
                r.read((0, 5, 0))
            with pytest.raises(IntegrityError, match=r"truncated blob \(layer 1, expert 7, part 0\) in layer_0001"):
                r.read((1, 7, 0))
        with BlobReader(store, mode, verify=False) as r:
            r.read((0, 5, 0))  # unchecked reads skip the checksum, never the length
            with pytest.raises(IntegrityError, match="truncated"):
                r.read((1, 7, 0))


def test_ioworkers_start_in_submission_order_at_concurrency_1(store):
    keys = list(reversed(store.keys()))
    with IOWorkers(BlobReader(store), concurrency=1) as io:
        results = [f.result() for f in [io.submit(k) for k in keys]]
    assert [r.key for r in results] == keys
    for a, b in zip(results, results[1:]):
        assert a.t_start <= a.t_end <= b.t_start
    assert {r.worker for r in results} == {0}


def test_ioworkers_deliver_everything_at_concurrency_4(store):
    want = {k: bytes(store.read(k)) for k in store.keys()}
    done, lock = [], threading.Lock()

    def record(fut):
        with lock:
            done.append(fut.result().key)

    with IOWorkers(BlobReader(store), concurrency=4) as io:
        futs = [io.submit(k) for k in store.keys() * 3]
        for f in futs:
            f.add_done_callback(record)
        results = [f.result() for f in futs]
        bad = io.submit((9, 9, 0))
        with pytest.raises(KeyError):
            bad.result()
    assert sorted(done) == sorted(store.keys() * 3)
    assert all(bytes(r.data) == want[r.key] for r in results)
    assert all(0 <= r.worker < 4 and r.t_start <= r.t_end for r in results)


def test_throttle_completion_times_hand_computed():
    # 100 B/s, 1 s latency. Serial device (queue depth 1): each request waits for the previous.
    t = StorageThrottle(read_bandwidth=100, latency=1.0, queue_depth=1)
    assert [t.reserve(0.0, 100) for _ in range(3)] == [2.0, 4.0, 6.0]
    # queue depth 2: latency overlaps the previous transfer; the third waits for a slot (t=2)
    t = StorageThrottle(read_bandwidth=100, latency=1.0, queue_depth=2)
    assert [t.reserve(0.0, 100) for _ in range(3)] == [2.0, 3.0, 4.0]
    # a request issued after the channel is idle starts from its own issue time
    assert t.reserve(10.0, 50) == 11.5
    # deep queue: transfers are serialised at the bandwidth, latency paid once up front
    t = StorageThrottle(read_bandwidth=1000, latency=0.5, queue_depth=8)
    assert [t.reserve(0.0, 250) for _ in range(4)] == [0.75, 1.0, 1.25, 1.5]
    t.reset()
    assert t.reserve(0.0, 1000) == 1.5
    with pytest.raises(ValueError):
        StorageThrottle(read_bandwidth=0)


def test_throttle_from_profile_and_in_workers(store):
    class Profile:  # duck-typed StorageProfile
        read_bandwidth, latency, queue_depth = 50e6, 0.002, 4

    t = StorageThrottle.from_profile(Profile)
    assert (t.read_bandwidth, t.latency, t.queue_depth) == (50e6, 0.002, 4)
    with IOWorkers(BlobReader(store), concurrency=2, throttle=t) as io:
        results = [f.result() for f in [io.submit(k) for k in store.keys()[:4]]]
    # every read is held at least until the modelled device would have finished it
    first = results[0]
    assert first.t_end >= first.t_start + 0.002 + store.blob_info(first.key).length / 50e6


def test_decompress_pool_fifo_and_errors():
    with DecompressPool(workers=1) as pool:
        res = [f.result() for f in [pool.submit(pow, i, 2, tag=i) for i in range(10)]]
    assert [r.value for r in res] == [i * i for i in range(10)] and [r.tag for r in res] == list(range(10))
    assert all(a.t_end <= b.t_start for a, b in zip(res, res[1:]))
    with DecompressPool(workers=3) as pool:
        futs = [pool.submit(lambda x: x + 1, i) for i in range(50)]
        err = pool.submit(lambda: 1 / 0)
        assert sorted(f.result().value for f in futs) == list(range(1, 51))
        with pytest.raises(ZeroDivisionError):
            err.result()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 1, 1)
