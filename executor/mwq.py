"""Matryoshka Weight Quantization (MWQ, D2MoE): a b1-bit base plane plus binary residual planes.

A weight matrix W [out, in] is cut into groups of `group` weights along the input dimension.
Level 0 (INT b1) is per-group asymmetric quantization, W0 = (Q - z) * s. Level k adds the
binary residual plane k: the sign of what is left (+1/-1, no zero point) times a per-group
scale, Wk = W(k-1) + s_k * sign(W - W(k-1)). Level k needs planes 0..k only, so a higher
precision loads just the extra planes. Ladders: V1 = INT2/3/4, V2 = INT5..8 (or any b1..bK).

Fitting. Scales are least-squares fits, optionally weighted by calibration activations x
(objective ||(W - What) x^T||^2, H = 2 x^T x + damp). The base grid is the coarse sub-lattice
of a least-squares fitted plain INT-bK grid: with ideal residual scales s/4, s/8, ... a full
set of planes then lands on that INT-bK grid, so the top level is as good as plain INT-bK. (A
base fitted for its own level alone clips more and leaves the top level 2-5% worse than plain
INT8, measured.) Residual scales are fitted greedily, level by level. With `block`, columns are
quantized in blocks of that width and the not-yet-quantized columns compensate each block's
error (GPTQ-style, block-level only). One compensation serves every level, since the levels
share their planes; it is the top level's error that is compensated: compensating a lower
level's larger error moves the weights the finer planes then reproduce, and measured, it
costs the higher levels more than it gains (the base codes are the top codes' leading bits,
so calibration mostly helps the levels above the base).

Storage. Scales and zero points are float16. A plane holds one bit per weight in ceil(N/8)
bytes, N = out*in, in a "lane" layout: bit j of byte q is weight j*ceil(N/8) + q, so
unpacking is shifts and masks of whole 64-bit words, with no per-weight shuffling. The base
plane is its b1 bit-planes. Dequantization (Dequantizer) is a fused numba kernel that writes
each float32 output once (as D2MoE's GPU kernel): in eager torch, one float32 pass per plane
cost 1-2.5x the time of multiplying the dequantized expert by 16 tokens on a 2-core CPU; fused,
it is under that time at every level (executor/benchmark_formats.py). An expert serialises
into exactly MwqFormat.part_bytes: part 0 = for each matrix the base bits (ceil(N*b1/8)
bytes), scales and zero points; part j = for each matrix residual plane j and its scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from devices.units import ConfigError
from executor.weights import check_weights, matrix_names
from workloads.formats import SCALE_BYTES, ExpertFormat, MwqFormat


# -- checks -------------------------------------------------------------------------------
def check_config(shape: Sequence[int], b1: int, bK: int, group: int) -> None:
    """Raise ConfigError naming what is wrong with quantizing a matrix of `shape`."""
    if len(shape) != 2:
        raise ConfigError(f"mwq: expected a 2-d weight matrix [out, in], got shape {tuple(shape)}")
    out, inp = shape
    if not 1 <= b1 <= 8:
        raise ConfigError(f"mwq: base bits b1 must be in 1..8, got b1={b1}")
    if b1 > bK:
        raise ConfigError(f"mwq: base bits b1={b1} > top bits bK={bK}; need b1 <= bK")
    if bK > 16:
        raise ConfigError(f"mwq: top bits bK must be <= 16, got bK={bK}")
    if group < 1 or inp % group:
        raise ConfigError(f"mwq: group size {group} does not divide the input dimension {inp} of a "
                          f"{out}x{inp} matrix")


def _to_fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ConfigError(f"mwq: {what} overflow float16 (weights too large or not finite)")
    return h


# -- quantized matrix, unpacked --------------------------------------------------------------
@dataclass
class MwqQuant:
    """One matrix after MWQ, one byte per base code and per sign bit."""
    codes: torch.Tensor       # uint8 [out, in], base codes 0 .. 2^b1-1
    signs: torch.Tensor       # uint8 [m, out, in], residual plane k: 1 = +1, 0 = -1
    scale: torch.Tensor       # float16 [out, in/group]
    zero: torch.Tensor        # float16 [out, in/group]
    res_scale: torch.Tensor   # float16 [m, out, in/group]
    b1: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bK(self) -> int:
        return self.b1 + self.signs.shape[0]

    @property
    def levels(self) -> int:
        return self.signs.shape[0] + 1


def _level(level: int | None, levels: int) -> int:
    if level is None:
        return levels - 1
    if not 0 <= level < levels:
        raise ConfigError(f"mwq: level {level} out of range 0..{levels - 1}")
    return level


def _group_terms(scale, zero, res_scale, level: int):
    """float32 per-group terms of W(level) = s*Q + c + sum_k d_k b_k (b_k in {0, 1}, d_k = 2 s_k),
    c = -z*s - sum_k s_k, as contiguous arrays for executor.mwq_kernel: s [G], c [G], d [level, G]."""
    s = scale.float().reshape(-1)
    c = -(zero.float().reshape(-1) * s)
    sk = res_scale[:level].float().reshape(level, s.shape[0])
    for k in range(level):
        c = c - sk[k]
    return s.numpy(), c.numpy(), (2 * sk).numpy()


def dequantize(q: MwqQuant, level: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Level `level` (0 = INT b1, default the top) of an unpacked quantized matrix (packs it: one
    dequantization code path)."""
    level = _level(level, q.levels)
    out = dequantize_packed(pack(q), level)
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_int(w: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
    """Plain per-group asymmetric INT quantization (min/max with 0 in range, integer zero point),
    dequantized: the reference MWQ is compared against."""
    check_config(tuple(w.shape), min(bits, 8), bits, group)
    wg = w.float().reshape(-1, group)
    lo, hi = wg.amin(1, keepdim=True).clamp(max=0), wg.amax(1, keepdim=True).clamp(min=0)
    qmax = 2 ** bits - 1
    s = (hi - lo) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(wg / s) + z, 0, qmax)
    return ((q - z) * s).reshape(w.shape)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - What||_F / ||W||_F."""
    w = w.double()
    return float((w - w_hat.double()).norm() / w.norm())


# -- least squares per group ------------------------------------------------------------------
def _group_lstsq(target: torch.Tensor, bases: Sequence[torch.Tensor], group: int, h: torch.Tensor | None,
                 rows: int = 64) -> torch.Tensor:
    """Coefficients c [nb, out, G] minimising sum_r e_r H e_r^T (H = I if h is None) with
    e = target - sum_a c_a[group of column] * bases[a]. Without H the groups are independent
    (nb x nb systems); with H the groups of a row are coupled (nb*G x nb*G systems, computed
    `rows` rows at a time). Float64; a tiny ridge keeps degenerate groups solvable."""
    o, n = target.shape
    G, nb = n // group, len(bases)
    B = torch.stack([b.double() for b in bases]).view(nb, o, G, group)
    t = target.double()
    if h is None:
        M = torch.einsum("aogc,bogc->ogab", B, B)
        v = torch.einsum("aogc,ogc->oga", B, t.view(o, G, group))
        sol = _ridge_solve(M, v)                         # [o, G, nb]
        return sol.permute(2, 0, 1)
    hb = h.double().view(G, group, n)
    out = torch.empty(nb, o, G, dtype=torch.float64)
    for r0 in range(0, o, rows):
        Br = B[:, r0:r0 + rows]
        R = Br.shape[1]
        T = torch.einsum("aogc,gcm->aogm", Br, hb).view(nb, R, G, G, group)   # row blocks of B H
        M = torch.einsum("aoghc,bohc->oagbh", T, Br).reshape(R, nb * G, nb * G)
        v = torch.einsum("aogc,ogc->oag", Br, (t[r0:r0 + rows] @ h.double()).view(R, G, group))
        out[:, r0:r0 + rows] = _ridge_solve(M, v.reshape(R, nb * G)).view(R, nb, G).permute(1, 0, 2)
    return out


def _ridge_solve(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = M.shape[-1]
    eye = torch.eye(k, dtype=M.dtype)
    diag = M.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    return torch.linalg.solve(M + 1e-10 * (diag + 1e-300) * eye, v.unsqueeze(-1)).squeeze(-1)


def _loss(e: torch.Tensor, group: int, h: torch.Tensor | None) -> torch.Tensor:
    """Loss per fitting unit, broadcastable to [out, G]: per group without H, per row with H."""
    if h is None:
        return e.double().view(e.shape[0], -1, group).pow(2).sum(-1)
    ed = e.double()
    return ((ed @ h.double()) * ed).sum(1, keepdim=True)


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    """[out, G] per-group values -> [out, in]."""
    return x.repeat_interleave(group, dim=1)


def _round_codes(w, step, zero, qmax, group):
    return torch.clamp(torch.round(w / _expand(step, group) + _expand(zero, group)), 0, qmax)


def _fit_grid(w: torch.Tensor, bits: int, group: int, h: torch.Tensor | None, iters: int):
    """Per-group step and zero point of the plain asymmetric `bits`-bit grid that fits w:
    min/max start, then `iters` rounds of (round codes, least-squares step and offset),
    keeping a group's (a row's, with H) new fit only where it lowers the loss."""
    o, n = w.shape
    qmax = 2 ** bits - 1
    wg = w.view(o, -1, group)
    # the grid includes 0 (as GPTQ's), so zero points stay in 0..qmax, where float16 is precise
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    step = (hi - lo) / qmax
    step = torch.where(step > 0, step, torch.ones_like(step))   # constant group: any step is exact
    zero = -lo / step
    codes = _round_codes(w, step, zero, qmax, group)
    loss = _loss(w - (codes - _expand(zero, group)) * _expand(step, group), group, h)
    for _ in range(iters):
        a, b = _group_lstsq(w, [codes, torch.ones_like(w)], group, h).float()
        ok = torch.isfinite(a) & torch.isfinite(b) & (a > 0)
        ok &= (-b / a >= 0) & (-b / a <= qmax)
        step2 = torch.where(ok, a, step)
        zero2 = torch.where(ok, -b / step2, zero)
        codes2 = _round_codes(w, step2, zero2, qmax, group)
        loss2 = _loss(w - (codes2 - _expand(zero2, group)) * _expand(step2, group), group, h)
        better = (loss2 < loss).expand(o, step.shape[1])
        step, zero = torch.where(better, step2, step), torch.where(better, zero2, zero)
        codes = torch.where(_expand(better, group), codes2, codes)
        loss = torch.minimum(loss, loss2)
    return step, zero


def _quantize_block(w: torch.Tensor, b1: int, bK: int, group: int, h: torch.Tensor | None, iters: int,
                    base_fit: str = "topgrid"):
    """MWQ of w (float32) -> (MwqQuant, reconstruction of every level)."""
    m = bK - b1
    if base_fit == "own":       # the paper: the INT-b1 grid that fits w best on its own
        step, zero = _fit_grid(w, b1, group, h, iters)
        scale = _to_fp16(step, "scales").clamp_min(2.0 ** -24)
        zero1 = _to_fp16(zero, "zero points")
    else:
        step, zero = _fit_grid(w, bK, group, h, iters)
        # the base grid is every 2^m-th point of the INT-bK grid, centred so that m ideal residual
        # planes (+-s/4, +-s/8, ...) reach the points in between
        scale = _to_fp16(step * 2 ** m, "scales").clamp_min(2.0 ** -24)   # >= the smallest float16 > 0
        zero1 = _to_fp16((zero - (2 ** m - 1) / 2) / 2 ** m, "zero points")
    s, z = _expand(scale.float(), group), _expand(zero1.float(), group)
    codes = torch.clamp(torch.round(w / s + z), 0, 2 ** b1 - 1)
    recon = [(codes - z) * s]
    signs, res_scales = [], []
    for _ in range(m):
        r = w - recon[-1]
        sign = torch.where(r >= 0, 1.0, -1.0)
        if h is None:   # least squares of r ~ s_k * sign, per group: the mean |r|
            sk = r.abs().view(r.shape[0], -1, group).mean(-1)
        else:
            sk = _group_lstsq(r, [sign], group, h)[0].float()
            sk = torch.where(torch.isfinite(sk), sk, r.abs().view(r.shape[0], -1, group).mean(-1))
        sk = _to_fp16(sk, "residual scales")
        recon.append(recon[-1] + _expand(sk.float(), group) * sign)
        signs.append((sign > 0).to(torch.uint8))
        res_scales.append(sk)
    o, n = w.shape
    q = MwqQuant(codes=codes.to(torch.uint8),
                 signs=torch.stack(signs) if signs else torch.empty(0, o, n, dtype=torch.uint8),
                 scale=scale, zero=zero1,
                 res_scale=torch.stack(res_scales) if res_scales else torch.empty(0, o, n // group,
                                                                                   dtype=torch.float16),
                 b1=b1, group=group)
    return q, recon


def _hessian(x: torch.Tensor, n: int, damp: float) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != n:
        raise ConfigError(f"mwq: calibration activations must be [tokens, {n}], got {tuple(x.shape)}")
    xd = x.double()
    h = 2 * xd.T @ xd
    lam = damp * float(h.diagonal().mean()) or damp
    return h + lam * torch.eye(n, dtype=torch.float64)


def _concat(parts: Sequence[MwqQuant]) -> MwqQuant:
    p0 = parts[0]
    return MwqQuant(codes=torch.cat([p.codes for p in parts], 1), signs=torch.cat([p.signs for p in parts], 2),
                    scale=torch.cat([p.scale for p in parts], 1), zero=torch.cat([p.zero for p in parts], 1),
                    res_scale=torch.cat([p.res_scale for p in parts], 2), b1=p0.b1, group=p0.group)


BASE_FITS = ("topgrid", "own")
# Chosen from `moelab eval` on tiny-moe (128 held-out windows, group 32): on V1 topgrid is better
# at every level, the base included (perplexity INT2 3.686 vs 3.715, INT3 3.570 vs 3.584, INT4
# 3.554 vs 3.564; bf16 3.552), so the top level stays plain INT-bK's (INT4 3.555); on V2 the two
# are within 0.03% at every level. "own" lowers the base's weight error only on heavy-tailed
# weights (Student-t3: INT2 relative error 0.50 vs 0.64), at its top level's cost (0.24 vs 0.16).
DEFAULT_BASE_FIT = "topgrid"


def quantize(w: torch.Tensor, b1: int, bK: int, group: int = 128, x: torch.Tensor | None = None,
             block: int | None = None, damp: float = 0.01, iters: int = 3, base_fit: str = DEFAULT_BASE_FIT) -> MwqQuant:
    """MWQ of a weight matrix w [out, in] with levels INT b1 .. INT bK.

    x: calibration activations [tokens, in]; scales then minimise ||(W - What) x^T||^2.
    block: with x, columns are quantized in blocks of this width (a multiple of group; default
    group) with GPTQ-style compensation of each block's error by the columns after it; 0 turns
    the compensation off (weighted least squares only: each level's scale is then the best for
    that level alone, which can leave the top level's loss above the unweighted fit's).
    damp: H = 2 x^T x + damp * mean(diag) * I. iters: least-squares refits of the grid.
    base_fit: "topgrid" (default) puts the base on every 2^(bK-b1)-th point of the fitted INT-bK
    grid, so that the top level is plain INT-bK; "own" (the paper's) fits the INT-b1 base grid for
    itself, then the residual planes on top. The stored format is the same for both.
    """
    check_config(tuple(w.shape), b1, bK, group)
    if base_fit not in BASE_FITS:
        raise ConfigError(f"mwq: base_fit {base_fit!r} unknown; allowed: {', '.join(BASE_FITS)}")
    wf = w.detach().float().cpu()
    if not torch.isfinite(wf).all():
        raise ConfigError("mwq: weights contain NaN or infinity")
    n = wf.shape[1]
    h = None if x is None else _hessian(x.detach().cpu(), n, damp)
    if h is None and block:
        raise ConfigError("mwq: block (GPTQ-style compensation) needs calibration activations x")
    if h is None or block == 0:
        return _quantize_block(wf, b1, bK, group, h, iters, base_fit)[0]
    block = group if block is None else block
    if block < group or block % group:
        raise ConfigError(f"mwq: block width {block} must be a positive multiple of the group size {group}")
    # rows of the upper Cholesky factor U of H^-1 give the compensation (GPTQ): fixing block B's
    # error E moves the later columns by -E U_BB^-1 U_B,rest
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    wd = wf.double().clone()
    parts = []
    for c0 in range(0, n, block):
        c1 = min(c0 + block, n)
        Ubb = U[c0:c1, c0:c1]
        ubb_inv = torch.linalg.solve_triangular(Ubb, torch.eye(c1 - c0, dtype=torch.float64), upper=True)
        h_eff = ubb_inv @ ubb_inv.T        # the block's loss with the later columns free to compensate
        q, recon = _quantize_block(wd[:, c0:c1].float(), b1, bK, group, h_eff, iters, base_fit)
        parts.append(q)
        if c1 < n:
            err = wd[:, c0:c1] - recon[-1].double()          # the top level's error (see module doc)
            wd[:, c1:] -= err @ (ubb_inv @ U[c0:c1, c1:])
    return _concat(parts)


# -- bit planes ---------------------------------------------------------------------------------
def _plane_bytes(n: int) -> int:
    return (n + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[P, N] 0/1 uint8 -> [P, ceil(N/8)] uint8 planes in the lane layout (bit j of byte q is
    weight j*L + q, L = ceil(N/8))."""
    P, N = bits.shape
    L = _plane_bytes(N)
    lanes = torch.zeros(P, 8 * L, dtype=torch.uint8)
    lanes[:, :N] = bits
    lanes = lanes.view(P, 8, L)
    out = torch.zeros(P, L, dtype=torch.uint8)
    for j in range(8):
        out |= lanes[:, j] << j
    return out


def unpack_bits(planes: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bits: [P, L] planes -> [P, n] 0/1 uint8 (reference path, numpy)."""
    a = np.unpackbits(planes.numpy(), axis=1, bitorder="little")       # [P, 8L], index 8q + j
    P, L = planes.shape
    return torch.from_numpy(np.ascontiguousarray(a.reshape(P, L, 8).transpose(0, 2, 1).reshape(P, 8 * L)[:, :n]))


@dataclass
class MwqPacked:
    """One matrix as stored: bit planes (b1 base planes, then the residual planes present)."""
    shape: tuple[int, int]
    group: int
    b1: int
    planes: torch.Tensor      # uint8 [b1 + m, ceil(N/8)], lane layout
    scale: torch.Tensor       # float16 [out, G]
    zero: torch.Tensor        # float16 [out, G]
    res_scale: torch.Tensor   # float16 [m, out, G]
    _terms: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def levels(self) -> int:
        return self.planes.shape[0] - self.b1 + 1

    @property
    def bK(self) -> int:
        return self.planes.shape[0]

    def terms(self, level: int):
        if level not in self._terms:
            self._terms[level] = _group_terms(self.scale, self.zero, self.res_scale, level)
        return self._terms[level]


def pack(q: MwqQuant) -> MwqPacked:
    """Unpacked -> bit planes."""
    n = q.codes.numel()
    base = torch.stack([(q.codes.reshape(-1) >> p) & 1 for p in range(q.b1)])
    bits = torch.cat([base, q.signs.reshape(-1, n)])
    return MwqPacked(tuple(q.shape), q.group, q.b1, pack_bits(bits), q.scale, q.zero, q.res_scale)


def unpack(p: MwqPacked) -> MwqQuant:
    """Bit planes -> unpacked (exact inverse of pack)."""
    o, i = p.shape
    bits = unpack_bits(p.planes, o * i)
    codes = torch.zeros(o * i, dtype=torch.uint8)
    for b in range(p.b1):
        codes |= bits[b] << b
    return MwqQuant(codes.view(o, i), bits[p.b1:].reshape(-1, o, i).clone(), p.scale, p.zero, p.res_scale,
                    p.b1, p.group)


class Dequantizer:
    """Fast dequantization of packed matrices of one shape into a float32 buffer that lives
    between calls (executor/mwq_kernel.py, parallel over the CPUs numba uses). The first call in a
    process compiles the kernel (a few seconds) unless numba's on-disk cache has it."""

    def __init__(self, shape: tuple[int, int], group: int, bK: int):
        """For [out, in] matrices of group size `group` with up to bK planes (b1 + residuals)."""
        o, i = shape
        self.shape, self.group, self.bK, self.n = (o, i), group, bK, o * i
        self.L = _plane_bytes(self.n)
        # the kernel reads 64-bit words: planes whose rows are not whole words are copied here
        self.padded = None if self.L % 8 == 0 else np.zeros((bK, -(-self.L // 8) * 8), np.uint8)
        self.out = torch.empty(self.n)

    def __call__(self, p: MwqPacked, level: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Level `level` (default: the top one present) as float32 [out, in]; `out` (contiguous
        float32, flat or shaped) defaults to the Dequantizer's own buffer, overwritten next call."""
        if tuple(p.shape) != self.shape or p.group != self.group or p.planes.shape[0] > self.bK:
            raise ConfigError(f"mwq: Dequantizer for {self.shape} (group {self.group}) got a {p.shape} matrix "
                              f"(group {p.group}, {p.planes.shape[0]} planes)")
        level = _level(level, p.levels)
        P = p.b1 + level
        out = self.out if out is None else out.view(-1)
        planes = p.planes[:P].contiguous().numpy()
        if self.padded is not None:
            self.padded[:P, :self.L] = planes
            planes = self.padded[:P]
        s, c, d = p.terms(level)
        from executor.mwq_kernel import dequantize_planes   # numba: imported on first use (~55 MB)
        dequantize_planes(planes, self.L, p.b1, self.group, s, c, d, out.numpy())
        return out.view(self.shape)


def dequantize_packed(p: MwqPacked, level: int | None = None) -> torch.Tensor:
    """Level `level` of a packed matrix, float32 [out, in] (a new tensor)."""
    return Dequantizer(p.shape, p.group, p.planes.shape[0])(p, level)   # its buffer: new, not shared


# -- one expert on storage ------------------------------------------------------------------------
def _valid_lanes(n: int) -> np.ndarray:
    """Mask over a plane's 8L bits, in byte order (index 8q + j), of those that hold a weight."""
    L = _plane_bytes(n)
    q, j = np.divmod(np.arange(8 * L), 8)
    return j * L + q < n


def _base_bytes(planes: torch.Tensor, n: int) -> bytes:
    """The b1 base planes as one ceil(n*b1/8)-byte stream: the planes back to back; when n is
    not a multiple of 8 the pad bits of each plane are dropped first."""
    a = planes.numpy()
    if n % 8 == 0:
        return a.tobytes()
    bits = np.unpackbits(a, axis=1, bitorder="little")[:, _valid_lanes(n)]
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _base_planes(buf: np.ndarray, b1: int, n: int) -> np.ndarray:
    L = _plane_bytes(n)
    if n % 8 == 0:
        return buf.reshape(b1, L)
    bits = np.unpackbits(buf, bitorder="little")[: b1 * n].reshape(b1, n)
    full = np.zeros((b1, 8 * L), np.uint8)
    full[:, _valid_lanes(n)] = bits
    return np.packbits(full, axis=1, bitorder="little")


def _f16_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().astype("<f2", copy=False).tobytes()


def serialize_expert(mats: Sequence[MwqPacked]) -> list[bytes]:
    """An expert's packed matrices -> [base part, residual part 1, ...], sizes = MwqFormat.part_bytes."""
    b1, P = mats[0].b1, mats[0].planes.shape[0]
    for p in mats:
        if p.b1 != b1 or p.planes.shape[0] != P:
            raise ConfigError("mwq: an expert's matrices must share b1 and the number of planes")
    parts = [b"".join(_base_bytes(p.planes[:b1], p.shape[0] * p.shape[1]) + _f16_bytes(p.scale) + _f16_bytes(p.zero)
                      for p in mats)]
    for k in range(P - b1):
        parts.append(b"".join(p.planes[b1 + k].numpy().tobytes() + _f16_bytes(p.res_scale[k]) for p in mats))
    return parts


class _Reader:
    def __init__(self, buf):
        self.buf, self.at = np.frombuffer(buf, np.uint8), 0

    def take(self, n: int) -> np.ndarray:
        out = self.buf[self.at:self.at + n]
        self.at += n
        return out

    def f16(self, shape) -> torch.Tensor:
        n = int(np.prod(shape))
        return torch.from_numpy(self.take(SCALE_BYTES * n).view("<f2").astype(np.float16)).view(*shape)


def parse_expert(parts: Sequence[Any], fmt: MwqFormat) -> list[MwqPacked]:
    """Parts 0..k of an expert (any prefix) -> its packed matrices with levels 0..k."""
    if not 1 <= len(parts) <= fmt.n_parts:
        raise ConfigError(f"mwq: an expert has 1..{fmt.n_parts} parts, got {len(parts)}")
    for j, part in enumerate(parts):
        size = memoryview(part).nbytes
        if size != fmt.part_bytes[j]:
            raise ConfigError(f"mwq: part {j} is {size} bytes, the format says {fmt.part_bytes[j]} "
                              f"(shapes {list(fmt.shapes)}, b1={fmt.b1}, bK={fmt.bK}, group={fmt.group})")
    readers = [_Reader(part) for part in parts]
    m, out = len(parts) - 1, []
    for o, i in fmt.shapes:
        n, G = o * i, i // fmt.group
        planes = np.empty((fmt.b1 + m, _plane_bytes(n)), np.uint8)
        planes[:fmt.b1] = _base_planes(readers[0].take(math.ceil(n * fmt.b1 / 8)), fmt.b1, n)
        scale, zero = readers[0].f16((o, G)), readers[0].f16((o, G))
        res = []
        for k in range(m):
            planes[fmt.b1 + k] = readers[k + 1].take(_plane_bytes(n))
            res.append(readers[k + 1].f16((o, G)))
        res_scale = torch.stack(res) if res else torch.empty(0, o, G, dtype=torch.float16)
        out.append(MwqPacked((o, i), fmt.group, fmt.b1, torch.from_numpy(planes), scale, zero, res_scale))
    return out


# -- store encoder ----------------------------------------------------------------------------------
class MwqEncoder:
    """executor/encoders.py's Encoder for the mwq format (no calibration data; dequantized to `dtype`)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    def encode(self, weights, fmt: ExpertFormat) -> list[bytes]:
        mats = [pack(quantize(w, fmt.b1, fmt.bK, fmt.group)) for w in check_weights(weights, fmt)]
        return serialize_expert(mats)

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        mats = parse_expert(parts[:len(fmt.parts_of(level))], fmt)
        return {name: dequantize_packed(p, level).to(self.dtype) for name, p in zip(matrix_names(fmt), mats)}


class CopiesEncoder:
    """The Encoder of the copies format (D²MoE's Matryoshka-Free baseline): part i is a
    standalone INT(b1+i) quantization, stored as an MWQ base plane of that width."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    @staticmethod
    def _width(fmt, level: int) -> MwqFormat:
        b = fmt.b1 + level
        return MwqFormat(fmt.shapes, b1=b, bK=b, group=fmt.group)

    def encode(self, weights, fmt: ExpertFormat) -> list[bytes]:
        mats = check_weights(weights, fmt)
        return [serialize_expert([pack(quantize(w, b, b, fmt.group)) for w in mats])[0]
                for b in range(fmt.b1, fmt.bK + 1)]

    def decode(self, parts: Sequence[Any], fmt: ExpertFormat, level: int) -> dict[str, torch.Tensor]:
        """`parts`: the one part of `level` (its own copy)."""
        mats = parse_expert(parts[:1], self._width(fmt, level))
        return {name: dequantize_packed(p, 0).to(self.dtype) for name, p in zip(matrix_names(fmt), mats)}
