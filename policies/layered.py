"""Layer-aware eviction: policies that know MoE routing is layer-cyclic.

A token visits layer 0, 1, ..., L-1, then the next token starts again at layer 0. Seen from
the decision point at layer c, a resident key of layer l can next be needed no sooner than
`(l - c - 1) mod L + 1` decision points later (its *cyclic distance*; L for the current layer's
own unpinned keys). Global LRU ranks keys by plain recency, so the keys of layers just after
the current one (used one token ago) are its first victims -- exactly the ones needed next:
below one token's working set (layers x top-k experts) it misses every access.

Every policy here gives only an eviction order (`_order`); the base class (policies/cache.py)
owns the byte budget, pins, pools and dependents, so parts of different sizes (MWQ planes, zip
parts) work unchanged and both engines carry out the same decisions. Within one expert the
higher parts go first (a higher MWQ plane is useless without the lower ones, which
`fmt.dependents` evicts with them anyway).

- `least-stale` (SpecMD, arXiv 2602.03921), `layered-lru` (arXiv 2509.02408);
- `layer-lru`, `layer-lfu`: the budget split into one pool per layer, `share=fixed|proportional`;
- `page-cache`: what an mmap-based runtime (llama.cpp) gets from the OS: Linux's active/inactive
  two-list LRU over 4 KiB pages, with readahead.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from devices.units import ConfigError
from policies.cache import CachePolicy
from policies.options import Option

PAGE = 4096


class _SortedPerPoint(CachePolicy):
    """An eviction order computed by one sort per decision point. Within a decision point keys
    only leave (evictions) or come in pinned (admissions, prefetches), so one sort serves every
    victim the point asks for (as d2moe-budget does)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.layer = 0
        self.tick = 0                        # accesses and admissions seen: LRU order
        self.last: dict = {}                 # key -> tick of its last use (or admission)
        self._sorted: list | None = None

    def begin_layer(self, layer, keys, demand=None):
        self.layer = layer
        self._sorted = None
        return super().begin_layer(layer, keys, demand)

    def _stamp(self, key) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def _forget(self, key):
        del self.last[key]

    def _rank(self, key) -> tuple:
        raise NotImplementedError

    def _order(self):
        if self._sorted is None:
            self._sorted = sorted(self.sizes, key=self._rank)
        return (k for k in self._sorted if k in self.sizes)

    def distance(self, layer: int) -> int:
        """Decision points until layer `layer` is next visited, seen from the current layer."""
        return (layer - self.layer - 1) % self.ctx.layers + 1


class LeastStale(_SortedPerPoint):
    """SpecMD's Least-Stale eviction (Hoang, Jaiswal, Samragh, Cho, "SpecMD: A Comprehensive Study
    On Speculative Expert Prefetching", arXiv 2602.03921, the eviction policy the paper proposes).
    The paper's own text (its section and pseudocode) was not reachable from this machine; this
    is our reading of its published description -- eviction that "exploits the predictable,
    layer-by-layer order of expert accesses in a forward pass", "balancing temporal and spatial
    locality", to cut the "collision misses" LRU suffers when experts are loaded for layers
    ahead. Say so when quoting numbers from it.

    Our reading: a resident key is *stale* once the current forward pass has reached its layer
    without using it (the current layer's unpinned keys included; a prefetched key that its layer
    did not use becomes stale the same way): it cannot be needed before the next token. Stale
    keys go first, least recently used first (temporal locality across tokens). The other keys
    -- used earlier in this pass, or waiting for a layer still ahead -- go in the order of the
    layer cycle, the one needed furthest in the future first (spatial: the layer just computed,
    then the one before, ..., and last the next layer's keys, e.g. a prefetch). A new forward
    pass starts when the layer does not increase."""
    name = "least-stale"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.passes = 0
        self.used_in: dict = {}              # key -> the pass it was last used in (-1: prefetched, unused)
        self._demand: frozenset = frozenset()

    def begin_layer(self, layer, keys, demand=None):
        if self.passes == 0 or layer <= self.layer:
            self.passes += 1
        self._demand = frozenset(keys)
        return super().begin_layer(layer, keys, demand)

    def _touch(self, key):
        self.used_in[key] = self.passes
        self._stamp(key)

    def _insert(self, key):
        self.used_in[key] = self.passes if key in self._demand else -1
        self._stamp(key)

    def _forget(self, key):
        super()._forget(key)
        del self.used_in[key]

    def stale(self, key) -> bool:
        return key.layer <= self.layer and self.used_in[key] != self.passes

    def _rank(self, key):
        if self.stale(key):                   # least recently used first
            return (0, self.last[key], -key.part, key)
        return (1, -self.distance(key.layer), -key.part, self.last[key], key)


