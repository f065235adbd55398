import itertools
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from devices.units import ConfigError
from executor import zipcodec as zc
from workloads.formats import ZIP_HEADER_BYTES, ZipFormat, make_format, split_sizes


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


ALL_PATTERNS = bf16_from_bits(np.random.default_rng(0).permutation(65536)).view(256, 256)


def gaussian_expert(seed=0, shapes=((256, 512), (256, 512), (512, 256))):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in shapes]


def raw_len(blob) -> int:
    return struct.unpack_from("<2sBBIII", blob)[3]


@pytest.mark.parametrize("codec", zc.CODECS)
def test_every_bf16_bit_pattern_round_trips_at_every_chunk_count(codec):
    # signed zeros, subnormals, infinities and every NaN payload, compared as int16
    for k in range(1, 9):
        parts = zc.encode_expert([ALL_PATTERNS], chunks=k, codec=codec)
        assert len(parts) == k + 1 and len(parts[0]) == 65536
        assert [raw_len(p) for p in parts[1:]] == split_sizes(65536, k)      # array_split boundaries
        (back,) = zc.decode_expert(parts, [(256, 256)], codec)
        assert same_bits(back, ALL_PATTERNS)


@pytest.mark.parametrize("codec", zc.CODECS)
def test_random_odd_sizes_round_trip_with_threads(codec):
    rng = np.random.default_rng(1)
    shapes = [(3, 7), (1, 1), (13, 11), (5, 17)]
    mats = [bf16_from_bits(rng.integers(0, 65536, s)) for s in shapes]
    for k in (1, 2, 5, 8):
        parts = zc.encode_expert(mats, chunks=k, codec=codec, threads=2)
        back = zc.decode_expert(parts, shapes, codec, threads=2)
        assert all(same_bits(a, b) for a, b in zip(back, mats))
        assert [raw_len(p) for p in parts[1:]] == split_sizes(sum(o * i for o, i in shapes), k)


def test_more_chunks_than_weights():
    mats = [bf16_from_bits(np.array([[1, 0x8000, 0x7F80]]))]
    parts = zc.encode_expert(mats, chunks=5, codec="zstd")
    assert [raw_len(p) for p in parts[1:]] == [1, 1, 1, 0, 0]
    assert same_bits(zc.decode_expert(parts, [(1, 3)])[0], mats[0])


def test_split_is_sign_mantissa_and_exponent_bytes():
    x = torch.tensor([-1.5, 2.0 ** -130, float("inf")], dtype=torch.bfloat16)
    sm, exp = zc.split_bf16(zc.bf16_bits(x))
    bits = x.view(torch.int16).numpy().view(np.uint16)
    assert exp.tolist() == [(b >> 7) & 0xFF for b in bits]
    assert sm.tolist() == [((b >> 15) << 7) | (b & 0x7F) for b in bits]


@pytest.mark.parametrize("codec", zc.CODECS)
def test_zip_format_with_measured_ratio_sizes_the_expert_exactly(codec):
    mats = gaussian_expert()
    shapes = [tuple(m.shape) for m in mats]
    parts = zc.encode_expert(mats, chunks=3, codec=codec)
    ratio = zc.exponent_ratio(parts)
    fmt = ZipFormat(shapes=tuple(shapes), chunks=3, codec=codec, exponent_ratio=ratio)
    assert fmt.expert_bytes == sum(len(p) for p in parts)                    # exact, headers included
    assert fmt.part_bytes[0] == len(parts[0]) == fmt.params
    assert list(fmt.decompress_bytes[1:]) == [raw_len(p) for p in parts[1:]]
    assert fmt.expert_bytes / (2 * fmt.params) == pytest.approx(zc.expert_ratio(parts))
    assert all(len(p) - ZIP_HEADER_BYTES == pytest.approx(b - ZIP_HEADER_BYTES, abs=0.05 * b)
               for p, b in zip(parts[1:], fmt.part_bytes[1:]))


def test_zstd_expert_ratio_on_gaussian_weights():
    # ZipMoE: an expert is ~0.68-0.74 of its BF16 size
    parts = zc.encode_expert(gaussian_expert(), chunks=3, codec="zstd")
    assert zc.expert_ratio(parts) <= 0.70


# -- bad input ---------------------------------------------------------------------------------
def encoded(codec="lz4", chunks=2):
    mats = gaussian_expert(shapes=((32, 64),))
    return mats, zc.encode_expert(mats, chunks=chunks, codec=codec)


def test_non_bf16_input_is_rejected():
    with pytest.raises(ConfigError, match="bfloat16.*float32"):
        zc.encode_expert([torch.zeros(4, 4)])
    with pytest.raises(ConfigError, match="bfloat16"):
        zc.encode_expert([np.zeros((4, 4), np.uint16)])


