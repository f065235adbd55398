"""An expert's weight matrices: their names and the check every encoder runs first.

Below executor/encoders.py and the formats (mwq, zipcodec): each of them imports this, and
this imports neither, so there is no import circle.
"""
from __future__ import annotations

from typing import Mapping

import torch

from devices.units import ConfigError
from workloads.formats import ExpertFormat

Weights = Mapping[str, torch.Tensor]


def matrix_names(fmt: ExpertFormat) -> tuple[str, ...]:
    """Names of an expert's weight matrices, in the order of fmt.shapes."""
    if len(fmt.shapes) == 3:
        return ("w1", "w3", "w2")
    if len(fmt.shapes) == 2:
        return ("w1", "w2")
    raise ConfigError(f"format {fmt.name}: experts have 2 or 3 matrices, got {len(fmt.shapes)} shapes")


def check_weights(weights: Weights, fmt: ExpertFormat) -> list[torch.Tensor]:
    """The expert's matrices in fmt.shapes order, after checking names and shapes."""
    names = matrix_names(fmt)
    if set(weights) != set(names):
        raise ConfigError(f"expert weights must be {', '.join(names)}; got {', '.join(sorted(weights))}")
    out = []
    for name, shape in zip(names, fmt.shapes):
        t = weights[name]
        if tuple(t.shape) != tuple(shape):
            raise ConfigError(f"expert weight {name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        out.append(t)
    return out
