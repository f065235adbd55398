"""Cache (residency) policies: which parts stay in memory, under a byte budget.

One class per eviction rule, cachetools-style: the base class owns the bookkeeping
(bytes, pins, the budget check); a subclass only says which unpinned key goes first
(`_victim`) and how it tracks use (`_touch`, `_insert`, `_forget`).

Semantics at a decision point (one step, one layer): every needed key is looked up
first (hits are recorded and pinned), then missing parts are admitted in plan order,
evicting unpinned keys. Evicting a part also evicts the higher parts of that expert,
which are useless without it (nested bit-planes; ZipMoE exponent chunks).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Sequence

from policies.base import BudgetError, Key, LoadItem, PolicyContext, load_item


class CachePolicy:
    name = "cache"

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.capacity = ctx.capacity_bytes
        self.used = 0
        self.peak = 0
        self.sizes: dict[Key, int] = {}                       # resident key -> resident bytes
        self.by_layer: list[set[Key]] = [set() for _ in range(ctx.layers)]
        self.pinned: set[Key] = set()
        self.clock = 0                                        # decision points seen

    # -- what engines call -------------------------------------------------
    def resident(self, layer: int) -> set[Key]:
        """The layer's resident keys: a live view, read it now, do not keep or change it."""
        return self.by_layer[layer]

    def begin_layer(self, layer: int, keys: Sequence[Key]) -> list[bool]:
        """Record an access to each key; pin them for this layer. Returns hit flags."""
        self.clock += 1
        sizes, touch = self.sizes, self._touch
        hits = [key in sizes for key in keys]
        for key, hit in zip(keys, hits):
            if hit:
                touch(key)
        self.pinned = set(keys)
        return hits

    def admit(self, item: LoadItem) -> list[Key]:
        """Make room for `item` (evicting unpinned keys) and count it resident. Returns evictions."""
        evicted: list[Key] = []
        while self.used + item.resident_bytes > self.capacity:
            victim = self._victim()
            if victim is None:
                raise BudgetError(
                    f"budget {self.capacity} B cannot hold layer {item.key.layer}'s demand: "
                    f"{self.used} B pinned, {item.resident_bytes} B more needed")
            evicted.extend(self._evict(victim))
        self.sizes[item.key] = item.resident_bytes
        self.by_layer[item.key.layer].add(item.key)
        self.used += item.resident_bytes
        self.peak = max(self.peak, self.used)
        self._insert(item.key)
        return evicted

    def prefetch(self, keys: Sequence[Key]) -> list[tuple[LoadItem, list[Key]]]:
        """Admit what a prefetcher proposed, in order, as long as it fits without evicting a
        pinned key; the wished keys already resident are pinned first, so that one prefetch
        never evicts another wished key. Returns the admitted load items with their evictions."""
        sizes = self.sizes
        self.pinned = self.pinned | {k for k in keys if k in sizes}
        items = [load_item(k, self.ctx.fmt) for k in keys if k not in sizes]
        locked = sum(size for k, size in sizes.items() if self._locked(k))
        out = []
        for item in items:
            if locked + item.resident_bytes > self.capacity:
                break
            out.append((item, self.admit(item)))
            self.pinned.add(item.key)
            locked += item.resident_bytes
        return out

    def end_layer(self, layer: int) -> list[Key]:
        """Unpin the layer; a tiering policy may drop keys now. Returns what it dropped."""
        self.pinned = set()
        return []

    # -- subclass hooks ----------------------------------------------------
    def _touch(self, key: Key) -> None:
        """A resident key was accessed."""

    def _insert(self, key: Key) -> None:
        """A key became resident."""

    def _forget(self, key: Key) -> None:
        """A key left the cache."""

    def _victim(self) -> Key | None:
        """The unpinned resident key to evict next, or None if every key is pinned."""
        raise NotImplementedError

    def _locked(self, key: Key) -> bool:
        """`key` cannot be evicted now (what _victim never returns)."""
        return key in self.pinned

    # -- helpers -------------------------------------------------------------
    def _evict(self, key: Key) -> list[Key]:
        """Evict `key` and the higher parts of the same expert."""
        out = []
        part = key.part
        while True:
            k = Key(key.layer, key.expert, part)
            if k not in self.sizes:
                break
            self.used -= self.sizes.pop(k)
            self.by_layer[k.layer].discard(k)
            self._forget(k)
            out.append(k)
            part += 1
        return out

    def drop_layer(self, layer: int) -> list[Key]:
        dropped = []
        for key in sorted(self.by_layer[layer]):
            if key in self.sizes:
                dropped.extend(self._evict(key))
        return dropped


