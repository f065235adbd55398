"""The shape of an expert call: how its time grows with the tokens it serves, per device and format.

A device profile may say, per expert format (`compute.kernels.<format>`), which kernel computes an
expert; formats it does not name keep the roofline (`ROOFLINE`). Fields, all optional:

    compute:
      kernels:
        mwq:                        # a format name: bf16, mwq, copies, zip
          tokens_per_call: 1        # at most this many tokens per call: n tokens take ceil(n / m) calls
                                    #   (m = 1: token-linear); absent: every token in one call
          dequant: fused            # per-call: a pass that writes the BF16 weights (the matmul reads them
                                    #   back) before every call; once: that pass once per expert and level,
                                    #   shared by its calls; fused: none (the kernel reads the packed weights)
          weight_bandwidth: 22.6GB/s  # the rate one call reads the level's weights (default: memory_bandwidth)
          dequant_bandwidth: 200GB/s  # the rate of the dequantization pass (default: memory_bandwidth)
          overhead: 20us            # fixed cost per call (default: compute.overhead)
          gemm_from: 33             # an expert's tokens at one level this many or more (a prefill's) run as one
                                    #   batched call on the roofline instead (default: never)

One call of t tokens at a level of `weight_bytes` bytes and `params` weights takes

    overhead + max(weight_bytes / weight_bandwidth, 2 * params * t / flops)   (+ the pass, per-call)

and the pass moves `dequant_bytes` (the cost model says how many: 4 per weight for MWQ and per-width
copies, twice the resident bytes for zip's re-assembly, none for bf16) at dequant_bandwidth. The
roofline (no kernel named) is one call for all tokens with the pass per call: exactly the cost model
before kernels existed. A measured host profile (compute.measured) overrides every kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEQUANT_MODES = ("per-call", "once", "fused")
FIELDS = ("tokens_per_call", "dequant", "weight_bandwidth", "dequant_bandwidth", "overhead", "gemm_from")


@dataclass(frozen=True)
class Kernel:
    """One format's expert-call kernel on one device (module doc); None: the device's own figure."""
    tokens_per_call: int | None = None        # None: every token in one call
    dequant: str = "per-call"
    weight_bandwidth: float | None = None     # bytes/s
    dequant_bandwidth: float | None = None    # bytes/s
    overhead: float | None = None             # seconds per call
    gemm_from: int | None = None              # tokens from which one batched roofline call serves them

    def __post_init__(self):
        assert self.dequant in DEQUANT_MODES, self.dequant
        assert self.tokens_per_call is None or self.tokens_per_call >= 1, self.tokens_per_call
        assert self.gemm_from is None or self.gemm_from >= 1, self.gemm_from

    def batched(self, tokens: int) -> bool:
        """Whether `tokens` tokens go to the batched roofline call (gemm_from)."""
        return self.gemm_from is not None and tokens >= self.gemm_from

    def calls(self, tokens: int) -> int:
        """How many calls serve `tokens` tokens (at least one)."""
        m = self.tokens_per_call
        return 1 if m is None or tokens <= m or self.batched(tokens) else math.ceil(tokens / m)

    def describe(self) -> str:
        m = "every token in one call" if self.tokens_per_call is None else f"at most {self.tokens_per_call} " \
            f"token{'s' if self.tokens_per_call > 1 else ''} per call"
        extra = [f"weights at {self.weight_bandwidth / 1e9:.3g} GB/s"] if self.weight_bandwidth else []
        extra += [f"dequantization at {self.dequant_bandwidth / 1e9:.3g} GB/s"] if self.dequant_bandwidth else []
        extra += [f"{self.overhead * 1e6:.3g} us per call"] if self.overhead is not None else []
        extra += [f"{self.gemm_from}+ tokens in one roofline call"] if self.gemm_from is not None else []
        return f"{m}, dequantization {self.dequant}" + "".join(f", {x}" for x in extra)


ROOFLINE = Kernel()


def expert_seconds(kernel: Kernel, compute, weight_bytes: int, params: int, dequant_bytes: int,
                   tokens: int) -> float:
    """One expert at one level for `tokens` tokens under `kernel` on `compute` (a ComputeProfile):
    full calls of tokens_per_call tokens, then one call of the rest (module doc); from gemm_from tokens
    on, the roofline kernel instead."""
    if kernel.batched(tokens):
        kernel = ROOFLINE
    bw = kernel.weight_bandwidth or compute.memory_bandwidth
    overhead = compute.overhead if kernel.overhead is None else kernel.overhead
    read = weight_bytes / bw
    dq = dequant_bytes / (kernel.dequant_bandwidth or compute.memory_bandwidth) if dequant_bytes else 0.0
    per_call = dq if kernel.dequant == "per-call" else 0.0

    def call(t: int) -> float:
        return overhead + max(read, 2 * params * t / compute.flops) + per_call

    m = kernel.tokens_per_call
    if m is None or tokens <= m:
        total = call(tokens)
    else:
        full, rest = divmod(tokens, m)
        total = full * call(m) + (call(rest) if rest else 0.0)
    return total + (dq if kernel.dequant == "once" else 0.0)
