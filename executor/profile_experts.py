"""`moelab profile`'s expert-call tables (compute.measured.experts): seconds of the executor's own
call, ExpertRuntime._compute (decode / dequantize / re-assemble the resident parts, the matmuls,
its timeline record), per format, level and token count, with the executor's torch threads,
cycling over the model's experts.

The cells are timed interleaved: each round times every (format, level, tokens) cell once, in a
seeded random order, and a cell's figure is its mean over the rounds (the simulator adds these
times up, so a table carries their mean, the occasional slow call included). A shared VM's speed
flips in bursts of a few hundred ms (executor/host_probe.py). Timed one cell after another, a burst
falls on the few cells timed during it: on this project's 2-vCPU VM one profile's bf16 row read
198, 273, 266, 208, 179 us for 1, 2, 4, 8, 16 tokens, and the next profile's mwq rows were 40-60%
above the first's while its bf16 row was within 10%. Interleaved, every cell takes the same share
of whatever the host did while the tables were timed, so a row keeps its shape and the formats
their ratios (`python -m executor.benchmark_expert_tables` measures both orders side by side).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from devices.profile import measured_key
from executor.encoders import get_encoder, resident_part
from executor.execute import _set_numba_threads
from executor.io import BlobReader
from executor.runtime import ExpertRuntime, StepInfo
from policies import build_online_policies
from policies.base import Key

WARMUP_ROUNDS = 2


@dataclass
class Cell:
    key: str                        # the format's measured key (devices/profile.py measured_key)
    level: int
    tokens: int
    call: Callable[[int], float]    # call(i): time the i-th sample's call, in seconds


def timed_means(cells: list[Cell], rounds: int, interleaved: bool = True, seed: int = 0) -> list[float]:
    """Each cell's mean seconds over `rounds` samples (after WARMUP_ROUNDS untimed ones). Interleaved:
    round by round, every cell once per round in a seeded random order; otherwise (`interleaved=False`,
    the order tables were once timed in, kept to compare) each cell's samples back to back."""
    samples = range(-WARMUP_ROUNDS, rounds)
    if interleaved:
        rng = np.random.default_rng(seed)
        order = [(r, j) for r in samples for j in rng.permutation(len(cells))]
    else:
        order = [(r, j) for j in range(len(cells)) for r in samples]
    sums = [0.0] * len(cells)
    for r, j in order:
        t = cells[j].call(r)
        if r >= 0:
            sums[j] += t
    return [s / rounds for s in sums]


def _caller(rt: ExpertRuntime, arch, pairs: list, level: int, n: int) -> Callable[[int], float]:
    """One cell's timed call: n tokens routed to the i-th (layer, expert) of `pairs` (its first slot)."""
    hidden = torch.randn(n, arch.d_model, device=rt.device)
    gates = torch.full((n, arch.top_k), 1.0 / arch.top_k, device=rt.device)
    rows = list(range(n))

    def call(i: int) -> float:
        layer, e = pairs[i % len(pairs)]
        ids = torch.full((n, arch.top_k), (e + 1) % arch.experts, device=rt.device)
        ids[:, 0] = e
        out = torch.zeros_like(hidden)
        t0 = time.perf_counter()
        rt._compute(out, hidden, ids, gates, layer, (e, level), rows)
        return time.perf_counter() - t0
    return call


def format_cells(p, fmt_name: str) -> tuple[list[Cell], int]:
    """The cells of one format (every level x token count) on an ExpertRuntime whose memory holds
    every part resident, and the number of experts its calls cycle over. `p`: a HostProfiler."""
    store = p.store(fmt_name)
    fmt = store.format
    _set_numba_threads(fmt, p.threads)                  # as execute() does
    enc = get_encoder(fmt.name)
    rt = ExpertRuntime(store, build_online_policies(p.arch, fmt, 10 ** 12), activation=p.model.cfg.activation,
                       io=None, torch_device=p.torch_device)
    rt.begin_step(StepInfo(0, 0, False, 1, 1))
    n_experts = min(len(store.keys()) // fmt.n_parts, 16 if p.quick else 64)
    every = [(layer, e) for layer in range(p.arch.layers) for e in range(p.arch.experts)]
    with BlobReader(store) as reader:
        for k in (Key(layer, e, q) for layer, e in every for q in range(fmt.n_parts)):
            rt.memory.buffers[k] = resident_part(enc, fmt, k.part, bytes(reader.read(k)))
    pairs = every[:n_experts]
    return [Cell(measured_key(fmt), level, n, _caller(rt, p.arch, pairs, level, n))
            for level in range(fmt.levels) for n in p.tokens], n_experts


def expert_tables(p, formats, bar=None, interleaved: bool = True, seed: int = 0) -> dict:
    """{format key: [[seconds per token count] per level]}, every format's cells timed together."""
    saved = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        cells, rounds = [], 0
        for fmt_name in formats:
            got, n_experts = format_cells(p, fmt_name)
            cells += got
            rounds = max(rounds, p.repeats * 4, n_experts)      # every expert at least once per cell
        means = timed_means(cells, rounds, interleaved, seed)
    finally:
        torch.set_num_threads(saved)
    tables: dict = {}
    for cell, mean in zip(cells, means):
        levels = tables.setdefault(cell.key, [])
        if cell.level == len(levels):
            levels.append([])
        levels[cell.level].append(mean)
        if bar is not None:
            bar.update(1)
    return tables
