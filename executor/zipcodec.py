"""ZipMoE's lossless BF16 codec: split each weight into an exponent byte and a sign+mantissa byte.

A BF16 value is s|e8|m7. The sign+mantissa (SM) byte (s<<7 | m) is stored raw; the exponent
bytes (bits 14..7), which carry only ~2.6 bits of entropy in trained (and Gaussian) weights,
are cut into K contiguous chunks (numpy.array_split boundaries) and each chunk is compressed
on its own with zstd (level 1), LZ4 (acceleration 5) or LZ4HC (level 9), ZipMoE's codecs.

An expert (several matrices, flattened and concatenated) becomes exactly ZipFormat's parts
(workloads/formats.py): part 0 = the SM bytes, parts 1..K = the compressed exponent chunks.
Every compressed chunk is a ZIP_HEADER_BYTES header (magic, codec, raw length, payload
length, crc32 of the header and payload) + the codec payload, so a truncated or altered chunk
is reported, never decoded into wrong weights. The crc covers the stored bytes rather than the
raw ones: it catches the same alterations, before decompression, and reads 0.4-0.7x the bytes.
Zero padding after the payload is allowed (a store may pad a chunk to a fixed slot); anything
else after it is an error.

Decoding runs the K chunks on a thread pool. A task decompresses its chunk into a buffer kept
between calls and re-assembles its slice of the BF16 bits with numpy ufuncs, a cache-sized
block at a time. The work holds no GIL: the ufuncs release it, and the decompressors are
called through ctypes (see _native_decoders).
"""
from __future__ import annotations

import ctypes
import importlib.util
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import lz4.block
import numpy as np
import torch
import zstandard

from devices.units import ConfigError
from workloads.formats import ZIP_HEADER_BYTES, ExpertFormat, split_sizes

CODECS = ("zstd", "lz4", "lz4hc")
_CODEC_ID = {name: i + 1 for i, name in enumerate(CODECS)}
_MAGIC = b"ZE"
_VERSION = 1
# magic, codec id, version, raw length, payload length, crc32 of the header's first 12 bytes + payload
_HEADER = struct.Struct("<2sBBIII")
_CRC_AT = 12       # the crc32 field's offset
_BLOCK = 1 << 18   # weights re-assembled at a time: 1.5 MB of buffers, inside a core's 2 MB L2
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
        found["lz4"] = lambda src, n, dst, cap: lz4_dec(src, dst, n, cap)
    except (OSError, AttributeError, TypeError):
        pass
    try:
        lib = ctypes.CDLL(_module_file("zstandard._cffi"))       # the cffi backend's libzstd
        zstd_dec, is_error = lib.ZSTD_decompress, lib.ZSTD_isError
        zstd_dec.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        zstd_dec.restype = ctypes.c_size_t
        is_error.argtypes, is_error.restype = [ctypes.c_size_t], ctypes.c_uint

        def zstd(src, n, dst, cap):
            got = zstd_dec(dst, cap, src, n)
            return -1 if is_error(got) else got
        found["zstd"] = zstd
    except (OSError, AttributeError, TypeError):
        pass
    return found


_NATIVE = _native_decoders()


def _decompress_into(payload: np.ndarray, codec: str, out: np.ndarray) -> int:
    """Decompress `payload` into `out` (uint8, exactly the raw length); returns the bytes written."""
    if out.size == 0:
        return 0 if payload.size == 0 else -1
    native = _NATIVE.get("lz4" if codec == "lz4hc" else codec)
    if native is not None:
        return native(payload.ctypes.data, payload.size, out.ctypes.data, out.size)
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


def compress_chunk(raw, codec: str) -> bytes:
    """Header + compressed payload of one raw byte chunk."""
    _check_codec(codec)
    payload = _compress(raw, codec)
    head = _HEADER.pack(_MAGIC, _CODEC_ID[codec], _VERSION, len(raw), len(payload), 0)[:_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def decompress_chunk(blob, codec: str | None = None, what: str = "chunk", out: np.ndarray | None = None) -> np.ndarray:
    """The raw bytes of one compressed chunk (uint8 array; written into `out` if given, which
    must hold exactly the raw length), after checking the header and the crc32. `codec`, if
    given, must match the one recorded in the header."""
    buf = np.frombuffer(blob, np.uint8)
    if buf.size < _HEADER.size:
        raise ConfigError(f"zipcodec: {what} is {buf.size} bytes, shorter than its {_HEADER.size}-byte header "
                          "(truncated)")
    magic, cid, version, raw_len, pay_len, crc = _HEADER.unpack_from(buf)
    if magic != _MAGIC or version != _VERSION:
        raise ConfigError(f"zipcodec: {what} does not start with a zipcodec header (magic {bytes(magic)!r}, "
                          f"version {version}); altered or not an exponent chunk")
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
    if out is None:
        out = np.empty(raw_len, np.uint8)
    elif out.size != raw_len:
        raise ConfigError(f"zipcodec: {what} holds {raw_len} bytes, expected {out.size}")
    if _decompress_into(payload, name, out) != raw_len:
        raise ConfigError(f"zipcodec: {what} does not decompress with {name} to the {raw_len} bytes its header "
                          "says; corrupt")
    return out


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
    """Encoder/decoder of experts with a pool of `threads` worker threads (ZipMoE's L). It keeps
    decode scratch buffers between calls, so one ZipCodec runs one decode at a time."""

    def __init__(self, threads: int = 1):
        if threads < 1:
            raise ConfigError(f"zipcodec: threads must be >= 1, got {threads}")
        self.threads = threads
        self._exp = np.empty(0, np.uint8)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="zipcodec") if threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _scratch(self) -> np.ndarray:
        """This thread's re-assembly buffer (one block of uint16)."""
        tmp = getattr(self._local, "tmp", None)
        if tmp is None:
            tmp = self._local.tmp = np.empty(_BLOCK, np.uint16)
        return tmp

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
        if self._exp.size < n:                      # scratch kept between calls: no page faults
            self._exp = np.empty(n, np.uint8)
        exp_buf = self._exp

        def work(k):                                # decompress and re-assemble one chunk
            lo, hi = spans[k]
            exp = decompress_chunk(parts[k + 1], codec, f"exponent chunk {k + 1} of {len(spans)} (part {k + 1})",
                                   exp_buf[lo:hi])
            tmp = self._scratch()                   # block by block, while it is in this core's cache
            for a in range(0, hi - lo, _BLOCK):
                b = min(a + _BLOCK, hi - lo)
                join_bf16(sm[lo + a:lo + b], exp[a:b], bits[lo + a:lo + b], tmp[:b - a])

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
    """executor/store.py's Encoder for the zip format. A store blob has exactly the format's
    part size, so each chunk is zero-padded to its slot; a chunk that does not fit (exponent_ratio
    set below what the weights compress to) is an error that states the ratio needed."""

    def __init__(self, threads: int = 1):
        self.codec = ZipCodec(threads)

    def encode(self, weights, fmt: ExpertFormat) -> list[bytes]:
        from executor.store import check_weights
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
        from executor.store import matrix_names
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