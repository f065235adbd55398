"""Power modes (devices/power.py): the bundled power files, every figure sourced, strict loading
with one-line errors, and a mode changing the simulated compute by exactly the caps it sets."""
import dataclasses
from pathlib import Path

import pytest

from devices.power import (POWER_DIR, list_power_devices, load_power, mode_powers, with_mode)
from devices.profile import list_devices, load_device
from devices.units import ConfigError
from experiments.cli import main
from experiments.run import simulate
from experiments.spec import RunSpec
from policies.cost import CostModel
from workloads.catalog import get_model
from workloads.formats import make_format

JETSONS = ["jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb"]
MODES = {"jetson-orin-nano-8gb": ["MAXN_SUPER", "25W", "15W", "7W"], "jetson-agx-orin-64gb": ["MAXN", "50W", "30W", "15W"],
         "jetson-agx-orin-32gb": ["MAXN", "40W", "30W", "15W"],
         "jetson-orin-nx-16gb": ["MAXN_SUPER", "40W", "25W", "15W", "10W"]}


def test_every_jetson_has_its_power_modes():
    assert list_power_devices() == JETSONS
    for name in JETSONS:
        spec = load_power(name)
        assert name in list_devices() and list(spec.modes) == MODES[name]
        assert spec.modes[spec.reference].gpu_clock == max(m.gpu_clock for m in spec.modes.values())


