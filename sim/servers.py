"""FIFO servers with deterministic service times, by reservation.

For a first-come-first-served queue whose jobs are submitted in nondecreasing time order
and whose service times are known at submission, each job's start is
max(arrival, earliest free server): exactly what a SimPy Resource would give, without a
process and two events per job (tests/test_engine_reference.py checks the equality
against a process-per-job SimPy model). This is what lets the simulator run thousands of
tokens per second.
"""
from __future__ import annotations


class FifoServer:
    """`n` identical servers fed from one FIFO queue."""

    def __init__(self, n: int = 1):
        self.free = [0.0] * n

    def reserve(self, arrival: float, duration: float) -> tuple[float, float, int]:
        """Serve a job arriving at `arrival`: returns (start, end, server index)."""
        i = min(range(len(self.free)), key=self.free.__getitem__) if len(self.free) > 1 else 0
        start = max(arrival, self.free[i])
        end = start + duration
        self.free[i] = end
        return start, end, i


class StorageChannel:
    """A storage device: up to `queue_depth` requests in flight, each paying a fixed
    `latency` (which overlaps with other requests' transfers) and then a transfer that
    shares the `bandwidth` with the others one at a time."""

    def __init__(self, bandwidth: float, latency: float, queue_depth: int):
        self.bandwidth = bandwidth
        self.latency = latency
        self.slots = FifoServer(queue_depth)
        self.wire = FifoServer(1)

    def reserve(self, arrival: float, nbytes: int, stall: float = 0.0) -> tuple[float, float]:
        """Issue a read at `arrival`: returns (issue time, completion time). `stall`: seconds the
        read takes beyond its transfer (its thread is held up on the host); it keeps its slot, not
        the wire."""
        issue = self.slots.free[min(range(len(self.slots.free)), key=self.slots.free.__getitem__)]
        issue = max(arrival, issue)
        _, end, _ = self.wire.reserve(issue + self.latency, nbytes / self.bandwidth)
        end += stall
        # the slot is held until the read completes
        self.slots.reserve(arrival, end - issue)
        return issue, end
