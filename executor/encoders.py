"""The store's encoders: they turn an expert's weight tensors into its format's parts and back.

They are looked up by format name; `bf16` ships here, mwq and copies (executor/mwq.py) and zip
(executor/zipcodec.py) are registered on import, other formats call `register_encoder`.
An encoder is any object with

    encode(weights: Mapping[str, Tensor], fmt) -> list[bytes]          # one per part, sizes = fmt.part_bytes
    decode(parts: Sequence[buffer], fmt, level) -> dict[str, Tensor]   # the parts of fmt.parts_of(level), in order

where the weight names are `matrix_names(fmt)` ("w1", "w3", "w2" for SwiGLU experts,
"w1", "w2" for two-matrix FFNs), in the order of `fmt.shapes`.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch

from devices.units import ConfigError
from executor.weights import Weights, check_weights, matrix_names
from workloads.formats import ExpertFormat


class Encoder(Protocol):
    """A format's codec. encode: weights -> one bytes object per part (sizes = fmt.part_bytes).
    decode: the *resident* parts a level needs -> weights. A format whose parts carry a
    decompression task (fmt.decompress_bytes[p] > 0) also has
    decompress_part(part, stored_bytes, fmt) -> resident bytes, which engines run on the
    decompression workers."""
    def encode(self, weights: Weights, fmt: ExpertFormat) -> list[bytes]: ...

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]: ...


def resident_part(encoder: Encoder, fmt: ExpertFormat, part: int, data):
    """What a stored part becomes in memory: itself, or its decompressed bytes."""
    return encoder.decompress_part(part, data, fmt) if fmt.decompress_bytes[part] else data


_ENCODERS: dict[str, Encoder] = {}


def register_encoder(name: str, encoder: Encoder) -> None:
    """Make `encoder` the codec of format `name` (replaces an earlier one)."""
    _ENCODERS[name] = encoder


def get_encoder(name: str) -> Encoder:
    if name not in _ENCODERS:
        raise ConfigError(f"no encoder for format {name!r}; registered: {', '.join(sorted(_ENCODERS))}")
    return _ENCODERS[name]


class Bf16Encoder:
    """One part: the raw little-endian bf16 bytes of each matrix, concatenated."""

    def encode(self, weights: Weights, fmt: ExpertFormat) -> list[bytes]:
        chunks = [t.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy()
                  .astype("<i2", copy=False).tobytes() for t in check_weights(weights, fmt)]
        return [b"".join(chunks)]

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        # one copy: the caller's buffer may be reused for the next read
        flat = torch.from_numpy(np.frombuffer(parts[0], dtype="<i2", count=fmt.params).astype(np.int16))
        flat = flat.view(torch.bfloat16)
        out, at = {}, 0
        for name, (o, i) in zip(matrix_names(fmt), fmt.shapes):
            out[name] = flat[at: at + o * i].view(o, i)
            at += o * i
        return out

    def decode_tensor(self, parts: Sequence[torch.Tensor], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        """decode from uint8 tensors on any torch device (a GPU's expert pool): views, no copy."""
        flat = parts[0][:2 * fmt.params].view(torch.bfloat16)      # the store's bytes are little-endian
        out, at = {}, 0
        for name, (o, i) in zip(matrix_names(fmt), fmt.shapes):
            out[name] = flat[at: at + o * i].view(o, i)
            at += o * i
        return out


register_encoder("bf16", Bf16Encoder())


def _register_paper_formats() -> None:
    from executor.mwq import CopiesEncoder, MwqEncoder   # D²MoE nested bit-planes; per-width copies
    from executor.zipcodec import ZipEncoder             # ZipMoE lossless BF16
    register_encoder("mwq", MwqEncoder())
    register_encoder("copies", CopiesEncoder())
    register_encoder("zip", ZipEncoder())


_register_paper_formats()
