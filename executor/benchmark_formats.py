"""Figures of the two expert formats on this machine; prints one JSON line.

    python -m executor.benchmark_formats [--quiet] [--repeats N]

- MWQ: relative Frobenius error of every level of V1 (INT2/3/4) and V2 (INT5..8) on a
  1408x2048 matrix of Gaussian and Student-t (df 3 and 5) weights, next to plain per-group
  INT of the same bits; dequantization time of a DeepSeek-V2-Lite-sized expert (3 matrices,
  2048x1408) per level, and its ratio to the time torch takes to multiply the dequantized
  weights by 16 tokens (float32, the dequantizer's output).
- ZipMoE codec: expert ratio (stored bytes / BF16 bytes) and exponent ratio per codec on
  Gaussian and Student-t (df 4) BF16 experts; encode and decode throughput in GB/s of BF16
  with 1 and 2 threads; next to the decode speedup of 2 threads, that of the decompression
  alone and of plain numpy copies (memcpy_2_thread_speedup), the ceiling on this machine.

Timings are the best of `--repeats` runs during which other processes left the CPUs alone
(the machine is shared; see best_times); what is compared is timed in turn.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from executor import mwq
from executor import zipcodec as zc
from workloads.formats import MWQ_LADDERS, split_sizes

SHAPES = [(1408, 2048), (1408, 2048), (2048, 1408)]   # w1, w3 [d_ff, d_model]; w2 [d_model, d_ff]
TOKENS = 16


def sample(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    if kind != "gauss":
        df = int(kind[1:])
        z = z / ((torch.randn((df,) + tuple(shape), generator=g) ** 2).mean(0)).sqrt()   # Student-t(df)
    return z * 0.02


def _ticks() -> tuple[int, int]:
    """(CPU ticks of the whole machine, of this process) so far; (0, 0) without /proc."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    t = os.times()
    return sum(v) - v[3] - v[4], round((t.user + t.system) * _HZ)


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
UNDISTURBED = {"runs": 0, "tries": 0}


def best_times(fns, repeats: int, rounds: int | None = None, warm: bool = True) -> list[float]:
    """Best time of each function over `repeats` rounds that run them in turn (so that they
    see the same conditions), counting only runs during which other processes used under
    10% of a core (this machine is shared); at most `rounds` (10 * repeats) rounds. A function
    with no undisturbed run gets its best run. warm: run each once first, untimed."""
    for fn in fns if warm else ():
        fn()
    best = [float("inf")] * len(fns)
    best_any = list(best)
    got = [0] * len(fns)
    for _ in range(rounds or 10 * repeats):
        for i, fn in enumerate(fns):
            (m0, p0), t0 = _ticks(), time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            m1, p1 = _ticks()
            best_any[i] = min(best_any[i], dt)
            UNDISTURBED["tries"] += 1
            if (m1 - m0) - (p1 - p0) <= 0.1 * dt * _HZ + 1:
                best[i], got[i] = min(best[i], dt), got[i] + 1
                UNDISTURBED["runs"] += 1
        if min(got) >= repeats:
            break
    return [b if g else a for b, a, g in zip(best, best_any, got)]


def mwq_errors(bar) -> dict:
    out = {}
    for kind in ("gauss", "t3", "t5"):
        w = sample(kind, SHAPES[0], 1)
        row = {"plain_int": {f"int{b}": round(mwq.relative_error(w, mwq.quantize_int(w, b)), 5) for b in range(2, 9)}}
        for ladder, (b1, bK) in MWQ_LADDERS.items():
            q = mwq.quantize(w, b1, bK)
            row[ladder] = {f"int{b1 + k}": round(mwq.relative_error(w, mwq.dequantize(q, k)), 5)
                           for k in range(q.levels)}
            bar.update()
        out[kind] = row
    return out


def mwq_dequant(bar, repeats: int) -> dict:
    ws = [sample("gauss", s, 10 + i) for i, s in enumerate(SHAPES)]
    x = torch.randn(TOKENS, SHAPES[0][1])
    h = torch.empty(TOKENS, SHAPES[0][0])
    h3 = torch.empty(TOKENS, SHAPES[0][0])
    y = torch.empty(TOKENS, SHAPES[2][0])
    n = sum(o * i for o, i in SHAPES)
    out = {"expert_shapes": SHAPES, "tokens": TOKENS, "dtype": "float32", "levels": {}}
    for ladder, (b1, bK) in MWQ_LADDERS.items():
        packed = [mwq.pack(mwq.quantize(w, b1, bK)) for w in ws]
        deq = [mwq.Dequantizer(s, 128, bK) for s in SHAPES]
        bufs = [torch.empty(s) for s in SHAPES]
        for level in range(bK - b1 + 1):
            def dequant():
                for d, p, b in zip(deq, packed, bufs):
                    d(p, level, out=b)
            t0 = time.perf_counter()
            dequant()
            # the process's first call compiles the numba kernel or loads it from numba's cache
            out.setdefault("first_call_s", round(time.perf_counter() - t0, 2))
            w1, w3, w2 = bufs

            def matmul():                      # the expert's three projections for 16 tokens
                torch.matmul(x, w1.T, out=h)
                torch.matmul(x, w3.T, out=h3)
                torch.matmul(h, w2.T, out=y)
            t_dq, t_mm = best_times([dequant, matmul], repeats)
            out["levels"][f"int{b1 + level}"] = {"dequant_ms": round(t_dq * 1e3, 3),
                                                 "gweights_per_s": round(n / t_dq / 1e9, 3),
                                                 "matmul_ms": round(t_mm * 1e3, 3),
                                                 "ratio_to_matmul": round(t_dq / t_mm, 3)}
        bar.update()
    return out


