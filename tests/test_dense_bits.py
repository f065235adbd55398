"""The dense (non-expert) weights' precision as deployed (RunSpec dense_bits): their memory and their
reads. D²MoE's LLaMA-MoE-3.5B on its 6 GB GPU fits only with them quantized."""
from dataclasses import replace

import pytest

from devices.profile import load_device
from devices.units import ConfigError, MoelabError
from experiments.run import OverMemory, prepare
from experiments.run_exec import check_spec
from experiments.spec import RunSpec, row_spec, spec_row
from policies.cost import CostModel
from workloads.catalog import get_model
from workloads.formats import make_format

def test_dense_bytes_scale_with_the_bits():
    m = get_model("llama-moe-3.5b")
    # 32 layers x (4 x 4096^2 attention + 4096 x 8 router) + 2 x 32000 x 4096 embeddings and head
    params = 32 * (4 * 4096 ** 2 + 4096 * 8) + 2 * 32000 * 4096
    assert m.dense_weight_bytes == 2 * params
    assert replace(m, dense_bits=8).dense_weight_bytes == params
    assert replace(m, dense_bits=4).dense_weight_bytes == params // 2


def test_dense_time_reads_the_quantized_bytes():
    """One layer's dense part on the roofline: overhead + max(bytes / bandwidth, 2 x params x tokens /
    flops); a decode token on the laptop is read-bound, so INT8 halves the read term."""
    device, m = load_device("rtx-3060-laptop-6gb"), get_model("llama-moe-3.5b")
    fmt = make_format("bf16", m.expert_shapes)
    c = device.compute
    params = m.dense_params_per_layer
    for bits, per_param in ((16, 2), (8, 1), (4, 0.5)):
        got = CostModel.build(device, replace(m, dense_bits=bits), fmt).dense_seconds(1)
        assert got == pytest.approx(c.overhead + max(params * per_param / c.memory_bandwidth, 2 * params / c.flops))


def test_the_paper_setup_is_refused_at_bf16_and_runs_at_int8():
    spec = RunSpec(device="rtx-3060-laptop-6gb", model="llama-moe-3.5b", budget=1_600_000_000, tokens=2)
    with pytest.raises(OverMemory, match=r"dense weights 4\.82GB"):
        prepare(spec, timeline=False)
    p = prepare(spec.with_(dense_bits=8), timeline=False)
    assert p.memory.meta()["dense_bytes"] == get_model("llama-moe-3.5b").dense_weight_bytes // 2


def test_spec_row_and_errors():
    spec = RunSpec(dense_bits=4)
    assert RunSpec.from_doc(spec.to_doc()) == spec and RunSpec().to_doc().get("dense_bits") is None
    assert spec.config_hash() != RunSpec().config_hash()
    assert row_spec(spec_row(spec, "mixtral-8x7b")).dense_bits == 4
    with pytest.raises(ConfigError, match="dense_bits: 5 is not a precision of the dense weights; allowed: 4, 8, 16"):
        RunSpec.from_doc({"dense_bits": 5}, "f.yaml")
    with pytest.raises(MoelabError, match="simulator what-if"):
        check_spec(RunSpec(dense_bits=8))
