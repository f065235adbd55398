"""Units and errors shared by every config reader.

Sizes are strings like "1.5GB", "200MB", "4KiB" (decimal SI prefixes, binary IEC
prefixes); bandwidths are sizes per second ("3.5GB/s"); durations are "80us",
"1.2ms", "0.5s". A bare number is taken in the base unit (bytes, bytes/s, seconds).
"""
from __future__ import annotations

import re


class MoelabError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class ConfigError(MoelabError):
    """Bad configuration or input: the message names the file, the key and what is allowed."""


_SIZE_UNITS = {
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _parse(value, units: dict, suffix: str, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{where}: {what} must be >= 0, got {value!r}")
        return float(value)
    text = str(value).strip().replace(" ", "")
    m = re.fullmatch(_NUMBER + r"([a-zA-Zµ]*)" + re.escape(suffix), text)
    if m is None or m.group(2).lower() not in units:
        allowed = ", ".join(f"{u}{suffix}" for u in units if u)
        raise ConfigError(f"{where}: cannot read {value!r} as {what}; write a number with a unit ({allowed})")
    return float(m.group(1)) * units[m.group(2).lower()]


def parse_size(value, where: str = "size") -> int:
    """'1.5GB' -> 1500000000 bytes."""
    units = dict(_SIZE_UNITS, **{"": 1})
    return int(round(_parse(value, units, "", "a size", where)))


def parse_bandwidth(value, where: str = "bandwidth") -> float:
    """'3.5GB/s' -> 3.5e9 bytes per second."""
    if isinstance(value, str) and not value.strip().endswith("/s"):
        raise ConfigError(f"{where}: cannot read {value!r} as a bandwidth; write e.g. '3.5GB/s' or '800MB/s'")
    return _parse(value, _SIZE_UNITS, "/s", "a bandwidth", where)


def parse_duration(value, where: str = "duration") -> float:
    """'80us' -> 8e-05 seconds."""
    return _parse(value, _TIME_UNITS, "", "a duration", where)


def format_size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f}{unit}"
    return f"{int(nbytes)}B"
