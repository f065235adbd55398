"""Where a sweep's runs execute: here (one job), in local worker processes, or on a Dask
cluster. Rows come back as runs finish.

An interruption stops every run at once: Ctrl-C (SIGINT, which a terminal or `timeout`
sends to the whole process group) and SIGTERM (`kill`, a batch system) both raise in the
parent alone, which cancels what has not started and ends the workers, or cancels the
cluster's futures and closes the client, so the sweep exits promptly (status 130) and
leaves nothing running. Workers ignore SIGINT: one that raised there mid-task would leave
the pool waiting on it. On Linux a worker also dies with its parent, so even `kill -9` of
the sweep leaves no worker behind.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterable, Iterator

from devices.units import ConfigError

_PR_SET_PDEATHSIG = 1      # linux/prctl.h


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: the same cleanup, the same exit (130)."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the block runs: by default it ends
    the process where it stands, with no cleanup, and its workers run on orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield                     # only the main thread may set handlers (a caller's own thread)
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while we clean up after the first: a second Ctrl-C there
    would abandon the workers half-stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def execute(fn: Callable, todo: list, jobs: int | None = None, cluster: str | None = None) -> Iterator:
    """fn(config) for every config of `todo` (picklable), as each finishes: on a Dask cluster,
    in local processes, or here (one job). Close the iterator (or let an exception through)
    to stop every run still going."""
    if not todo:
        return
    if cluster:
        yield from _on_dask(fn, todo, cluster)
        return
    jobs = min(jobs or os.cpu_count() or 1, len(todo))
    if jobs == 1:
        yield from map(fn, todo)          # here: Ctrl-C and SIGTERM raise in the run itself
        return
    yield from _in_processes(fn, todo, jobs)


# -- local processes ------------------------------------------------------------------------------
def _in_processes(fn, todo: list, jobs: int) -> Iterator:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    pool = ProcessPoolExecutor(jobs, initializer=_worker_start, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(fn, c) for c in todo]
        for fut in as_completed(futures):
            yield fut.result()
    except BaseException:         # Ctrl-C, SIGTERM, a failed run, or the caller stopped reading
        _stop(pool)
        raise
    pool.shutdown()


def _worker_start(parent: int) -> None:
    """In each worker: only the parent answers Ctrl-C; SIGTERM ends the worker at once (the
    parent's handler, inherited by the fork, would turn it into a failed task); and the worker
    dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return                # no prctl here: the parent's cleanup still ends us
        if os.getppid() != parent:
            os._exit(1)           # the parent died before prctl took effect


def _stop(pool) -> None:
    """Cancel the runs not started and end the workers now. `shutdown(wait=True)` would wait
    for every run in flight, and a worker left running outlives the sweep."""
    workers = list((getattr(pool, "_processes", None) or {}).values())    # no public handle on them
    with _held():
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers:
            p.terminate()
        for p in workers:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)


# -- Dask ---------------------------------------------------------------------------------------------
def _on_dask(fn, todo: list, cluster: str) -> Iterator:
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise ConfigError("--cluster needs dask.distributed: pip install 'moelab[cluster]'") from None
    try:
        client = Client(cluster, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"--cluster {cluster}: cannot connect ({e})") from None
    futures = []
    try:
        futures = client.map(fn, todo, pure=False)
        for fut in as_completed(futures):
            yield fut.result()
    except BaseException:
        with _held():
            _cancel(client, futures)
        raise
    client.close()


def _cancel(client, futures: Iterable) -> None:
    """Cancel the sweep's futures on the cluster (the workers drop the queued runs), then
    close the client; a cluster gone away already is no reason to hang or hide the first error."""
    try:
        client.cancel(list(futures), force=True)
    except Exception:
        pass
    try:
        client.close(timeout=5)
    except Exception:
        pass
