"""Power modes and power figures of a device, read from `devices/power/<device>.yaml`.

A Jetson runs under a power mode (`nvpmodel -m ID`): each mode takes CPU cores offline and caps
the CPU, GPU and memory (EMC) clocks and the GPU's powered TPCs. The device profile
(devices/<device>.yaml) states its figures at one mode, the file's `reference`; a mode scales the
figures it caps (`with_mode`), so the simulated compute changes by exactly the caps:

    compute.flops              x gpu_tpcs / ref  x  gpu_clock / ref
    compute.memory_bandwidth   x emc_clock / ref            (and the kernels' weight / dequant rates)
    compute.overhead           x ref / cpu_clock            (the launch path runs on the CPU; kernels too)
    decompress.throughput      x cpu_clock / ref            (per worker: a CPU core)
    decompress.workers         min(the profile's, cpu_cores - 2): the profiles leave two cores to the
                               executor's main and I/O threads
Storage is not capped by a mode. A profile measured on a host (compute.measured) was measured in
one mode and is refused: profile the host again in the other mode.

Schema (every key required unless marked optional; no other keys):

    device: jetson-orin-nano-8gb        # the device profile the figures are for (the file's stem)
    reference: MAXN_SUPER               # the mode the device profile's figures are stated at
    modes:                              # each mode's caps (none above the reference's)
      25W:
        description: "..."             # optional, free text
        cpu_cores: 6                    # CPU cores online (integer >= 1)
        cpu_clock: 1344MHz              # CPU clock cap (MHz / GHz)
        gpu_clock: 918MHz               # GPU clock cap
        gpu_tpcs: 4                     # GPU TPCs powered (2 SMs each)
        emc_clock: 3199MHz              # memory controller clock cap
    power:                              # watts at the reference mode ("4.5W", "450mW")
      board: 4.5W                       # module and carrier at idle: drawn all the time
      compute:                          # what runs the experts and dense parts (the GPU and its host thread)
        busy: 8.5W
        idle: 0W
        static: 0.1                     # share of busy power no cap scales (0 <= x <= 1)
        clock_exponent: 2               # the rest scales as units x clock^exponent
      decompress:                       # one CPU core running a decompression worker
        busy: 0.83W
        idle: 0W
        static: 0.1
        clock_exponent: 2
        concurrency: 2.0                # mean workers busy while any is (the timeline records the union)
      memory:                           # DRAM while the computes stream weights, at the reference EMC clock
        busy: 2.46W
        idle: 0W
      storage:                          # per storage option of the device profile
        nvme:
          busy: 6.2W
          idle: 0.04W

In a mode, compute busy = busy x (static + (1 - static) x tpcs/ref x (gpu_clock/ref)^exponent); one
decompression core's busy power scales the same way with the CPU clock, and the timeline charges
min(concurrency, the mode's workers) of them while any worker is busy; memory busy scales with the
EMC clock (the energy per bit stays); the board, the idle figures and the storage stay. Every figure
carries its source or `estimate:` with its derivation in a comment on its line (tests check it).
Errors are ConfigError naming the file and the key path.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from devices.profile import STORAGE_KINDS, DeviceProfile, _Reader
from devices.units import ConfigError, _parse

POWER_DIR = Path(__file__).resolve().parent / "power"
CAPS = ("cpu_cores", "cpu_clock", "gpu_clock", "gpu_tpcs", "emc_clock")
_SCALED = {"busy", "idle", "static", "clock_exponent"}
_HZ = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_WATTS = {"": 1.0, "m": 1e-3}


@dataclass(frozen=True)
class Mode:
    """One power mode's caps (clocks in Hz)."""
    name: str
    cpu_cores: int
    cpu_clock: float
    gpu_clock: float
    gpu_tpcs: int
    emc_clock: float
    description: str = ""

    def describe(self) -> str:
        return (f"{self.cpu_cores} CPU cores at {self.cpu_clock / 1e6:.0f} MHz, GPU {self.gpu_tpcs} TPCs at "
                f"{self.gpu_clock / 1e6:.0f} MHz, memory at {self.emc_clock / 1e6:.0f} MHz")


@dataclass(frozen=True)
class Scaled:
    """A resource's power at the reference mode and how the caps scale it."""
    busy: float
    idle: float
    static: float = 1.0
    clock_exponent: float = 0.0


@dataclass(frozen=True)
class PowerSpec:
    device: str
    reference: str
    modes: dict[str, Mode]
    board: float
    compute: Scaled
    decompress: Scaled
    concurrency: float
    memory: Scaled
    storage: dict[str, tuple[float, float]]    # option -> (busy, idle)
    path: str = ""

    def mode(self, name: str | None) -> Mode:
        """The named mode (case-insensitive); None: the reference."""
        if name is None:
            return self.modes[self.reference]
        for key, m in self.modes.items():
            if key.lower() == str(name).lower():
                return m
        raise ConfigError(f"{self.device} has no power mode {name!r}; modes: {', '.join(self.modes)} "
                          f"(devices/power/{self.device}.yaml)")

    def ratios(self, mode: Mode) -> dict[str, float]:
        ref = self.modes[self.reference]
        return {"cpu": mode.cpu_clock / ref.cpu_clock, "gpu": mode.gpu_clock / ref.gpu_clock,
                "tpcs": mode.gpu_tpcs / ref.gpu_tpcs, "emc": mode.emc_clock / ref.emc_clock}


