"""Measured energy in the executor (executor/power.py): the parsers on recorded outputs of each
source's documented format (tests/data/power/), RAPL's wrap-around, the sampling thread's
integral, and what this host exposes.

The recorded samples are written from the documented formats:
- tegrastats: NVIDIA's "tegrastats Utility" reference (rails `NAME <now>/<average>`, mW), e.g.
  https://docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/Tegra%20Linux%20Driver%20Package%20Development%20Guide/AppendixTegraStats.html
  and https://docs.nvidia.com/drive/drive-os-5.2.0.0L/drive-os/DRIVE_OS_Linux_SDK_Development_Guide/Utilities/util_tegrastats.html;
  on Orin (JetPack 5/6) the values carry `mW` (VDD_IN, VDD_CPU_GPU_CV, VDD_SOC on the Nano/NX; VDD_GPU_SOC,
  VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO on the AGX: https://github.com/rbonghi/jetson_stats/issues/344);
- the INA3221 hwmon files: Linux's https://kernel.org/doc/Documentation/hwmon/ina3221.rst
  (in[123]_label, in[123]_input bus mV, curr[123]_input mA);
- powercap: Linux's https://docs.kernel.org/power/powercap/powercap.html (energy_uj, max_energy_range_uj, name;
  zones intel-rapl:N, subzones intel-rapl:N:M);
- `vcgencmd pmic_read_adc` on a Raspberry Pi 5: `NAME_A current(N)=<A>A` / `NAME_V volt(N)=<V>V` lines, as the
  published output in https://github.com/jfikar/RPi5-power shows (no formal specification was found).
"""
import time
from pathlib import Path

import pytest

from executor.power import (PowerMeter, Rapl, Source, board_watts, detect, integrate, parse_pmic, parse_tegrastats,
                            rapl_delta, rapl_zones, read_ina3221)

DATA = Path(__file__).parent / "data" / "power"


def test_tegrastats_orin_nano_lines():
    idle, busy = (DATA / "tegrastats-orin-nano.txt").read_text().splitlines()
    assert parse_tegrastats(idle) == pytest.approx({"VDD_IN": 4.61, "VDD_CPU_GPU_CV": 0.47, "VDD_SOC": 1.42})
    rails = parse_tegrastats(busy)          # the value before the slash: now, not tegrastats' running mean
    assert rails["VDD_IN"] == pytest.approx(12.98) and board_watts(rails) == pytest.approx(12.98)
    assert "RAM" not in rails and "SWAP" not in rails


