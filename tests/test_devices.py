"""Device profiles: the bundled YAMLs, the roofline, and the loader's error messages."""
import re
from pathlib import Path

import pytest

from devices.profile import (CODECS, DEVICES_DIR, STORAGE_KINDS, ComputeProfile, DeviceProfile, StorageProfile,
                             list_devices, load_device)
from devices.units import ConfigError

BUNDLED = ["jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-agx-orin-64gb-d2moe-impl", "jetson-orin-nano-8gb",
           "jetson-orin-nx-16gb", "raspberry-pi-4-8gb", "raspberry-pi-5-8gb", "rtx-3060-laptop-6gb",
           "rtx-3060-laptop-6gb-d2moe-impl"]

GOOD = """\
name: test-board
description: "a test board"
memory: 8GB
expert_budget: 4GB
default_storage: nvme
storage:
  nvme:
    read_bandwidth: 2GB/s
    latency: 80us
    queue_depth: 4
  microsd:
    read_bandwidth: 50MB/s
    latency: 0.3ms
    queue_depth: 1
    description: "slow card"
compute:
  memory_bandwidth: 100GB/s
  flops: 10TFLOPS
  overhead: 30us
decompress:
  workers: 4
  throughput:
    lz4: 1GB/s
    zstd: 700MB/s
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "board.yaml"
    path.write_text(text)
    return str(path)


def test_bundled_list():
    assert list_devices() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_profile_loads(name):
    d = load_device(name)
    assert d.name == name and d.path.endswith(f"{name}.yaml")
    assert d.storage_option() is d.storage[d.default_storage]
    assert set(d.storage) <= set(STORAGE_KINDS)
    assert 0 < d.expert_budget_bytes <= d.memory_bytes
    assert d.decompress_workers >= 1 and set(d.decompress_throughput) == set(CODECS)
    for s in d.storage.values():
        assert s.read_bandwidth > 0 and s.latency >= 0 and s.queue_depth >= 1
    assert d.compute.memory_bandwidth > 0 and d.compute.flops > 0
    text = d.describe()
    assert name in text and "[default]" in text


def test_nvme_is_default_where_present():
    for name in BUNDLED:
        d = load_device(name)
        if "nvme" in d.storage:
            assert d.default_storage == "nvme", name


@pytest.mark.parametrize("name", BUNDLED)
def test_every_figure_has_a_source_comment(name):
    """Each `key: value` line (names and free text aside) ends in `# <URL ...>` or `# estimate: ...`."""
    for n, line in enumerate((DEVICES_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        body, _, comment = line.partition(" #")
        key, _, value = body.strip().partition(":")
        if not value.strip() or key in ("name", "description", "default_storage"):
            continue
        comment = comment.strip()
        assert comment, f"{name}.yaml:{n}: figure without a source comment: {line.strip()}"
        assert comment.startswith("estimate:") or "http" in comment, \
            f"{name}.yaml:{n}: comment is neither a source URL nor 'estimate: ...': {comment}"


def test_loaded_values_and_units(tmp_path):
    d = load_device(write(tmp_path, GOOD))
    assert d.memory_bytes == 8 * 10**9 and d.expert_budget_bytes == 4 * 10**9
    assert d.storage_option("microsd") == StorageProfile("microsd", 50e6, 3e-4, 1, "slow card")
    assert d.compute == ComputeProfile(memory_bandwidth=100e9, flops=10e12, overhead=pytest.approx(30e-6))
    assert d.decompress_workers == 4 and d.decompress_throughput == {"lz4": 1e9, "zstd": 700e6}


def test_expert_time_roofline():
    d = DeviceProfile("x", "x", 10**9, 10**8, {"nvme": StorageProfile("nvme", 1e9, 0.0, 1)}, "nvme",
                      ComputeProfile(memory_bandwidth=100e9, flops=10e12, overhead=30e-6), 1, {"lz4": 1e9})
    # 1M params in 2 MB: reading takes 2e6 / 100e9 = 20 us; math is 2 * 1e6 * t / 10e12 = 0.2 us per token
    assert d.expert_time(2_000_000, 1_000_000, 1) == pytest.approx(30e-6 + 20e-6)         # memory-bound
    assert d.expert_time(2_000_000, 1_000_000, 100) == pytest.approx(30e-6 + 20e-6)       # 20 us each: tie
    assert d.expert_time(2_000_000, 1_000_000, 500) == pytest.approx(30e-6 + 100e-6)      # compute-bound


def test_storage_option_unknown_lists_options():
    d = load_device("raspberry-pi-5-8gb")
    assert d.storage_option("usb-ssd").name == "usb-ssd"
    with pytest.raises(ConfigError, match=r"no storage option 'emmc'.*nvme \(default\), usb-ssd, microsd"):
        d.storage_option("emmc")


def test_unknown_device_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        load_device("jetson-tx2")
    assert "unknown device 'jetson-tx2'" in str(e.value)
    for name in BUNDLED:
        assert name in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: no such device profile file"):
        load_device("/tmp/nope.yaml")


@pytest.mark.parametrize("old, new, key, allowed", [
    ("read_bandwidth: 2GB/s", "read_bandwidth: 2GB", "storage.nvme.read_bandwidth", "GB/s"),
    ("read_bandwidth: 2GB/s", "read_bandwidth: 2000", "storage.nvme.read_bandwidth", "3.5GB/s"),
    ("memory: 8GB", "memory: 8 parsecs", "memory", "gb, tb, kib"),
    ("latency: 80us", "latency: 80 fortnights", "storage.nvme.latency", "us"),
    ("flops: 10TFLOPS", "flops: 10T", "compute.flops", "TFLOPS"),
    ("queue_depth: 4", "queue_depth: 0", "storage.nvme.queue_depth", "integer >= 1"),
    ("workers: 4", "workers: two", "decompress.workers", "integer >= 1"),
    ("expert_budget: 4GB", "expert_budget: 9GB", "expert_budget", "exceeds memory"),
    ("default_storage: nvme", "default_storage: emmc", "default_storage", "nvme, microsd"),
    ("  microsd:", "  floppy:", "storage.floppy", "nvme, microsd, usb-ssd, emmc"),
    ("    zstd: 700MB/s", "    brotli: 700MB/s", "decompress.throughput.brotli", "lz4, lz4hc, zstd"),
    ("    queue_depth: 4", "    queue_depth: 4\n    bandwith: 3GB/s", "storage.nvme.bandwith", "read_bandwidth"),
    ("overhead: 30us", "overhead: 30us\n  clock: 1GHz", "compute.clock", "memory_bandwidth"),
    ("memory: 8GB\n", "", "memory", "missing key"),
    ("  flops: 10TFLOPS\n", "", "compute.flops", "missing key"),
])
def test_errors_name_file_key_and_allowed(tmp_path, old, new, key, allowed):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_device(path)
    msg = str(e.value)
    assert path in msg and key in msg and allowed in msg, msg


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'read_bandwidth'"):
        load_device(write(tmp_path, GOOD.replace("read_bandwidth: 2GB/s", "read_bandwith: 2GB/s", 1)))


@pytest.mark.parametrize("text, what", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
    (re.sub(r"compute:\n(  .*\n)+", "compute: 5\n", GOOD), "compute: expected a mapping"),
])
def test_malformed_files(tmp_path, text, what):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(what)) as e:
        load_device(path)
    assert path in str(e.value)
