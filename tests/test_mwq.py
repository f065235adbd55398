import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.units import ConfigError
from executor import mwq
from workloads.formats import MWQ_LADDERS, MwqFormat, make_format


def weights(kind: str, shape=(128, 512), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=g) * 0.02
    df = {"t3": 3.0, "t5": 5.0}[kind]                  # Student-t: heavy tails, outliers in most groups
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((int(df),) + shape, generator=g) ** 2).sum(0)
    return z / (chi2 / df).sqrt() * 0.02


def level_errors(w, q):
    return [mwq.relative_error(w, mwq.dequantize(q, k)) for k in range(q.levels)]


@pytest.mark.parametrize("kind", ["gauss", "t3", "t5"])
@pytest.mark.parametrize("ladder", ["v1", "v2"])
def test_error_falls_with_every_plane(kind, ladder):
    w = weights(kind)
    b1, bK = MWQ_LADDERS[ladder]
    errs = level_errors(w, mwq.quantize(w, b1, bK))
    assert len(errs) == bK - b1 + 1
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # each residual plane roughly halves the error, like one more bit of plain INT
    assert all(b < 0.6 * a for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("kind", ["gauss", "t3", "t5"])
def test_int8_level_is_as_good_as_plain_int8(kind):
    # err(MWQ INT8 = INT5 + 3 planes) <= 1.01 * err(plain per-group asymmetric INT8)
    w = weights(kind, (256, 1024))
    err8 = level_errors(w, mwq.quantize(w, 5, 8))[-1]
    assert err8 <= 1.01 * mwq.relative_error(w, mwq.quantize_int(w, 8))
    err4 = level_errors(w, mwq.quantize(w, 2, 4))[-1]                    # and V1's INT4 vs plain INT4
    assert err4 <= 1.01 * mwq.relative_error(w, mwq.quantize_int(w, 4))


def test_levels_are_per_group_asymmetric_then_binary_planes():
    w = weights("gauss", (4, 256))
    q = mwq.quantize(w, 3, 5, group=128)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
    assert q.scale.shape == q.zero.shape == (4, 2) and q.scale.dtype == torch.float16
    assert q.signs.shape == (2, 4, 256) and set(q.signs.unique().tolist()) <= {0, 1}
    s, z = q.scale.float().repeat_interleave(128, 1), q.zero.float().repeat_interleave(128, 1)
    w0 = (q.codes.float() - z) * s
    assert torch.allclose(mwq.dequantize(q, 0), w0, atol=1e-6)
    w1 = w0 + q.res_scale[0].float().repeat_interleave(128, 1) * (2 * q.signs[0].float() - 1)
    assert torch.allclose(mwq.dequantize(q, 1), w1, atol=1e-6)


@st.composite
def configs(draw):
    group = draw(st.sampled_from([1, 2, 3, 6, 8, 16, 64]))
    out = draw(st.integers(1, 9))
    inp = group * draw(st.integers(1, 5))
    b1 = draw(st.integers(1, 8))
    bK = draw(st.integers(b1, min(b1 + 4, 12)))
    return out, inp, group, b1, bK, draw(st.integers(0, 2 ** 16))


@settings(max_examples=40, deadline=None)
@given(configs())
def test_packing_parsing_and_dequantizing_are_exact(cfg):
    out, inp, group, b1, bK, seed = cfg
    shapes = [(out, inp), (inp, out * group)]                      # two matrices, N odd or even
    ws = [weights("t5", s, seed + i) for i, s in enumerate(shapes)]
    qs = [mwq.quantize(w, b1, bK, group) for w in ws]
    packed = [mwq.pack(q) for q in qs]
    for q, p in zip(qs, packed):
        back = mwq.unpack(p)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.signs, q.signs)
        assert p.planes.shape == (bK, (q.codes.numel() + 7) // 8)
    fmt = MwqFormat(shapes=tuple(shapes), b1=b1, bK=bK, group=group)
    parts = mwq.serialize_expert(packed)
    assert [len(x) for x in parts] == list(fmt.part_bytes)
    for level in range(fmt.levels):
        # a prefix of the parts gives that level, equal to dequantizing in memory
        got = mwq.parse_expert(parts[:len(fmt.parts_of(level))], fmt)
        for q, p in zip(qs, got):
            assert p.levels == level + 1
            assert torch.equal(mwq.dequantize_packed(p, level), mwq.dequantize(q, level))


@pytest.mark.parametrize("ladder", ["v1", "v2"])
def test_encoder_output_has_the_format_part_sizes(ladder):
    shapes = [(64, 256), (64, 256), (256, 128)]
    fmt = make_format("mwq", shapes, ladder=ladder)
    ws = dict(zip(("w1", "w3", "w2"), (weights("gauss", s, i) for i, s in enumerate(shapes))))
    enc = mwq.MwqEncoder(dtype=torch.float32)
    parts = enc.encode(ws, fmt)
    assert [len(p) for p in parts] == list(fmt.part_bytes)
    b1, bK = MWQ_LADDERS[ladder]
    for level in range(fmt.levels):
        got = enc.decode(parts, fmt, level)
        want = mwq.dequantize(mwq.quantize(ws["w2"], b1, bK), level)
        assert torch.equal(got["w2"], want)


def reference_dequantize(q, level):
    """The dequantizer's arithmetic written out in torch: fl(fl(Q*s) + c), then + 2 s_k b_k per
    plane in order, with c = -z*s - s_1 - ... (float32)."""
    def per_weight(t):
        return t.float().repeat_interleave(q.group, -1)
    s, sk = per_weight(q.scale), per_weight(q.res_scale[:level])
    c = -(per_weight(q.zero) * s)
    for k in range(level):
        c = c - sk[k]
    w = q.codes.float() * s + c
    for k in range(level):
        w = w + q.signs[k].float() * (2 * sk[k])
    return w


@settings(max_examples=60, deadline=None)
@given(configs(), st.data())
def test_dequantizer_matches_the_arithmetic_written_out(cfg, data):
    # shapes whose planes are not whole 64-bit words, groups across lanes, short last lanes
    out, inp, group, b1, bK, seed = cfg
    q = mwq.quantize(weights("t3", (out, inp), seed), b1, bK, group)
    p = mwq.pack(q)
    d = mwq.Dequantizer((out, inp), group, bK)
    level = data.draw(st.integers(0, q.levels - 1))
    assert torch.equal(d(p, level), reference_dequantize(q, level))


def test_fast_dequantizer_reuses_its_buffers_and_matches_reference():
    w = weights("gauss", (64, 512))
    q = mwq.quantize(w, 5, 8)
    p = mwq.pack(q)
    d = mwq.Dequantizer((64, 512), 128, 8)
    a = d(p, 3).clone()
    d(p, 0)
    assert torch.equal(d(p, 3), a) and d(p, 3).data_ptr() == d.out.data_ptr()
    assert all(torch.equal(d(p, k), reference_dequantize(q, k)) for k in range(4))
    buf = torch.empty(64, 512)
    assert d(p, 2, out=buf).data_ptr() == buf.data_ptr() and torch.equal(buf, reference_dequantize(q, 2))
    # padded rows; a short last lane; several tasks per lane, groups across lanes; whole groups
    for shape, group in [((3, 24), 8), ((1, 7), 1), ((257, 64), 64), ((300, 256), 128)]:
        q = mwq.quantize(weights("t3", shape), 2, 4, group)
        d = mwq.Dequantizer(shape, group, 4)
        assert all(torch.equal(d(mwq.pack(q), k), reference_dequantize(q, k)) for k in range(3))
    with pytest.raises(ConfigError, match="Dequantizer for"):
        d(mwq.pack(mwq.quantize(weights("t3", (4, 128)), 2, 4)))


def test_calibration_lowers_the_calibration_loss_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = weights("gauss", (64, 512))
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 512, generator=g) + 0.3 * torch.randn(2048, 512, generator=g)
    x = x * torch.logspace(-1, 1, 512)[torch.randperm(512, generator=g)]     # correlated, uneven channels

    def loss(q, k):
        return float(((w - mwq.dequantize(q, k)) @ x.T).norm())

    for b1, bK in MWQ_LADDERS.values():
        plain = mwq.quantize(w, b1, bK)
        calib = mwq.quantize(w, b1, bK, x=x)                 # weighted fit + block compensation
        lp = [loss(plain, k) for k in range(plain.levels)]
        lc = [loss(calib, k) for k in range(calib.levels)]
        assert all(c < p for c, p in zip(lc[1:], lp[1:])), (lc, lp)  # every level above the base
        assert lc[-1] < 0.8 * lp[-1]
        assert lc[0] < 1.05 * lp[0]                          # the base: the top codes' leading bits
        # weighted least squares alone: each level's scales are the best for that level
        wls = mwq.quantize(w, b1, bK, x=x, block=0)
        assert loss(wls, 1) < lp[1]