class LayeredLRU(_SortedPerPoint):
    """Layered-LRU (Angelopoulos, Marchal, Obrecht, Simon, "Cache Management for Mixture-of-Experts
    LLMs", arXiv 2509.02408, the layer-based extension of LRU it proposes for l-layer paging; the
    paper's pseudocode was not reachable from this machine: this is our reading of it).

    Recency is measured per layer, in visits of the key's own layer (tokens), not in global time:
    a key's *age* is how many times its layer was visited since the key was last used (0: used at
    its layer's latest visit). Global LRU calls a key of layer c+1 used one token ago older than a
    key of layer c-1 used a moment ago, although both were used at their layer's latest visit and
    the first is needed much sooner. Layered-LRU evicts the oldest age first; among equal ages, the
    key whose layer is furthest away in the cyclic order (the current layer's unpinned keys, then
    the layer just computed, ...); then least recently used. A prefetched key starts at age 0 for
    its layer's next visit. At one token's working set it keeps each layer's latest experts."""
    name = "layered-lru"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.visits = [0] * ctx.layers
        self.seen: dict = {}                  # key -> its layer's visit count when last used

    def begin_layer(self, layer, keys, demand=None):
        self.visits[layer] += 1
        return super().begin_layer(layer, keys, demand)

    def _touch(self, key):
        self.seen[key] = self.visits[key.layer]
        self._stamp(key)

    _insert = _touch

    def _forget(self, key):
        super()._forget(key)
        del self.seen[key]

    def _rank(self, key):
        age = self.visits[key.layer] - self.seen[key]
        return (-age, -self.distance(key.layer), -key.part, self.last[key], key)


# -- per-layer partitions ----------------------------------------------------------------------
SHARES = ("fixed", "proportional")


def layer_shares(capacity: int, weights, share: str, who: str) -> list[int]:
    """The budget split into one share per layer: `fixed` in equal parts, `proportional` in
    proportion to `weights`, each layer's effective number of experts (exp of the entropy of its
    routing so far: `_effective_experts`), so a layer whose routing is concentrated on a few
    experts needs fewer slots. Nothing here reads the run's future: the weights are what the cache
    has seen (all equal before it has seen anything). A layer whose decision point needs more than
    its share overflows (LayerLRU.admit), so every budget that holds one layer's demand runs."""
    if share not in SHARES:
        raise ConfigError(f"{who}: option share must be one of {', '.join(SHARES)}, got {share!r}")
    weights = np.asarray(weights, float)
    if share == "fixed" or weights.sum() <= 0:
        weights = np.ones(len(weights))
    extra = np.floor(capacity * weights / weights.sum()).astype(np.int64)
    extra[0] += capacity - int(extra.sum())          # what rounding left over
    return [int(x) for x in extra]


