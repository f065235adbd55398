"""The reservation servers equal a process-per-job SimPy model of the same queues."""
import numpy as np
import simpy
from hypothesis import given, settings, strategies as st

from sim.servers import FifoServer, StorageChannel


def simpy_storage(jobs, bandwidth, latency, depth):
    """jobs: [(arrival, nbytes)] in arrival order -> [(issue, end)], one SimPy process per read."""
    env = simpy.Environment()
    slots, wire = simpy.Resource(env, depth), simpy.Resource(env, 1)
    out = [None] * len(jobs)

    def read(i, arrival, nbytes):
        yield env.timeout(arrival)
        with slots.request() as slot:
            yield slot
            issue = env.now
            yield env.timeout(latency)
            with wire.request() as w:
                yield w
                yield env.timeout(nbytes / bandwidth)
            out[i] = (issue, env.now)

    for i, (a, n) in enumerate(jobs):
        env.process(read(i, a, n))
    env.run()
    return out


def simpy_pool(jobs, workers):
    env = simpy.Environment()
    pool = simpy.Resource(env, workers)
    out = [None] * len(jobs)

    def work(i, arrival, duration):
        yield env.timeout(arrival)
        with pool.request() as r:
            yield r
            start = env.now
            yield env.timeout(duration)
            out[i] = (start, env.now)

    for i, (a, d) in enumerate(jobs):
        env.process(work(i, a, d))
    env.run()
    return out


jobs = st.lists(st.tuples(st.integers(0, 50), st.integers(1, 400)), min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(jobs, st.integers(1, 4), st.sampled_from([0.0, 0.5, 2.0]))
def test_storage_channel_equals_simpy(raw, depth, latency):
    arrivals = np.cumsum([a for a, _ in raw]) / 10.0          # nondecreasing submissions
    jobs_ = [(float(t), n) for t, (_, n) in zip(arrivals, raw)]
    ch = StorageChannel(100.0, latency, depth)
    ours = [ch.reserve(a, n) for a, n in jobs_]
    ref = simpy_storage(jobs_, 100.0, latency, depth)
    assert np.allclose(ours, ref)


@settings(max_examples=80, deadline=None)
@given(jobs, st.integers(1, 4))
def test_fifo_pool_equals_simpy(raw, workers):
    arrivals = np.cumsum([a for a, _ in raw]) / 10.0
    jobs_ = [(float(t), d / 100.0) for t, (_, d) in zip(arrivals, raw)]
    pool = FifoServer(workers)
    ours = [pool.reserve(a, d)[:2] for a, d in jobs_]
    assert np.allclose(ours, simpy_pool(jobs_, workers))
