"""ZipMoE's lossless BF16 codec: split each weight into an exponent byte and a sign+mantissa byte.

A BF16 value is s|e8|m7. The sign+mantissa (SM) byte (s<<7 | m) is stored raw; the exponent
bytes (bits 14..7), which carry only ~2.6 bits of entropy in trained (and Gaussian) weights,
are cut into K contiguous chunks (numpy.array_split boundaries) and each chunk is compressed
on its own with zstd (level 1), LZ4 (acceleration 5) or LZ4HC (level 9), ZipMoE's codecs.

An expert (several matrices, flattened and concatenated) becomes exactly ZipFormat's parts
(workloads/formats.py): part 0 = the SM bytes, parts 1..K = the compressed exponent chunks.
Every compressed chunk is a ZIP_HEADER_BYTES header (magic, codec, version, raw length,
payload length, crc32 of the header and payload) + the payload, so a truncated or altered
chunk is reported, never decoded into wrong weights. The crc covers the stored bytes rather
than the raw ones: it catches the same alterations, before decompression, and reads 0.4-0.7x
the bytes. The payload (format version 2) is a table (u32 sub-block size S, then the u32
stored size of each sub-block) + the sub-blocks: runs of S exponent bytes, each compressed on
its own, so that a decoder can decompress one into a cache-sized buffer and re-assemble its
weights at once.
Zero padding after the payload is allowed (a store may pad a chunk to a fixed slot); anything
else after it is an error.

Decoding runs the K chunks on a thread pool. A task checks its chunk, then decodes it in one
numba call that holds no GIL (executor/zip_kernel.py): per sub-block, the native decompressor
(see _native_decoders) writes the exponent bytes into a buffer that stays in the core's cache,
and the weights are re-assembled from it at once. The whole-chunk alternative (decompress to a
chunk-sized buffer, then numpy ufuncs over it) sent the exponent bytes to DRAM and back and
paid a GIL hand-off per ufunc call: 2 threads were 1.1-1.6x as fast as one.
"""
from __future__ import annotations

import ctypes
import importlib.util
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import lz4.block
import numpy as np
import torch
import zstandard

from devices.units import ConfigError
from executor.weights import check_weights, matrix_names
from workloads.formats import ZIP_HEADER_BYTES, ExpertFormat, split_sizes

CODECS = ("zstd", "lz4", "lz4hc")
_CODEC_ID = {name: i + 1 for i, name in enumerate(CODECS)}
_MAGIC = b"ZE"
_VERSION = 2       # 1: one compressed payload per chunk (moelab before sub-blocks)
# magic, codec id, version, raw length, payload length, crc32 of the header's first 12 bytes + payload
_HEADER = struct.Struct("<2sBBIII")
_CRC_AT = 12       # the crc32 field's offset
_SUB_BLOCK = 1 << 17   # exponent bytes per sub-block (see compress_chunk)
_MAX_SUB_BLOCK = 1 << 24   # the largest a header may state (a decoder allocates one)
assert _HEADER.size == ZIP_HEADER_BYTES


# -- bit split ----------------------------------------------------------------------------
def bf16_bits(t: torch.Tensor, what: str = "tensor") -> np.ndarray:
    """The raw bits of a bfloat16 tensor as a flat uint16 numpy array (no copy if contiguous)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"zipcodec: {what} must be a bfloat16 tensor, got {got}")
    return t.detach().cpu().contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)


def split_bf16(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 BF16 bits -> (SM bytes, exponent bytes)."""
    exp = (bits >> 7).astype(np.uint8)                          # bits 14..7; the cast drops the sign
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    return sm, exp


