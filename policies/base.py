"""The shared policy interface (DESIGN.md): plain objects making deterministic decisions.

The vocabulary every policy speaks: keys and load items (one part of one expert), the
router's output, the per-token demand, and the context a policy is built with. The
order in which the policies are asked lives in one place, `policies/bundle.py`
(`Policies.decide` and `Policies.finish`); engines only carry its `Decision`s out.

Decisions depend only on these inputs and the policy's own state, so two engines fed
the same trace make identical decisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from devices.units import MoelabError
from workloads.formats import ExpertFormat

if TYPE_CHECKING:
    from policies.cost import CostModel


class Key(NamedTuple):
    """One part of one expert: the unit of storage, loading and residency."""
    layer: int
    expert: int
    part: int


_new_key = partial(tuple.__new__, Key)   # Key from a 3-tuple, without NamedTuple's slower __new__


class LoadItem(NamedTuple):
    key: Key
    nbytes: int              # bytes read from storage
    resident_bytes: int      # bytes held once ready (what the budget counts)
    decompress_bytes: int    # raw bytes a decompression task produces after the read (0: none)


_new_item = partial(tuple.__new__, LoadItem)


class Routing(NamedTuple):
    """Router output of one layer for the tokens of one step: [tokens, k] ids and scores, and
    a precision level per (token, slot) when a bit-width router chose one (or a trace has it).
    `predicted`: (ids int32 [tokens, P], probabilities [tokens, P]) of the experts the next
    layer's router picks from this layer's hidden state (gate lookahead), best first, -1 padded."""
    experts: np.ndarray
    scores: np.ndarray
    levels: np.ndarray | None = None
    predicted: tuple | None = None


@dataclass(slots=True)
class Demand:
    """What each token of the step needs at this layer: a tuple of (expert, level) per token.
    Treat it as immutable (a decision point routed like an earlier one may get the same Demand
    back, policies/bundle.py); `_keys` memoises needed_keys (engines and schedulers both ask),
    `_counts` counts(), and an allocator that knows max_level() cheaply may pass it as `_max`."""
    layer: int
    per_token: tuple[tuple[tuple[int, int], ...], ...]
    _keys: tuple | None = field(default=None, repr=False, compare=False)
    _max: dict | None = field(default=None, repr=False, compare=False)
    _counts: dict | None = field(default=None, repr=False, compare=False)

    def counts(self) -> dict[tuple[int, int], int]:
        """Tokens needing each (expert, level), in order of first appearance (do not change it)."""
        out = self._counts
        if out is None:
            out = {}
            for token in self.per_token:
                for pair in token:
                    out[pair] = out.get(pair, 0) + 1
            self._counts = out
        return out

    def rows(self) -> dict[tuple[int, int], list[int]]:
        """Token rows needing each (expert, level), in order of first appearance."""
        out: dict[tuple[int, int], list[int]] = {}
        for t, token in enumerate(self.per_token):
            for pair in token:
                out.setdefault(pair, []).append(t)
        return out

    def levels_of(self) -> dict[int, set[int]]:
        """Levels asked of each expert, in order of first appearance."""
        out: dict[int, set[int]] = {}
        for token in self.per_token:
            for expert, level in token:
                out.setdefault(expert, set()).add(level)
        return out

    def max_level(self) -> dict[int, int]:
        """Highest level needed of each expert, in order of first appearance."""
        if self._max is not None:
            return self._max
        out: dict[int, int] = {}
        get = out.get
        for token in self.per_token:
            for expert, level in token:
                if level > get(expert, -1):
                    out[expert] = level
        return out


def needed_keys(demand: Demand, fmt: ExpertFormat) -> list[Key]:
    """Every part the layer needs, expert by expert in first-appearance order, parts ascending:
    the union of the parts of the levels its tokens ask for. Computed once per demand
    (engines, caches and schedulers all ask)."""
    cached = demand._keys
    if cached is None or cached[0] is not fmt:
        parts, layer = fmt.level_parts, demand.layer
        if fmt.nested:       # the highest level's parts include every lower level's
            keys = [_new_key((layer, e, p)) for e, lvl in demand.max_level().items() for p in parts[lvl]]
        else:
            keys = [_new_key((layer, e, p)) for e, lvls in demand.levels_of().items()
                    for p in sorted({p for lvl in lvls for p in parts[lvl]})]
        cached = demand._keys = (fmt, keys)
    return cached[1]


def layer_demand_bytes(keys: Sequence[Key], fmt: ExpertFormat) -> int:
    """Resident bytes of one decision point's needed keys: what the budget must hold at once."""
    sizes = fmt.resident_bytes
    return sum(sizes[k.part] for k in keys)


