"""Prefetchers: loads for the next decision point, issued while this one computes.

Without one, a layer's loads can start only once its router has run, so each layer pays
dense + loads + its last expert's compute in a chain. A prefetcher breaks the chain: at
each decision point, after the plan is admitted, the engine asks it for the keys the
*next* decision point (the next layer, or layer 0 of the next step) will likely need,
and loads the ones not resident behind this layer's plan on the same storage queue.
The cache admits them without evicting anything pinned (CachePolicy.prefetch), so a
prefetch never delays or starves the demand it runs ahead of.

A prefetched key that is used counts as a hit at its decision point; one that is not is
wasted bandwidth (the timeline's "prefetch" records show both).
"""
from __future__ import annotations

from policies.base import Demand, Key, NeedsFuture, PolicyContext, Routing, needed_keys


class Prefetcher:
    """Proposes keys for the next decision point, in priority order."""
    name = "prefetcher"
    offline = False          # True: reads the run's own future (a bound)

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.fmt = ctx.fmt

    def after_layer(self, layer: int, demand: Demand, routing: Routing | None = None) -> list[Key]:
        """Called once per decision point, after its plan was admitted and issued; `routing` is
        the decision point's router output (a lookahead prefetcher reads routing.predicted)."""
        raise NotImplementedError


class NextLayerOracle(Prefetcher):
    """Exactly what the next decision point needs, read from the access sequence: the
    best any predictor can do (a bound, like belady; the simulator and forced-trace
    executor runs have the sequence)."""
    name = "oracle"
    offline = True

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.future is None:
            raise NeedsFuture("the oracle prefetcher needs the access sequence of the whole run: give a "
                              "trace (`moelab execute --trace`), or use --prefetch last-use")
        self.point = 0

    def after_layer(self, layer, demand, routing=None):
        self.point += 1
        future = self.ctx.future
        return list(future[self.point]) if self.point < len(future) else []


class LastUse(Prefetcher):
    """The next layer will need what it needed last time (consecutive tokens reuse experts:
    about 0.6 of them for Mixtral, workloads/stats.py). Online: uses only what it has seen."""
    name = "last-use"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.last: list[list[Key]] = [[] for _ in range(ctx.layers)]

    def after_layer(self, layer, demand, routing=None):
        self.last[layer] = needed_keys(demand, self.fmt)
        return self.last[(layer + 1) % self.ctx.layers]