def join_bf16(sm: np.ndarray, exp: np.ndarray, out: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """(SM bytes, exponent bytes) -> uint16 BF16 bits written into `out`. Three ufunc passes:
    sign-extending the SM byte to int16 and masking 0x807F puts s at bit 15 and m at 6..0."""
    tmp = np.empty_like(out) if tmp is None else tmp
    np.bitwise_and(sm.view(np.int8), np.int16(-0x7F81), out=out.view(np.int16), dtype=np.int16)  # 0x807F
    np.left_shift(exp, 7, out=tmp, dtype=np.uint16)
    np.bitwise_or(out, tmp, out=out)
    return out


# -- one compressed chunk -----------------------------------------------------------------
def _check_codec(codec: str) -> None:
    if codec not in _CODEC_ID:
        raise ConfigError(f"zipcodec: unknown codec {codec!r}; known codecs: {', '.join(CODECS)}")


def _compress(raw, codec: str) -> bytes:
    if len(raw) == 0:
        return b""
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(raw)
    if codec == "lz4":
        return lz4.block.compress(raw, mode="fast", acceleration=5, store_size=False)
    return lz4.block.compress(raw, mode="high_compression", compression=9, store_size=False)


def _module_file(name: str) -> str | None:
    spec = importlib.util.find_spec(name)          # its file, without importing it
    return spec.origin if spec is not None else None


def _native_decoders() -> dict:
    """liblz4's LZ4_decompress_safe and libzstd's ZSTD_decompress, taken from the extension
    modules of the lz4 and zstandard packages and called through ctypes, which releases the GIL
    during the call; both write into a buffer we own. python-lz4's block.decompress holds the
    GIL (two threads decoded 1.08x as fast as one, measured) and both bindings allocate their
    output. A codec whose symbol is missing falls back to its Python binding."""
    found = {}
    try:
        lz4_dec = ctypes.CDLL(_module_file("lz4.block._block")).LZ4_decompress_safe
        lz4_dec.argtypes, lz4_dec.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int], ctypes.c_int
        found["lz4"] = lz4_dec                                   # (src, dst, n, cap) -> bytes written or < 0
    except (OSError, AttributeError, TypeError):
        pass
    try:
        zstd_dec = ctypes.CDLL(_module_file("zstandard._cffi")).ZSTD_decompress   # the cffi backend's libzstd
        zstd_dec.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        zstd_dec.restype = ctypes.c_size_t
        found["zstd"] = zstd_dec            # (dst, cap, src, n) -> bytes written, or an error code (> any cap)
    except (OSError, AttributeError, TypeError):
        pass
    return found


_NATIVE = _native_decoders()


def _decompress_into(payload: np.ndarray, codec: str, out: np.ndarray) -> int:
    """Decompress `payload` into `out` (uint8, exactly the raw length); returns the bytes written."""
    if out.size == 0:
        return 0 if payload.size == 0 else -1
    native = _NATIVE.get("lz4" if codec == "lz4hc" else codec)
    if native is not None and codec == "zstd":
        return native(out.ctypes.data, out.size, payload.ctypes.data, payload.size)
    if native is not None:
        return native(payload.ctypes.data, out.ctypes.data, payload.size, out.size)
    try:
        if codec == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=out.size)
        else:
            raw = lz4.block.decompress(payload, uncompressed_size=out.size)
    except (zstandard.ZstdError, lz4.block.LZ4BlockError):
        return -1
    if len(raw) != out.size:
        return len(raw)
    out[:] = np.frombuffer(raw, np.uint8)
    return out.size


