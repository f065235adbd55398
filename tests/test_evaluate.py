"""`moelab eval`: experts at mixed levels from memory, the quality table, and MWQ's two base fits."""
import csv
import math

import numpy as np
import pytest
import torch

from devices.units import ConfigError
from executor import mwq
from executor.evaluate import (LevelExperts, allocator_bundle, allocator_levels, eval_table, fixed_level, perplexity,
                               write_table)
from executor.levels import bf16_levels, int_levels, mwq_levels, store_group
from test_executor import tiny_model
from test_mwq import level_errors, weights


def windows(n=4, seq=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))


def routed_output(model, fn, x):
    """Each MoE layer's routed output for the hidden states the plain model produces."""
    outs = {}

    def spy(layer, hidden, ids, gates):
        outs[layer] = fn(layer, hidden, ids, gates)
        return model.moe_layers[layer].resident_experts(layer, hidden, ids, gates)
    model.set_expert_fn(spy)
    with torch.no_grad():
        model(x)
    model.set_expert_fn(None)
    return outs


def test_bf16_level_experts_are_the_resident_experts():
    model, x = tiny_model(), windows()[:, :-1]
    with torch.no_grad():
        want = model(x)
        model.set_expert_fn(LevelExperts(bf16_levels(model), model.cfg.activation))
        got = model(x)
    model.set_expert_fn(None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_each_token_is_computed_at_its_own_level():
    model, x = tiny_model(), windows()[:, :-1]
    lw = mwq_levels(model, "v1")
    per_level = [routed_output(model, LevelExperts(lw, "silu", fixed_level(k)), x) for k in range(3)]

    def by_token(layer, hidden, ids, gates):      # token t at level t % 3, both slots
        return np.repeat((np.arange(ids.shape[0]) % 3)[:, None], ids.shape[1], 1).astype(np.uint8)
    mixed = routed_output(model, LevelExperts(lw, "silu", by_token), x)
    for layer, out in mixed.items():
        for k in range(3):
            torch.testing.assert_close(out[k::3], per_level[k][layer][k::3], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(per_level[0][layer], per_level[2][layer])     # the levels differ


def test_allocator_levels_follow_the_demand_and_count_bits():
    model, w = tiny_model(), windows()
    lw = mwq_levels(model, "v1")
    fn = LevelExperts(lw, "silu", allocator_levels(allocator_bundle(model, "v1", lw_group(model), "capacity")))
    perplexity(model, w, fn)
    assert fn.slots == 3 * w[:, 1:].numel() * 2                       # layers x tokens x top-2
    assert fn.bits / fn.slots == pytest.approx(3.0, abs=0.03)         # capacities 0.3/0.4/0.3 of INT2/3/4


def lw_group(model):
    return store_group(model)


def test_table_rows_bits_and_files(tmp_path):
    model = tiny_model()
    notes = []
    rows = eval_table(model, windows(), ladders=("v1", "v2"), fits=("topgrid", "own"), plain_bits=(8, 4, 2),
                      allocators=("gate-score", "capacity", "learned"), quiet=True, notes=notes)
    by = {(r.method, r.ladder, r.base_fit): r for r in rows}
    assert rows[0].method == "bf16" and rows[0].avg_bits == 16 and rows[0].vs_bf16_pct == 0
    assert by[("INT8", "", "")].avg_bits == 8 and by[("INT8", "", "")].stored_bits == 8 + 32 / store_group(model)
    for ladder, bits in (("V1", (2, 3, 4)), ("V2", (5, 6, 7, 8))):
        for fit in ("topgrid", "own"):
            for k, b in enumerate(bits):
                assert by[(f"MWQ INT{b} (fixed {k})", ladder, fit)].avg_bits == b
        errs = [abs(by[(f"MWQ INT{b} (fixed {k})", ladder, "topgrid")].loss_nats - rows[0].loss_nats)
                for k, b in enumerate(bits)]
        assert errs[-1] < errs[0]                               # the top level is closer to bf16 than the base
    assert by[("capacity", "V1", mwq.DEFAULT_BASE_FIT)].avg_bits == pytest.approx(3.0, abs=0.03)
    assert by[("gate-score (top-1 top, rest base)", "V2", mwq.DEFAULT_BASE_FIT)].avg_bits == pytest.approx(6.5)
    assert by[("gate-score", "V1", mwq.DEFAULT_BASE_FIT)].avg_bits > 3.0          # top-1 always at INT4
    assert any("learned V1: no bit router" in n for n in notes)                   # no router given: said so
    for r in rows:
        assert r.perplexity == pytest.approx(math.exp(r.loss_nats))
    csv_path, md_path = write_table(rows, tmp_path, "t", notes)
    read = list(csv.DictReader(csv_path.open()))
    assert len(read) == len(rows) and float(read[1]["avg_bits"]) == 8
    md = md_path.read_text()
    assert "| V1 | INT2 |" in md and "| bf16 | - | - | 16.00 |" in md and "no bit router" in md


def test_int_levels_are_plain_int():
    model = tiny_model()
    lw = int_levels(model, 4)
    w = model.expert_weights(1, 2)["w2"].detach()
    torch.testing.assert_close(lw.weights[1][2][0]["w2"], mwq.quantize_int(w, 4, store_group(model)))


# -- base fits ---------------------------------------------------------------------------------
def test_own_base_fit_beats_plain_int2_where_topgrid_does_not():
    w = weights("t3", (256, 1024))                  # heavy tails
    top = level_errors(w, mwq.quantize(w, 2, 4, base_fit="topgrid"))
    own = level_errors(w, mwq.quantize(w, 2, 4, base_fit="own"))
    plain = [mwq.relative_error(w, mwq.quantize_int(w, b)) for b in (2, 3, 4)]
    assert own[0] < 0.9 * plain[0] < 0.9 * top[0]             # 0.50 < 0.60 < 0.64
    assert top[2] <= 1.01 * plain[2] < own[2]                 # but its top level is worse than INT4
    assert all(a > b for a, b in zip(own, own[1:]))


def test_base_fits_share_the_stored_format():
    from workloads.formats import MwqFormat
    w = weights("gauss", (16, 64))
    fmt = MwqFormat(((16, 64),), b1=2, bK=4, group=32)
    for fit in mwq.BASE_FITS:
        q = mwq.quantize(w, 2, 4, group=32, base_fit=fit)
        parts = mwq.serialize_expert([mwq.pack(q)])
        assert [len(p) for p in parts] == list(fmt.part_bytes)
        back = mwq.parse_expert(parts, fmt)[0]
        torch.testing.assert_close(mwq.dequantize_packed(back, 2), mwq.dequantize(q, 2))


def test_unknown_base_fit_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="base_fit 'best' unknown; allowed: topgrid, own"):
        mwq.quantize(weights("gauss", (4, 128)), 2, 4, base_fit="best")
