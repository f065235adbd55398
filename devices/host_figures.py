"""compute.measured.host: the figures of the structural host model (issue 24 item 1), read from a
profile that `moelab profile` measured (executor/profile_gil.py measures them; sim/host_model.py
charges them).

Each of the executor's operations is described by two shares of its wall time when it runs alone
on the host (its table's time): `lock`, the share spent holding the interpreter lock (Python code),
and `cpu`, its CPU seconds per wall second (the cores it keeps busy on average: above 1 for a
kernel on several torch threads, below 1 for a read that waits on the device). A pair is written
`[lock, cpu]`, with 0 <= lock <= 1 and lock <= cpu:

      host:
        cores: 2                        # the cores the profile was measured on (`--cores`)
        calls:                          # per format key, per level, per token count of `tokens`
          bf16: [[[0.21, 1.0], [0.15, 1.0]]]
        dense:                          # one layer's dense part, per token count
          prefill: [[0.3, 1.0], [0.2, 1.0]]
          decode: [[0.3, 1.0], [0.25, 1.0]]
        decide: [0.98, 1.0]             # the decision path
        read:                           # a read of a format's blob (BlobReader.read + the future), of its
          bf16: [0.04, 0.35]            #   host time (latency + bytes / bandwidth of the host's own storage)
        decompress:                     # a decompression task per codec, and its rate alone (raw bytes/s)
          lz4: {share: [0.01, 1.0], rate: 1.4GB/s}
        beside:                         # optional: measured co-runs (executor/profile_beside.py), per
          read:                         #   background kind (a format's reads, a codec's decompressions):
            bf16:                       #   per main-thread operation [main slowdown beside 1 and 2 of
              alone: [1.0, 1.4]         #   them, their slowdown beside it with 1 and 2]; alone: theirs
              calls: {bf16: [[[1.2, 1.9, 1.1, 1.5]]]}   #   with no main-thread work, 1 and 2 at once
              dense: {prefill: [[1.1, 1.3, 1.2, 1.4]], decode: [[1.1, 1.3, 1.2, 1.4]]}
              decide: [1.5, 2.2, 1.3, 1.6]
          decompress:
            lz4hc: {...}                # the same, with zip's calls, and optionally
              rate: 230MB/s             #   raw bytes/s of its task's event alone on the pool
              across: [2.0, 2.3, 1.9, 2.4]   # it beside 1 and 2 read threads; a read beside 1 and 2 of it

With `beside`, sim/host_model.py charges the measured co-run slowdowns (sim/host_beside.py) instead
of the lock and core shares: CPython's interpreter lock is not a first-come-first-served server (a
thread that releases it for a short kernel mostly takes it back before a waiter wakes; a waiter
gets it at the switch interval or a long release), so the shares alone mispredict a co-run by
several times (a tiny-moe zip call of 242 us took 2.4 ms beside one decompression worker and 8 ms
beside two on 2 cores; 0.48 and 0.76 ms on 1 core).
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.units import parse_bandwidth

KEYS = {"cores", "calls", "dense", "decide", "read", "decompress"}
OPTIONAL = frozenset({"beside"})
BESIDE_KINDS = ("read", "decompress")


@dataclass(frozen=True)
class Share:
    lock: float     # share of its wall time alone holding the interpreter lock
    cpu: float      # CPU seconds per wall second alone (the cores it keeps busy)


Slow = tuple[float, float, float, float]   # main slowdown beside 1 and 2 workers; theirs beside it, 1 and 2


@dataclass(frozen=True)
class BesideFigures:
    """One background kind's measured co-runs with each main-thread operation."""
    alone: tuple[float, float]                          # its slowdown with no main-thread work, 1 and 2 at once
    calls: dict[str, tuple[tuple[Slow, ...], ...]]      # format key -> level -> per token count
    dense_prefill: tuple[Slow, ...]
    dense_decode: tuple[Slow, ...]
    decide: Slow
    rate: float | None = None                           # a decompression's raw bytes/s on the pool alone
    across: tuple[float, float, float, float] | None = None   # it beside 1 and 2 of the other kind; they beside 1 and 2 of it


@dataclass(frozen=True)
class HostFigures:
    cores: int
    calls: dict[str, tuple[tuple[Share, ...], ...]]     # format key -> level -> per token count
    dense_prefill: tuple[Share, ...]
    dense_decode: tuple[Share, ...]
    decide: Share
    read: dict[str, Share]                              # format key -> a read of its blobs
    decompress: dict[str, tuple[Share, float]]          # codec -> (share, raw bytes/s alone)
    beside: dict[str, dict[str, BesideFigures]] | None = None   # kind -> format key or codec -> co-runs


