"""A profile's levels as a run asks for them: the host level, its link, the CPU section, or a
one-line error naming the profile and the bundled devices that have what was asked (devices/tiers.py
reads them)."""
from __future__ import annotations

from devices.profile import list_devices, load_device
from devices.tiers import CpuProfile, Link, Tier
from devices.units import ConfigError


def lower_level(device) -> Tier:
    """The level below the accelerator (host RAM), or a clear error naming the profile."""
    if len(device.tiers) < 2:
        raise ConfigError(f"{device.path or device.name}: device {device.name!r} has one memory level in front of "
                          f"storage (no lower level under tiers:), so a host budget, a host cache or CPU placement "
                          f"cannot run on it; devices with host RAM: {', '.join(devices_with(lambda d: len(d.tiers) > 1))}")
    return device.tiers[1]


def lower_link(device) -> Link:
    """The link from the level below the accelerator up to it."""
    lower_level(device)                     # (a clear error without one)
    return device.tiers[0].link


def cpu_of(device) -> CpuProfile:
    """The profile's CPU section, or a clear error (CPU placement needs it)."""
    if device.cpu is None:
        raise ConfigError(f"{device.path or device.name}: device {device.name!r} has no cpu: section (cores, "
                          f"memory_bandwidth, flops), so experts cannot be placed on its CPU; devices with one: "
                          f"{', '.join(devices_with(lambda d: d.cpu is not None))}")
    return device.cpu


def devices_with(test) -> list[str]:
    """The bundled profiles that pass `test` (what an error suggests instead)."""
    return [n for n in list_devices() if test(load_device(n))]