def largest_layer_demand(future: Sequence[Sequence[Key]], fmt: ExpertFormat) -> int:
    """The largest single decision point's demand in bytes over an access sequence: the
    smallest budget that can run it (the builder's check and static-hot's reserve)."""
    return max((layer_demand_bytes(keys, fmt) for keys in future), default=0)


def load_item(key: Key, fmt: ExpertFormat) -> LoadItem:
    p = key.part
    return _new_item((key, fmt.part_bytes[p], fmt.resident_bytes[p], fmt.decompress_bytes[p]))


class BudgetError(MoelabError):
    """The budget cannot hold what one layer needs."""


class NeedsFuture(BudgetError):
    """An offline policy (a bound: belady, the oracle prefetcher) built without the access
    sequence of the whole run. The message names the policy."""


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know when it is built (offline policies also get the access sequence)."""
    fmt: ExpertFormat
    layers: int
    experts: int
    capacity_bytes: int
    future: Sequence[Sequence[Key]] | None = None   # the whole access sequence, by decision point (Belady)
    popularity: np.ndarray | None = None            # [layers, experts] access counts from the trace
    cost: CostModel | None = None                   # seconds of reads, decompression, computes (policies/cost.py)

    def need_cost(self, who: str) -> CostModel:
        """The cost model, or a clear error for a policy that plans with it."""
        if self.cost is None:
            raise BudgetError(f"{who} plans with the device's costs: give a device profile (the simulator has "
                              f"one; for the executor use --throttle DEVICE or --cost-profile DEVICE)")
        return self.cost


class Allocator:
    """Chooses a precision level for each (token, expert).

    `self.cache` is the run's cache policy (set when the bundle is built): an allocator may
    read its residency and budget (HOBBIT-style "use the precision already resident"). One
    that does sets `reads_cache = True`, since its demand then depends on the cache's past
    and cannot be precomputed for offline policies (belady, the oracle prefetcher)."""
    name = "allocator"
    offline = False          # True: reads the run's own routing in advance (a bound, never deployable)
    reads_cache = False
    cache = None

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.fmt = ctx.fmt

    def allocate(self, layer: int, routing: Routing) -> Demand:
        raise NotImplementedError

    def levels_used(self) -> Sequence[int]:
        """The levels this allocator may ask for (the online minimum budget holds them)."""
        return range(self.fmt.levels)

    def report(self) -> dict:
        """Counters worth reporting at the end of a run (e.g. how often it substituted a level)."""
        return {}


class Scheduler:
    """Orders the loads of one layer; may also order its decompression tasks and computes
    (ZipMoE interleaves them). Engines keep their default where a hook returns None: tasks
    in load order, computes in order of readiness."""
    name = "scheduler"
    offline = False

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.fmt = ctx.fmt

    def order(self, layer: int, demand: Demand, resident: set[Key]) -> list[LoadItem]:
        raise NotImplementedError

    def decompress_order(self, layer: int, loads: Sequence[LoadItem]) -> list[Key] | None:
        """Keys of the loads carrying a decompression task, in the order workers take them."""
        return None

    def compute_order(self, layer: int, demand: Demand, loads: Sequence[LoadItem]) -> list[tuple[int, int]] | None:
        """Every (expert, level) of the demand, in the order the compute queue runs them."""
        return None
