"""Expert storage formats as the engines see them: load items (parts) and their sizes.

An expert on storage is a list of *parts*, each one load item (DESIGN.md). A precision
*level* needs a *set* of parts (`parts_of(level)`): a prefix for nested formats (MWQ
bit-planes, zip), one part of its own for per-width copies. A part may be useless without
another (a residual plane without its base): `dependents(part)` are evicted with it.

- bf16: one part, the whole expert.
- mwq:  part 0 is the b1-bit base plane (packed codes + fp16 scale and zero point per
        group), part j>0 the j-th binary residual plane (1 bit per weight + fp16 scale per
        group). Level i (i = 0..bK-b1) is INT(b1+i) and needs parts 0..i.
- zip:  part 0 is the sign+mantissa bytes (one byte per weight, raw), parts 1..K the K
        exponent chunks (compressed; each a ZIP_HEADER_BYTES header + codec payload). The
        only level needs every part. Keeping only part 0 resident is ZipMoE's SM-only tier.
- copies: D²MoE's Matryoshka-Free baseline: part i is a standalone INT(b1+i) copy of the
        expert (packed codes + fp16 scale and zero point per group, like an MWQ base
        plane), and level i needs part i alone. Moving up a level reads a whole new copy.

Torch-free, so the simulator can import it; the executor's encoders produce exactly
these sizes (tests check it; the zip ratio is an input taken from a measurement).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

from devices.units import ConfigError
from workloads.store_index import INDEX, index_field, read_index

SCALE_BYTES = 2  # scales and zero points are stored as float16
ZIP_HEADER_BYTES = 16  # per compressed exponent chunk: magic, codec, raw/payload length, crc32 (executor/zipcodec.py)


def split_sizes(n: int, k: int) -> list[int]:
    """Sizes of k contiguous chunks of n items, as numpy.array_split cuts them."""
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


@dataclass(frozen=True)
class ExpertFormat:
    """Sizes of one expert's parts. Subclasses fill the three per-part lists."""
    shapes: tuple[tuple[int, int], ...]
    name: str = "expert"
    dequantizes = False        # class attribute: computes unpack the weights to BF16 first (mwq, copies)
    part_bytes: tuple[int, ...] = field(init=False)          # bytes on storage (one load item)
    resident_bytes: tuple[int, ...] = field(init=False)      # bytes in memory once ready
    decompress_bytes: tuple[int, ...] = field(init=False)    # raw bytes a decompression task produces (0: none)

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.shapes)

    @property
    def n_parts(self) -> int:
        return len(self.part_bytes)

    @property
    def levels(self) -> int:
        return 1

    def parts_of(self, level: int) -> tuple[int, ...]:
        """The parts (ascending) a token computed at `level` needs. Default: all of them."""
        self.check_level(level)
        return tuple(range(self.n_parts))

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.levels:
            labels = ", ".join(f"{i} ({self.level_label(i)})" for i in range(self.levels))
            raise ConfigError(f"{self.name}: level {level} out of range; levels: {labels}")

    def dependents(self, part: int) -> tuple[int, ...]:
        """Parts useless without `part`, evicted with it. Default: the higher parts (nested planes;
        zip exponent chunks beyond a dropped one, so a partial expert falls back to SM-only)."""
        return tuple(range(part + 1, self.n_parts))

    def level_label(self, level: int) -> str:
        return self.name

    @cached_property
    def level_parts(self) -> tuple[tuple[int, ...], ...]:
        """parts_of every level, precomputed for the engines' hot loops."""
        return tuple(self.parts_of(lvl) for lvl in range(self.levels))

    @cached_property
    def nested(self) -> bool:
        """Every level needs a prefix of the parts, each level's a superset of the one below: an
        expert's needed parts are then those of the highest level any token asks for."""
        return all(parts == tuple(range(len(parts))) for parts in self.level_parts) and \
            all(len(a) <= len(b) for a, b in zip(self.level_parts, self.level_parts[1:]))

    def level_bytes(self, level: int) -> int:
        """Resident bytes the compute of `level` reads."""
        return sum(self.resident_bytes[p] for p in self.parts_of(level))

    @cached_property
    def level_sizes(self) -> tuple[int, ...]:
        """level_bytes of every level, precomputed."""
        return tuple(self.level_bytes(lvl) for lvl in range(self.levels))

    @property
    def expert_bytes(self) -> int:
        return sum(self.part_bytes)

    def _set(self, part: list[int], resident: list[int], decompress: list[int]) -> None:
        object.__setattr__(self, "part_bytes", tuple(part))
        object.__setattr__(self, "resident_bytes", tuple(resident))
        object.__setattr__(self, "decompress_bytes", tuple(decompress))


@dataclass(frozen=True)
class Bf16Format(ExpertFormat):
    name: str = "bf16"

    def __post_init__(self):
        n = 2 * self.params
        self._set([n], [n], [0])


