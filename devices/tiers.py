"""Memory tiers and the CPU compute section of a device profile (both optional).

    tiers:                      # the memory levels, the accelerator's first, in order down to storage
      gpu:
        capacity: 6GB           # the level's memory (the first level's is `memory`)
        link:                   # the link to the next level down (a copy queue, like a storage option)
          bandwidth: 12.6GB/s
          latency: 10us         # per copy, before its transfer
          queue_depth: 1        # copies in flight (copy engines)
      host-ram:
        capacity: 32GB
        expert_budget: 24GB     # the default budget for experts at this level (--host-budget)
    cpu:                        # compute where the host RAM is (all cores together)
      cores: 8
      memory_bandwidth: 38GB/s  # for reading expert weights
      flops: 380GFLOPS          # effective matmul rate on the expert's weights
      overhead: 20us            # optional: fixed cost per expert call (dispatch to the thread pool)

The last level's link to storage is the storage option itself (`storage:`): it has no `link`.
Without `tiers:` a profile is one level (`memory`) in front of storage, as before. moelab models at
most two cached levels (an accelerator's memory and host RAM); a unified-memory device (Jetson,
Pi) is one level. Without `cpu:` experts cannot be placed on the CPU (devices/levels.py `cpu_of`
says so).
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.units import format_size, parse_bandwidth, parse_duration, parse_size

MAX_LEVELS = 2
_LEVEL = {"capacity"}
_LEVEL_OPTIONAL = frozenset({"link", "expert_budget", "description"})
_LINK = {"bandwidth", "latency", "queue_depth"}
_CPU = {"cores", "memory_bandwidth", "flops"}


@dataclass(frozen=True)
class Link:
    """A copy queue between two levels: like a storage option, `queue_depth` copies in flight, each
    paying `latency` and then a transfer sharing `bandwidth` one at a time."""
    src: str                  # the level it copies from (lower)
    dst: str                  # the level it copies to (upper)
    bandwidth: float          # bytes/s
    latency: float            # seconds per copy
    queue_depth: int

    @property
    def resource(self) -> str:
        """Its lane on the timeline."""
        return f"link:{self.src}>{self.dst}"


@dataclass(frozen=True)
class Tier:
    name: str
    capacity: int                     # bytes
    link: Link | None = None          # to the next level down; None: the last level (storage follows)
    expert_budget: int | None = None  # the default expert budget here (lower levels)
    description: str = ""


@dataclass(frozen=True)
class CpuProfile:
    """The host CPU as a compute resource for CPU-placed experts (a roofline, like `compute:`)."""
    cores: int
    memory_bandwidth: float           # bytes/s
    flops: float                      # FLOP/s
    overhead: float = 0.0             # seconds per expert call


def read_tiers(reader, value, memory: int) -> tuple[Tier, ...]:
    """The `tiers:` mapping (module docstring); `reader` is devices/profile.py's _Reader."""
    if not isinstance(value, dict) or not 1 <= len(value) <= MAX_LEVELS:
        raise reader.fail("tiers", f"expected a mapping of 1 to {MAX_LEVELS} memory levels, the accelerator's "
                                   f"first (name: {{capacity, link, expert_budget}}), got {value!r}")
    names = [str(n) for n in value]
    out = []
    for i, (name, raw) in enumerate(value.items()):
        key = f"tiers.{name}"
        v = reader.mapping(raw, key, _LEVEL, _LEVEL_OPTIONAL)
        capacity = int(reader.quantity(v["capacity"], f"{key}.capacity", parse_size, "32GB"))
        if i == 0 and capacity != memory:
            raise reader.fail(f"{key}.capacity", f"the first level is the accelerator's memory: must equal memory "
                                                 f"({format_size(memory)}), got {v['capacity']!r}")
        last = i == len(value) - 1
        if last and "link" in v:
            raise reader.fail(f"{key}.link", "the last level's link to storage is the storage option "
                                             "(storage:); drop link here")
        if not last and "link" not in v:
            raise reader.fail(f"{key}.link", f"missing key: the link from {names[i + 1]} to {name} "
                                             f"(bandwidth, latency, queue_depth)")
        link = None if last else _link(reader, v["link"], f"{key}.link", names[i + 1], str(name))
        budget = None
        if "expert_budget" in v:
            budget = int(reader.quantity(v["expert_budget"], f"{key}.expert_budget", parse_size, "24GB"))
            if budget > capacity:
                raise reader.fail(f"{key}.expert_budget", f"{format_size(budget)} exceeds the level's capacity "
                                                          f"{format_size(capacity)}")
        out.append(Tier(str(name), capacity, link, budget,
                        reader.text(v["description"], f"{key}.description") if "description" in v else ""))
    return tuple(out)


def _link(reader, value, key: str, src: str, dst: str) -> Link:
    v = reader.mapping(value, key, _LINK)
    return Link(src, dst, reader.quantity(v["bandwidth"], f"{key}.bandwidth", parse_bandwidth, "12.6GB/s"),
                reader.quantity(v["latency"], f"{key}.latency", parse_duration, "10us", positive=False),
                reader.count(v["queue_depth"], f"{key}.queue_depth"))


def read_cpu(reader, value) -> CpuProfile:
    v = reader.mapping(value, "cpu", _CPU, frozenset({"overhead"}))
    return CpuProfile(reader.count(v["cores"], "cpu.cores"),
                      reader.quantity(v["memory_bandwidth"], "cpu.memory_bandwidth", parse_bandwidth, "38GB/s"),
                      reader.quantity(v["flops"], "cpu.flops", reader.flops, "380GFLOPS"),
                      reader.quantity(v.get("overhead", "0us"), "cpu.overhead", parse_duration, "20us",
                                      positive=False))


def default_tiers(memory: int) -> tuple[Tier, ...]:
    """A profile without `tiers:`: one level, its memory, in front of storage."""
    return (Tier("memory", memory),)


def describe_rows(device) -> list[tuple[str, str]]:
    """`moelab devices show` rows for the tiers and the CPU."""
    rows = []
    for t in device.tiers:
        below = (f"link from {t.link.src}: {format_size(t.link.bandwidth)}/s, {t.link.latency * 1e6:.3g} us latency, "
                 f"queue depth {t.link.queue_depth}") if t.link else "then storage"
        budget = f", expert budget {format_size(t.expert_budget)}" if t.expert_budget else ""
        rows.append((f"tier {t.name}", f"{format_size(t.capacity)}{budget}; {below}"))
    c = device.cpu
    if c is not None:
        rows.append(("cpu", f"{c.cores} cores, {format_size(c.memory_bandwidth)}/s weight reads, "
                            f"{c.flops / 1e9:.0f} GFLOPS, {c.overhead * 1e6:.3g} us per expert call"))
    return rows
