"""FIFO servers with deterministic service times, by reservation.

For a first-come-first-served queue whose jobs are submitted in nondecreasing time order
and whose service times are known at submission, each job's start is
max(arrival, earliest free server): exactly what a SimPy Resource would give, without a
process and two events per job (tests/test_servers.py checks the equality against a
process-per-job SimPy model). This is what lets the simulator run thousands of tokens per
second. The arithmetic is written out (no key functions, a plain float for the single wire)
because it runs for every load; sim/fast.py repeats it inline, operation for operation.
"""
from __future__ import annotations


class FifoServer:
    """`n` identical servers fed from one FIFO queue."""

    def __init__(self, n: int = 1):
        self.free = [0.0] * n

    def reserve(self, arrival: float, duration: float) -> tuple[float, float, int]:
        """Serve a job arriving at `arrival`: returns (start, end, server index), the server
        being the first of those free earliest."""
        free = self.free
        i = free.index(min(free)) if len(free) > 1 else 0
        start = arrival if arrival > free[i] else free[i]
        end = start + duration
        free[i] = end
        return start, end, i

    def state(self) -> list[float]:
        return self.free[:]

    def restore(self, state: list[float]) -> None:
        self.free[:] = state


class StorageChannel:
    """A storage device: up to `queue_depth` requests in flight, each paying a fixed
    `latency` (which overlaps with other requests' transfers) and then a transfer that
    shares the `bandwidth` with the others one at a time."""

    def __init__(self, bandwidth: float, latency: float, queue_depth: int):
        self.bandwidth = bandwidth
        self.latency = latency
        self.slots = FifoServer(queue_depth)
        self.wire = 0.0                       # when the wire is free (one transfer at a time)

    def reserve(self, arrival: float, nbytes: int, stall: float = 0.0) -> tuple[float, float]:
        """Issue a read at `arrival`: returns (issue time, completion time). `stall`: seconds the
        read takes beyond its transfer (its thread is held up on the host); it keeps its slot, not
        the wire."""
        free = self.slots.free
        i = free.index(min(free)) if len(free) > 1 else 0
        issue = arrival if arrival > free[i] else free[i]
        start = issue + self.latency
        if self.wire > start:
            start = self.wire
        end = start + nbytes / self.bandwidth
        self.wire = end
        end += stall
        # the slot is held until the read completes (as a job of end - issue seconds from issue)
        free[i] = issue + (end - issue)
        return issue, end

    def state(self) -> tuple:
        return self.slots.free[:], self.wire

    def restore(self, state: tuple) -> None:
        self.slots.free[:], self.wire = state[0], state[1]
