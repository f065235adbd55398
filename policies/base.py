"""The shared policy interface (DESIGN.md): plain objects making deterministic decisions.

An engine (simulator or executor) calls, for each step and MoE layer:

    demand = allocator.allocate(layer, routing)              # (expert, level) per token
    plan   = scheduler.order(layer, demand, cache.resident(layer))
    hits   = cache.begin_layer(layer, needed_keys(demand))   # record accesses, pin the layer
    for item in plan: evicted = cache.admit(item)            # never exceeds the budget
    ... engine loads the plan in order and computes ...
    cache.end_layer(layer)                                   # unpin; tiering decides what stays

Decisions depend only on these inputs and the policy's own state, so two engines fed
the same trace make identical decisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple, Sequence

import numpy as np

from devices.units import MoelabError
from workloads.formats import ExpertFormat


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
    """Router output of one layer for the tokens of one step: [tokens, k] ids and scores."""
    experts: np.ndarray
    scores: np.ndarray


@dataclass(slots=True)
class Demand:
    """What each token of the step needs at this layer: a tuple of (expert, level) per token.
    Treat it as immutable; `_keys` memoises needed_keys (engines and schedulers both ask), and
    an allocator that knows max_level() cheaply may pass it as `_max`."""
    layer: int
    per_token: tuple[tuple[tuple[int, int], ...], ...]
    _keys: tuple | None = field(default=None, repr=False, compare=False)
    _max: dict | None = field(default=None, repr=False, compare=False)

    def counts(self) -> dict[tuple[int, int], int]:
        """Tokens needing each (expert, level), in order of first appearance."""
        out: dict[tuple[int, int], int] = {}
        for token in self.per_token:
            for pair in token:
                out[pair] = out.get(pair, 0) + 1
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
    """Every part the layer needs, expert by expert in first-appearance order, parts ascending.
    Computed once per demand (engines and schedulers both ask)."""
    cached = demand._keys
    if cached is None or cached[0] is not fmt:
        parts, layer = fmt.level_parts, demand.layer
        keys = [_new_key((layer, e, p)) for e, lvl in demand.max_level().items() for p in range(parts[lvl])]
        cached = demand._keys = (fmt, keys)
    return cached[1]


def load_item(key: Key, fmt: ExpertFormat) -> LoadItem:
    p = key.part
    return _new_item((key, fmt.part_bytes[p], fmt.resident_bytes[p], fmt.decompress_bytes[p]))


class BudgetError(MoelabError):
    """The budget cannot hold what one layer needs."""


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know when it is built (offline policies also get the access sequence)."""
    fmt: ExpertFormat
    layers: int
    experts: int
    capacity_bytes: int
    future: Sequence[Sequence[Key]] | None = None   # the whole access sequence, by decision point (Belady)
    popularity: np.ndarray | None = None            # [layers, experts] access counts from the trace


class Allocator:
    """Chooses a precision level for each (token, expert)."""
    name = "allocator"

    def allocate(self, layer: int, routing: Routing) -> Demand:
        raise NotImplementedError


class Scheduler:
    """Orders the loads of one layer."""
    name = "scheduler"

    def __init__(self, ctx: PolicyContext):
        self.fmt = ctx.fmt

    def order(self, layer: int, demand: Demand, resident: set[Key]) -> list[LoadItem]:
        raise NotImplementedError
