"""Every precision level of every expert, dequantized and held in memory: the weights `moelab eval`
(executor/evaluate.py) and the bit router's training (executor/bit_router.py) compute with.

Quantization is the store's (executor/mwq.py, no calibration data: MwqEncoder), with the store's
group size (workloads/formats.py default_group: 32 for tiny-moe). Stored bits per weight add the
fp16 scales and zero points (the bytes the store reads per weight at that level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from devices.units import ConfigError
from executor.model import MoETransformer
from executor.mwq import DEFAULT_BASE_FIT, dequantize, quantize, quantize_int
from workloads.formats import MWQ_LADDERS, MwqFormat, default_group


@dataclass
class LevelWeights:
    """weights[layer][expert][level] = {"w1", "w3", "w2"} float32; bits[level]; stored bits per weight."""
    name: str
    weights: list
    bits: tuple[float, ...]
    stored_bits: tuple[float, ...]

    @property
    def levels(self) -> int:
        return len(self.bits)


def expert_shapes(model: MoETransformer) -> list[tuple[int, int]]:
    c = model.cfg
    return [(c.d_ff, c.d_model)] * (c.expert_matrices - 1) + [(c.d_model, c.d_ff)]


def store_group(model: MoETransformer) -> int:
    """The group size the mwq stores of this model have (workloads/formats.py default_group)."""
    return default_group(expert_shapes(model))


def _stacked(model: MoETransformer):
    """{(shape): (tensor [n*out, in], [(layer, expert, name)])}: same-shaped expert matrices stacked
    by rows. Without calibration data quantization is per (row, group), so quantizing the stack is
    quantizing each matrix, in one call."""
    out: dict = {}
    for i, layer in enumerate(model.moe_layers):
        for j, ex in enumerate(layer.experts):
            for name, w in ex.weights().items():
                mats, keys = out.setdefault(tuple(w.shape), ([], []))
                mats.append(w.detach().float())
                keys.append((i, j, name))
    return {shape: (torch.cat(mats), keys) for shape, (mats, keys) in out.items()}


def _unstack(model: MoETransformer, per_shape: dict, levels: int) -> list:
    """per_shape[shape] = [level][n*out, in] -> [layer][expert][level] {name: tensor}."""
    W = [[[{} for _ in range(levels)] for _ in layer.experts] for layer in model.moe_layers]
    for shape, (keys, lvls) in per_shape.items():
        for lvl, stack in enumerate(lvls):
            for n, (i, j, name) in enumerate(keys):
                W[i][j][lvl][name] = stack[n * shape[0]:(n + 1) * shape[0]]
    return W


def _int_stored_bits(model: MoETransformer, bits: int, group: int) -> float:
    shapes = expert_shapes(model)
    fmt = MwqFormat(tuple(shapes), b1=bits, bK=bits, group=group)
    return fmt.level_bytes(0) * 8 / sum(o * i for o, i in shapes)


def mwq_levels(model: MoETransformer, ladder: str, base_fit: str = DEFAULT_BASE_FIT,
               group: Optional[int] = None) -> LevelWeights:
    """Every MWQ level of ladder `ladder` ("v1", "v2") of every expert, dequantized."""
    if ladder not in MWQ_LADDERS:
        raise ConfigError(f"eval: unknown mwq ladder {ladder!r}; known: {', '.join(MWQ_LADDERS)}")
    b1, bK = MWQ_LADDERS[ladder]
    group = group or store_group(model)
    per_shape = {}
    with torch.no_grad():
        for shape, (stack, keys) in _stacked(model).items():
            q = quantize(stack, b1, bK, group, base_fit=base_fit)
            per_shape[shape] = (keys, [dequantize(q, k) for k in range(q.levels)])
    shapes = expert_shapes(model)
    fmt = MwqFormat(tuple(shapes), b1=b1, bK=bK, group=group)
    n = sum(o * i for o, i in shapes)
    return LevelWeights(f"MWQ {ladder.upper()} ({base_fit})", _unstack(model, per_shape, bK - b1 + 1),
                        tuple(float(b) for b in range(b1, bK + 1)),
                        tuple(fmt.level_bytes(k) * 8 / n for k in range(fmt.levels)))


def int_levels(model: MoETransformer, bits: int, group: Optional[int] = None) -> LevelWeights:
    """Plain per-group INT-`bits` (min/max) of every expert: one level."""
    group = group or store_group(model)
    with torch.no_grad():
        per_shape = {shape: (keys, [quantize_int(stack, bits, group)]) for shape, (stack, keys) in
                     _stacked(model).items()}
    return LevelWeights(f"INT{bits}", _unstack(model, per_shape, 1), (float(bits),),
                        (_int_stored_bits(model, bits, group),))


def bf16_levels(model: MoETransformer) -> LevelWeights:
    """The shipped (bf16) weights: one level."""
    W = [[[{k: v.detach().float() for k, v in ex.weights().items()}] for ex in layer.experts]
         for layer in model.moe_layers]
    return LevelWeights("bf16", W, (16.0,), (16.0,))