def _two_thread_speedup(tasks, repeats: int) -> float:
    """Time of running `tasks` (callables) one after another / on a pool of 2 threads."""
    with ThreadPoolExecutor(2) as pool:
        t1, t2 = best_times([lambda: [t() for t in tasks], lambda: list(pool.map(lambda t: t(), tasks))], repeats)
    return round(t1 / t2, 2)


def copy_scaling(nbytes: int, repeats: int) -> dict:
    """The ceiling the decode speedup is measured against: numpy copies split over 2 threads vs
    1. "dram": one copy of an expert-sized buffer per thread (memory bandwidth bound, one GIL
    release each); "cache": 256 copies of 128 KB per thread, inside a core's L2 (so many
    short GIL-releasing calls that handing the GIL over between the threads shows)."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    half = nbytes // 2
    dram = [lambda a=a: np.copyto(dst[a:a + half], src[a:a + half]) for a in (0, half)]
    small = [(np.ones(1 << 17, np.uint8), np.empty(1 << 17, np.uint8)) for _ in range(2)]

    def cache_copies(s, d):
        for _ in range(256):
            np.copyto(d, s)
    cache = [lambda s=s, d=d: cache_copies(s, d) for s, d in small]
    return {"dram": _two_thread_speedup(dram, repeats), "cache": _two_thread_speedup(cache, repeats)}


def zip_figures(bar, repeats: int) -> dict:
    ratios = {}
    experts = {kind: [sample(kind, s, 20 + i).to(torch.bfloat16) for i, s in enumerate(SHAPES)]
               for kind in ("gauss", "t4")}
    for kind, mats in experts.items():
        ratios[kind] = {}
        for codec in zc.CODECS:
            parts = zc.encode_expert(mats, chunks=3, codec=codec, threads=2)
            ratios[kind][codec] = {"exponent": round(zc.exponent_ratio(parts), 4),
                                   "expert": round(zc.expert_ratio(parts), 4)}
            bar.update()
    mats = experts["gauss"]
    nbytes = 2 * sum(m.numel() for m in mats)
    chunks = 4                                   # a multiple of both thread counts
    thr = {"chunks": chunks}
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    one = zc.encode_expert(mats[:1], 1, "lz4")
    t0 = time.perf_counter()
    zc.decode_expert(one, SHAPES[:1])
    # the process's first decode imports numba and compiles its kernel or loads it from numba's cache
    thr["first_decode_s"] = round(time.perf_counter() - t0, 2)
    for codec in zc.CODECS:
        row = {"encode_gbps": {}, "decode_gbps": {}}
        codecs = {t: zc.ZipCodec(t) for t in (1, 2)}
        slow = codec == "lz4hc"                                # LZ4HC level 9 takes seconds
        t_enc = best_times([lambda c=c: c.encode(mats, chunks, codec) for c in codecs.values()],
                           1 if slow else repeats, rounds=2 if slow else None, warm=not slow)
        parts = codecs[1].encode(mats, chunks, codec)
        # decodes take milliseconds: many more rounds, so that the best of each sees the second
        # core free (this VM's neighbours take it away for seconds at a time, unseen by best_times)
        many = 6 * repeats
        t_dec = best_times([lambda c=c: c.decode(parts, SHAPES, codec, out=buf) for c in codecs.values()], many)
        # the decompression alone (a GIL-free ctypes call per sub-block), without the re-assembly
        raw = np.empty(nbytes // 2, np.uint8)
        at = np.cumsum([0] + split_sizes(nbytes // 2, chunks))
        unzip = [lambda k=k: zc.decompress_chunk(parts[k + 1], codec, out=raw[at[k]:at[k + 1]]) for k in range(chunks)]
        row["decompress_only_speedup_2_threads"] = _two_thread_speedup(unzip, many)
        for c in codecs.values():
            c.close()
        for threads, te, td in zip(codecs, t_enc, t_dec):
            row["encode_gbps"][threads] = round(nbytes / te / 1e9, 3)
            row["decode_gbps"][threads] = round(nbytes / td / 1e9, 3)
        row["decode_speedup_2_threads"] = round(t_dec[0] / t_dec[1], 2)
        thr[codec] = row
        bar.update(2)
    thr["memcpy_2_thread_speedup"] = copy_scaling(nbytes, repeats)
    return {"expert_shapes": SHAPES, "ratio_chunks": 3, "ratio": ratios, "throughput": thr}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (best is kept)")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tqdm(total=6 + 2 + 6 + 6, disable=args.quiet, file=sys.stderr, desc="benchmark_formats") as bar:
        result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "timing": f"best of {args.repeats} undisturbed runs"},
                  "mwq": {"shape": SHAPES[0], "group": 128, "rel_error": mwq_errors(bar),
                          "dequant": mwq_dequant(bar, args.repeats)},
                  "zip": zip_figures(bar, args.repeats)}
    result["machine"]["undisturbed_runs"] = f"{UNDISTURBED['runs']}/{UNDISTURBED['tries']}"
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