# -- bad input --------------------------------------------------------------------------------
def test_bad_configurations_name_what_is_wrong():
    w = torch.zeros(4, 200)
    with pytest.raises(ConfigError, match="group size 128 does not divide the input dimension 200"):
        mwq.quantize(w, 2, 4)
    with pytest.raises(ConfigError, match="b1=5 > top bits bK=4"):
        mwq.quantize(torch.zeros(4, 256), 5, 4)
    with pytest.raises(ConfigError, match="b1 must be in 1..8"):
        mwq.quantize(torch.zeros(4, 256), 0, 4)
    with pytest.raises(ConfigError, match="needs calibration activations"):
        mwq.quantize(torch.zeros(4, 256), 2, 4, block=128)
    with pytest.raises(ConfigError, match=r"calibration activations must be \[tokens, 256\]"):
        mwq.quantize(torch.zeros(4, 256), 2, 4, x=torch.zeros(8, 128))
    with pytest.raises(ConfigError, match="block width 64 must be a positive multiple of the group size 128"):
        mwq.quantize(torch.zeros(4, 256), 2, 4, x=torch.zeros(8, 256), block=64)
    with pytest.raises(ConfigError, match="NaN"):
        mwq.quantize(torch.full((4, 128), float("nan")), 2, 4)
    q = mwq.quantize(torch.randn(4, 128), 2, 4)
    with pytest.raises(ConfigError, match="level 3 out of range 0..2"):
        mwq.dequantize(q, 3)


def test_parse_rejects_wrong_part_sizes():
    fmt = make_format("mwq", [(4, 128)], ladder="v1")
    parts = mwq.serialize_expert([mwq.pack(mwq.quantize(torch.randn(4, 128), 2, 4))])
    with pytest.raises(ConfigError, match=r"part 1 is \d+ bytes, the format says"):
        mwq.parse_expert([parts[0], parts[1][:-1]], fmt)
    with pytest.raises(ConfigError, match="1..3 parts, got 4"):
        mwq.parse_expert(parts + [parts[2]], fmt)


def test_constant_and_zero_groups_are_exact():
    w = torch.cat([torch.zeros(2, 128), torch.full((2, 128), 0.25)])
    q = mwq.quantize(w, 2, 4)
    assert mwq.relative_error(w, mwq.dequantize(q)) < 1e-3
