"""Kernel-aware expert calls (devices/kernels.py, policies/cost.py): hand-computed call times for each
kernel shape on the paper's two models, the YAML that chooses them, a measured host profile's
priority, and the same costs in both engines."""
from dataclasses import replace

import pytest

from devices.kernels import Kernel
from devices.profile import ComputeProfile, DeviceProfile, StorageProfile, load_device
from devices.units import ConfigError
from policies.cost import CostModel
from workloads.catalog import get_model
from workloads.formats import make_format

US = 1e-6
LLAMA, MIXTRAL = get_model("llama-moe-3.5b"), get_model("mixtral-8x7b")


def device(**kernels) -> DeviceProfile:
    """100 GB/s, 10 TFLOPS, 30 us per call."""
    return DeviceProfile("d", "d", 10**10, 10**9, {"nvme": StorageProfile("nvme", 1e9, 0.0, 1)}, "nvme",
                         ComputeProfile(memory_bandwidth=100e9, flops=10e12, overhead=30 * US, kernels=kernels),
                         1, {"lz4": 1e9})


def seconds(model, fmt_name, level, tokens, **kernels) -> float:
    fmt = make_format(fmt_name, model.expert_shapes)
    return CostModel.build(device(**kernels), model, fmt).expert_seconds(level, tokens)


# LLaMA-MoE-3.5B, MWQ INT4: 12,681,216 B of planes, 16,908,288 weights. At 100 GB/s and 10 TFLOPS:
#   weight read 126.81216 us; math 2 x 16,908,288 / 1e13 = 3.3816576 us per token (ahead from 38 tokens);
#   dequantization pass 4 B per weight = 67,633,152 B = 676.33152 us.
@pytest.mark.parametrize("kernel, tokens, want_us", [
    (None, 1, 30 + 126.81216 + 676.33152),                                  # roofline: one call, pass per call
    (None, 32, 30 + 126.81216 + 676.33152),                                 #   flat at decode
    (None, 64, 30 + 64 * 3.3816576 + 676.33152),                            #   then flops-bound
    (Kernel(tokens_per_call=1), 8, 8 * (30 + 126.81216 + 676.33152)),      # token-linear, pass per call
    (Kernel(tokens_per_call=8), 20, 3 * (30 + 126.81216 + 676.33152)),     # 8 + 8 + 4 tokens: 3 calls
    (Kernel(tokens_per_call=1, dequant="once"), 8, 8 * (30 + 126.81216) + 676.33152),
    (Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=20e9), 8, 8 * (30 + 634.0608)),
    (Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=20e9, gemm_from=33), 32, 32 * (30 + 634.0608)),
    (Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=20e9, gemm_from=33), 40,
     30 + 40 * 3.3816576 + 676.33152),                                      # a prefill's call: the roofline
    (Kernel(dequant="per-call", dequant_bandwidth=200e9, overhead=10 * US), 1, 10 + 126.81216 + 338.16576),
])
def test_llama_moe_int4_call_times_by_hand(kernel, tokens, want_us):
    kernels = {} if kernel is None else {"mwq": kernel}
    assert seconds(LLAMA, "mwq", 2, tokens, **kernels) == pytest.approx(want_us * US, rel=1e-12)


# Mixtral-8x7B, MWQ INT2: 49,545,216 B, 176,160,768 weights: read 495.45216 us, math 35.2321536 us per
# token, pass 704,643,072 B = 7046.43072 us. Per-width INT4 copy: 93,585,408 B = 935.85408 us to read.
@pytest.mark.parametrize("fmt_name, level, kernel, tokens, want_us", [
    ("mwq", 0, None, 1, 30 + 495.45216 + 7046.43072),
    ("mwq", 0, None, 32, 30 + 32 * 35.2321536 + 7046.43072),                # flops-bound from 15 tokens
    ("mwq", 0, Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=20e9), 4, 4 * (30 + 2477.2608)),
    ("mwq", 0, Kernel(tokens_per_call=16, dequant="fused"), 40, 2 * (30 + 16 * 35.2321536) + (30 + 495.45216)),
    ("copies", 2, Kernel(tokens_per_call=1, dequant="once"), 3, 3 * (30 + 935.85408) + 7046.43072),
    ("bf16", 0, Kernel(tokens_per_call=1), 2, 2 * (30 + 3523.21536)),       # bf16: no pass to make
])
def test_mixtral_call_times_by_hand(fmt_name, level, kernel, tokens, want_us):
    kernels = {} if kernel is None else {fmt_name: kernel}
    assert seconds(MIXTRAL, fmt_name, level, tokens, **kernels) == pytest.approx(want_us * US, rel=1e-12)


def test_zip_reassembly_is_its_pass():
    # LLaMA-MoE zip: re-assembly moves twice the 33,816,576 resident bytes = 676.33152 us at 100 GB/s
    assert seconds(LLAMA, "zip", 0, 1) == pytest.approx((30 + 338.16576 + 676.33152) * US)
    assert seconds(LLAMA, "zip", 0, 1, zip=Kernel(dequant="fused")) == pytest.approx((30 + 338.16576) * US)


def test_a_kernel_applies_to_its_format_only_and_counts_calls():
    k = Kernel(tokens_per_call=8, gemm_from=64)
    cost = CostModel.build(device(mwq=k), LLAMA, make_format("mwq", LLAMA.expert_shapes))
    assert [cost.expert_calls(n) for n in (1, 8, 9, 63, 64, 4096)] == [1, 1, 2, 8, 1, 1]
    bf16 = CostModel.build(device(mwq=k), LLAMA, make_format("bf16", LLAMA.expert_shapes))
    assert bf16.kernel == Kernel() and bf16.expert_calls(4096) == 1


