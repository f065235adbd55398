"""Device profiles: what one edge device can do, read from `devices/<name>.yaml`.

YAML schema (every key is required unless marked optional; no other keys are allowed):

    name: jetson-agx-orin-64gb          # the device name (bundled files: the file's stem)
    description: "NVIDIA Jetson ..."     # one line, free text
    memory: 64GB                        # total device memory (size; GB = 1e9 bytes, GiB also accepted)
    expert_budget: 32GB                 # default memory budget for experts (size, <= memory)
    default_storage: nvme               # one of the keys under `storage`
    storage:                            # one entry per storage option: nvme | microsd | usb-ssd | emmc
      nvme:
        read_bandwidth: 3.5GB/s         # large sequential reads (bandwidth)
        latency: 70us                   # fixed per-request latency before the transfer (duration)
        queue_depth: 4                  # useful concurrent requests (integer >= 1)
        description: "Samsung 970 EVO"  # optional, free text
    compute:
      memory_bandwidth: 152.8GB/s       # effective, for reading expert weights (bandwidth)
      flops: 33.4TFLOPS                 # effective bf16/fp16 matmul rate (GFLOPS / TFLOPS)
      overhead: 30us                    # fixed cost per expert call: launch, dispatch (duration)
    decompress:
      workers: 6                        # CPU threads usable for decompression (integer >= 1)
      throughput:                       # per worker, bytes/s of RAW output; keys among lz4, lz4hc, zstd
        lz4: 1.15GB/s

Sizes are "64GB", "200MB", "4GiB"; bandwidths "3.5GB/s"; durations "80us"; compute "33.4TFLOPS".
Quantities must carry a unit (a bare `memory: 64` would silently mean 64 bytes). Every
figure in a bundled file carries its source, or `estimate:` and its derivation, in a
comment on the same line (tests/test_devices.py checks this).

Errors are ConfigError naming the file, the key path (`storage.nvme.read_bandwidth`) and
what is allowed.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from devices.units import ConfigError, format_size, parse_bandwidth, parse_duration, parse_size

DEVICES_DIR = Path(__file__).resolve().parent
STORAGE_KINDS = ("nvme", "microsd", "usb-ssd", "emmc")
CODECS = ("lz4", "lz4hc", "zstd")


@dataclass(frozen=True)
class StorageProfile:
    name: str               # "nvme" | "microsd" | "usb-ssd" | "emmc"
    read_bandwidth: float   # bytes/s, large sequential reads
    latency: float          # seconds, fixed per-request latency before the transfer
    queue_depth: int        # useful concurrent requests (>= 1)
    description: str = ""


@dataclass(frozen=True)
class ComputeProfile:
    memory_bandwidth: float  # bytes/s effective for reading expert weights during compute
    flops: float             # FLOP/s effective for expert matmuls at bf16/fp16
    overhead: float          # seconds, fixed per expert call (kernel launch, dispatch)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int                        # total device memory
    expert_budget_bytes: int                 # default memory budget for experts
    storage: dict[str, StorageProfile]
    default_storage: str
    compute: ComputeProfile
    decompress_workers: int                  # CPU threads usable for decompression
    decompress_throughput: dict[str, float]  # per worker, bytes/s of RAW output, by codec
    path: str = ""                           # file it was loaded from

    def storage_option(self, name: str | None = None) -> StorageProfile:
        """The named storage option; None gives the default."""
        key = self.default_storage if name is None else name
        if key not in self.storage:
            raise ConfigError(f"{self.path or self.name}: device {self.name!r} has no storage option {key!r}; "
                              f"options: {self._storage_list()}")
        return self.storage[key]

    def expert_time(self, weight_bytes: int, params: int, tokens: int) -> float:
        """Roofline: a fixed overhead plus the slower of reading the weights and doing the math."""
        c = self.compute
        return c.overhead + max(weight_bytes / c.memory_bandwidth, 2 * params * tokens / c.flops)

    def describe(self) -> str:
        c = self.compute
        rows = [("memory", f"{format_size(self.memory_bytes)} (default expert budget "
                           f"{format_size(self.expert_budget_bytes)})"),
                ("compute", f"{format_size(c.memory_bandwidth)}/s weight reads, {_format_flops(c.flops)}, "
                            f"{_format_duration(c.overhead)} per expert call")]
        for s in self.storage.values():
            rows.append((f"storage {s.name}",
                         f"{format_size(s.read_bandwidth)}/s, {_format_duration(s.latency)} latency, queue depth "
                         f"{s.queue_depth}" + (" [default]" if s.name == self.default_storage else "")
                         + (f" - {s.description}" if s.description else "")))
        rates = ", ".join(f"{k} {format_size(v)}/s" for k, v in self.decompress_throughput.items())
        rows.append(("decompress", f"{self.decompress_workers} workers; per worker: {rates}"))
        if self.path:
            rows.append(("file", self.path))
        return "\n".join([f"{self.name}: {self.description}"] + [f"  {k:<16}{v}" for k, v in rows])

    def _storage_list(self) -> str:
        return ", ".join(k + (" (default)" if k == self.default_storage else "") for k in self.storage)


# -- loading -------------------------------------------------------------------------------
def list_devices() -> list[str]:
    """Names of the bundled device profiles."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def load_device(name_or_path: str) -> DeviceProfile:
    """A bundled device by name (see list_devices) or a profile YAML by path."""
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{text}: no such device profile file")
    else:
        path = DEVICES_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown device {text!r}; bundled devices: {', '.join(list_devices())} "
                              f"(or give a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read device profile: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _Reader(str(path)).device(data)


