import numpy as np
import pytest

from devices.profile import ComputeProfile, DeviceProfile, StorageProfile
from workloads.catalog import ModelArch
from workloads.trace import RoutingTrace


def make_device(*, bandwidth=1920.0, latency=0.02, queue_depth=1, mem_bw=19200.0, flops=1e18, overhead=0.0,
                workers=2, decompress=None) -> DeviceProfile:
    """A device with round numbers, for hand-computed timelines."""
    return DeviceProfile(
        name="test-device", description="hand-made", memory_bytes=10**9, expert_budget_bytes=10**6,
        storage={"nvme": StorageProfile("nvme", bandwidth, latency, queue_depth)}, default_storage="nvme",
        compute=ComputeProfile(memory_bandwidth=mem_bw, flops=flops, overhead=overhead),
        decompress_workers=workers, decompress_throughput=decompress or {"lz4hc": 1000.0, "zstd": 1000.0,
                                                                         "lz4": 1000.0})


# 2 MoE layers of 2 experts, top-1; one expert = 3 x (8 x 4) params = 192 bf16 bytes
TINY = ModelArch("tiny", layers=2, experts=2, top_k=1, d_model=4, d_ff=8, n_heads=1, n_kv_heads=1, vocab=16)


def make_trace(experts, prompt=None, request_ids=None, num_experts=None) -> RoutingTrace:
    experts = np.asarray(experts, np.int32)
    scores = np.full(experts.shape, 1.0 / experts.shape[2], np.float32)
    meta = {"experts": num_experts} if num_experts else {}
    return RoutingTrace(experts, scores, request_ids, prompt, meta)


@pytest.fixture
def device():
    return make_device()


def assert_within_budget(tl, budget: int) -> None:
    """Resident expert bytes, replayed from the timeline's cache records, stay in [0, budget]."""
    mem = 0
    for e in tl.of("cache"):
        mem += -e.bytes if e.kind == "evict" else e.bytes
        assert 0 <= mem <= budget


def requested(steps, experts, levels=None) -> dict:
    """Tokens that asked for each (step, layer, expert) — or (step, layer, expert, level) when
    `levels` ([tokens, layers, k]) is given — of a batched trace: what the computes must cover."""
    want: dict = {}
    for s in steps:
        for t in s.tokens:
            for layer in range(experts.shape[1]):
                for slot, e in enumerate(experts[t, layer]):
                    key = (s.index, layer, int(e)) if levels is None else (s.index, layer, int(e),
                                                                           int(levels[t, layer, slot]))
                    want[key] = want.get(key, 0) + 1
    return want