class _OrderedCache(CachePolicy):
    """Evicts from the front of an ordered dict; subclasses decide whether a hit moves a key."""
    move_on_hit = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.order: OrderedDict[Key, None] = OrderedDict()

    def begin_layer(self, layer, keys):
        # the base class's loop with the hook inlined: the simulator's hottest call
        self.clock += 1
        sizes = self.sizes
        hits = [key in sizes for key in keys]
        if self.move_on_hit:
            move = self.order.move_to_end
            for key, hit in zip(keys, hits):
                if hit:
                    move(key)
        self.pinned = set(keys)
        return hits

    def _touch(self, key):
        if self.move_on_hit:
            self.order.move_to_end(key)

    def _insert(self, key):
        self.order[key] = None

    def _forget(self, key):
        del self.order[key]

    def _victim(self):
        for key in self.order:
            if key not in self.pinned:
                return key
        return None


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
        self.last: dict[Key, int] = {}
        self.heap: list[tuple[int, int, Key]] = []
        self.tick = 0

    def _push(self, key):
        self.tick += 1
        self.last[key] = self.tick
        heapq.heappush(self.heap, (self.freq[key], self.tick, key))

    def _touch(self, key):
        self.freq[key] += 1
        self._push(key)

    def _insert(self, key):
        self.freq[key] = 1
        self._push(key)

    def _forget(self, key):
        del self.freq[key], self.last[key]

    def _victim(self):
        skipped, victim = [], None
        while self.heap:
            f, t, key = self.heap[0]
            if self.last.get(key) != t:          # stale entry
                heapq.heappop(self.heap)
                continue
            if key in self.pinned:
                skipped.append(heapq.heappop(self.heap))
                continue
            victim = key
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return victim


class Belady(CachePolicy):
    """Offline optimum (MIN): evict the key whose next use is furthest away. Needs the
    whole access sequence (ctx.future, by decision point); a bound, not a deployable policy."""
    name = "belady"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.future is None:
            raise BudgetError("belady needs the access sequence of the whole run")
        # next_use[i][key]: the decision point after i where key is next accessed
        self.uses: dict[Key, list[int]] = {}
        for point, keys in enumerate(ctx.future):
            for key in keys:
                self.uses.setdefault(key, []).append(point + 1)
        self.cursor: dict[Key, int] = {}
        self.heap: list[tuple[int, Key]] = []

    def _next_use(self, key) -> int:
        uses = self.uses.get(key, ())
        i = self.cursor.get(key, 0)
        while i < len(uses) and uses[i] <= self.clock:
            i += 1
        self.cursor[key] = i
        return uses[i] if i < len(uses) else 1 << 62

    def _touch(self, key):
        heapq.heappush(self.heap, (-self._next_use(key), key))

    _insert = _touch

    def _victim(self):
        skipped, victim = [], None
        while self.heap:
            neg, key = self.heap[0]
            if key not in self.sizes or -neg != self._next_use(key):   # stale
                heapq.heappop(self.heap)
                continue
            if key in self.pinned:
                skipped.append(heapq.heappop(self.heap))
                continue
            victim = key
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return victim


class StaticHot(CachePolicy):
    """Pin the most popular experts (from the trace's counts) for the whole run; everything
    else is loaded on demand and dropped after its layer. The hot set gets what is left
    of the budget after room for the largest layer demand."""
    name = "static-hot"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.popularity is None:
            raise BudgetError("static-hot needs expert popularity counts (from the trace)")
        fmt = ctx.fmt
        expert_bytes = sum(fmt.resident_bytes)
        room = ctx.capacity_bytes - _max_layer_bytes(ctx)
        n_hot = max(0, room // expert_bytes)
        flat = ctx.popularity.ravel()
        order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:n_hot]
        self.hot = {Key(i // ctx.experts, i % ctx.experts, p)
                    for i in order if flat[i] > 0 for p in range(fmt.n_parts)}

    def end_layer(self, layer):
        super().end_layer(layer)
        dropped = []
        for key in sorted(self.by_layer[layer] - self.hot):
            if key in self.sizes:
                dropped.extend(self._evict(key))
        return dropped

    def _victim(self):
        for key in self.sizes:
            if not self._locked(key):
                return key
        return None

    def _locked(self, key):
        return key in self.pinned or key in self.hot


def _max_layer_bytes(ctx: PolicyContext) -> int:
    """Bytes of the largest single-layer demand in the access sequence (or top_k experts)."""
    if ctx.future:
        sizes = ctx.fmt.resident_bytes
        return max(sum(sizes[k.part] for k in keys) for keys in ctx.future)
    return 0