_TOP = {"name", "description", "memory", "expert_budget", "default_storage", "storage", "compute", "decompress"}
_STORAGE = {"read_bandwidth", "latency", "queue_depth"}
_COMPUTE = {"memory_bandwidth", "flops", "overhead"}
_DECOMPRESS = {"workers", "throughput"}
_FLOPS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


class _Reader:
    """Turns the parsed YAML of one file into a DeviceProfile; every error names file and key."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key}: {msg}" if key else f"{self.file}: {msg}")

    def mapping(self, value, key: str, required: set[str], optional: frozenset = frozenset()) -> dict:
        """Check that `value` is a mapping with exactly the allowed keys."""
        where = key or "top level"
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(sorted(required | optional))}, "
                                 f"got {type(value).__name__}")
        allowed = required | optional
        for k in value:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(_join(key, k), f"unknown key{hint}; allowed under {where}: "
                                               f"{', '.join(sorted(allowed))}")
        for k in sorted(required):
            if k not in value:
                raise self.fail(_join(key, k), f"missing key (required under {where})")
        return value

    def text(self, value, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def quantity(self, value, key: str, parse, example: str, positive: bool = True) -> float:
        # a bare number would be read in base units (64 -> 64 bytes): demand a unit
        if not isinstance(value, str):
            raise self.fail(key, f"expected a number with a unit, e.g. {example!r}, got {value!r}")
        number = parse(value, f"{self.file}: {key}")
        if positive and number <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return number

    def count(self, value, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"expected an integer >= 1, got {value!r}")
        return value

    def flops(self, value, where: str) -> float:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]?)(?:FLOPS|FLOP/s|flops|flop/s)",
                         value.strip())
        if m is None:
            raise ConfigError(f"{where}: cannot read {value!r} as a compute rate; write e.g. '33.4TFLOPS' or "
                              f"'100GFLOPS' (units: FLOPS, GFLOPS, TFLOPS, PFLOPS)")
        return float(m.group(1)) * _FLOPS[m.group(2).lower()]

    def storage(self, value, key: str, kind: str) -> StorageProfile:
        v = self.mapping(value, key, _STORAGE, frozenset({"description"}))
        return StorageProfile(
            name=kind,
            read_bandwidth=self.quantity(v["read_bandwidth"], f"{key}.read_bandwidth", parse_bandwidth, "3.5GB/s"),
            latency=self.quantity(v["latency"], f"{key}.latency", parse_duration, "80us", positive=False),
            queue_depth=self.count(v["queue_depth"], f"{key}.queue_depth"),
            description=self.text(v["description"], f"{key}.description") if "description" in v else "",
        )

    def device(self, data) -> DeviceProfile:
        d = self.mapping(data, "", _TOP)
        memory = int(self.quantity(d["memory"], "memory", parse_size, "64GB"))
        budget = int(self.quantity(d["expert_budget"], "expert_budget", parse_size, "32GB"))
        if budget > memory:
            raise self.fail("expert_budget", f"{format_size(budget)} exceeds memory {format_size(memory)}")

        raw_storage = d["storage"]
        if not isinstance(raw_storage, dict) or not raw_storage:
            raise self.fail("storage", f"expected a mapping of storage options ({', '.join(STORAGE_KINDS)})")
        storage = {}
        for kind, opt in raw_storage.items():
            if kind not in STORAGE_KINDS:
                raise self.fail(f"storage.{kind}", f"unknown storage option; allowed: {', '.join(STORAGE_KINDS)}")
            storage[kind] = self.storage(opt, f"storage.{kind}", kind)
        default = d["default_storage"]
        if default not in storage:
            raise self.fail("default_storage", f"{default!r} is not one of the storage options here: "
                                               f"{', '.join(storage)}")

        c = self.mapping(d["compute"], "compute", _COMPUTE)
        compute = ComputeProfile(
            memory_bandwidth=self.quantity(c["memory_bandwidth"], "compute.memory_bandwidth", parse_bandwidth,
                                           "150GB/s"),
            flops=self.quantity(c["flops"], "compute.flops", self.flops, "33.4TFLOPS"),
            overhead=self.quantity(c["overhead"], "compute.overhead", parse_duration, "30us", positive=False),
        )

        z = self.mapping(d["decompress"], "decompress", _DECOMPRESS)
        rates = z["throughput"]
        if not isinstance(rates, dict) or not rates:
            raise self.fail("decompress.throughput", f"expected a mapping of codec -> bandwidth, codecs among "
                                                     f"{', '.join(CODECS)}")
        throughput = {}
        for codec, rate in rates.items():
            if codec not in CODECS:
                raise self.fail(f"decompress.throughput.{codec}", f"unknown codec; allowed: {', '.join(CODECS)}")
            throughput[codec] = self.quantity(rate, f"decompress.throughput.{codec}", parse_bandwidth, "1.15GB/s")

        return DeviceProfile(
            name=self.text(d["name"], "name"),
            description=self.text(d["description"], "description"),
            memory_bytes=memory,
            expert_budget_bytes=budget,
            storage=storage,
            default_storage=default,
            compute=compute,
            decompress_workers=self.count(z["workers"], "decompress.workers"),
            decompress_throughput=throughput,
            path=self.file,
        )


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _format_flops(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOPS" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOPS"


def _format_duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"
