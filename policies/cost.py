"""The cost model: what a policy may know about time, in seconds.

Planning policies (ZipMoE's pool split and its Type-I/II scheduler, D²MoE's budget
planning) weigh reads against decompression against computes. They read this model
through `PolicyContext.cost`; they never measure time themselves, so two engines given
the same model make the same decisions.

The simulator builds it from the device profile it simulates and times its own servers
with the very same functions, so a policy plans with exactly the costs it is then
charged. The executor builds it from the profile it is throttled to (or a measured
profile of the host).

An expert call's time follows the kernel the profile names for the format (compute.kernels,
devices/kernels.py: tokens per call, dequantization per call / once / fused, its rates); a format
it does not name gets the roofline kernel: every token in one call, the dequantization pass per
call. A profile measured on a host (`moelab profile`: compute.measured) has priority over both
where it applies: for the model it was measured with, the expert call per format and level and
the dense part are read from its tables, and the executor's own costs appear as
decision_seconds (per decision point, plus per load issued) and step_seconds (per step,
outside the layers). Without such tables those are 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from devices import kernels
from devices.profile import Contention, DeviceProfile, MeasuredTables, StorageProfile, measured_key
from devices.levels import cpu_of, lower_link
from devices.units import ConfigError
from workloads.catalog import ModelArch
from workloads.formats import ExpertFormat

# CPU-placed experts (policies/placement.py): quantized weights are read packed and dequantized inside
# the dot product (ggml's q4/q8 kernels: https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-cpu/),
# so no separate pass writes the wide weights
CPU_FUSED = kernels.Kernel(dequant="fused")


@dataclass
class CostModel:
    device: DeviceProfile
    storage: StorageProfile
    model: ModelArch
    fmt: ExpertFormat
    _dense: dict = field(default_factory=dict, repr=False)
    _expert: dict = field(default_factory=dict, repr=False)
    _cpu: dict = field(default_factory=dict, repr=False)

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

    # -- tiers (devices/tiers.py) ------------------------------------------------------
    def link_seconds(self, nbytes: int) -> float:
        """One copy of `nbytes` alone over the link from host RAM to the accelerator."""
        link = lower_link(self.device)
        return link.latency + nbytes / link.bandwidth

    def cpu_expert_seconds(self, level: int, tokens: int) -> float:
        """One expert at `level` for `tokens` tokens on the host CPU (cpu:), from host RAM: the roofline
        kernel on the CPU's figures (its weights at its memory bandwidth, the matmul at its flops, its
        per-call overhead). Integer formats (MWQ planes, INT copies) run fused, as llama.cpp's quantized
        dot products dequantize in registers; zip's re-assembly is a pass per call, as on the accelerator."""
        key = (level, tokens)
        t = self._cpu.get(key)
        if t is None:
            fmt = self.fmt
            kernel = CPU_FUSED if fmt.dequantizes else kernels.ROOFLINE
            t = self._cpu[key] = kernels.expert_seconds(kernel, cpu_of(self.device), fmt.level_sizes[level],
                                                        fmt.params, self.dequant_bytes(level), tokens)
        return t

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
    @property
    def measured(self) -> MeasuredTables | None:
        """The host's measured tables when they are for this model, else None."""
        m = self.device.compute.measured
        return m if m is not None and m.model == self.model.name else None

    def _expert_table(self) -> bool:
        m = self.measured
        return (m is not None and measured_key(self.fmt) in m.experts
                and len(m.experts[measured_key(self.fmt)]) == self.fmt.levels)

    @property
    def kernel(self) -> kernels.Kernel | None:
        """The kernel expert calls run (the profile's for this format, else the roofline); None when
        a measured table times them instead."""
        return None if self._expert_table() else self.device.compute.kernels.get(self.fmt.name, kernels.ROOFLINE)

    def expert_seconds(self, level: int, tokens: int) -> float:
        """One expert at `level` for `tokens` tokens: the measured table (it includes decoding,
        dequantizing or re-assembling the weights), else the format's kernel on the device's compute
        (devices/kernels.py), whose dequantization pass moves dequant_bytes(level)."""
        key = (level, tokens)
        t = self._expert.get(key)
        if t is None:
            fmt = self.fmt
            if self._expert_table():
                t = self.measured.expert(measured_key(fmt), level, tokens)
            else:
                t = kernels.expert_seconds(self.kernel, self.device.compute, fmt.level_sizes[level], fmt.params,
                                           self.dequant_bytes(level), tokens)
            self._expert[key] = t
        return t

    def expert_calls(self, tokens: int) -> int:
        """How many kernel calls serve one expert's `tokens` tokens (1 under a measured table)."""
        k = self.kernel
        return 1 if k is None else k.calls(tokens)

    def decision_seconds(self, loads: int) -> float:
        """The decision point's own cost: per layer, plus per load item it issues (measured; 0 without tables)."""
        m = self.measured
        return 0.0 if m is None else m.decision_overhead + loads * m.load_overhead

    def compute_gap(self) -> float:
        """The executor's own time between two expert calls of a layer (measured; 0 without tables)."""
        m = self.measured
        return 0.0 if m is None else m.compute_gap

    def handoffs(self) -> tuple[float, float]:
        """(wake, handoff): a part's ready -> the start of the expert call that waited for it, and a
        read's end -> its decompression's start on an idle worker (measured; 0 without tables)."""
        m = self.measured
        return (0.0, 0.0) if m is None else (m.wake, m.handoff)

    def dense_after_loads(self) -> float:
        """What a dense part takes beyond its table after a decision point that loaded (measured; 0
        without tables)."""
        m = self.measured
        return 0.0 if m is None else m.dense_after_loads

    def call_after_load(self) -> float:
        """What an expert call takes beyond its table when its expert was loaded at this decision point
        (measured per format; 0 without tables)."""
        m = self.measured
        return 0.0 if m is None else m.call_after_load.get(measured_key(self.fmt), 0.0)

    def contention(self) -> Contention:
        """How the executor's threads share the cores in this format: the main thread's speed while
        reads / decompressions are in flight, and what an expert call / dense part costs in runs beyond
        its table (measured; none without tables)."""
        m = self.measured
        return Contention() if m is None else m.contention.get(measured_key(self.fmt), Contention())

    def step_seconds(self, tokens: int, prefill: bool = False) -> float:
        """Per step, outside the layers: embedding, output head, sampling (measured; 0 without tables)."""
        m = self.measured
        return 0.0 if m is None else m.step(tokens, prefill)

    def dequant_bytes(self, level: int) -> int:
        """What the executor does to a resident expert before its matmul, in bytes moved through memory:
        - zip: it keeps an expert as SM bytes + raw exponent bytes and re-assembles the BF16
          weights at every compute (read both, write the BF16: twice the level's resident bytes;
          measured ~17 GB/s moved on a 2-core x86 host);
        - mwq, copies: it dequantizes the packed planes into BF16 weights at every compute (the
          roofline already reads the packed bytes; add writing the BF16 weights and the matmul
          reading them back: 2 x 2 bytes per weight). D²MoE reports this overhead as 5-19% of
          latency (its Fig. 12) with kernels that overlap it; moelab's executor does not.
        0 for bf16. The kernel says when the pass runs (per call, once, or fused away) and how fast."""
        fmt = self.fmt
        if any(fmt.decompress_bytes):
            return 2 * fmt.level_sizes[level]
        if fmt.dequantizes:
            return 2 * 2 * fmt.params
        return 0

    def assemble_seconds(self, level: int) -> float:
        """The dequantization / re-assembly pass of one call at `level` (dequant_bytes) at the kernel's
        rate; 0 where the kernel fuses it or a measured table includes it."""
        k = self.kernel
        if k is None or k.dequant == "fused":
            return 0.0
        return self.dequant_bytes(level) / (k.dequant_bandwidth or self.device.compute.memory_bandwidth)

    def attention_seconds(self, kv) -> float:
        """The context term of one layer's attention at a step (kv: workloads/memory.py StepKV): the
        K/V positions it reads at the memory bandwidth plus its score and value flops (2 x 2 x head_dim
        per head and attended pair) at the device's flops. 0 under a measured table: its dense times
        were measured with attention at the profile's own context, and the executor's tiny models read
        a few hundred KB of K/V per step (see DESIGN.md, "attention time")."""
        if kv is None or self.measured is not None:
            return 0.0
        m, c = self.model, self.device.compute
        return kv.read_tokens * m.kv_bytes_per_token_layer / c.memory_bandwidth + \
            4 * m.n_heads * m.head_dim * kv.attended / c.flops

    def layer_dense_seconds(self, tokens: int, prefill: bool, kv) -> float:
        """One layer's dense part at a step: the weights' time (dense_seconds) plus attention's
        context term (attention_seconds). Every engine times a step's dense parts with this."""
        return self.dense_seconds(tokens, prefill) + self.attention_seconds(kv)

    def dense_seconds(self, tokens: int, prefill: bool = False) -> float:
        """Attention, router and shared experts of one layer for `tokens` tokens (a prefill's
        tokens are batch x prompt, a decode step's the batch: measured tables tell them apart)."""
        key = (tokens, prefill)
        t = self._dense.get(key)
        if t is None:
            if self.measured is not None:
                t = self.measured.dense(tokens, prefill)
            else:
                m = self.model
                dense_bytes = int(m.dense_params_per_layer * m.dense_bytes_per_param)
                t = self.device.expert_time(dense_bytes, m.dense_params_per_layer, tokens)
            self._dense[key] = t
        return t
