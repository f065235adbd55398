"""The cost model: what a policy may know about time, in seconds.

Planning policies (ZipMoE's pool split and its Type-I/II scheduler, D²MoE's budget
planning) weigh reads against decompression against computes. They read this model
through `PolicyContext.cost`; they never measure time themselves, so two engines given
the same model make the same decisions.

The simulator builds it from the device profile it simulates and times its own servers
with the very same functions, so a policy plans with exactly the costs it is then
charged. The executor builds it from the profile it is throttled to (or a measured
profile of the host).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from devices.profile import DeviceProfile, StorageProfile
from devices.units import ConfigError
from workloads.catalog import ModelArch
from workloads.formats import ExpertFormat


@dataclass
class CostModel:
    device: DeviceProfile
    storage: StorageProfile
    model: ModelArch
    fmt: ExpertFormat
    _dense: dict = field(default_factory=dict, repr=False)
    _expert: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, device: DeviceProfile, model: ModelArch, fmt: ExpertFormat,
              storage: str | StorageProfile | None = None) -> "CostModel":
        if not isinstance(storage, StorageProfile):
            storage = device.storage_option(storage)
        return cls(device, storage, model, fmt)

    # -- storage ---------------------------------------------------------------------
    def read_seconds(self, nbytes: int) -> float:
        """One read of `nbytes` alone on the storage: its latency plus its transfer."""
        return self.storage.latency + nbytes / self.storage.read_bandwidth

    # -- decompression ---------------------------------------------------------------
    @property
    def decompress_workers(self) -> int:
        return self.device.decompress_workers

    def decompress_rate(self, codec: str | None = None) -> float:
        """Raw bytes per second one worker produces with `codec` (default: the format's)."""
        codec = codec or getattr(self.fmt, "codec", None)
        rates = self.device.decompress_throughput
        if codec not in rates:
            raise ConfigError(f"{self.device.path or self.device.name}: decompress_throughput has no entry for "
                              f"codec {codec!r}; known: {', '.join(rates)}")
        return rates[codec]

    def decompress_seconds(self, raw_bytes: int, workers: int = 1, codec: str | None = None) -> float:
        """Time to produce `raw_bytes`, split evenly over `workers` workers."""
        return raw_bytes / (self.decompress_rate(codec) * max(1, workers))

    # -- compute -----------------------------------------------------------------------
    def expert_seconds(self, level: int, tokens: int) -> float:
        """One expert at `level` for `tokens` tokens (roofline of the device's compute), plus
        re-assembling its weights first where the format keeps them split (assemble_seconds)."""
        key = (level, tokens)
        t = self._expert.get(key)
        if t is None:
            fmt = self.fmt
            t = self._expert[key] = (self.device.expert_time(fmt.level_sizes[level], fmt.params, tokens)
                                     + self.assemble_seconds(level))
        return t

    def assemble_seconds(self, level: int) -> float:
        """Zip: the executor keeps an expert as SM bytes + raw exponent bytes and re-assembles the
        BF16 weights at every compute (read both, write the BF16: twice the level's resident bytes
        through memory; measured ~17 GB/s moved on a 2-core x86 host). 0 for other formats."""
        if not any(self.fmt.decompress_bytes):
            return 0.0
        return 2 * self.fmt.level_sizes[level] / self.device.compute.memory_bandwidth

    def dense_seconds(self, tokens: int) -> float:
        """Attention, router and shared experts of one layer for `tokens` tokens."""
        t = self._dense.get(tokens)
        if t is None:
            m = self.model
            t = self._dense[tokens] = self.device.expert_time(m.dense_params_per_layer * m.dtype_bytes,
                                                              m.dense_params_per_layer, tokens)
        return t