def test_tegrastats_agx_orin_sums_its_rails():
    rails = parse_tegrastats((DATA / "tegrastats-agx-orin.txt").read_text())
    assert set(rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert board_watts(rails) == pytest.approx(3.2 + 0.8 + 3.3 + 0.5)


def test_tegrastats_older_jetsons_without_units():
    rails = parse_tegrastats((DATA / "tegrastats-nano-jp4.txt").read_text())
    assert rails == pytest.approx({"POM_5V_IN": 2.6, "POM_5V_GPU": 0.04, "POM_5V_CPU": 0.45})
    assert board_watts(rails) == pytest.approx(2.6)
    assert parse_tegrastats("RAM 1/2MB CPU [1%@729] GR3D_FREQ 1%") == {}


def test_pmic_read_adc_pairs_currents_with_voltages():
    rails = parse_pmic((DATA / "pmic_read_adc-pi5.txt").read_text())
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails   # voltages without a current
    assert rails["VDD_CORE"] == pytest.approx(0.72)
    assert board_watts(rails) == pytest.approx(1.99636)


def _tree(root: Path, listing: Path) -> Path:
    """A sysfs folder from a recorded `file=content` listing."""
    for line in listing.read_text().splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(value + "\n")
    return root


def test_ina3221_hwmon_folder(tmp_path):
    folder = _tree(tmp_path, DATA / "ina3221-orin-nano.txt")
    rails = read_ina3221(folder)
    assert rails == pytest.approx({"VDD_IN": 5.072 * 0.902, "VDD_CPU_GPU_CV": 5.064 * 0.096, "VDD_SOC": 5.072 * 0.286})
    assert board_watts(rails) == pytest.approx(5.072 * 0.902)


def test_rapl_zones_and_wrap_around(tmp_path):
    root = _tree(tmp_path, DATA / "powercap-intel-rapl.txt")
    zones = rapl_zones(root)
    assert [z[0] for z in zones] == ["intel-rapl:0 (package-0)", "intel-rapl:0:0 (dram)", "intel-rapl:1 (package-1)"]
    assert rapl_delta(100, 300, 1000) == 200
    assert rapl_delta(900, 100, 1000) == 200                   # wrapped at max_energy_range_uj
    source = Rapl(zones)
    assert source.sample() == {z[0]: 0.0 for z in zones}
    (root / "intel-rapl:0" / "energy_uj").write_text("1171150\n")   # package-0 wrapped: 1.32885 J to the top + 1.17115 J
    (root / "intel-rapl:0:0" / "energy_uj").write_text("2500000\n")  # dram: +1 J
    (root / "intel-rapl:1" / "energy_uj").write_text("7000000\n")    # package-1: +2 J
    total = source.sample()
    assert total["intel-rapl:0 (package-0)"] == pytest.approx(2.5)
    assert sum(total.values()) == pytest.approx(5.5)
    (root / "intel-rapl:2").mkdir()
    (root / "intel-rapl:2" / "name").write_text("psys\n")
    (root / "intel-rapl:2" / "energy_uj").write_text("1\n")
    assert [z[0] for z in rapl_zones(root)] == ["intel-rapl:2 (psys)"]     # the platform alone: no double count


def test_trapezoid_integral_holds_the_edges():
    assert integrate([(0.5, 2.0), (1.5, 4.0)], 2.0) == pytest.approx(2.0 * 0.5 + 3.0 + 4.0 * 0.5)


class Ramp(Source):
    """A fake monitor reading 10 W + 1 W per sample."""
    name = "fake"

    def __init__(self):
        self.n = 0

    def sample(self):
        self.n += 1
        return {"VDD_IN": 10.0 + self.n, "VDD_SOC": 1.0}


def test_the_meter_samples_on_a_thread_and_integrates_the_board_rail():
    with PowerMeter(interval_s=0.01, source=Ramp()) as meter:
        time.sleep(0.1)
    r = meter.reading
    assert len(r.samples) >= 3 and r.samples[0][1]["VDD_IN"] == 11.0
    m = r.metrics(tokens=4)
    assert m["energy_source"] == "fake" and m["energy_reason"] is None
    assert m["energy_j"] == pytest.approx(integrate([(t, s["VDD_IN"]) for t, s in r.samples], r.seconds))
    assert m["energy_per_token_j"] == pytest.approx(m["energy_j"] / 4) and m["average_power_w"] > 10
    assert m["energy_rails_j"]["VDD_SOC"] == pytest.approx(r.seconds, rel=1e-6)
    assert r.track()["points"][0][1] == 11.0


def test_no_source_is_null_with_the_reason():
    with PowerMeter(source=None, reason="nothing here") as meter:
        pass
    m = meter.reading.metrics(tokens=3)
    assert m["energy_j"] is None and m["energy_reason"] == "nothing here" and meter.reading.track() is None


def _powercap_readable() -> bool:
    try:
        return any(int(p.read_text()) >= 0 for p in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"))
    except (OSError, ValueError):
        return False


def test_this_host_reports_powercap_energy_if_readable_else_null_with_the_reason():
    source, reason = detect()
    if _powercap_readable() and not Path("/sys/bus/i2c/drivers/ina3221").exists():
        assert source is not None and source.name.startswith("powercap") and not reason
    elif source is None:
        assert reason.startswith("this host exposes no power readings") and "powercap" in reason


def test_an_executor_run_reports_the_hosts_energy(tmp_path):
    pytest.importorskip("torch")
    from experiments.run_exec import execute
    from experiments.spec import RunSpec
    run = execute(RunSpec(tokens=2, store=str(tmp_path / "store")))
    m = run.metrics
    assert set(m) >= {"energy_j", "energy_per_token_j", "average_power_w", "energy_source", "energy_reason"}
    source, reason = detect()
    if source is None:
        assert m["energy_j"] is None and m["energy_reason"] == reason
    else:
        assert m["energy_source"] == source.name and (m["energy_j"] is not None or m["energy_reason"])