KERNELS_YAML = """\
  kernels:
    mwq: {tokens_per_call: 1, dequant: fused, weight_bandwidth: 20GB/s, gemm_from: 33}
    copies: {dequant: once, dequant_bandwidth: 200GB/s, overhead: 10us}
"""


def board(tmp_path, kernels: str = KERNELS_YAML) -> str:
    from test_devices import GOOD, write
    return write(tmp_path, GOOD.replace("  overhead: 30us\n", "  overhead: 30us\n" + kernels))


def test_kernels_are_read_from_the_yaml(tmp_path):
    d = load_device(board(tmp_path))
    assert d.compute.kernels == {"mwq": Kernel(1, "fused", 20e9, None, None, 33),
                                 "copies": Kernel(None, "once", None, 200e9, pytest.approx(10e-6))}
    assert "kernel mwq" in d.describe() and "at most 1 token per call" in d.describe()


@pytest.mark.parametrize("kernels, key, allowed", [
    ("  kernels:\n    mwq: {tokens_per_call: 0}\n", "compute.kernels.mwq.tokens_per_call", "integer >= 1"),
    ("  kernels:\n    mwq: {dequant: sometimes}\n", "compute.kernels.mwq.dequant", "per-call, once, fused"),
    ("  kernels:\n    gguf: {dequant: fused}\n", "compute.kernels.gguf", "bf16, mwq, copies, zip"),
    ("  kernels:\n    mwq: {tokens: 1}\n", "compute.kernels.mwq.tokens", "tokens_per_call"),
    ("  kernels:\n    mwq: {weight_bandwidth: 20GB}\n", "compute.kernels.mwq.weight_bandwidth", "GB/s"),
])
def test_kernel_errors_name_the_key(tmp_path, kernels, key, allowed):
    path = board(tmp_path, kernels)
    with pytest.raises(ConfigError) as e:
        load_device(path)
    assert path in str(e.value) and key in str(e.value) and allowed in str(e.value), str(e.value)


def test_a_measured_host_profile_keeps_priority_over_a_kernel():
    from devices.profile import MeasuredTables
    arch = replace(LLAMA, name="m")
    fmt = make_format("mwq", arch.expert_shapes)
    table = MeasuredTables("m", (1, 8), {"mwq-int2-4": ((1e-3, 2e-3),) * 3}, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0),
                           (0.0, 0.0), 0.0, 0.0)
    d = device(mwq=Kernel(tokens_per_call=1))
    d = replace(d, compute=replace(d.compute, measured=table))
    cost = CostModel.build(d, arch, fmt)
    assert cost.expert_seconds(2, 8) == pytest.approx(2e-3) and cost.kernel is None and cost.expert_calls(8) == 1
    other = CostModel.build(d, LLAMA, fmt)                  # another model: the kernel again
    assert other.expert_seconds(2, 8) == pytest.approx(8 * (30 + 126.81216 + 676.33152) * US)


def test_the_paper_implementation_profiles_differ_from_the_hardware_only_in_the_expert_call():
    for env in ("rtx-3060-laptop-6gb", "jetson-agx-orin-64gb"):
        hw, impl = load_device(env), load_device(f"{env}-d2moe-impl")
        assert replace(impl, name=hw.name, description=hw.description, path=hw.path,
                       compute=replace(impl.compute, kernels={})) == hw
        k = impl.compute.kernels
        assert k["mwq"] == k["copies"] and (k["mwq"].tokens_per_call, k["mwq"].dequant) == (1, "fused")
    # Env 1: the paper's RTX 3060 expert computes in 3.1 ms what its SSD reads in 20 ms at 3.5 GB/s
    assert load_device("rtx-3060-laptop-6gb-d2moe-impl").compute.kernels["mwq"].weight_bandwidth == \
        pytest.approx(3.5e9 * 20 / 3.1, rel=1e-3)


def test_the_env2_rate_is_fig3s_calibration():
    """Re-derives Env 2's weight rate from Fig. 3 (one 32-request run, ~10 s) and checks the YAML's."""
    from experiments.d2moe_bounds import fig3_weight_bandwidth
    from experiments.d2moe_runs import fig3_run
    got = fig3_weight_bandwidth("jetson-agx-orin-64gb", fig3_run("env2"))["weight_bandwidth"]
    assert load_device("jetson-agx-orin-64gb-d2moe-impl").compute.kernels["mwq"].weight_bandwidth == \
        pytest.approx(got, rel=5e-3)


def test_both_engines_plan_with_the_same_kernel_costs(tmp_path):
    """The simulator's run function and the executor's cost model read the same YAML kernels."""
    from experiments.run import prepare
    from experiments.run_exec import HostOptions, cost_model
    from experiments.spec import RunSpec
    path = board(tmp_path)
    spec = RunSpec.from_doc({"device": path, "model": "llama-moe-3.5b", "format": {"name": "mwq"}, "tokens": 2,
                             "prompt_tokens": 1, "budget": "1GB"})
    sim = prepare(spec, timeline=False).cost
    ex = cost_model(spec, HostOptions(), LLAMA, sim.fmt)
    for level in range(3):
        for n in (1, 8, 32, 33, 4096):
            assert ex.expert_seconds(level, n) == sim.expert_seconds(level, n)
    assert sim.expert_seconds(2, 8) == pytest.approx(8 * (30 + 12_681_216 / 20e9 * 1e6) * US)
