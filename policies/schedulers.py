"""Load schedulers: the order in which a layer's missing parts go to storage."""
from __future__ import annotations

from policies.base import Demand, Key, LoadItem, Scheduler, load_item, needed_keys


class FifoScheduler(Scheduler):
    """Router order: experts as tokens first select them, each expert's parts ascending."""
    name = "fifo"

    def order(self, layer: int, demand: Demand, resident: set[Key]) -> list[LoadItem]:
        return [load_item(k, self.fmt) for k in needed_keys(demand, self.fmt) if k not in resident]