def compress_chunk(raw, codec: str, sub_block: int = _SUB_BLOCK) -> bytes:
    """Header + payload of one raw byte chunk: the sub-block table, then each run of
    `sub_block` bytes compressed on its own. The default (128 KB) was measured: the exponent
    ratio of Gaussian weights is 1.04x (zstd), 1.03x (lz4), 1.04x (lz4hc) that of whole-chunk
    payloads, where 64 KB costs 1.03x, 1.05x, 1.08x; and a sub-block's exponent bytes stay
    in a core's 512 KB L2 while its weights are re-assembled."""
    _check_codec(codec)
    if not 1 <= sub_block <= _MAX_SUB_BLOCK:
        raise ConfigError(f"zipcodec: sub_block must be in 1..{_MAX_SUB_BLOCK}, got {sub_block}")
    raw = memoryview(raw).cast("B")
    blocks = [_compress(raw[a:a + sub_block], codec) for a in range(0, len(raw), sub_block)]
    payload = struct.pack(f"<I{len(blocks)}I", sub_block, *map(len, blocks)) + b"".join(blocks)
    head = _HEADER.pack(_MAGIC, _CODEC_ID[codec], _VERSION, len(raw), len(payload), 0)[:_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _parse_chunk(blob, codec: str | None, what: str, raw_len: int | None = None):
    """Check one compressed chunk (header, crc32, padding, codec, sub-block table) and return
    (codec name, raw length, payload, sub-block size, start and size of each sub-block in the
    payload). `raw_len`, if given, is the raw length the chunk must hold."""
    buf = np.frombuffer(blob, np.uint8)
    if buf.size < _HEADER.size:
        raise ConfigError(f"zipcodec: {what} is {buf.size} bytes, shorter than its {_HEADER.size}-byte header "
                          "(truncated)")
    magic, cid, version, n, pay_len, crc = _HEADER.unpack_from(buf)
    if magic != _MAGIC:
        raise ConfigError(f"zipcodec: {what} does not start with a zipcodec header (magic {bytes(magic)!r}); "
                          "altered or not an exponent chunk")
    if version != _VERSION:
        old = " by an older moelab (without sub-blocks): rebuild the store" if version == 1 else ""
        raise ConfigError(f"zipcodec: {what} was written in zipcodec format version {version}{old}; this moelab "
                          f"reads version {_VERSION} only")
    end = _HEADER.size + pay_len
    if end > buf.size:
        raise ConfigError(f"zipcodec: {what} is truncated: header says {pay_len} payload bytes, "
                          f"only {buf.size - _HEADER.size} present")
    payload = buf[_HEADER.size:end]
    if zlib.crc32(payload, zlib.crc32(buf[:_CRC_AT])) != crc:
        raise ConfigError(f"zipcodec: {what} fails its crc32 check; altered")
    if buf[end:].any():
        raise ConfigError(f"zipcodec: {what} has {buf.size - end} bytes after its payload that are not zero "
                          "padding; altered")
    if not 1 <= cid <= len(CODECS):
        raise ConfigError(f"zipcodec: {what} names unknown codec id {cid}")
    name = CODECS[cid - 1]
    if codec is not None and codec != name:
        raise ConfigError(f"zipcodec: {what} was compressed with {name}, expected {codec}")
    if raw_len is not None and n != raw_len:
        raise ConfigError(f"zipcodec: {what} holds {n} bytes, expected {raw_len}")
    # the crc passed, so only a writer's bug could fail these; checked anyway before any
    # sub-block is decompressed, so that no read goes past the payload
    block = int(payload[:4].view("<u4")[0]) if pay_len >= 4 else 0
    count = -(-n // block) if 1 <= block <= _MAX_SUB_BLOCK else -1
    table = 4 * (1 + count)
    if count < 0 or table > pay_len:
        raise ConfigError(f"zipcodec: {what} has a bad sub-block table (sub-block size {block}, payload "
                          f"{pay_len} bytes for {n} raw bytes); altered")
    sizes = payload[4:table].view("<u4").astype(np.int64)
    if int(sizes.sum()) != pay_len - table:
        raise ConfigError(f"zipcodec: {what} has a bad sub-block table: its sizes add up to {int(sizes.sum())} "
                          f"bytes, the payload holds {pay_len - table} after the table; altered")
    starts = table + np.cumsum(sizes) - sizes
    return name, n, payload, block, starts, sizes


def decompress_chunk(blob, codec: str | None = None, what: str = "chunk", out: np.ndarray | None = None) -> np.ndarray:
    """The raw bytes of one compressed chunk (uint8 array; written into `out` if given, which
    must hold exactly the raw length), after checking the header and the crc32. `codec`, if
    given, must match the one recorded in the header."""
    name, n, payload, block, starts, sizes = _parse_chunk(blob, codec, what, None if out is None else out.size)
    out = np.empty(n, np.uint8) if out is None else out
    for j, (a, size) in enumerate(zip(starts.tolist(), sizes.tolist())):
        lo, hi = j * block, min(n, (j + 1) * block)
        if _decompress_into(payload[a:a + size], name, out[lo:hi]) != hi - lo:
            _corrupt(what, name, j, len(sizes), hi - lo)
    return out


def _corrupt(what: str, name: str, j: int, count: int, size: int):
    raise ConfigError(f"zipcodec: {what}: sub-block {j} of {count} does not decompress with {name} to the "
                      f"{size} bytes its header says; corrupt")


# -- one expert ---------------------------------------------------------------------------
def _expert_bits(mats: Sequence[torch.Tensor]) -> np.ndarray:
    if len(mats) == 0:
        raise ConfigError("zipcodec: an expert needs at least one matrix")
    parts = [bf16_bits(m, f"matrix {i}") for i, m in enumerate(mats)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    if chunks < 1:
        raise ConfigError(f"zipcodec: chunks must be >= 1, got {chunks}")
    edges = np.cumsum([0] + split_sizes(n, chunks)).tolist()
    return list(zip(edges[:-1], edges[1:]))


class ZipCodec:
    """Encoder/decoder of experts with a pool of `threads` worker threads (ZipMoE's L)."""

    def __init__(self, threads: int = 1):
        if threads < 1:
            raise ConfigError(f"zipcodec: threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="zipcodec") if threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _map(self, fn, items):
        if self._pool is None:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def encode(self, mats: Sequence[torch.Tensor], chunks: int = 3, codec: str = "lz4hc") -> list[bytes]:
        """BF16 matrices -> [SM bytes, compressed exponent chunk 1..K]."""
        _check_codec(codec)
        bits = _expert_bits(mats)
        sm = np.empty(bits.size, np.uint8)

        def work(span):
            lo, hi = span
            sm_part, exp = split_bf16(bits[lo:hi])
            sm[lo:hi] = sm_part
            return compress_chunk(exp, codec)

        blobs = self._map(work, _bounds(bits.size, chunks))
        return [sm.tobytes()] + blobs

    def decode(self, parts: Sequence[Any], shapes: Sequence[tuple[int, int]], codec: str | None = None,
               out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Parts -> BF16 matrices (views of one flat tensor, `out` if given). The number of
        exponent chunks is len(parts) - 1."""
        n = sum(o * i for o, i in shapes)
        if len(parts) < 2:
            raise ConfigError(f"zipcodec: an expert needs the SM part and at least one exponent chunk, "
                              f"got {len(parts)} parts")
        sm = np.frombuffer(parts[0], np.uint8)
        if sm.size != n:
            raise ConfigError(f"zipcodec: SM part is {sm.size} bytes, expected {n} (one per weight of shapes "
                              f"{list(shapes)}); truncated or wrong shapes")
        if out is None:
            out = torch.empty(n, dtype=torch.bfloat16)
        elif out.dtype != torch.bfloat16 or out.numel() != n or not out.is_contiguous():
            raise ConfigError(f"zipcodec: out must be a contiguous bfloat16 tensor of {n} elements")
        flat = out.view(-1)
        bits = flat.view(torch.int16).numpy().view(np.uint16)
        spans = _bounds(n, len(parts) - 1)
        lz4, zstd = _NATIVE.get("lz4"), _NATIVE.get("zstd")
        if lz4 is not None and zstd is not None:
            # numba: imported on first use (~55 MB of RSS)
            from executor.zip_kernel import decode_chunk

        def work(k):                                # check, decompress and re-assemble one chunk
            lo, hi = spans[k]
            what = f"exponent chunk {k + 1} of {len(spans)} (part {k + 1})"
            if lz4 is None or zstd is None:         # no native decoder: the Python bindings, whole chunk
                exp = decompress_chunk(parts[k + 1], codec, what, np.empty(hi - lo, np.uint8))
                join_bf16(sm[lo:hi], exp, bits[lo:hi])
                return
            name, _, payload, block, starts, sizes = _parse_chunk(parts[k + 1], codec, what, hi - lo)
            bad = decode_chunk(lz4, zstd, name == "zstd", payload, starts, sizes, block, sm[lo:hi], bits[lo:hi])
            if bad >= 0:
                _corrupt(what, name, bad, len(sizes), min(block, hi - lo - bad * block))

        self._map(work, range(len(spans)))
        mats, at = [], 0
        for o, i in shapes:
            mats.append(flat[at: at + o * i].view(o, i))
            at += o * i
        return mats


def encode_expert(mats: Sequence[torch.Tensor], chunks: int = 3, codec: str = "lz4hc", threads: int = 1) -> list[bytes]:
    """BF16 matrices -> ZipFormat parts: [SM bytes, K compressed exponent chunks]."""
    with ZipCodec(threads) as c:
        return c.encode(mats, chunks, codec)


def decode_expert(parts: Sequence[Any], shapes: Sequence[tuple[int, int]], codec: str | None = None,
                  threads: int = 1) -> list[torch.Tensor]:
    """ZipFormat parts -> the BF16 matrices, bit-identical to the encoded ones."""
    with ZipCodec(threads) as c:
        return c.decode(parts, shapes, codec)


def exponent_ratio(parts: Sequence[Any]) -> float:
    """Measured payload bytes / raw exponent bytes of encoded parts (headers excluded), the
    ZipFormat.exponent_ratio that reproduces these parts' total size exactly."""
    raw = len(parts[0])
    payload = sum(len(p) - _HEADER.size for p in parts[1:])
    return payload / raw


def expert_ratio(parts: Sequence[Any]) -> float:
    """Stored bytes of an expert / its BF16 bytes."""
    return sum(len(p) for p in parts) / (2 * len(parts[0]))


# -- store encoder --------------------------------------------------------------------------
class ZipEncoder:
    """executor/encoders.py's Encoder for the zip format. A store blob has exactly the format's
    part size, so each chunk is zero-padded to its slot; a chunk that does not fit (exponent_ratio
    set below what the weights compress to) is an error that states the ratio needed."""

    def __init__(self, threads: int = 1):
        self.codec = ZipCodec(threads)

    def encode(self, weights, fmt: ExpertFormat) -> list[bytes]:
        # the store holds BF16 experts (as the bf16 format does): convert, then compress losslessly
        mats = [t.detach().to("cpu", torch.bfloat16).contiguous() for t in check_weights(weights, fmt)]
        parts = self.codec.encode(mats, fmt.chunks, fmt.codec)
        out = [parts[0]]
        for k, (blob, slot) in enumerate(zip(parts[1:], fmt.part_bytes[1:])):
            if len(blob) > slot:
                need = exponent_ratio(parts)
                raise ConfigError(f"zip: exponent chunk {k + 1} compresses to {len(blob)} bytes, more than its "
                                  f"{slot}-byte part at exponent_ratio={fmt.exponent_ratio}; these weights need "
                                  f"exponent_ratio >= {need:.4f} overall (more for the worst chunk)")
            out.append(blob + bytes(slot - len(blob)))
        return out

    def decompress_part(self, part: int, data, fmt: ExpertFormat) -> np.ndarray:
        """A stored exponent chunk -> its raw exponent bytes (runs on a decompression worker)."""
        return decompress_chunk(data, fmt.codec, what=f"exponent chunk {part} of {fmt.chunks} (part {part})")

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        """Resident parts (SM bytes, then the K raw exponent chunks from decompress_part) -> BF16 matrices."""
        n = fmt.params
        sm = np.frombuffer(parts[0], np.uint8, count=n)
        exp = np.concatenate([np.frombuffer(p, np.uint8) for p in parts[1:]])
        if exp.size != n:
            raise ConfigError(f"zip: the raw exponent chunks hold {exp.size} bytes, the expert has {n} weights")
        bits = join_bf16(sm, exp, np.empty(n, np.uint16))
        flat = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        out, at = {}, 0
        for name, (o, i) in zip(matrix_names(fmt), fmt.shapes):
            out[name] = flat[at:at + o * i].view(o, i)
            at += o * i
        return out