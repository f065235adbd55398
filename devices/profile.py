"""Device profiles: what one edge device can do, read from `devices/<name>.yaml`.

YAML schema (every key is required unless marked optional; no other keys are allowed):

    name: jetson-agx-orin-64gb          # the device name (bundled files: the file's stem)
    description: "NVIDIA Jetson ..."     # one line, free text
    memory: 64GB                        # total device memory (size; GB = 1e9 bytes, GiB also accepted)
    expert_budget: 32GB                 # default memory budget for experts (size, <= memory)
    memory_reserved: 1.5GB              # optional: OS, runtime and engine buffers, never for weights or
                                        #   KV (workloads/memory.py's split; default 0)
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
      kernels:                          # optional: per format, the expert call's kernel (devices/kernels.py:
        mwq: {tokens_per_call: 1}       #   tokens per call, dequantization per call / once / fused, rates)
      measured:                         # optional: what `moelab profile` measured on a host (see below)
    decompress:
      workers: 6                        # CPU threads usable for decompression (integer >= 1)
      throughput:                       # per worker, bytes/s of RAW output; keys among lz4, lz4hc, zstd
        lz4: 1.15GB/s

`compute.measured` (optional; `moelab profile` writes it) holds tables measured on the host
where the roofline is not what the host does. Each table gives seconds at the token counts of
`tokens`, interpolated linearly between them (and extrapolated from the last two points):

      measured:
        model: tiny-moe                 # the model the tables time (its name in the catalog / run)
        tokens: [1, 2, 4, 8]            # token counts of every table (increasing integers >= 1)
        experts:                        # one expert call per format key and level (executor's path:
          bf16: [[80us, 85us, 90us, 99us]]      # decode/dequantize/re-assemble, then the matmuls)
        dense:                          # one layer's non-expert part (attention, norms, router)
          prefill: [200us, ...]         #   at tokens = batch x prompt
          decode: [200us, ...]          #   at tokens = batch
        step:                           # per step, outside the layers (embedding, output head, sampling)
          prefill: [60us, ...]
          decode: [60us, ...]
        decision_overhead: 120us        # the decision point's own cost per layer (decide + bookkeeping)
        load_overhead: 8us              # per load item the decision point issues
        compute_gap: 10us               # optional (default 0): the runtime's own time between two expert
                                        #   calls of a layer (its loop: bookkeeping, waiting on a queue)
        wake: 25us                      # optional (default 0): a part's ready (its read's or decompression's
                                        #   end) -> the start of the expert call that waited for it (the
                                        #   worker's callback, the main thread woken from its queue)
        handoff: 60us                   # optional (default 0): a read's end -> its decompression's start on
                                        #   an idle worker (the read's callback, the pool's worker woken)
        dense_after_loads: 40us         # optional (default 0): what a dense part takes beyond its table
                                        #   after a decision point that loaded (the readers' tails, caches
                                        #   the reads disturbed)
        call_after_load:                # optional, per format key (default 0): what an expert call takes
          bf16: 15us                    #   beyond its table when its expert was loaded at this decision
                                        #   point (its weights fresh from storage, not in the CPU's caches)
        contention:                     # optional: per format key, how the executor's threads share the cores
          zip: {read: 0.6, decompress: 0.2, call: 15us, dense: 80us, stall: 0.5}
                                        # read / decompress: the share of its speed the main thread loses
                                        #   (expert calls and dense parts) while >= 1 read / decompression is
                                        #   in flight (0 <= x < 1; summed when both); call / dense: what an
                                        #   expert call / a dense part costs in runs beyond its table;
                                        #   stall: the share a read loses while the main thread works
        host:                           # optional: the structural host model's figures (lock and CPU shares
                                        #   per operation, the cores measured on): devices/host_figures.py;
                                        #   with them the simulator charges sim/host_model.py, not contention;
                                        #   with its `beside:` co-runs, sim/host_beside.py

They apply to the named model only (other models keep the roofline). Format keys:
bf16, zip, mwq-int2-4 (mwq / copies with their widths); see measured_key.

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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devices.host_figures import HostFigures, read_host
from devices.kernels import DEQUANT_MODES, FIELDS as KERNEL_FIELDS, Kernel
from devices.tiers import CpuProfile, Tier, default_tiers, describe_rows, read_cpu, read_tiers
from devices.units import ConfigError, format_size, parse_bandwidth, parse_duration, parse_size

DEVICES_DIR = Path(__file__).resolve().parent
STORAGE_KINDS = ("nvme", "microsd", "usb-ssd", "emmc", "disk", "host-ram")   # disk: a host's own, as measured;
# host-ram: experts already in RAM (the page cache), copied where they compute
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
    measured: "MeasuredTables | None" = None   # host tables (compute.measured), if profiled
    kernels: dict = field(default_factory=dict)  # format name -> Kernel (compute.kernels); others: the roofline


def measured_key(fmt) -> str:
    """The key of a format's table under compute.measured.experts: its name, plus the widths
    of a quantized ladder (mwq-int2-4), whose levels differ from ladder to ladder."""
    b1 = getattr(fmt, "b1", None)
    return fmt.name if b1 is None else f"{fmt.name}-int{b1}-{fmt.bK}"


def interpolate(xs, ys, x: float) -> float:
    """Piecewise linear through (xs, ys) (xs increasing); the first value below xs[0], the
    line through the last two points beyond xs[-1]."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Contention:
    """How the executor's threads share the host's cores, for one format (compute.measured.contention).
    While at least one read is in flight the main thread's work (expert calls, dense parts) runs at
    1 - read of its speed, while a decompression runs at 1 - decompress (1 - both when both); and an
    expert call / a dense part costs `call` / `dense` seconds more in runs than its table says. A read
    in turn runs at 1 - stall of its speed while the main thread works (its decision path, expert
    calls): the reader thread waits for the cores (and the interpreter) the main thread holds."""
    read: float = 0.0
    decompress: float = 0.0
    call: float = 0.0
    dense: float = 0.0
    stall: float = 0.0      # the share of its speed a read loses while the main thread works

    def rate(self, reading: bool, decompressing: bool) -> float:
        return 1.0 - (self.read if reading else 0.0) - (self.decompress if decompressing else 0.0)


