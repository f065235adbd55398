"""The MWQ dequantization kernel (numba), in its own module so that numba (~55 MB of RSS)
is imported only by runs that dequantize MWQ planes (executor/mwq.py imports it lazily)."""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

_BYTE_BITS = np.uint64(0x0101010101010101)   # bit 0 of each byte of a 64-bit word
_TASK_WORDS = 256                             # a task: 8 * 256 weights, in L1 with their codes


@njit(parallel=True, nogil=True, cache=True)
def _dequant_kernel(planes, L, b1, group, s, c, d, out, threads):  # pragma: no cover (compiled)
    """out[n] (float32) = s_g*Q + c_g + sum_k d_kg b_k for the weights n of P = b1 + m bit-planes
    (uint8 [P, 8*ceil(L/8)], lane layout with L bytes per plane, rows padded to whole words).

    Eager torch needs a float32 pass over the whole output per plane, which made dequantization
    cost 1-2.5x the expert's matmul; here each output is written once. A task is a run of 2048
    weights of one lane j, so that its codes and output stay in L1: the base codes are gathered
    8 weights per 64-bit word (bit j of each byte of plane p -> bit p of the byte), the residual
    bits likewise as 0/1 bytes (tests on uint8 would be done on int64 lanes: slower), then per
    group one float pass for the base and one per residual plane. Rounding: fl(fl(Q*s) + c),
    then + d_k per plane in order."""
    words = planes.view(np.uint64)
    W = planes.shape[1] // 8
    m = planes.shape[0] - b1
    N = out.size
    per_lane = (W + _TASK_WORDS - 1) // _TASK_WORDS
    tasks = 8 * per_lane
    for th in prange(threads):              # one scratch per thread (numba's), not per task
        codes = np.empty(_TASK_WORDS, np.uint64)
        bits = np.empty((m, _TASK_WORDS), np.uint64)
        codes8, bits8 = codes.view(np.uint8), bits.view(np.uint8)
        for task in range(th * tasks // threads, (th + 1) * tasks // threads):
            j = task // per_lane
            w0 = (task - j * per_lane) * _TASK_WORDS
            w1 = min(W, w0 + _TASK_WORDS)
            n0 = j * L + 8 * w0
            n1 = min(N, j * L + min(L, 8 * w1))
            if n0 >= n1:
                continue
            jj = np.uint64(j)                # (uint64 with int64 would be float64 in numba)
            codes[:] = 0
            for p in range(b1):
                pp, wp = np.uint64(p), words[p, w0:w1]
                for t in range(w1 - w0):
                    codes[t] |= ((wp[t] >> jj) & _BYTE_BITS) << pp
            for k in range(m):
                wp, bk = words[b1 + k, w0:w1], bits[k]
                for t in range(w1 - w0):
                    bk[t] = (wp[t] >> jj) & _BYTE_BITS
            for g in range(n0 // group, (n1 - 1) // group + 1):
                a, e = max(n0, g * group), min(n1, g * group + group)
                o, q = out[a:e], codes8[a - n0:e - n0]
                sg, cg = s[g], c[g]
                for t in range(e - a):
                    o[t] = np.float32(q[t]) * sg + cg
                for k in range(m):
                    b, dk = bits8[k, a - n0:e - n0], d[k, g]
                    for t in range(e - a):
                        o[t] += np.float32(b[t]) * dk


def dequantize_planes(planes, L, b1, group, s, c, d, out) -> None:
    """_dequant_kernel over numba's threads (passed in: reading them inside the kernel keeps
    numba from caching it)."""
    _dequant_kernel(planes, L, b1, group, s, c, d, out, get_num_threads())
