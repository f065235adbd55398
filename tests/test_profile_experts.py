"""The expert-call tables' timing order (executor/profile_experts.py): interleaved rounds give every
cell the same share of a slow spell of the host; cells timed back to back leave it on a few."""
import pytest

from executor.profile_experts import WARMUP_ROUNDS, Cell, timed_means


def burst_cells(n_cells: int, burst: range):
    """Cells whose every call takes 1 s, or 2 s while the host's global call count is in `burst`."""
    calls = []

    def make(j):
        def call(i):
            calls.append((j, i))
            return 2.0 if len(calls) - 1 in burst else 1.0
        return call
    return [Cell("bf16", 0, j, make(j)) for j in range(n_cells)], calls


def test_a_burst_lands_on_every_cell_alike_when_interleaved():
    """8 cells x (2 warm-up + 20) samples = 176 calls; a 2x burst over calls 44-87 (a quarter). Back to
    back it doubles cells 2 and 3 (each timed wholly inside it: 2 s) and leaves the rest at 1 s;
    interleaved, every cell takes 5 or 6 of its 20 samples in it (1.25-1.3 s)."""
    cells, _ = burst_cells(8, range(44, 88))
    blocked = timed_means(cells, 20, interleaved=False)
    assert blocked == [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    cells, calls = burst_cells(8, range(44, 88))
    mixed = timed_means(cells, 20)
    assert all(1.2 <= m <= 1.35 for m in mixed) and max(mixed) - min(mixed) <= 0.1
    assert sum(mixed) * 20 == pytest.approx(8 * 20 + 44)        # the 44 burst calls all past the warm-ups
    # each round calls every cell once (its sample index the round), the warm-ups first
    for r in range(-WARMUP_ROUNDS, 20):
        chunk = calls[(r + WARMUP_ROUNDS) * 8:(r + WARMUP_ROUNDS + 1) * 8]
        assert sorted(j for j, _ in chunk) == list(range(8)) and {i for _, i in chunk} == {r}


def test_the_order_is_seeded_and_shuffled_per_round():
    cells, first = burst_cells(5, range(0))
    timed_means(cells, 6, seed=3)
    cells, again = burst_cells(5, range(0))
    timed_means(cells, 6, seed=3)
    assert first == again
    orders = {tuple(j for j, _ in first[k * 5:(k + 1) * 5]) for k in range(8)}
    assert len(orders) > 1                                   # not one fixed order every round