@pytest.mark.parametrize("name", JETSONS)
def test_every_power_figure_has_a_source_comment(name):
    """Each `key: value` line (names and free text aside) ends in `# <URL ...>` or `# estimate: ...`."""
    for n, line in enumerate((POWER_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        body, _, comment = line.partition(" #")
        key, _, value = body.strip().partition(":")
        if not value.strip() or key in ("device", "reference", "description"):
            continue
        comment = comment.strip()
        assert comment, f"{name}.yaml:{n}: figure without a source comment: {line.strip()}"
        assert comment.startswith("estimate:") or "http" in comment, \
            f"{name}.yaml:{n}: comment is neither a source URL nor 'estimate: ...': {comment}"


@pytest.mark.parametrize("name", JETSONS)
def test_a_mode_scales_the_figures_by_exactly_its_caps(name):
    ref, spec = load_device(name), load_power(name)
    assert with_mode(ref, None) is ref and with_mode(ref, spec.reference) is ref
    r0 = spec.modes[spec.reference]
    for m in spec.modes.values():
        d = with_mode(ref, m.name)
        assert d.compute.flops == pytest.approx(ref.compute.flops * m.gpu_tpcs / r0.gpu_tpcs * m.gpu_clock / r0.gpu_clock)
        assert d.compute.memory_bandwidth == pytest.approx(ref.compute.memory_bandwidth * m.emc_clock / r0.emc_clock)
        assert d.compute.overhead == pytest.approx(ref.compute.overhead * r0.cpu_clock / m.cpu_clock)
        for codec, rate in ref.decompress_throughput.items():
            assert d.decompress_throughput[codec] == pytest.approx(rate * m.cpu_clock / r0.cpu_clock)
        assert d.decompress_workers == max(1, min(ref.decompress_workers, m.cpu_cores - 2))
        assert d.storage == ref.storage and d.memory_bytes == ref.memory_bytes and d.name == ref.name


def test_the_simulated_compute_changes_by_exactly_the_caps():
    """Every expert call of a simulated run in a mode takes the roofline on the capped figures: the
    reference call's overhead x cpu ratio and its weight read x EMC ratio (memory-bound decode), its
    math x TPCs x GPU clock (a compute-bound prefill)."""
    name, mode = "jetson-orin-nano-8gb", "15W"
    spec = load_power(name)
    r0, m = spec.modes[spec.reference], spec.mode(mode)
    ref = load_device(name)
    model = get_model("olmoe-1b-7b")
    fmt = make_format("bf16", model.expert_shapes)
    run = simulate(RunSpec(device=name, model="olmoe-1b-7b", power_mode=mode, tokens=3, prompt_tokens=2048))
    c = ref.compute
    for e in run.timeline.of("compute", "expert"):
        read = fmt.level_sizes[e.level] / (c.memory_bandwidth * m.emc_clock / r0.emc_clock)
        math_ = 2 * fmt.params * e.tokens / (c.flops * m.gpu_tpcs / r0.gpu_tpcs * m.gpu_clock / r0.gpu_clock)
        assert e.end - e.start == pytest.approx(c.overhead * r0.cpu_clock / m.cpu_clock + max(read, math_), rel=1e-9)
    big = [e for e in run.timeline.of("compute", "expert") if e.tokens >= 200]
    assert big and all(2 * fmt.params * e.tokens / (c.flops * 0.6) > fmt.level_sizes[0] / (c.memory_bandwidth * 2 / 3)
                       for e in big)                          # the prefill's calls are compute-bound here


def test_the_cost_model_scales_decompression_and_dense_parts():
    name = "jetson-agx-orin-64gb"
    model = get_model("mixtral-8x7b")
    fmt = make_format("zip", model.expert_shapes, codec="lz4")
    ref = CostModel.build(load_device(name), model, fmt)
    low = CostModel.build(with_mode(load_device(name), "15W"), model, fmt)
    m, r0 = load_power(name).mode("15W"), load_power(name).mode(None)
    assert low.decompress_seconds(10 ** 6) == pytest.approx(ref.decompress_seconds(10 ** 6) * r0.cpu_clock / m.cpu_clock)
    d = ref.dense_seconds(1) - ref.device.compute.overhead
    assert low.dense_seconds(1) - low.device.compute.overhead == pytest.approx(d * r0.emc_clock / m.emc_clock)
    assert low.decompress_workers == 2


def test_mode_powers_scale_as_documented():
    p = load_power("jetson-orin-nano-8gb")
    ref = mode_powers("jetson-orin-nano-8gb", None, "nvme", 4)
    low = mode_powers("jetson-orin-nano-8gb", "7W", "nvme", 2)
    assert ref["compute"] == (p.compute.busy, 0.0) and ref["decompress"][0] == pytest.approx(2.0 * p.decompress.busy)
    assert low["compute"][0] == pytest.approx(p.compute.busy * (0.1 + 0.9 * 0.5 * (408 / 1020) ** 2))
    assert low["decompress"][0] == pytest.approx(2 * p.decompress.busy * (0.1 + 0.9 * (960 / 1728) ** 2))
    assert low["memory"][0] == pytest.approx(p.memory.busy * 2133 / 3199)
    assert low["board"] == ref["board"] == p.board and low["storage"] == ref["storage"] == (6.2, 0.04)
    with pytest.raises(ConfigError, match="no power figures for storage option 'emmc'"):
        mode_powers("jetson-orin-nano-8gb", None, "emmc", 4)


def test_a_measured_host_profile_is_refused_in_another_mode():
    d = load_device("jetson-orin-nano-8gb")
    measured = dataclasses.replace(d, compute=dataclasses.replace(d.compute, measured=object()))
    with pytest.raises(ConfigError, match=r"measured on a host .* in mode 7W"):
        with_mode(measured, "7W")


GOOD = (POWER_DIR / "jetson-orin-nano-8gb.yaml").read_text()


@pytest.mark.parametrize("old,new,message", [
    ("    gpu_tpcs: 2 ", "    gpu_tpc: 2 ", r"modes\.7W\.gpu_tpc: unknown key \(did you mean 'gpu_tpcs'\?\)"),
    ("    cpu_clock: 960MHz", "    cpu_clock: 960", r"modes\.7W\.cpu_clock: expected a clock with a unit"),
    ("  board: 4.5W", "  board: 4.5", r"power\.board: expected a power with a unit"),
    ("  board: 4.5W", "  board: 4.5V", r"power\.board: cannot read '4\.5V' as a power"),
    ("    gpu_clock: 408MHz", "    gpu_clock: 2GHz", r"modes\.7W\.gpu_clock: 2e\+09 exceeds the reference mode MAXN_SUPER"),
    ("reference: MAXN_SUPER", "reference: MAXN", r"reference: 'MAXN' is not one of the modes here"),
    ("    static: 0.1 ", "    static: 1.5 ", r"power\.compute\.static: expected a number, 0\.0 <= x <= 1\.0"),
    ("    concurrency: 2.0 ", "    parallel: 2.0 ", r"power\.decompress\.parallel: unknown key"),
    ("    microsd:", "    floppy:", r"power\.storage\.floppy: unknown storage option"),
    ("device: jetson-orin-nano-8gb", "device: other", r"device: 'other' does not match the file name"),
])
def test_strict_loading_names_the_file_and_the_key(tmp_path, old, new, message):
    assert old in GOOD
    path = tmp_path / "jetson-orin-nano-8gb.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as e:
        load_power(str(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_cli_power_mode_and_devices_show(capsys, tmp_path):
    assert main(["devices", "show", "jetson-agx-orin-64gb"]) == 0
    out = capsys.readouterr().out
    for mode in MODES["jetson-agx-orin-64gb"]:
        assert f"    {mode} " in out
    assert "4 CPU cores at 1114 MHz, GPU 3 TPCs at 408 MHz, memory at 2133 MHz" in out
    assert main(["devices"]) == 0 and "power modes: MAXN_SUPER, 25W, 15W, 7W" in capsys.readouterr().out
    out_dir = tmp_path / "run"
    assert main(["simulate", "--device", "jetson-orin-nano-8gb", "--model", "olmoe-1b-7b", "--power-mode", "7W",
                 "--tokens", "2", "--out", str(out_dir), "--quiet"]) == 0
    import json
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["power_mode"] == "7W" and m["energy_j"] > 0
    assert main(["simulate", "--device", "jetson-orin-nano-8gb", "--power-mode", "9W", "--tokens", "2",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "has no power mode '9W'" in capsys.readouterr().err


def test_a_spec_file_with_a_power_mode_round_trips(tmp_path):
    spec = RunSpec(device="jetson-orin-nx-16gb", power_mode="10W", tokens=2)
    path = spec.save(tmp_path / "s.yaml")
    assert RunSpec.load(path) == spec and Path(path).read_text().count("power_mode: 10W") == 1
