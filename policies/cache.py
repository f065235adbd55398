"""Cache (residency) policies: which parts stay in memory, under a byte budget.

One class per eviction rule, cachetools-style: the base class owns the bookkeeping
(bytes, pins, pools, the budget check, the victim loop); a subclass only gives its
eviction order (`_order`) and how it tracks use (`_touch`, `_insert`, `_forget`).

Semantics at a decision point (one step, one layer): every needed key is looked up
first (hits are recorded and pinned), then missing parts are admitted in plan order,
evicting unlocked keys. Evicting a part also evicts the parts of that expert that are
useless without it (`fmt.dependents`: higher bit-planes; ZipMoE exponent chunks).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterator, Sequence

from policies.base import (BudgetError, Demand, Key, LoadItem, NeedsFuture, PolicyContext, _new_key,
                           largest_layer_demand, load_item)


class CachePolicy:
    """Residency under a byte budget. A subclass supplies the eviction order (`_order`: keys,
    best victim first) and how it tracks use (`_touch`, `_insert`, `_forget`); the base
    class owns the bytes, the pins, the pools and the one victim loop.

    Pools: a cache may split its budget into named pools (ZipMoE's full and SM-only
    experts) by setting `self.pools = {name: capacity}` and `pool(key)`. Each pool stays
    within its capacity and all of them together within the budget."""
    name = "cache"
    offline = False          # True: reads the run's own future (ctx.future / its popularity): a bound

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.fmt = ctx.fmt
        self.capacity = ctx.capacity_bytes
        self.used = 0
        self.peak = 0
        self.sizes: dict[Key, int] = {}                       # resident key -> resident bytes
        self.by_layer: list[set[Key]] = [set() for _ in range(ctx.layers)]
        self.pinned: set[Key] = set()
        self.clock = 0                                        # decision points seen
        self.pools: dict[str, int] | None = None             # name -> capacity; None: one pool
        self.pool_of: dict[Key, str] = {}
        self.pool_used: dict[str, int] = {}
        self._pool_base: tuple | None = None                 # resize: (budget, pools) the shares are of
        # each part with the parts useless without it (fmt.dependents), evicted together
        self._with_dependents = [(p, *self.fmt.dependents(p)) for p in range(self.fmt.n_parts)]

    # -- what the decision point calls (policies/bundle.py) ---------------------
    def resident(self, layer: int) -> set[Key]:
        """The layer's resident keys: a live view, read it now, do not keep or change it."""
        return self.by_layer[layer]

    def begin_layer(self, layer: int, keys: Sequence[Key], demand: Demand | None = None) -> int:
        """Record an access to each key and pin them for this layer; `demand` says how many
        tokens need each (expert, level), for token-weighted policies. Returns the hits."""
        self.clock += 1
        sizes, touch = self.sizes, self._touch
        hits = 0
        for key in keys:
            if key in sizes:
                hits += 1
                touch(key)
        self.pinned = set(keys)
        return hits

    def admit(self, item: LoadItem) -> list[Key]:
        """Make room for `item` (evicting unlocked keys) and count it resident. Returns evictions."""
        evicted: list[Key] = []
        size = item.resident_bytes
        if self.pools is not None:
            pool = self.pool(item.key)
            while self.pool_used[pool] + size > self.pools[pool]:
                evicted.extend(self._evict(self._victim_or_fail(item, pool)))
        while self.used + size > self.capacity:
            evicted.extend(self._evict(self._victim_or_fail(item)))
        key = item.key
        self.sizes[key] = size
        self.by_layer[key.layer].add(key)
        self.used += size
        if self.used > self.peak:
            self.peak = self.used
        if self.pools is not None:
            self.pool_of[key] = pool
            self.pool_used[pool] += size
        self._insert(key)
        return evicted

    def prefetch(self, keys: Sequence[Key]) -> list[tuple[LoadItem, list[Key]]]:
        """Admit what a prefetcher proposed, in order, as long as it fits without evicting a
        locked key; the wished keys already resident are pinned first, so that one prefetch
        never evicts another wished key. Returns the admitted load items with their evictions."""
        sizes = self.sizes
        self.pinned = self.pinned | {k for k in keys if k in sizes}
        items = [load_item(k, self.fmt) for k in keys if k not in sizes]
        locked: dict[str | None, int] = {None: 0}
        for k, size in sizes.items():
            if self._locked(k):
                locked[None] += size
                if self.pools is not None:
                    locked[self.pool_of[k]] = locked.get(self.pool_of[k], 0) + size
        out = []
        for item in items:
            size = item.resident_bytes
            if locked[None] + size > self.capacity:
                break
            if self.pools is not None:
                pool = self.pool(item.key)
                if locked.get(pool, 0) + size > self.pools[pool]:
                    break
                locked[pool] = locked.get(pool, 0) + size
            out.append((item, self.admit(item)))
            self.pinned.add(item.key)
            locked[None] += size
        return out

    def end_layer(self, layer: int) -> list[Key]:
        """Unpin the layer; a tiering policy may drop keys now. Returns what it dropped."""
        self.pinned = set()
        return []

    def resize(self, capacity: int) -> list[Key]:
        """The budget becomes `capacity` (the shared KV mode: the expert cache yields as the KV
        grows and gets the room back when a group's KV is freed). Evicts, in the policy's own victim
        order, until what is resident fits; pools keep their share of the budget (each scaled by
        capacity / the budget it was set for). Returns the evictions."""
        if self.pools is not None:
            if self._pool_base is None or self.pools != self._pool_base[2]:   # (re)planned since: rebase
                self._pool_base = (self.capacity, dict(self.pools), None)
            base, shares, _ = self._pool_base
            self.pools = {name: cap * capacity // base if base else 0 for name, cap in shares.items()}
            self._pool_base = (base, shares, dict(self.pools))
        self.capacity = capacity
        evicted: list[Key] = []
        for pool in self.pools or ():
            while self.pool_used[pool] > self.pools[pool]:
                evicted.extend(self._evict(self._resize_victim(pool)))
        while self.used > capacity:
            evicted.extend(self._evict(self._resize_victim()))
        return evicted

    def _resize_victim(self, pool: str | None = None) -> Key:
        victim = self._victim(pool)
        if victim is None:
            where = f"pool {pool!r} ({self.pools[pool]} B)" if pool is not None else f"capacity {self.capacity} B"
            raise BudgetError(f"the KV cache leaves the expert cache a {where}, less than its locked keys hold "
                              f"({self.pool_used[pool] if pool is not None else self.used} B): give a larger "
                              f"budget, fewer or shorter requests, or --kv fixed")
        return victim

    # -- subclass hooks ----------------------------------------------------
    def _touch(self, key: Key) -> None:
        """A resident key was accessed."""

    def _insert(self, key: Key) -> None:
        """A key became resident."""

    def _forget(self, key: Key) -> None:
        """A key left the cache."""

    def _order(self) -> Iterator[Key]:
        """Resident keys, the best victim first (locked ones are skipped by the caller)."""
        raise NotImplementedError

    def _locked(self, key: Key) -> bool:
        """`key` cannot be evicted now."""
        return key in self.pinned

    def pool(self, key: Key) -> str:
        """The pool an admitted key goes to (only asked when `self.pools` is set)."""
        raise NotImplementedError

    # -- the one victim loop and the bookkeeping ---------------------------------
    def _victim(self, pool: str | None = None) -> Key | None:
        """The first unlocked key of the subclass's order (in `pool`, if given), or None."""
        order = self._order()
        try:
            for key in order:
                if not self._locked(key) and (pool is None or self.pool_of[key] == pool):
                    return key
            return None
        finally:
            close = getattr(order, "close", None)
            if close is not None:
                close()

    def _victim_or_fail(self, item: LoadItem, pool: str | None = None) -> Key:
        victim = self._victim(pool)
        if victim is None:
            where = f"pool {pool!r} ({self.pools[pool]} B)" if pool is not None else f"budget {self.capacity} B"
            held = self.pool_used[pool] if pool is not None else self.used
            raise BudgetError(f"{where} cannot hold layer {item.key.layer}'s demand: {held} B locked, "
                              f"{item.resident_bytes} B more needed")
        return victim

    def _evict(self, key: Key) -> list[Key]:
        """Evict `key` and the resident parts of the same expert that are useless without it."""
        out = []
        layer, expert, _ = key
        for part in self._with_dependents[key.part]:
            k = _new_key((layer, expert, part))
            size = self.sizes.pop(k, None)
            if size is None:
                continue
            self.used -= size
            self.by_layer[k.layer].discard(k)
            if self.pools is not None:
                self.pool_used[self.pool_of.pop(k)] -= size
            self._forget(k)
            out.append(k)
        return out

    def _move(self, key: Key, pool: str) -> None:
        """Count a resident key in another pool (ZipMoE: an expert demoted to SM-only keeps its
        SM part, which leaves the full pool for the SM pool). The bytes stay resident, so the
        budget is unchanged; the new pool must have room (make it first, by evicting)."""
        old = self.pool_of[key]
        if old == pool:
            return
        size = self.sizes[key]
        if self.pool_used[pool] + size > self.pools[pool]:
            raise BudgetError(f"pool {pool!r} ({self.pools[pool]} B) cannot take {key}: "
                              f"{self.pool_used[pool]} B used, {size} B more")
        self.pool_used[old] -= size
        self.pool_used[pool] += size
        self.pool_of[key] = pool

    def drop_layer(self, layer: int, keep: set[Key] | frozenset = frozenset()) -> list[Key]:
        """Evict the layer's resident keys except `keep`, in key order."""
        dropped = []
        for key in sorted(self.by_layer[layer] - keep):
            if key in self.sizes:
                dropped.extend(self._evict(key))
        return dropped


class _LazyHeap:
    """A priority queue of keys with lazy deletion: pushing a key again or discarding it
    leaves its old entries in the heap, recognised as stale by a version number."""

    def __init__(self):
        self.heap: list[tuple] = []
        self.version: dict[Key, int] = {}
        self.tick = 0

    def push(self, key: Key, *priority) -> None:
        self.tick += 1
        self.version[key] = self.tick
        heapq.heappush(self.heap, (*priority, self.tick, key))

    def discard(self, key: Key) -> None:
        self.version.pop(key, None)

    def __iter__(self) -> Iterator[Key]:
        """Live keys, lowest priority first; entries passed over go back when iteration stops."""
        heap, version, passed = self.heap, self.version, []
        try:
            while heap:
                entry = heapq.heappop(heap)
                if version.get(entry[-1]) != entry[-2]:       # stale: drop it for good
                    continue
                passed.append(entry)
                yield entry[-1]
        finally:
            for entry in passed:
                heapq.heappush(heap, entry)


class _OrderedCache(CachePolicy):
    """Evicts from the front of an ordered dict; subclasses decide whether a hit moves a key."""
    move_on_hit = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.order: OrderedDict[Key, None] = OrderedDict()

    def begin_layer(self, layer, keys, demand=None):
        # the base class's loop with the hook inlined: the simulator's hottest call
        self.clock += 1
        sizes = self.sizes
        if self.move_on_hit:
            move = self.order.move_to_end
            hits = 0
            for key in keys:
                if key in sizes:
                    hits += 1
                    move(key)
        else:
            hits = sum(key in sizes for key in keys)
        self.pinned = set(keys)
        return hits

    def _touch(self, key):
        if self.move_on_hit:
            self.order.move_to_end(key)

    def _insert(self, key):
        self.order[key] = None

    def _forget(self, key):
        del self.order[key]

    def _order(self):
        return iter(self.order)


class LRU(_OrderedCache):
    name = "lru"
    move_on_hit = True


class FIFO(_OrderedCache):
    name = "fifo"


class OnDemand(FIFO):
    """Nothing outlives its layer: every needed part is loaded, used and dropped."""
    name = "on-demand"

    def end_layer(self, layer):
        super().end_layer(layer)
        return self.drop_layer(layer)


class LFU(CachePolicy):
    """Least frequently used among resident keys; ties go to the least recently used.
    A key's count starts at 1 when it is inserted (it is forgotten on eviction)."""
    name = "lfu"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.freq: dict[Key, int] = {}
        self.heap = _LazyHeap()

    def _touch(self, key):
        self.freq[key] += 1
        self.heap.push(key, self.freq[key])

    def _insert(self, key):
        self.freq[key] = 1
        self.heap.push(key, 1)

    def _forget(self, key):
        del self.freq[key]
        self.heap.discard(key)

    def _order(self):
        return iter(self.heap)


class Belady(CachePolicy):
    """Offline optimum (MIN): evict the key whose next use is furthest away (ties: the
    smallest key). Needs the whole access sequence (ctx.future, by decision point); a
    bound, not a deployable policy."""
    offline = True
    name = "belady"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.future is None:
            raise NeedsFuture("belady needs the access sequence of the whole run")
        self.uses: dict[Key, list[int]] = {}              # key -> decision points (1-based) using it
        for point, keys in enumerate(ctx.future):
            for key in keys:
                self.uses.setdefault(key, []).append(point + 1)
        self.cursor: dict[Key, int] = {}
        self.heap = _LazyHeap()

    def _next_use(self, key) -> int:
        uses = self.uses.get(key, ())
        i = self.cursor.get(key, 0)
        while i < len(uses) and uses[i] <= self.clock:
            i += 1
        self.cursor[key] = i
        return uses[i] if i < len(uses) else 1 << 62

    def _touch(self, key):
        self.heap.push(key, -self._next_use(key), key)

    _insert = _touch

    def _forget(self, key):
        self.heap.discard(key)

    def _order(self):
        return iter(self.heap)


class StaticHot(CachePolicy):
    """Pin the most popular experts (from the trace's counts) for the whole run; everything
    else is loaded on demand and dropped after its layer. The hot set gets what is left
    of the budget after room for the largest layer demand."""
    offline = True
    name = "static-hot"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.popularity is None:
            raise NeedsFuture("static-hot needs expert popularity counts (from the trace)")
        fmt = ctx.fmt
        expert_bytes = sum(fmt.resident_bytes)
        room = ctx.capacity_bytes - largest_layer_demand(ctx.future or (), fmt)
        n_hot = max(0, room // expert_bytes)
        flat = ctx.popularity.ravel()
        order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:n_hot]
        self.hot = {Key(i // ctx.experts, i % ctx.experts, p)
                    for i in order if flat[i] > 0 for p in range(fmt.n_parts)}

    def end_layer(self, layer):
        super().end_layer(layer)
        return self.drop_layer(layer, keep=self.hot)

    def _order(self):
        return iter(self.sizes)

    def _locked(self, key):
        return key in self.pinned or key in self.hot


class BudgetRule(CachePolicy):
    """D²MoE's memory-budget rule (Algorithm 2): when a layer's needs exceed the budget,
    free the *previous* layer's weights, its highest bit-planes first, then its lower
    planes, then its base planes; if still short, the layer before it, and so on. Planes
    used often stay resident: within one layer and plane, the least used go first.

    Why the previous layer: routing is layer-cyclic, so the layer just computed is the one
    needed furthest in the future (L-1 layers on). Generalised by that distance: a resident
    key of layer l, seen from the current layer c, is next needed (l - c - 1) mod L + 1
    layers on; the furthest goes first. The current layer's own unpinned keys (experts it
    did not ask for this time; the paper's text does not mention them) are the furthest of
    all (L layers on), so they go before the previous layer's."""
    name = "d2moe-budget"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.uses: dict[Key, int] = {}
        self.layer = 0
        self._sorted: list[Key] | None = None

    def begin_layer(self, layer, keys, demand=None):
        self.layer = layer
        self._sorted = None                 # residency changed since: sort again when asked
        return super().begin_layer(layer, keys, demand)

    def _touch(self, key):
        self.uses[key] += 1

    def _insert(self, key):
        self.uses[key] = 1

    def _forget(self, key):
        del self.uses[key]

    def _order(self):
        # within a decision point, keys only leave (evictions) or come in pinned (admissions,
        # prefetches), so one sort serves every victim it asks for
        if self._sorted is None:
            L, c, uses = self.ctx.layers, self.layer, self.uses
            self._sorted = sorted(self.sizes, key=lambda k: (-((k.layer - c - 1) % L + 1), -k.part, uses[k], k))
        return (k for k in self._sorted if k in self.sizes)