@dataclass(frozen=True)
class MeasuredTables:
    """compute.measured: seconds against token counts, measured on a host (`moelab profile`)."""
    model: str
    tokens: tuple[int, ...]
    experts: dict[str, tuple[tuple[float, ...], ...]]   # format key -> per level -> seconds at `tokens`
    dense_prefill: tuple[float, ...]
    dense_decode: tuple[float, ...]
    step_prefill: tuple[float, ...]
    step_decode: tuple[float, ...]
    decision_overhead: float                            # seconds per decision point
    load_overhead: float                                # seconds per load item issued
    compute_gap: float = 0.0                            # seconds between two expert calls of a layer
    wake: float = 0.0                                   # seconds from a part's ready to the call that waited
    handoff: float = 0.0                                # seconds from a read's end to its decompression's start
    dense_after_loads: float = 0.0                      # seconds a dense part adds after a decision that loaded
    call_after_load: dict[str, float] = field(default_factory=dict)   # format key -> seconds a call adds
                                                        #   when its expert was loaded at its decision point
    contention: dict[str, "Contention"] = field(default_factory=dict)   # format key -> how threads share cores
    host: HostFigures | None = None                     # the structural host model's figures, if measured

    def expert(self, key: str, level: int, tokens: int) -> float:
        return interpolate(self.tokens, self.experts[key][level], tokens)

    def dense(self, tokens: int, prefill: bool) -> float:
        return interpolate(self.tokens, self.dense_prefill if prefill else self.dense_decode, tokens)

    def step(self, tokens: int, prefill: bool) -> float:
        return interpolate(self.tokens, self.step_prefill if prefill else self.step_decode, tokens)


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
    tiers: tuple[Tier, ...] = ()             # memory levels, the accelerator's first (devices/tiers.py)
    cpu: CpuProfile | None = None            # the host CPU as a compute resource (devices/tiers.py)
    memory_reserved_bytes: int = 0           # OS, runtime, engine buffers: not for weights or KV

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
        rows += [(f"kernel {fmt}", k.describe()) for fmt, k in c.kernels.items()]
        for s in self.storage.values():
            rows.append((f"storage {s.name}",
                         f"{format_size(s.read_bandwidth)}/s, {_format_duration(s.latency)} latency, queue depth "
                         f"{s.queue_depth}" + (" [default]" if s.name == self.default_storage else "")
                         + (f" - {s.description}" if s.description else "")))
        if c.measured is not None:
            m = c.measured
            rows.append(("measured", f"tables for {m.model} at {list(m.tokens)} tokens: {', '.join(m.experts)}; "
                                     f"{_format_duration(m.decision_overhead)} per decision point, "
                                     f"{_format_duration(m.load_overhead)} per load, "
                                     f"{_format_duration(m.compute_gap)} between expert calls, "
                                     f"{_format_duration(m.wake)} to wake for a part, "
                                     f"{_format_duration(m.handoff)} from a read to its decompression, "
                                     f"+{_format_duration(m.dense_after_loads)} per dense part after loads"
                                     + "".join(f"; {k}: main thread at {1 - c.read:.0%} while reading, "
                                               f"{1 - c.decompress:.0%} while decompressing, "
                                               f"+{_format_duration(c.call)} per expert call, "
                                               f"+{_format_duration(c.dense)} per dense part, "
                                               f"reads at {1 - c.stall:.0%} while it works"
                                               for k, c in m.contention.items())))
            if m.host is not None:
                rows.append(("host model", f"structural (sim/host_model.py): {m.host.cores} cores, the interpreter "
                                           f"lock; shares for {', '.join(m.host.calls)}"))
        if len(self.tiers) > 1 or self.cpu is not None:
            rows += describe_rows(self)
        rates = ", ".join(f"{k} {format_size(v)}/s" for k, v in self.decompress_throughput.items())
        rows.append(("decompress", f"{self.decompress_workers} workers; per worker: {rates}"))
        if self.path:
            rows.append(("file", self.path))
        width = max(16, *(len(k) + 2 for k, _ in rows))      # labels then values, in two columns
        return "\n".join([f"{self.name}: {self.description}"] + [f"  {k:<{width}}{v}" for k, v in rows])

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
_TOP_OPTIONAL = frozenset({"memory_reserved", "tiers", "cpu"})   # tiers, cpu: devices/tiers.py
_STORAGE = {"read_bandwidth", "latency", "queue_depth"}
_COMPUTE = {"memory_bandwidth", "flops", "overhead"}
KERNEL_FORMATS = ("bf16", "mwq", "copies", "zip")
_MEASURED = {"model", "tokens", "experts", "dense", "step", "decision_overhead", "load_overhead"}
_PHASES = {"prefill", "decode"}
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

    def durations(self, value, key: str, n: int) -> tuple[float, ...]:
        """A table row: `n` durations, one per token count."""
        if not isinstance(value, list) or len(value) != n:
            raise self.fail(key, f"expected a list of {n} durations (one per entry of tokens), got {value!r}")
        return tuple(self.quantity(v, f"{key}[{i}]", parse_duration, "80us") for i, v in enumerate(value))

    def measured(self, value, key: str) -> MeasuredTables:
        m = self.mapping(value, key, _MEASURED, frozenset({"compute_gap", "wake", "handoff", "dense_after_loads", "call_after_load", "contention", "host", "read_interference",
                                                                     "decompress_interference"}))
        for old in ("read_interference", "decompress_interference"):
            if old in m:
                raise self.fail(f"{key}.{old}", "was replaced by compute.measured.contention (how the executor's "
                                                "threads share the cores, per format); re-run `moelab profile`")
        tokens = m["tokens"]
        if (not isinstance(tokens, list) or not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1
                                                               for t in tokens)
                or any(b <= a for a, b in zip(tokens, tokens[1:]))):
            raise self.fail(f"{key}.tokens", f"expected increasing integers >= 1, got {tokens!r}")
        n = len(tokens)
        experts = m["experts"]
        if not isinstance(experts, dict) or not experts:
            raise self.fail(f"{key}.experts", "expected a mapping of format key -> list of levels' rows")
        tables = {}
        for fmt, levels in experts.items():
            if not isinstance(levels, list) or not levels:
                raise self.fail(f"{key}.experts.{fmt}", f"expected a list of rows (one per level), got {levels!r}")
            tables[str(fmt)] = tuple(self.durations(row, f"{key}.experts.{fmt}[{i}]", n)
                                     for i, row in enumerate(levels))
        dense = self.mapping(m["dense"], f"{key}.dense", _PHASES)
        step = self.mapping(m["step"], f"{key}.step", _PHASES)
        return MeasuredTables(
            model=self.text(m["model"], f"{key}.model"), tokens=tuple(tokens), experts=tables,
            dense_prefill=self.durations(dense["prefill"], f"{key}.dense.prefill", n),
            dense_decode=self.durations(dense["decode"], f"{key}.dense.decode", n),
            step_prefill=self.durations(step["prefill"], f"{key}.step.prefill", n),
            step_decode=self.durations(step["decode"], f"{key}.step.decode", n),
            decision_overhead=self.quantity(m["decision_overhead"], f"{key}.decision_overhead", parse_duration,
                                            "120us", positive=False),
            load_overhead=self.quantity(m["load_overhead"], f"{key}.load_overhead", parse_duration, "8us",
                                        positive=False),
            compute_gap=self.quantity(m.get("compute_gap", "0s"), f"{key}.compute_gap", parse_duration, "10us",
                                      positive=False),
            wake=self.quantity(m.get("wake", "0s"), f"{key}.wake", parse_duration, "25us", positive=False),
            handoff=self.quantity(m.get("handoff", "0s"), f"{key}.handoff", parse_duration, "60us", positive=False),
            dense_after_loads=self.quantity(m.get("dense_after_loads", "0s"), f"{key}.dense_after_loads",
                                            parse_duration, "40us", positive=False),
            call_after_load=self.per_format(m.get("call_after_load", {}), f"{key}.call_after_load"),
            contention=self.contention(m.get("contention", {}), f"{key}.contention"),
            host=read_host(self, m["host"], f"{key}.host", n) if "host" in m else None)

    def kernels(self, value, key: str) -> dict[str, Kernel]:
        """compute.kernels: format name -> its expert-call kernel (devices/kernels.py)."""
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of format ({', '.join(KERNEL_FORMATS)}) -> kernel, got {value!r}")
        out = {}
        for fmt, v in value.items():
            where = f"{key}.{fmt}"
            if fmt not in KERNEL_FORMATS:
                raise self.fail(where, f"unknown format; allowed: {', '.join(KERNEL_FORMATS)}")
            v = self.mapping(v if v is not None else {}, where, set(), frozenset(KERNEL_FIELDS))
            m = v.get("tokens_per_call")
            if m is not None:
                m = self.count(m, f"{where}.tokens_per_call")
            dequant = v.get("dequant", "per-call")
            if dequant not in DEQUANT_MODES:
                raise self.fail(f"{where}.dequant", f"must be one of {', '.join(DEQUANT_MODES)}, got {dequant!r}")
            rates = {k: self.quantity(v[k], f"{where}.{k}", parse_bandwidth, "20GB/s")
                     for k in ("weight_bandwidth", "dequant_bandwidth") if k in v}
            overhead = (self.quantity(v["overhead"], f"{where}.overhead", parse_duration, "20us", positive=False)
                        if "overhead" in v else None)
            gemm = self.count(v["gemm_from"], f"{where}.gemm_from") if "gemm_from" in v else None
            out[str(fmt)] = Kernel(tokens_per_call=m, dequant=dequant, overhead=overhead, gemm_from=gemm, **rates)
        return out

    def per_format(self, value, key: str) -> dict[str, float]:
        """A mapping of format key -> duration (compute.measured.call_after_load)."""
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of format key -> duration, got {value!r}")
        return {str(fmt): self.quantity(v, f"{key}.{fmt}", parse_duration, "15us", positive=False)
                for fmt, v in value.items()}

    def contention(self, value, key: str) -> dict[str, Contention]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of format key -> {{read, decompress, call, dense}}, got {value!r}")
        out = {}
        for fmt, v in value.items():
            where = f"{key}.{fmt}"
            v = self.mapping(v, where, set(), frozenset({"read", "decompress", "call", "dense", "stall"}))
            shares = {}
            for k in ("read", "decompress", "stall"):
                x = v.get(k, 0.0)
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < 1:
                    raise self.fail(f"{where}.{k}", f"expected a share of speed lost, 0 <= x < 1, got {x!r}")
                shares[k] = float(x)
            if shares["read"] + shares["decompress"] >= 1:
                raise self.fail(where, f"read + decompress must stay below 1 (the main thread would stop), got "
                                       f"{shares['read']} + {shares['decompress']}")
            out[str(fmt)] = Contention(**shares, **{k: self.quantity(v.get(k, "0s"), f"{where}.{k}", parse_duration,
                                                                   "15us", positive=False) for k in ("call", "dense")})
        return out

    def device(self, data) -> DeviceProfile:
        d = self.mapping(data, "", _TOP, _TOP_OPTIONAL)
        memory = int(self.quantity(d["memory"], "memory", parse_size, "64GB"))
        budget = int(self.quantity(d["expert_budget"], "expert_budget", parse_size, "32GB"))
        if budget > memory:
            raise self.fail("expert_budget", f"{format_size(budget)} exceeds memory {format_size(memory)}")
        reserved = int(self.quantity(d.get("memory_reserved", "0B"), "memory_reserved", parse_size, "1GB",
                                     positive=False))
        if reserved >= memory:
            raise self.fail("memory_reserved", f"{format_size(reserved)} leaves nothing of memory {format_size(memory)}")

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

        c = self.mapping(d["compute"], "compute", _COMPUTE, frozenset({"measured", "kernels"}))
        compute = ComputeProfile(
            memory_bandwidth=self.quantity(c["memory_bandwidth"], "compute.memory_bandwidth", parse_bandwidth,
                                           "150GB/s"),
            flops=self.quantity(c["flops"], "compute.flops", self.flops, "33.4TFLOPS"),
            overhead=self.quantity(c["overhead"], "compute.overhead", parse_duration, "30us", positive=False),
            measured=self.measured(c["measured"], "compute.measured") if "measured" in c else None,
            kernels=self.kernels(c.get("kernels", {}), "compute.kernels"),
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
            tiers=read_tiers(self, d["tiers"], memory) if "tiers" in d else default_tiers(memory),
            cpu=read_cpu(self, d["cpu"]) if "cpu" in d else None,
            memory_reserved_bytes=reserved,
        )


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _format_flops(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOPS" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOPS"


def _format_duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"