def default_group(shapes) -> int:
    """The paper's g=128 where the input widths allow it, else the largest power of two that
    divides them all (llama-moe's 1376 -> 32): one rule for the simulator and the executor."""
    return next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if all(i % g == 0 for _, i in shapes))


def _int_bytes(shapes, bits: int, group: int) -> int:
    """Packed `bits`-bit codes plus an fp16 scale and zero point per group (an MWQ base plane)."""
    return sum(math.ceil(o * i * bits / 8) + 2 * SCALE_BYTES * o * (i // group) for o, i in shapes)


@dataclass(frozen=True)
class _IntLadder(ExpertFormat):
    """Integer widths INT b1..INT bK, one level each, scales per group of `group` inputs: what
    MWQ's nested planes and the per-width copies share (they differ in their parts)."""
    dequantizes = True
    b1: int = 2
    bK: int = 4
    group: int | None = None       # None: default_group(shapes)

    def _check_ladder(self) -> None:
        if self.group is None:
            object.__setattr__(self, "group", default_group(self.shapes))
        if not 1 <= self.b1 <= self.bK <= 16:
            raise ConfigError(f"mwq: need 1 <= b1 <= bK <= 16, got b1={self.b1}, bK={self.bK}")
        for out, inp in self.shapes:
            if inp % self.group:
                raise ConfigError(f"mwq: group size {self.group} does not divide the input dimension {inp}")

    @property
    def levels(self) -> int:
        return self.bK - self.b1 + 1

    def level_label(self, level: int) -> str:
        return f"int{self.b1 + level}"


@dataclass(frozen=True)
class MwqFormat(_IntLadder):
    name: str = "mwq"

    def __post_init__(self):
        self._check_ladder()
        base = _int_bytes(self.shapes, self.b1, self.group)
        plane = sum(math.ceil(o * i / 8) + SCALE_BYTES * o * (i // self.group) for o, i in self.shapes)
        sizes = [base] + [plane] * (self.bK - self.b1)
        self._set(sizes, sizes, [0] * len(sizes))

    def parts_of(self, level: int) -> tuple[int, ...]:
        self.check_level(level)
        return tuple(range(level + 1))


@dataclass(frozen=True)
class CopiesFormat(_IntLadder):
    """One standalone copy per width (D²MoE's Matryoshka-Free baseline): level i is part i."""
    name: str = "copies"

    def __post_init__(self):
        self._check_ladder()
        sizes = [_int_bytes(self.shapes, b, self.group) for b in range(self.b1, self.bK + 1)]
        self._set(sizes, sizes, [0] * len(sizes))

    def parts_of(self, level: int) -> tuple[int, ...]:
        self.check_level(level)
        return (level,)

    def dependents(self, part: int) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class ZipFormat(ExpertFormat):
    name: str = "zip"
    chunks: int = 3
    codec: str = "lz4hc"
    exponent_ratio: float = 0.40  # compressed/raw exponent bytes; ZipMoE's code profiles: 0.40 LZ4(HC), 0.36 zstd

    def __post_init__(self):
        if self.chunks < 1:
            raise ConfigError(f"zip: chunks must be >= 1, got {self.chunks}")
        if not 0 < self.exponent_ratio <= 1.1:
            raise ConfigError(f"zip: exponent_ratio must be in (0, 1.1], got {self.exponent_ratio}")
        n = self.params
        raw = split_sizes(n, self.chunks)
        # exponent_ratio = codec payload bytes / raw exponent bytes (headers excluded); the total
        # payload is spread over the chunks like the raw bytes, so an expert's size is exact
        # when the ratio is one measured on it (executor/zipcodec.exponent_ratio)
        payload = split_sizes(round(n * self.exponent_ratio), self.chunks)
        comp = [ZIP_HEADER_BYTES + p for p in payload]
        self._set([n] + comp, [n] + raw, [0] + raw)


FORMATS = {"bf16": Bf16Format, "mwq": MwqFormat, "zip": ZipFormat, "copies": CopiesFormat}
MWQ_LADDERS = {"v1": (2, 4), "v2": (5, 8)}               # D²MoE's ladders
SINGLE_WIDTHS = {"int4": (4, 4), "int8": (8, 8)}          # one level: the uniform-width baselines


def make_format(name: str, shapes, **options) -> ExpertFormat:
    """Build a format by name for experts of the given (out, in) shapes."""
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    ladder = options.pop("ladder", None)
    if ladder is not None:
        ladders = MWQ_LADDERS | SINGLE_WIDTHS
        if ladder not in ladders:
            raise ConfigError(f"unknown mwq ladder {ladder!r}; known: {', '.join(ladders)}")
        options["b1"], options["bK"] = ladders[ladder]
    try:
        return FORMATS[name](shapes=tuple(tuple(s) for s in shapes), **options)
    except TypeError as e:
        raise ConfigError(f"format {name!r}: bad option ({e})") from None


def format_options(fmt: ExpertFormat) -> dict:
    """The constructor options that rebuild `fmt` with make_format (besides name and shapes)."""
    return {f.name: getattr(fmt, f.name) for f in fields(fmt) if f.init and f.name not in ("shapes", "name")}


def describe_format(fmt: ExpertFormat) -> dict:
    """The format as a store's index records it (workloads/store_index.py); format_from_index reads it."""
    return {"name": fmt.name, "options": format_options(fmt), "shapes": [list(s) for s in fmt.shapes]}


def format_from_index(data: dict, path) -> ExpertFormat:
    """The format recorded in a store index read by workloads/store_index.py read_index."""
    f = index_field(data, "format", dict, "", path)
    name = index_field(f, "name", str, "format.", path)
    options = index_field(f, "options", dict, "format.", path)
    shapes = index_field(f, "shapes", list, "format.", path)
    if not shapes or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s)
                             for s in shapes):
        raise ConfigError(f"{path}: field 'format.shapes' must be a list of [out, in] positive integers, got {shapes!r}")
    try:
        return make_format(name, shapes, **options)
    except ConfigError as e:
        raise ConfigError(f"{path}: field 'format': {e}") from None


def stored_format(folder) -> ExpertFormat | None:
    """The format recorded in an expert store's index, read without the executor: the simulator
    then uses the store's own part sizes (a zip store's measured compression), so both engines
    read the same bytes. None if there is no store."""
    if not (Path(folder) / INDEX).exists():
        return None
    try:
        return format_from_index(read_index(folder), Path(folder) / INDEX)
    except ConfigError as e:
        raise ConfigError(f"{e}; rebuild it with `moelab store build`") from None


LADDERS = MWQ_LADDERS | SINGLE_WIDTHS
CODECS = ("lz4", "lz4hc", "zstd")
LADDERED = ("mwq", "copies")


@dataclass(frozen=True)
class FormatSpec:
    """A format as data (a run spec's `format:`): its name and the options that apply to it, the
    defaults filled in (mwq/copies: ladder v1; zip: codec lz4hc), so equal runs compare equal. An
    option the format does not have is refused, not ignored."""
    name: str = "bf16"
    ladder: str | None = None
    codec: str | None = None
    group: int | None = None

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ConfigError(f"unknown format {self.name!r}; known: {', '.join(FORMATS)}")
        laddered = self.name in LADDERED
        for key, applies in (("ladder", laddered), ("codec", self.name == "zip"), ("group", laddered)):
            if getattr(self, key) is not None and not applies:
                owners = "mwq and copies have" if key != "codec" else "zip has"
                raise ConfigError(f"{key} {getattr(self, key)}: only {owners} a {key} (this format is "
                                  f"{self.name}); drop it or change the format")
        if laddered and self.ladder is None:
            object.__setattr__(self, "ladder", "v1")
        if self.name == "zip" and self.codec is None:
            object.__setattr__(self, "codec", "lz4hc")
        if self.ladder is not None and self.ladder not in LADDERS:
            raise ConfigError(f"ladder: unknown ladder {self.ladder!r}; known: {', '.join(LADDERS)}")
        if self.codec is not None and self.codec not in CODECS:
            raise ConfigError(f"codec: unknown codec {self.codec!r}; known: {', '.join(CODECS)}")
        if self.group is not None and (not isinstance(self.group, int) or isinstance(self.group, bool)
                                       or self.group < 1):
            raise ConfigError(f"group: must be a whole number >= 1, got {self.group!r}")

    @classmethod
    def from_doc(cls, doc, where: str = "format") -> "FormatSpec":
        """`bf16`, or {name: mwq, ladder: v2} / {name: zip, codec: zstd}."""
        doc = {"name": doc} if isinstance(doc, str) else doc
        if not isinstance(doc, dict) or "name" not in doc or set(doc) - {"name", "ladder", "codec", "group"}:
            raise ConfigError(f"{where}: a format name ({', '.join(FORMATS)}) or a mapping of name, ladder, codec, "
                              f"group; got {doc!r}")
        try:
            return cls(**doc)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_doc(self):
        doc = {k: v for k, v in (("name", self.name), ("ladder", self.ladder), ("codec", self.codec),
                                 ("group", self.group)) if v is not None}
        return doc["name"] if len(doc) == 1 else doc

    def options(self) -> dict:
        """make_format's and the store builder's options."""
        return {k: v for k, v in (("ladder", self.ladder), ("codec", self.codec), ("group", self.group))
                if v is not None}

    def make(self, shapes) -> ExpertFormat:
        return make_format(self.name, shapes, **self.options())


def level_bits(fmt: ExpertFormat) -> list[int]:
    """Nominal bits per weight of each precision level (MWQ and copies: INT b1..bK; bf16/zip: 16)."""
    if hasattr(fmt, "b1"):
        return [fmt.b1 + i for i in range(fmt.levels)]
    return [16] * fmt.levels
