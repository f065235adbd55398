"""ZipMoE's fused decode kernel (numba), in its own module so that numba (~55 MB of RSS) is
imported only by runs that decode zip experts (executor/zipcodec.py imports it lazily)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def decode_chunk(lz4, zstd, use_zstd, payload, starts, sizes, block, sm, out):  # pragma: no cover (compiled)
    """Decompress one exponent chunk's sub-blocks and re-assemble their BF16 bits, in one call
    that holds no GIL; returns -1, or the index of the first sub-block that did not decompress
    to its raw length (corrupt).

    payload: the chunk's stored bytes; sub-block j is payload[starts[j]:starts[j] + sizes[j]]
    and holds `block` exponent bytes (the last one, what is left). lz4, zstd: LZ4_decompress_safe
    and ZSTD_decompress (ctypes functions, which numba calls directly). sm: the chunk's SM
    bytes; out: its uint16 BF16 bits.

    Each sub-block is decompressed into a scratch buffer that stays in this core's cache and
    re-assembled at once, so the exponent bytes never go to DRAM and back: decoding a chunk
    reads its compressed and SM bytes once and writes the BF16 bits once."""
    exp = np.empty(block, np.uint8)
    dst = exp.ctypes.data
    src = payload.ctypes.data
    n = sm.size
    for j in range(sizes.size):
        lo = j * block
        m = min(block, n - lo)
        if use_zstd:
            got = np.int64(zstd(dst, m, src + starts[j], sizes[j]))    # an error code reads as < 0
        else:
            got = np.int64(lz4(src + starts[j], dst, np.int32(sizes[j]), np.int32(m)))
        if got != m:
            return j
        s, o = sm[lo:lo + m], out[lo:lo + m]
        for i in range(m):        # s|e8|m7 from the SM byte s<<7|m and the exponent byte
            b = np.uint16(s[i])
            o[i] = ((b & 0x80) << 8) | (np.uint16(exp[i]) << 7) | (b & 0x7F)
    return -1
