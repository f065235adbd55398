"""Byte-level tokenizer: token i < 256 is byte i; one special token ends a document.

Honest and lossless for any text (UTF-8 bytes), no training, and perplexities are per
byte, so they compare directly with byte-level baselines. Saved as a small JSON file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

from devices.atomic import atomic_write
from devices.units import ConfigError

EOT = "<|endoftext|>"


class ByteTokenizer:
    kind = "bytes"

    def __init__(self, specials: tuple[str, ...] = (EOT,)):
        self.specials = tuple(specials)
        self.special_ids = {s: 256 + i for i, s in enumerate(self.specials)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    @property
    def eot_id(self) -> int:
        return self.special_ids[EOT]

    def encode(self, text: Union[str, bytes]) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text (invalid UTF-8 replaced); special tokens are written by name."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self.specials[i - 256] if i - 256 < len(self.specials) else f"<|unk{i}|>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size, "specials": list(self.specials)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> "ByteTokenizer":
        if d.get("type") != cls.kind:
            raise ConfigError(f"{where}: tokenizer type {d.get('type')!r} unknown; allowed: {cls.kind!r}")
        tok = cls(tuple(d.get("specials", (EOT,))))
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise ConfigError(f"{where}: vocab_size {d['vocab_size']} does not match {tok.vocab_size} "
                              f"(256 bytes + {len(tok.specials)} specials)")
        return tok

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ByteTokenizer":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read tokenizer: {e}") from None
