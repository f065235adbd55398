"""Load schedulers: the order in which a layer's missing parts go to storage."""
from __future__ import annotations

import heapq

from devices.units import ConfigError
from policies.base import Demand, Key, LoadItem, PolicyContext, Scheduler, load_item, needed_keys
from policies.options import Option


class FifoScheduler(Scheduler):
    """Loads in a fixed order, each expert's parts ascending, except that parts carrying a
    decompression task (zip exponent chunks) go before the expert's raw parts: the workers then
    decompress while the raw bytes stream, instead of starting only after them (read SM, read
    chunks, decompress, one after another, left the I/O idle).

    `order="router"` (the default): experts as tokens first select them. The hottest expert
    tends to be selected first, so this order is already close to HEBF's.
    `order="expert-id"`: experts by ascending id, the order D²MoE's FIFO baseline loads in
    (its Fig. 3), which knows nothing of how many tokens wait for an expert.
    """
    name = "fifo"
    options = (Option("order", "str", "router", "experts as tokens first select them, or by ascending id "
                                                "(D²MoE's FIFO baseline)", choices=("router", "expert-id")),)

    def __init__(self, ctx: PolicyContext, order: str = "router"):
        super().__init__(ctx)
        if order not in ("router", "expert-id"):
            raise ConfigError(f"fifo: order must be 'router' or 'expert-id', got {order!r}")
        self.order_by = order
        self.by_id = order == "expert-id"
        self.decompresses = any(self.fmt.decompress_bytes)     # a format with decompression tasks

    def order(self, layer: int, demand: Demand, resident: set[Key]) -> list[LoadItem]:
        fmt, items = self.fmt, []
        for k in needed_keys(demand, fmt):      # (a loop: most keys are resident, a comprehension costs a call)
            if k not in resident:
                items.append(load_item(k, fmt))
        # (the sorts are stable: parts stay ascending within an expert)
        if self.by_id:
            items.sort(key=lambda it: (it.key.expert, not it.decompress_bytes))
        elif self.decompresses:
            rank = {}
            items.sort(key=lambda it: (rank.setdefault(it.key.expert, len(rank)), not it.decompress_bytes))
        return items


class HEBF(Scheduler):
    """D²MoE's hottest-expert-bit-first (§3 of the paper, as papers.md states it):

      1. for each activated expert j, a queue Q_j of its requested levels, ascending;
      2. repeatedly, among the heads of all queues, pop the hottest item (the most tokens)
         and append its missing parts to the I/O queue (ties: the expert the router chose
         first).

    An item is the parts its level needs that no earlier item of that expert loaded (for
    nested MWQ planes: the planes from the previous requested level up to this one).

    "The most tokens" is ambiguous for nested planes. `count="exact"` (the default) counts the
    tokens that asked for exactly this level, the paper's literal B_{j,k}: they are also the
    tokens whose compute this item unlocks (a token at a higher level still waits for its
    further planes), which is what HEBF's rationale, hiding the next loads behind the
    compute a hot item starts, is about. `count="cumulative"` counts every token that needs
    the item's parts (this level or higher).
    """
    name = "hebf"
    options = (Option("count", "str", "exact", "tokens that ask for exactly this level, or for it or higher",
                      choices=("exact", "cumulative")),)

    def __init__(self, ctx: PolicyContext, count: str = "exact"):
        super().__init__(ctx)
        if count not in ("exact", "cumulative"):
            raise ConfigError(f"hebf: count must be 'exact' or 'cumulative', got {count!r}")
        self.count = count

    def order(self, layer: int, demand: Demand, resident: set[Key]) -> list[LoadItem]:
        counts = demand.counts()
        queues: dict[int, list[int]] = {}
        for expert, level in counts:
            queues.setdefault(expert, []).append(level)
        heat: dict[tuple[int, int], int] = {}
        for expert, levels in queues.items():
            levels.sort()
            for i, level in enumerate(levels):
                heat[expert, level] = (counts[expert, level] if self.count == "exact" else
                                       sum(counts[expert, lv] for lv in levels[i:]))
        rank = {expert: i for i, expert in enumerate(queues)}
        heads = [(-heat[e, lv[0]], rank[e], e) for e, lv in queues.items()]
        heapq.heapify(heads)
        parts, fmt = self.fmt.level_parts, self.fmt
        loaded: dict[int, set[int]] = {}
        plan = []
        while heads:
            _, r, expert = heapq.heappop(heads)
            level = queues[expert].pop(0)
            done = loaded.setdefault(expert, set())
            for p in parts[level]:
                key = Key(layer, expert, p)
                if p not in done and key not in resident:
                    plan.append(load_item(key, fmt))
                done.add(p)
            if queues[expert]:
                heapq.heappush(heads, (-heat[expert, queues[expert][0]], r, expert))
        return plan