# -- loading ---------------------------------------------------------------------------------------
def power_file(name: str) -> Path | None:
    """The bundled power file of a device name, or None."""
    path = POWER_DIR / f"{Path(str(name)).stem}.yaml"
    return path if path.is_file() else None


def list_power_devices() -> list[str]:
    return sorted(p.stem for p in POWER_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=32)
def load_power(name_or_path: str) -> PowerSpec:
    """A device's power file, by device name (bundled) or by path."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else power_file(text)
    if path is None or not path.is_file():
        raise ConfigError(f"{name_or_path}: no power figures (no devices/power/{Path(text).stem}.yaml); devices with "
                          f"power modes: {', '.join(list_power_devices())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read power file: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _PowerReader(str(path)).spec(data)


class _PowerReader(_Reader):
    def watts(self, value, key: str) -> float:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a power with a unit, e.g. '4.5W' or '450mW', got {value!r}")
        return _parse(value, _WATTS, "W", "a power", f"{self.file}: {key}")

    def clock(self, value, key: str) -> float:
        if not isinstance(value, str) or not re.search(r"[hH]z$", value.strip()):
            raise self.fail(key, f"expected a clock with a unit, e.g. '1344MHz', got {value!r}")
        hz = _parse(value.strip()[:-2] + "Hz", _HZ, "Hz", "a clock", f"{self.file}: {key}")
        if hz <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return hz

    def number(self, value, key: str, low: float, high: float | None = None) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low \
            and (high is None or value <= high)
        if not ok:
            bound = f"{low} <= x" + (f" <= {high}" if high is not None else "")
            raise self.fail(key, f"expected a number, {bound}, got {value!r}")
        return float(value)

    def mode(self, name: str, value, key: str) -> Mode:
        v = self.mapping(value, key, set(CAPS), frozenset({"description"}))
        return Mode(str(name), self.count(v["cpu_cores"], f"{key}.cpu_cores"),
                    self.clock(v["cpu_clock"], f"{key}.cpu_clock"), self.clock(v["gpu_clock"], f"{key}.gpu_clock"),
                    self.count(v["gpu_tpcs"], f"{key}.gpu_tpcs"), self.clock(v["emc_clock"], f"{key}.emc_clock"),
                    self.text(v["description"], f"{key}.description") if "description" in v else "")

    def scaled(self, value, key: str, extra: frozenset = frozenset(), caps: bool = True) -> Scaled:
        v = self.mapping(value, key, _SCALED if caps else {"busy", "idle"}, extra)
        if not caps:
            return Scaled(self.watts(v["busy"], f"{key}.busy"), self.watts(v["idle"], f"{key}.idle"))
        return Scaled(self.watts(v["busy"], f"{key}.busy"), self.watts(v["idle"], f"{key}.idle"),
                      self.number(v["static"], f"{key}.static", 0.0, 1.0),
                      self.number(v["clock_exponent"], f"{key}.clock_exponent", 0.0))

    def modes(self, value) -> dict[str, Mode]:
        if not isinstance(value, dict) or not value:
            raise self.fail("modes", "expected a mapping of mode name -> caps")
        return {str(k): self.mode(k, v, f"modes.{k}") for k, v in value.items()}

    def check_caps(self, modes: dict[str, Mode], reference: str) -> None:
        ref = modes[reference]
        for m in modes.values():
            for cap in CAPS:
                if getattr(m, cap) > getattr(ref, cap):
                    raise self.fail(f"modes.{m.name}.{cap}", f"{getattr(m, cap):g} exceeds the reference mode "
                                                             f"{reference}'s {getattr(ref, cap):g} (a mode caps the "
                                                             f"figures the device profile states at {reference})")

    def storage(self, value) -> dict[str, tuple[float, float]]:
        if not isinstance(value, dict) or not value:
            raise self.fail("power.storage", f"expected a mapping of storage option ({', '.join(STORAGE_KINDS)}) "
                                             f"-> {{busy, idle}}")
        out = {}
        for kind, v in value.items():
            if kind not in STORAGE_KINDS:
                raise self.fail(f"power.storage.{kind}", f"unknown storage option; allowed: {', '.join(STORAGE_KINDS)}")
            s = self.scaled(v, f"power.storage.{kind}", caps=False)
            out[str(kind)] = (s.busy, s.idle)
        return out

    def spec(self, data) -> PowerSpec:
        d = self.mapping(data, "", {"device", "reference", "modes", "power"})
        device = self.text(d["device"], "device")
        if device != Path(self.file).stem:
            raise self.fail("device", f"{device!r} does not match the file name {Path(self.file).name}")
        modes = self.modes(d["modes"])
        reference = d["reference"]
        if reference not in modes:
            raise self.fail("reference", f"{reference!r} is not one of the modes here: {', '.join(modes)}")
        self.check_caps(modes, reference)
        p = self.mapping(d["power"], "power", {"board", "compute", "decompress", "memory", "storage"})
        dec = p["decompress"]
        scaled = self.scaled(dec, "power.decompress", frozenset({"concurrency"}))
        if "concurrency" not in (dec or {}):
            raise self.fail("power.decompress.concurrency", "missing key (required under power.decompress)")
        return PowerSpec(device, reference, modes, self.watts(p["board"], "power.board"),
                         self.scaled(p["compute"], "power.compute"), scaled,
                         self.number(dec["concurrency"], "power.decompress.concurrency", 1.0),
                         self.scaled(p["memory"], "power.memory", caps=False), self.storage(p["storage"]), self.file)


# -- a mode applied ---------------------------------------------------------------------------------
def with_mode(device: DeviceProfile, mode: str | None) -> DeviceProfile:
    """The device profile in power mode `mode` (module docstring): its compute and decompression
    figures scaled by the mode's caps; None or the reference mode: the profile unchanged."""
    spec = load_power(device.name)
    m = spec.mode(mode)
    if m.name == spec.reference:
        return device
    if device.compute.measured is not None:
        raise ConfigError(f"power_mode {m.name}: {device.path or device.name} holds tables measured on a host "
                          f"(compute.measured) in one mode; measure it again in mode {m.name} (`moelab profile`)")
    r = spec.ratios(m)
    c = device.compute
    kernels = {fmt: dataclasses.replace(
        k, weight_bandwidth=k.weight_bandwidth and k.weight_bandwidth * r["emc"],
        dequant_bandwidth=k.dequant_bandwidth and k.dequant_bandwidth * r["emc"],
        overhead=None if k.overhead is None else k.overhead / r["cpu"]) for fmt, k in c.kernels.items()}
    compute = dataclasses.replace(c, flops=c.flops * r["tpcs"] * r["gpu"],
                                  memory_bandwidth=c.memory_bandwidth * r["emc"], overhead=c.overhead / r["cpu"],
                                  kernels=kernels)
    return dataclasses.replace(
        device, compute=compute, decompress_workers=max(1, min(device.decompress_workers, m.cpu_cores - 2)),
        decompress_throughput={k: v * r["cpu"] for k, v in device.decompress_throughput.items()})


