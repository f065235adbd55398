"""Issue 24 item 1: the processor-sharing cores and the interpreter lock (sim/host_servers.py),
timelines worked out by hand in the comments. Times in seconds."""
import pytest

from sim.host_servers import (InterpreterLock, Operation, ProcessorSharing, Segment, operation, operation_ends,
                              run_threads)


def spans_of(spans):
    return [(s.thread, s.kind, round(s.asked, 9), round(s.start, 9), round(s.end, 9)) for s in spans]


def test_processor_sharing_two_threads_on_one_core():
    """Job A (2 s of work) at 0, job B (0.5 s) at 1, one core. [0, 1): A alone, 1 s done, 1 s left.
    From 1 both run at 1/2: B's 0.5 s takes 1 s, ending at 2; A has done 0.5 more by then (0.5 left),
    alone again: ends at 2.5. On two cores nobody slows: A at 2, B at 1.5."""
    assert ProcessorSharing(1).finish_times([(0, 2.0), (1, 0.5)]) == pytest.approx([2.5, 2.0])
    assert ProcessorSharing(2).finish_times([(0, 2.0), (1, 0.5)]) == pytest.approx([2.0, 1.5])


def test_processor_sharing_n_above_c_runs_at_c_over_n():
    """Three 1 s jobs at 0 on two cores: each at 2/3 speed, all end at 1.5; on one core at 1/3: 3."""
    assert ProcessorSharing(2).finish_times([(0, 1.0)] * 3) == pytest.approx([1.5] * 3)
    assert ProcessorSharing(1).finish_times([(0, 1.0)] * 3) == pytest.approx([3.0] * 3)
    assert ProcessorSharing(2).speed(4) == 0.5 and ProcessorSharing(2).speed(1) == 1.0


def test_a_wide_kernel_counts_its_width():
    """A 2-wide kernel (1 s alone) and a 1-wide job (1 s) at 0 on 2 cores: demand 3, speed 2/3,
    both end at 1.5 (3 core-seconds on 2 cores)."""
    spans = run_threads([[Operation(0, (Segment("core", 1.0, width=2),))], [Operation(0, (Segment("core", 1.0),))]], 2)
    assert [s.end for s in spans] == pytest.approx([1.5, 1.5])


def test_the_lock_two_threads_half_held_on_two_cores():
    """Two threads, each one operation of 1 s holding the lock for half of it (held part first),
    both ready at 0, two cores. A (thread 0, first in order) holds [0, 0.5]; B asks at 0 and waits.
    At 0.5 A releases: B holds [0.5, 1.0] while A runs its released half [0.5, 1.0] on the other
    core. B's released half: [1.0, 1.5]. The lock alone costs B 0.5 s."""
    spans = run_threads([[operation(1.0, 0.5)], [operation(1.0, 0.5)]], 2)
    assert spans_of(spans) == [(0, "lock", 0, 0, 0.5), (0, "core", 0.5, 0.5, 1.0), (1, "lock", 0, 0.5, 1.0),
                               (1, "core", 1.0, 1.0, 1.5)]
    assert operation_ends(spans) == pytest.approx({(0, 0): 1.0, (1, 0): 1.5})


def test_the_lock_two_threads_half_held_on_one_core():
    """The same on one core. [0, 0.5]: A holds, alone runnable (B is blocked on the lock, not
    running). From 0.5 A's released half and B's held half share the core at 1/2: both 0.5 s of
    work take 1 s, ending at 1.5. B's released half then runs alone: [1.5, 2.0]. 2 s of work, one
    core never idle: the last end is 2.0."""
    spans = run_threads([[operation(1.0, 0.5)], [operation(1.0, 0.5)]], 1)
    assert spans_of(spans) == [(0, "lock", 0, 0, 0.5), (0, "core", 0.5, 0.5, 1.5), (1, "lock", 0, 0.5, 1.5),
                               (1, "core", 1.5, 1.5, 2.0)]