def read_host(r, value, key: str, n: int) -> HostFigures:
    """compute.measured.host through the profile reader `r` (devices/profile.py _Reader): every error
    names the file and the key; `n` token counts per row."""
    v = r.mapping(value, key, KEYS, OPTIONAL)

    def share(x, where: str) -> Share:
        if (not isinstance(x, list) or len(x) != 2
                or any(isinstance(y, bool) or not isinstance(y, (int, float)) for y in x)
                or not 0 <= x[0] <= 1 or x[1] < x[0]):
            raise r.fail(where, f"expected [lock, cpu] with 0 <= lock <= 1 and lock <= cpu, got {x!r}")
        return Share(float(x[0]), float(x[1]))

    def row(x, where: str) -> tuple[Share, ...]:
        if not isinstance(x, list) or len(x) != n:
            raise r.fail(where, f"expected a list of {n} [lock, cpu] pairs (one per entry of tokens), got {x!r}")
        return tuple(share(y, f"{where}[{i}]") for i, y in enumerate(x))

    def table(x, where: str) -> dict:
        if not isinstance(x, dict) or not x:
            raise r.fail(where, f"expected a mapping, got {x!r}")
        return x

    calls = {}
    for fmt, levels in table(v["calls"], f"{key}.calls").items():
        if not isinstance(levels, list) or not levels:
            raise r.fail(f"{key}.calls.{fmt}", f"expected a list of rows (one per level), got {levels!r}")
        calls[str(fmt)] = tuple(row(x, f"{key}.calls.{fmt}[{i}]") for i, x in enumerate(levels))
    dense = r.mapping(v["dense"], f"{key}.dense", {"prefill", "decode"})
    decompress = {}
    for codec, x in table(v["decompress"], f"{key}.decompress").items():
        where = f"{key}.decompress.{codec}"
        x = r.mapping(x, where, {"share", "rate"})
        decompress[str(codec)] = (share(x["share"], f"{where}.share"),
                                  r.quantity(x["rate"], f"{where}.rate", parse_bandwidth, "1.4GB/s"))
    return HostFigures(cores=r.count(v["cores"], f"{key}.cores"), calls=calls,
                       beside=read_beside(r, v["beside"], f"{key}.beside", n) if "beside" in v else None,
                       dense_prefill=row(dense["prefill"], f"{key}.dense.prefill"),
                       dense_decode=row(dense["decode"], f"{key}.dense.decode"),
                       decide=share(v["decide"], f"{key}.decide"),
                       read={str(k): share(x, f"{key}.read.{k}") for k, x in table(v["read"], f"{key}.read").items()},
                       decompress=decompress)


def read_beside(r, value, key: str, n: int) -> dict[str, dict[str, BesideFigures]]:
    """compute.measured.host.beside: kind (read, decompress) -> format key or codec -> its co-runs."""
    def slow(x, where: str, size: int = 4, what: str | None = None):
        what = what or ("main beside 1 and 2, theirs beside it with 1 and 2" if size == 4 else "with 1 and 2 at once")
        if (not isinstance(x, list) or len(x) != size
                or any(isinstance(y, bool) or not isinstance(y, (int, float)) or y < 1 for y in x)):
            raise r.fail(where, f"expected {size} slowdowns >= 1 ({what}), got {x!r}")
        return tuple(float(y) for y in x)

    def row(x, where: str):
        if not isinstance(x, list) or len(x) != n:
            raise r.fail(where, f"expected a list of {n} entries (one per entry of tokens), got {x!r}")
        return tuple(slow(y, f"{where}[{i}]") for i, y in enumerate(x))

    out = {}
    for kind, table in r.mapping(value, key, frozenset(), frozenset(BESIDE_KINDS)).items():
        if not isinstance(table, dict) or not table:
            raise r.fail(f"{key}.{kind}", f"expected a mapping of {'format key' if kind == 'read' else 'codec'} -> co-runs")
        out[kind] = {}
        for name, doc in table.items():
            where = f"{key}.{kind}.{name}"
            d = r.mapping(doc, where, {"alone", "calls", "dense", "decide"},
                          frozenset({"rate", "across"}) if kind == "decompress" else frozenset())
            calls = d["calls"]
            if not isinstance(calls, dict) or not calls:
                raise r.fail(f"{where}.calls", f"expected a mapping of format key -> rows per level, got {calls!r}")
            dense = r.mapping(d["dense"], f"{where}.dense", {"prefill", "decode"})
            out[kind][str(name)] = BesideFigures(
                alone=slow(d["alone"], f"{where}.alone", 2),
                calls={str(f): tuple(row(x, f"{where}.calls.{f}[{i}]") for i, x in enumerate(levels))
                       for f, levels in calls.items()},
                dense_prefill=row(dense["prefill"], f"{where}.dense.prefill"),
                dense_decode=row(dense["decode"], f"{where}.dense.decode"),
                decide=slow(d["decide"], f"{where}.decide"),
                rate=r.quantity(d["rate"], f"{where}.rate", parse_bandwidth, "230MB/s") if "rate" in d else None,
                across=slow(d["across"], f"{where}.across", what="it beside 1 and 2 read threads, a read beside 1 "
                            "and 2 of it") if "across" in d else None)
    return out