def _effective_experts(counts: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


class LayerLRU(CachePolicy):
    """Per-layer partitioned LRU (mixtral-offloading's per-layer cache; llama.cpp's per-layer LRU
    proposals): each layer an LRU cache of its own share of the budget (`share=fixed|proportional`,
    `layer_shares`; proportional re-splits it by the routing seen so far). A key admitted to a layer at its share evicts that layer's least recently
    used keys. Where one decision point needs more than its layer's share (a prefill, or a budget
    below the sum of the layers' largest demands) the layer overflows, and the budget's victims
    come from the layer furthest over its share -- so every budget that holds the largest single
    layer demand runs; where every share holds its layer's demand, the layers never overflow and
    this is exactly L independent LRU caches (tests/test_layered.py against libCacheSim)."""
    name = "layer-lru"
    options = (Option("share", "str", "fixed", "how the budget beyond each layer's largest demand is split: equally, "
                                               "or by each layer's effective number of experts",
                      choices=("fixed", "proportional")),)

    def __init__(self, ctx, share: str = "fixed"):
        super().__init__(ctx)
        self.share = share
        self.seen = np.zeros((ctx.layers, ctx.experts))   # accesses so far per (layer, expert)
        self.shares = layer_shares(self.capacity, np.zeros(ctx.layers), share, self.name)
        self.layer_used = [0] * ctx.layers
        self.lists: list[OrderedDict] = [OrderedDict() for _ in range(ctx.layers)]

    def begin_layer(self, layer, keys, demand=None):
        if self.share == "proportional":
            # the shares follow the routing seen so far, re-split once per step (at its first layer);
            # a shrunk share evicts lazily, when its layer next admits
            if layer == 0 and self.clock:
                self.shares = layer_shares(self.capacity, [_effective_experts(row) for row in self.seen],
                                           self.share, self.name)
            for expert in {key.expert for key in keys}:
                self.seen[layer, expert] += 1
        return super().begin_layer(layer, keys, demand)

    def admit(self, item):
        layer, size, evicted = item.key.layer, item.resident_bytes, []
        while self.layer_used[layer] + size > self.shares[layer]:
            victim = next((k for k in self._layer_order(layer) if not self._locked(k)), None)
            if victim is None:
                break                               # overflow: the budget check below decides
            evicted.extend(self._evict(victim))
        return evicted + super().admit(item)

    def _touch(self, key):
        self.lists[key.layer].move_to_end(key)

    def _insert(self, key):
        self.lists[key.layer][key] = None
        self.layer_used[key.layer] += self.sizes[key]

    def _forget(self, key):
        del self.lists[key.layer][key]
        self.layer_used[key.layer] -= self.fmt.resident_bytes[key.part]

    def _layer_order(self, layer):
        return iter(list(self.lists[layer]))

    def _order(self):
        over = sorted(range(self.ctx.layers), key=lambda l: (self.shares[l] - self.layer_used[l], l))
        for layer in over:
            yield from self._layer_order(layer)


class LayerLFU(LayerLRU):
    """Per-layer partitioned LFU: within each layer's share, the least frequently used key goes
    first (ties: least recently used); a key's count starts at 1 when it comes in."""
    name = "layer-lfu"

    def __init__(self, ctx, share: str = "fixed"):
        super().__init__(ctx, share)
        self.freq: dict = {}

    def _touch(self, key):
        super()._touch(key)
        self.freq[key] += 1

    def _insert(self, key):
        super()._insert(key)
        self.freq[key] = 1

    def _forget(self, key):
        super()._forget(key)
        del self.freq[key]

    def _layer_order(self, layer):
        recency = {k: i for i, k in enumerate(self.lists[layer])}
        return iter(sorted(recency, key=lambda k: (self.freq[k], recency[k])))


# -- the page-cache baseline ---------------------------------------------------------------------
class PageCache(CachePolicy):
    """What an mmap-based runtime (llama.cpp with its default mmap) gets from the operating system:
    Linux's two-list page reclaim (mm/vmscan.c, mm/swap.c) over 4 KiB pages, with readahead.

    Modelled: a faulted page goes to the head of the *inactive* list, unreferenced; an access
    to an inactive page marks it referenced, a second one moves it to the *active* list
    (mark_page_accessed); reclaim takes pages from the inactive tail, and first, while the
    active list is larger than `ratio` times the inactive one (inactive_is_low), moves active-tail
    pages to the inactive head (shrink_active_list). `ratio` defaults to the kernel's
    inactive_ratio for the budget: isqrt(10 x GiB), 1 below 1 GiB.

    Approximations (so that both engines can carry it out, part by part):
    - All pages of one part are faulted together and referenced together (computing an expert
      reads all its weights), so they move through the lists as one unit of ceil(bytes / 4 KiB)
      pages; the only difference from per-page reclaim is the last victim, which Linux may take
      only partly and we take whole.
    - Readahead: mmap's read-around reads `readahead_kb` (128 KiB, the block-layer default) around
      each fault, so the windows that tile a part spill up to half a window beyond each end into
      its neighbours in the file (parts laid out by layer, expert, part). The spill is counted
      as read amplification in the report (`page_cache_readahead_bytes`), not as memory, and never
      makes a neighbour usable: for real experts (MBs each) the spill is a few percent of a part.
    - PTE-young second chances at reclaim (page_check_references) and workingset refault
      activation (shadow entries) are not modelled."""
    name = "page-cache"
    options = (Option("ratio", "float", None, "active/inactive list ratio (default: the kernel's inactive_ratio for "
                                              "the budget, isqrt(10 x GiB))"),
               Option("readahead_kb", "int", 128, "mmap read-around window", unit="KiB"))

    def __init__(self, ctx, ratio: float | None = None, readahead_kb: int = 128):
        super().__init__(ctx)
        gib = ctx.capacity_bytes >> 30
        self.ratio = float(ratio) if ratio is not None else float(math.isqrt(10 * gib) if gib else 1)
        if not self.ratio > 0:
            raise ConfigError(f"page-cache: option ratio must be a number > 0, got {ratio!r}")
        self.readahead_kb = int(readahead_kb)
        self.readahead = self.readahead_kb * 1024
        if self.readahead < 0:
            raise ConfigError(f"page-cache: option readahead_kb must be >= 0, got {readahead_kb!r}")
        self.inactive: OrderedDict = OrderedDict()     # front = tail (reclaimed first), end = head
        self.active: OrderedDict = OrderedDict()
        self.referenced: set = set()
        self.bytes = {"inactive": 0, "active": 0}
        self.spill = 0
        self.activations = 0
        self.faulted_pages = 0

    def pages(self, key) -> int:
        return -(-self.fmt.resident_bytes[key.part] // PAGE)

    def _touch(self, key):
        if key in self.active:
            self.referenced.add(key)
        elif key in self.referenced:                    # second access on the inactive list
            self.referenced.discard(key)
            del self.inactive[key]
            self.bytes["inactive"] -= self.sizes[key]
            self.active[key] = None
            self.bytes["active"] += self.sizes[key]
            self.activations += 1
        else:
            self.referenced.add(key)

    def _insert(self, key):
        self.inactive[key] = None
        self.bytes["inactive"] += self.sizes[key]
        self.faulted_pages += self.pages(key)
        self.spill += self._spill(key)

    def _spill(self, key) -> int:
        """Bytes read-around reads beyond the part, into neighbours that are not resident."""
        half = self.readahead // 2
        if not half:
            return 0
        fmt, out = self.fmt, 0
        n = fmt.n_parts
        flat = (key.layer * self.ctx.experts + key.expert) * n + key.part
        for step in (-1, 1):
            j = flat + step
            if 0 <= j < self.ctx.layers * self.ctx.experts * n:
                nb = type(key)(j // n // self.ctx.experts, j // n % self.ctx.experts, j % n)
                if nb not in self.sizes:
                    out += min(half, -(-fmt.part_bytes[nb.part] // PAGE) * PAGE)
        return out

    def _forget(self, key):
        for name, lst in (("inactive", self.inactive), ("active", self.active)):
            if key in lst:
                del lst[key]
                self.bytes[name] -= self.sizes.get(key, self.fmt.resident_bytes[key.part])
        self.referenced.discard(key)

    def _order(self):
        # shrink_active_list: keep the active list within ratio x the inactive one
        while self.active and self.bytes["active"] > self.ratio * self.bytes["inactive"]:
            key, _ = self.active.popitem(last=False)
            size = self.sizes[key]
            self.bytes["active"] -= size
            self.inactive[key] = None
            self.bytes["inactive"] += size
            self.referenced.discard(key)
        yield from list(self.inactive)
        yield from list(self.active)

    def report(self):
        return {"page_cache_readahead_bytes": self.spill, "page_cache_activations": self.activations,
                "page_cache_faulted_pages": self.faulted_pages}


LAYERED_CACHES = (LeastStale, LayeredLRU, LayerLRU, LayerLFU, PageCache)