def test_a_main_thread_and_a_reader_on_one_core():
    """The executor's shape, one core. Main thread: decision path 0.2 s under the lock, then an
    expert kernel of 1.0 s (released). Reader: submit 0.1 s (lock), the device 0.5 s (wait),
    checksum 0.2 s (released), callback 0.1 s (lock).
    0: main holds the lock, alone runnable; the reader waits for it.  0.2: main releases; the
    reader holds it; both run at 1/2: its 0.1 s submit ends at 0.4 (main's kernel 0.1 done).
    0.4 - 0.9: the reader waits on the device; main alone (0.5 more: 0.4 of its kernel left).
    0.9: checksum and kernel at 1/2: the checksum's 0.2 s ends at 1.3 (kernel: 0.2 left).
    1.3: the callback gets the lock at once (main is in its kernel); at 1/2 it ends at 1.5
    (kernel: 0.1 left), which main then finishes alone at 1.6 = the 1.6 s of CPU work in all."""
    main = Operation(0, (Segment("lock", 0.2), Segment("core", 1.0)))
    reader = Operation(0, (Segment("lock", 0.1), Segment("wait", 0.5), Segment("core", 0.2), Segment("lock", 0.1)))
    spans = run_threads([[main], [reader]], 1)
    assert spans_of(spans) == [(0, "lock", 0, 0, 0.2), (1, "lock", 0, 0.2, 0.4), (1, "wait", 0.4, 0.4, 0.9),
                               (1, "core", 0.9, 0.9, 1.3), (1, "lock", 1.3, 1.3, 1.5), (0, "core", 0.2, 0.2, 1.6)]


def test_a_main_thread_and_a_reader_on_two_cores():
    """The same on two cores: nothing slows for the cores; only the lock costs. Main: lock [0, 0.2],
    kernel [0.2, 1.2]. Reader: submit waits for the lock, [0.2, 0.3]; device [0.3, 0.8]; checksum
    [0.8, 1.0]; callback [1.0, 1.1] (the lock is free: main is in its kernel)."""
    main = Operation(0, (Segment("lock", 0.2), Segment("core", 1.0)))
    reader = Operation(0, (Segment("lock", 0.1), Segment("wait", 0.5), Segment("core", 0.2), Segment("lock", 0.1)))
    spans = run_threads([[main], [reader]], 2)
    assert spans_of(spans) == [(0, "lock", 0, 0, 0.2), (1, "lock", 0, 0.2, 0.3), (1, "wait", 0.3, 0.3, 0.8),
                               (1, "core", 0.8, 0.8, 1.0), (1, "lock", 1.0, 1.0, 1.1), (0, "core", 0.2, 0.2, 1.2)]


def test_two_pieces_alternate_the_lock():
    """Each thread: 1 s holding the lock for half, in 2 pieces (lock 0.25, free 0.25, lock 0.25,
    free 0.25), two cores. A: lock [0, .25], free [.25, .5]; B holds [.25, .5]. At .5 B releases
    and A asks again (ends come before the next segments): A holds [.5, .75], B free [.5, .75];
    at .75 A releases, B asks and holds [.75, 1.0]; A free [.75, 1.0]; B free [1.0, 1.25]."""
    op = operation(1.0, 0.5, pieces=2)
    assert [s.kind for s in op.segments] == ["lock", "core", "lock", "core"]
    ends = operation_ends(run_threads([[op], [op]], 2))
    assert ends == pytest.approx({(0, 0): 1.0, (1, 0): 1.25})


def test_operations_run_in_order_from_their_ready_time():
    """One thread, two 1 s operations ready at 0 and 0.5: the second begins when the first ends
    (1.0), not at its ready time; a third ready at 3 waits for 3."""
    ops = [Operation(0, (Segment("core", 1.0),)), Operation(0.5, (Segment("core", 1.0),)),
           Operation(3, (Segment("core", 0.5),))]
    ends = operation_ends(run_threads([ops], 1))
    assert ends == pytest.approx({(0, 0): 1.0, (0, 1): 2.0, (0, 2): 3.5})


def test_the_lock_serves_waiters_first_come_first_served():
    lock = InterpreterLock()
    assert lock.request(0) and not lock.request(2) and not lock.request(1)
    assert lock.release(0) == 2 and lock.release(2) == 1 and lock.release(1) is None
    with pytest.raises(RuntimeError):
        lock.release(1)


def test_bad_segments_are_refused():
    with pytest.raises(ValueError):
        Segment("sleep", 1.0)
    with pytest.raises(ValueError):
        Segment("lock", 1.0, width=2)
    with pytest.raises(ValueError):
        operation(1.0, 1.5)