def test_unknown_codec_is_rejected():
    with pytest.raises(ConfigError, match="unknown codec 'gzip'.*zstd"):
        zc.encode_expert(gaussian_expert(shapes=((2, 2),)), codec="gzip")


@pytest.mark.parametrize("codec", zc.CODECS)
def test_truncated_chunk_is_an_error(codec):
    _, parts = encoded(codec)
    blob = parts[1]
    for cut in (len(blob) - 1, ZIP_HEADER_BYTES + 1, ZIP_HEADER_BYTES - 1, 0):
        with pytest.raises(ConfigError, match="truncated"):
            zc.decompress_chunk(blob[:cut])


@pytest.mark.parametrize("codec", zc.CODECS)
def test_altered_chunk_is_an_error(codec):
    mats, parts = encoded(codec)
    blob = bytearray(parts[1])
    for at in (ZIP_HEADER_BYTES, len(blob) // 2, len(blob) - 1):             # payload bytes
        bad = bytearray(blob)
        bad[at] ^= 0x5A
        with pytest.raises(ConfigError, match="altered|truncated"):
            zc.decode_expert([parts[0], bytes(bad), parts[2]], [(32, 64)])
    bad = bytearray(blob)
    bad[12] ^= 1                                                              # the stored crc32
    with pytest.raises(ConfigError, match="crc32"):
        zc.decompress_chunk(bytes(bad))
    bad = bytearray(blob)
    bad[4] ^= 1                                                               # the raw length
    with pytest.raises(ConfigError, match="altered"):
        zc.decompress_chunk(bytes(bad))
    bad = bytearray(blob)
    bad[0:2] = b"XX"
    with pytest.raises(ConfigError, match="magic"):
        zc.decompress_chunk(bytes(bad))
    with pytest.raises(ConfigError, match="not zero padding"):
        zc.decompress_chunk(bytes(blob) + b"\x01")
    assert zc.decompress_chunk(bytes(blob) + bytes(7)).size == raw_len(blob)  # zero padding is fine


def test_wrong_codec_sm_size_and_chunk_count_are_errors():
    _, parts = encoded("lz4", chunks=2)
    with pytest.raises(ConfigError, match="compressed with lz4, expected zstd"):
        zc.decode_expert(parts, [(32, 64)], codec="zstd")
    with pytest.raises(ConfigError, match="SM part is 2047 bytes, expected 2048"):
        zc.decode_expert([parts[0][:-1]] + parts[1:], [(32, 64)])
    with pytest.raises(ConfigError, match=r"exponent chunk 1 of 3 \(part 1\) holds 1024 bytes, expected 683"):
        zc.decode_expert([parts[0], parts[1], parts[2], parts[2]], [(32, 64)])


# -- store encoder ------------------------------------------------------------------------------
def test_store_encoder_pads_to_the_format_and_round_trips():
    mats = gaussian_expert(shapes=((64, 32), (64, 32), (32, 64)))
    weights = dict(zip(("w1", "w3", "w2"), mats))
    shapes = [tuple(m.shape) for m in mats]
    ratio = zc.exponent_ratio(zc.encode_expert(mats, chunks=3, codec="zstd"))
    fmt = make_format("zip", shapes, chunks=3, codec="zstd", exponent_ratio=ratio * 1.1)
    enc = zc.ZipEncoder()
    parts = enc.encode(weights, fmt)
    assert [len(p) for p in parts] == list(fmt.part_bytes)
    resident = [parts[0]] + [enc.decompress_part(k, parts[k], fmt) for k in range(1, len(parts))]
    assert [len(r) for r in resident] == list(fmt.resident_bytes)
    back = enc.decode(resident, fmt, 0)
    assert all(same_bits(back[n], weights[n]) for n in weights)
    tight = make_format("zip", shapes, chunks=3, codec="zstd", exponent_ratio=ratio * 0.8)
    with pytest.raises(ConfigError, match="exponent_ratio >= "):
        enc.encode(weights, tight)


def test_python_binding_fallback_decodes_the_same(monkeypatch):
    mats, parts = encoded("zstd")
    lz_mats, lz_parts = encoded("lz4hc")
    monkeypatch.setattr(zc, "_NATIVE", {})          # as if the C symbols were not found
    assert same_bits(zc.decode_expert(parts, [(32, 64)], threads=2)[0], mats[0])
    assert same_bits(zc.decode_expert(lz_parts, [(32, 64)])[0], lz_mats[0])
    bad = bytearray(parts[1])
    bad[ZIP_HEADER_BYTES + 3] ^= 0xFF
    with pytest.raises(ConfigError, match="altered"):
        zc.decompress_chunk(bytes(bad))


# -- sub-blocks (format version 2) -----------------------------------------------------------
def with_crc(blob) -> bytes:
    """`blob` with its crc32 recomputed, as a writer with a bug would store it."""
    blob = bytes(blob)
    pay_len = struct.unpack_from("<I", blob, 8)[0]
    crc = zlib.crc32(blob[16:16 + pay_len], zlib.crc32(blob[:12]))
    return blob[:12] + struct.pack("<I", crc) + blob[16:]


def sub_block_parts(mats, codec, sub_block, chunks=2):
    """Parts of an expert whose exponent chunks have `sub_block`-byte sub-blocks."""
    bits = np.concatenate([zc.bf16_bits(m) for m in mats])
    sm, exp = zc.split_bf16(bits)
    edges = np.cumsum([0] + split_sizes(bits.size, chunks))
    return [sm.tobytes()] + [zc.compress_chunk(exp[a:b], codec, sub_block) for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("codec", zc.CODECS)
def test_sizes_around_sub_block_multiples_round_trip(codec):
    rng = np.random.default_rng(2)
    S = 64
    for n in (1, S - 1, S, S + 1, 2 * S - 1, 2 * S, 2 * S + 1, 5 * S + 3):
        mats = [bf16_from_bits(rng.integers(0, 65536, (1, n)))]
        parts = sub_block_parts(mats, codec, S, chunks=1)
        assert len(parts[1]) - ZIP_HEADER_BYTES >= 4 * (1 + -(-n // S))     # S and one size per sub-block
        assert np.array_equal(zc.decompress_chunk(parts[1], codec), zc.split_bf16(zc.bf16_bits(mats[0]))[1])
        for threads in (1, 2):
            assert same_bits(zc.decode_expert(parts, [(1, n)], codec, threads=threads)[0], mats[0])


def test_default_sub_block_boundaries_round_trip():
    S = zc._SUB_BLOCK
    for n in (S - 1, S, S + 1):
        mats = gaussian_expert(shapes=((1, n),))
        parts = zc.encode_expert(mats, chunks=1, codec="lz4")
        assert struct.unpack_from("<I", parts[1], ZIP_HEADER_BYTES)[0] == S
        assert same_bits(zc.decode_expert(parts, [(1, n)])[0], mats[0])


def test_version_1_chunk_is_refused():
    _, parts = encoded("lz4")
    blob = bytearray(parts[1])
    blob[3] = 1                                                # the version byte
    with pytest.raises(ConfigError, match="format version 1 by an older moelab.*rebuild the store"):
        zc.decompress_chunk(with_crc(blob))
    with pytest.raises(ConfigError, match="older moelab"):
        zc.decode_expert([parts[0], with_crc(blob), parts[2]], [(32, 64)])


@pytest.mark.parametrize("codec", zc.CODECS)
def test_altered_sub_block_table_is_an_error(codec):
    mats = gaussian_expert(shapes=((32, 64),))
    parts = sub_block_parts(mats, codec, 256)                  # 1024 bytes a chunk: 4 sub-blocks
    blob = bytes(parts[1])
    at = ZIP_HEADER_BYTES                                      # the table: S, then 4 sizes

    def table(values):
        return with_crc(blob[:at] + struct.pack("<5I", *values) + blob[at + 20:])

    S, *sizes = struct.unpack_from("<5I", blob, at)
    bad = [[0] + sizes, [1 << 30] + sizes,                     # S = 0, S too large
           [1] + sizes,                                        # S too small: a table longer than the payload
           [S, sizes[0] + 1] + sizes[1:], [S, 0xFFFFFFFF] + sizes[1:]]   # sizes past the payload
    for values in bad:
        with pytest.raises(ConfigError, match="sub-block table"):
            zc.decompress_chunk(table(values))
        with pytest.raises(ConfigError, match="sub-block table"):
            zc.decode_expert([parts[0], table(values), parts[2]], [(32, 64)], codec)
    # sizes that add up but split the sub-blocks in the wrong places: never wrong weights
    moved = table([S, sizes[0] - 1, sizes[1] + 1] + sizes[2:])
    with pytest.raises(ConfigError, match="sub-block 0 of 4 does not decompress"):
        zc.decompress_chunk(moved)
    for threads in (1, 2):
        with pytest.raises(ConfigError, match="sub-block 0 of 4 does not decompress"):
            zc.decode_expert([parts[0], moved, parts[2]], [(32, 64)], codec, threads=threads)
    assert same_bits(zc.decode_expert(parts, [(32, 64)], codec)[0], mats[0])


def test_numba_is_imported_by_the_first_decode_only():
    # numba costs ~55 MB of RSS: runs that never decode a zip expert must not import it
    code = ("import sys, torch\nfrom executor import encoders, zipcodec as zc\n"
            "parts = zc.encode_expert([torch.ones(4, 4, dtype=torch.bfloat16)], 2, 'zstd')\n"
            "assert 'numba' not in sys.modules\nzc.decode_expert(parts, [(4, 4)])\nassert 'numba' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
