"""Bit allocators: which precision level each token gets for each selected expert."""
from __future__ import annotations

from policies.base import Allocator, BudgetError, Demand, PolicyContext, Routing


class FixedLevel(Allocator):
    """Every token at one level (default: the highest the format offers)."""
    name = "fixed"

    def __init__(self, ctx: PolicyContext, level: int | None = None):
        super().__init__(ctx)
        self.level = ctx.fmt.levels - 1 if level is None else int(level)
        ctx.fmt.check_level(self.level)

    def levels_used(self):
        return (self.level,)

    def allocate(self, layer: int, routing: Routing) -> Demand:
        lvl = self.level
        rows = routing.experts.tolist()
        return Demand(layer, tuple([tuple([(e, lvl) for e in row]) for row in rows]),
                      _max=dict.fromkeys([e for row in rows for e in row], lvl))


class TraceLevels(Allocator):
    """Each (token, slot) at the level the routing carries: a bit-width router's choice in the
    executor, or the levels `trace record` wrote into a trace. Replaying a recorded trace with
    it makes the simulator follow the executor's bit choices exactly."""
    name = "trace-levels"

    def allocate(self, layer: int, routing: Routing) -> Demand:
        if routing.levels is None:
            raise BudgetError("the trace-levels allocator needs a level per (token, layer, slot): give a trace "
                              "that has them (`moelab trace record` with a bit-width router), or use --allocator fixed")
        top = self.fmt.levels
        levels = routing.levels.tolist()
        per_token = []
        for row, lvls in zip(routing.experts.tolist(), levels):
            for lvl in lvls:
                if not 0 <= lvl < top:
                    self.fmt.check_level(lvl)       # raises, naming the valid levels
            per_token.append(tuple(zip(row, lvls)))
        return Demand(layer, tuple(per_token))
