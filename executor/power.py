"""Energy of an executor run, measured where the host exposes it, sampled on a thread.

Sources, tried in this order (`detect`):

- Jetson INA3221 power monitors under sysfs: the hwmon driver's `in<N>_label` (rail name),
  `in<N>_input` (bus mV) and `curr<N>_input` (mA) per channel (JetPack 5/6; Linux's
  Documentation/hwmon/ina3221.rst), or JetPack 4's iio driver (`rail_name_<N>`, `in_power<N>_input` mW);
- `tegrastats --interval MS`: one line per interval whose rails read `NAME <now>mW/<average>mW`
  (Orin) or `NAME <now>/<average>` in mW (older Jetsons);
- Linux powercap / RAPL on x86: `/sys/class/powercap/intel-rapl:<N>/energy_uj`, a counter of micro-
  joules that wraps at `max_energy_range_uj` (Documentation/power/powercap/powercap.rst);
- the Raspberry Pi 5's PMIC: `vcgencmd pmic_read_adc`, `NAME_A current(N)=<amps>A` and
  `NAME_V volt(N)=<volts>V` per rail (the 5 V rail's loads, USB and the NVMe HAT, are not in it).

The board's power is VDD_IN where a monitor has it (the module's input), else the sum of the rails
(an AGX Orin's VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO); RAPL's the sum of its
package zones (and DRAM zones), or its psys zone alone where there is one. Power samples are
integrated by the trapezoid rule over the run, the first and last value held to its edges; RAPL's
counters are differenced (with wrap-around) instead. A host exposing none of these gives null
energy with the reason (what was looked for and why it is not usable).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POWERCAP = "/sys/class/powercap"
INA_GLOBS = ("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*", "/sys/class/hwmon/hwmon*")
INA_IIO_GLOB = "/sys/bus/i2c/drivers/ina3221x/*/iio:device*"
BOARD_RAILS = ("VDD_IN", "POM_5V_IN")          # a monitor's module input, where it has one
INTERVAL_S = 0.05


# -- parsers (tests/test_power_sources.py runs them on recorded outputs) ------------------------------
_TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)(mW|W)/(\d+(?:\.\d+)?)(mW|W)")
_TEGRA_OLD = re.compile(r"\b((?:VDD|POM|VIN)_[A-Z0-9_]*) (\d+)/(\d+)(?=\s|$)")
_PMIC = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)([AV])\s*$")


def parse_tegrastats(line: str) -> dict[str, float]:
    """The rails of one tegrastats line -> their current power in watts (the average after the
    slash is tegrastats' own running mean, not this instant)."""
    rails = {m.group(1): float(m.group(2)) * (1e-3 if m.group(3) == "mW" else 1.0) for m in _TEGRA_RAIL.finditer(line)}
    if not rails:
        rails = {m.group(1): int(m.group(2)) * 1e-3 for m in _TEGRA_OLD.finditer(line)}
    return rails


def parse_pmic(text: str) -> dict[str, float]:
    """`vcgencmd pmic_read_adc` output -> watts per rail that has both a current and a voltage."""
    amps, volts = {}, {}
    for line in text.splitlines():
        m = _PMIC.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


def board_watts(rails: dict[str, float]) -> float:
    """The board's power from its rails: the module input where monitored, else their sum."""
    for name in BOARD_RAILS:
        if name in rails:
            return rails[name]
    return sum(rails.values())


def rapl_delta(before: int, after: int, max_range: int) -> int:
    """Micro-joules between two readings of a RAPL counter that wraps at max_range."""
    return after - before if after >= before else after + max_range - before


def _read_int(path) -> int:
    with open(path) as f:
        return int(f.read().strip())


def read_ina3221(folder) -> dict[str, float]:
    """Watts per labelled channel of an INA3221 hwmon folder (in<N>_input mV x curr<N>_input mA)."""
    folder, out = Path(folder), {}
    for n in (1, 2, 3):
        label, volts, amps = folder / f"in{n}_label", folder / f"in{n}_input", folder / f"curr{n}_input"
        if label.is_file() and volts.is_file() and amps.is_file():
            name = label.read_text().strip()
            if name and not name.upper().startswith("NC"):
                out[name] = _read_int(volts) * _read_int(amps) * 1e-6
    return out


def read_ina3221_iio(folder) -> dict[str, float]:
    """Watts per rail of a JetPack 4 ina3221x iio folder (rail_name_<N>, in_power<N>_input mW)."""
    folder, out = Path(folder), {}
    for n in (0, 1, 2):
        name, power = folder / f"rail_name_{n}", folder / f"in_power{n}_input"
        if name.is_file() and power.is_file():
            out[name.read_text().strip()] = _read_int(power) * 1e-3
    return out


def rapl_zones(root=POWERCAP) -> list[tuple[str, Path, int]]:
    """(name, energy_uj file, max_energy_range_uj) of the RAPL zones whose energies add up to the
    host's: psys alone where there is one, else every package and every DRAM zone."""
    zones = []
    for d in sorted(Path(root).glob("intel-rapl:*")):
        if not (d / "energy_uj").exists():
            continue
        name = (d / "name").read_text().strip() if (d / "name").is_file() else d.name
        top = d.name.count(":") == 1
        if top or name == "dram":
            rng = _read_int(d / "max_energy_range_uj") if (d / "max_energy_range_uj").is_file() else 2 ** 32
            zones.append((f"{d.name} ({name})", d / "energy_uj", rng))
    psys = [z for z in zones if "psys" in z[0]]
    return psys or zones


# -- sources ------------------------------------------------------------------------------------------
class Source:
    """A way to read this host's power: `sample()` -> {rail: watts} (or cumulative joules, counter=True)."""
    name = ""
    counter = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class SysfsRails(Source):
    def __init__(self, folders: list[str], iio: bool = False):
        self.folders, self.iio = folders, iio
        self.name = f"ina3221 ({', '.join(folders)})"

    def sample(self) -> dict[str, float]:
        read = read_ina3221_iio if self.iio else read_ina3221
        out = {}
        for folder in self.folders:
            out.update(read(folder))
        return out


class Rapl(Source):
    counter = True

    def __init__(self, zones: list[tuple[str, Path, int]]):
        self.zones = zones
        self.name = "powercap " + ", ".join(z[0] for z in zones)
        self.last: dict[str, int] = {}
        self.total: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        for name, path, rng in self.zones:
            now = _read_int(path)
            if name in self.last:
                self.total[name] = self.total.get(name, 0.0) + rapl_delta(self.last[name], now, rng) * 1e-6
            else:
                self.total[name] = 0.0
            self.last[name] = now
        return dict(self.total)


class Tegrastats(Source):
    def __init__(self, binary: str, interval_s: float):
        self.binary, self.interval_s = binary, interval_s
        self.name = f"tegrastats ({binary})"
        self.latest: dict[str, float] = {}
        self.proc = None

    def start(self) -> None:
        ms = max(1, int(self.interval_s * 1000))
        self.proc = subprocess.Popen([self.binary, "--interval", str(ms)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._lines, daemon=True).start()

    def _lines(self) -> None:
        for line in self.proc.stdout:
            rails = parse_tegrastats(line)
            if rails:
                self.latest = rails

    def sample(self) -> dict[str, float]:
        return dict(self.latest)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Pmic(Source):
    def __init__(self, binary: str):
        self.binary = binary
        self.name = f"vcgencmd pmic_read_adc ({binary})"

    def sample(self) -> dict[str, float]:
        out = subprocess.run([self.binary, "pmic_read_adc"], capture_output=True, text=True, timeout=5)
        return parse_pmic(out.stdout)


def detect(powercap_root: str = POWERCAP) -> tuple[Source | None, str]:
    """This host's power source, or None with what was looked for and why none is usable."""
    why = []
    folders = [f for g in INA_GLOBS for f in sorted(glob.glob(g))
               if Path(f, "name").is_file() and Path(f, "name").read_text().strip() == "ina3221"
               or "ina3221/" in f]
    folders = sorted(set(folders))
    if folders and any(_quiet(read_ina3221, f) for f in folders):
        return SysfsRails(folders), ""
    iio = sorted(glob.glob(INA_IIO_GLOB))
    if iio and any(_quiet(read_ina3221_iio, f) for f in iio):
        return SysfsRails(iio, iio=True), ""
    why.append("no INA3221 power monitor under /sys/bus/i2c/drivers/ina3221*/ or /sys/class/hwmon")
    source, reason = _rapl(powercap_root)
    if source is not None:
        return source, ""
    why.append(reason)
    binary = shutil.which("tegrastats")
    if binary:
        return Tegrastats(binary, max(INTERVAL_S, 0.1)), ""
    why.append("no tegrastats on PATH")
    binary = shutil.which("vcgencmd")
    if binary and _quiet(lambda b: Pmic(b).sample(), binary):
        return Pmic(binary), ""
    why.append("no vcgencmd pmic_read_adc (a Raspberry Pi 5's PMIC)" if not binary else
               "vcgencmd pmic_read_adc printed no rails (not a Raspberry Pi 5, or older firmware)")
    return None, "this host exposes no power readings: " + "; ".join(why)


def _rapl(root: str) -> tuple[Source | None, str]:
    if not Path(root).is_dir():
        return None, f"no {root} (no powercap/RAPL: not x86, or a VM or container without it)"
    zones = rapl_zones(root)
    if not zones:
        return None, f"{root} has no intel-rapl zone with energy_uj"
    try:
        for _, path, _ in zones:
            _read_int(path)
    except PermissionError:
        return None, (f"{zones[0][1]} is not readable by this user (root only since Linux 5.10, CVE-2020-8694); "
                      f"run as root or make energy_uj readable")
    except (OSError, ValueError) as e:
        return None, f"{zones[0][1]}: cannot read ({e})"
    return Rapl(zones), ""


def _quiet(fn, arg):
    try:
        return fn(arg)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# -- the meter ----------------------------------------------------------------------------------------
@dataclass
class Reading:
    source: str | None
    reason: str | None
    seconds: float = 0.0
    samples: list = field(default_factory=list)        # (t since start, {rail: W or cumulative J})
    counter: bool = False

    def rail_joules(self) -> dict[str, float]:
        """Joules per rail (zone) over the run."""
        if not self.samples:
            return {}
        if self.counter:
            return dict(self.samples[-1][1])
        return {rail: integrate([(t, s.get(rail, 0.0)) for t, s in self.samples], self.seconds)
                for rail in self.samples[-1][1]}

    def joules(self) -> float | None:
        if self.source is None or len(self.samples) < 2:
            return None
        if self.counter:
            return sum(self.samples[-1][1].values())
        return integrate([(t, board_watts(s)) for t, s in self.samples], self.seconds)

    def metrics(self, tokens: int) -> dict:
        """energy_j, energy_per_token_j, average_power_w (None with the reason where nothing was read)."""
        e = self.joules()
        reason = self.reason if self.source is None else None if e is not None else \
            f"{self.source}: fewer than two samples in {self.seconds:.3f} s"
        return {"energy_j": e, "energy_per_token_j": e / tokens if e is not None and tokens else None,
                "average_power_w": e / self.seconds if e is not None and self.seconds > 0 else None,
                "energy_source": self.source, "energy_reason": reason, "power_samples": len(self.samples),
                "energy_rails_j": self.rail_joules() if e is not None else None}

    def track(self) -> dict | None:
        """The measured board power as a counter track (timeline/events.py), or None."""
        if self.source is None or len(self.samples) < 2:
            return None
        if self.counter:
            pts = [(t, sum(s.values())) for t, s in self.samples]
            watts = [[a[0], (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0] for a, b in zip(pts, pts[1:])]
        else:
            watts = [[t, board_watts(s)] for t, s in self.samples]
        return {"name": "measured power (W)", "resources": [self.source.split(" ")[0]], "points": watts}


def integrate(points: list[tuple[float, float]], end: float) -> float:
    """Trapezoid integral of (t, W) samples over [0, end], the first and last value held to the edges."""
    if not points:
        return 0.0
    total = points[0][1] * max(0.0, points[0][0])
    for (t0, w0), (t1, w1) in zip(points, points[1:]):
        total += (t1 - t0) * (w0 + w1) / 2
    return total + points[-1][1] * max(0.0, end - points[-1][0])


class PowerMeter:
    """`with PowerMeter() as m: run()`, then `m.reading`: this host's power sampled on a thread every
    `interval_s` while the block runs (a sample at its start and at its end)."""

    def __init__(self, interval_s: float = INTERVAL_S, source: Source | None = None, reason: str = ""):
        if source is None and not reason:
            source, reason = detect()
        self.source, self.interval_s = source, interval_s
        self.reading = Reading(source.name if source else None, reason or None,
                               counter=bool(source and source.counter))
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        try:
            rails = self.source.sample()
        except (OSError, ValueError, subprocess.SubprocessError):
            return                                # a missed sample; the integral spans the gap
        if rails or self.source.counter:          # (tegrastats has printed nothing yet)
            self.reading.samples.append((time.perf_counter() - self.t0, rails))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PowerMeter":
        self.t0 = time.perf_counter()
        if self.source is not None:
            self.source.start()
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="power-meter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.source is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.source.stop()
        self.reading.seconds = time.perf_counter() - self.t0
