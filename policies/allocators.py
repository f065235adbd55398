"""Bit allocators: which precision level each token gets for each selected expert."""
from __future__ import annotations

from policies.base import Allocator, Demand, PolicyContext, Routing


class FixedLevel(Allocator):
    """Every token at one level (default: the highest the format offers)."""
    name = "fixed"

    def __init__(self, ctx: PolicyContext, level: int | None = None):
        self.level = ctx.fmt.levels - 1 if level is None else level
        ctx.fmt.parts_for_level(self.level)  # validates the level

    def allocate(self, layer: int, routing: Routing) -> Demand:
        lvl = self.level
        rows = routing.experts.tolist()
        return Demand(layer, tuple([tuple([(e, lvl) for e in row]) for row in rows]),
                      _max=dict.fromkeys([e for row in rows for e in row], lvl))