def mode_powers(device_name: str, mode: str | None, storage: str, workers: int) -> dict:
    """Each resource's (busy, idle) watts in `mode` for the timeline's energy (timeline/energy.py
    Powers takes this mapping); ConfigError when the device or its storage has no figures."""
    spec = load_power(device_name)
    m = spec.mode(mode)
    if storage not in spec.storage:
        raise ConfigError(f"{spec.path}: power.storage: no power figures for storage option {storage!r}; "
                          f"options with figures: {', '.join(spec.storage)}")
    r = spec.ratios(m)

    def scaled(s: Scaled, units: float, clock: float) -> float:
        return s.busy * (s.static + (1 - s.static) * units * clock ** s.clock_exponent)
    cores = min(spec.concurrency, workers)
    return {"mode": m.name, "board": spec.board,
            "compute": (scaled(spec.compute, r["tpcs"], r["gpu"]), spec.compute.idle),
            "memory": (spec.memory.busy * r["emc"], spec.memory.idle),
            "decompress": (cores * scaled(spec.decompress, 1.0, r["cpu"]), cores * spec.decompress.idle),
            "storage": spec.storage[storage]}


def describe_modes(device_name: str) -> str | None:
    """`moelab devices show`: the modes and the power figures, or None without a power file."""
    if power_file(device_name) is None:
        return None
    spec = load_power(device_name)
    rows = [f"  power modes ({spec.path}; the profile's figures are at {spec.reference}):"]
    for m in spec.modes.values():
        p = mode_powers(device_name, m.name, next(iter(spec.storage)), 99)
        r = spec.ratios(m)
        rows.append(f"    {m.name:<11} {m.describe()}: compute x{r['tpcs'] * r['gpu']:.3f}, memory x{r['emc']:.3f}, "
                    f"CPU x{r['cpu']:.3f}; compute {p['compute'][0]:.1f} W busy"
                    + (" [reference]" if m.name == spec.reference else ""))
    store = ", ".join(f"{k} {b:g}/{i:g} W" for k, (b, i) in spec.storage.items())
    rows.append(f"  power (W, at {spec.reference}): board {spec.board:g}; compute {spec.compute.busy:g} busy / "
                f"{spec.compute.idle:g} idle; a decompression core {spec.decompress.busy:g} / {spec.decompress.idle:g} "
                f"(~{spec.concurrency:g} at once); memory {spec.memory.busy:g} / {spec.memory.idle:g}; storage busy/idle: "
                f"{store}")
    return "\n".join(rows)
