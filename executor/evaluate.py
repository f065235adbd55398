"""`moelab eval`: held-out perplexity of the trained model with its experts at each precision
(D²MoE's Table 3 shape: one row per system, with its average bits per weight).

Rows: bf16 (the shipped weights), plain per-group INT-b (executor/mwq.py quantize_int, the
min/max reference), every MWQ level of ladders V1 (INT2-4) and V2 (INT5-8) for each base fit
(executor/mwq.py quantize base_fit: a level row is the `fixed` allocator at that level), and
each bit allocator (gate-score, capacity, learned) at the average bits it ends up using.

Everything runs in memory: every level of every expert is dequantized once and held
(executor/levels.py), and an expert_fn (executor/model.py) computes each (token, slot) at the
level chosen for it, with accumulate_expert's `rows`. The held-out text is executor/corpus.py's
(stdlib_corpus's held-out split, eval_windows) and the perplexity per byte executor/train.py's
(evaluate); `windows` of them, evenly spaced.

Quantization is the store's (executor/mwq.py, no calibration data: MwqEncoder), with the store's
group size (workloads/formats.py default_group: 32 for tiny-moe). "avg bits" is token-weighted: the mean over every (token, layer, slot)
of the bit-width the expert was computed at; "stored bits" adds the fp16 scales and zero points
(the bytes the store reads per weight at that level).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from devices.atomic import atomic_write
from devices.units import ConfigError
from executor.bit_router import default_path, load_bit_router
from executor.corpus import eval_windows, stdlib_corpus
from executor.levels import LevelWeights, bf16_levels, expert_shapes, int_levels, mwq_levels, store_group
from executor.model import MoETransformer, accumulate_expert, model_arch
from executor.mwq import BASE_FITS, DEFAULT_BASE_FIT
from executor.train import DEFAULT_MODEL, evaluate, load_trained
from workloads.formats import MWQ_LADDERS, make_format

ALLOCATOR_ROWS = ("gate-score", "capacity", "learned")


def allocator_variants(name: str, levels: int) -> list[tuple[str, dict]]:
    """(row label, options) of an allocator's rows. gate-score twice: its defaults, and with
    thresholds no second expert reaches (top-1 at the top level, the others at the base), which
    uses (b1 + bK) / 2 bits with top-2: the capacities' average bits on V1 (3.0) and V2 (6.5)."""
    if name == "gate-score":
        return [(name, {}), (f"{name} (top-1 top, rest base)", {"thresholds": [0.6 + 0.1 * j for j in
                                                                                range(levels - 1)]})]
    return [(name, {})]


# -- the expert_fn --------------------------------------------------------------------------
Chooser = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]


class LevelExperts:
    """expert_fn computing each (token, slot) at the level `choose(layer, hidden, ids, gates)`
    gives (uint8 [tokens, k]; None: every slot at level 0). Tallies the bits used."""

    def __init__(self, lw: LevelWeights, activation: str = "silu", choose: Optional[Chooser] = None):
        self.lw, self.activation, self.choose = lw, activation, choose
        self.bits = self.stored = 0.0
        self.slots = 0

    def __call__(self, layer, hidden, ids, gates):
        levels = None if self.choose is None else self.choose(layer, hidden, ids, gates)
        lv = torch.zeros_like(ids) if levels is None else torch.as_tensor(np.asarray(levels), dtype=torch.long)
        if lv.shape != ids.shape or int(lv.min()) < 0 or int(lv.max()) >= self.lw.levels:
            raise ConfigError(f"eval: levels of shape {tuple(lv.shape)} in 0..{self.lw.levels - 1} needed for "
                              f"ids {tuple(ids.shape)}; got range {int(lv.min())}..{int(lv.max())}")
        counts = torch.bincount(lv.reshape(-1), minlength=self.lw.levels).tolist()
        self.bits += sum(c * b for c, b in zip(counts, self.lw.bits))
        self.stored += sum(c * b for c, b in zip(counts, self.lw.stored_bits))
        self.slots += ids.numel()
        out = torch.zeros_like(hidden)
        W = self.lw.weights[layer]
        for e, lvl in torch.unique(torch.stack([ids.reshape(-1), lv.reshape(-1)], 1), dim=0).tolist():
            rows = torch.where(((ids == e) & (lv == lvl)).any(1))[0]
            accumulate_expert(out, hidden, ids, gates, e, W[e][lvl], self.activation, rows=rows)
        return out


def fixed_level(level: int) -> Chooser:
    return lambda layer, hidden, ids, gates: np.full(tuple(ids.shape), level, np.uint8)


def allocator_levels(policies, level_fn=None) -> Chooser:
    """Levels from the demand of a policy bundle's decision point (policies/bundle.py), as the
    executor gets them; every level is resident here, so only the allocator's choice matters
    (level_fn: a bit-width router, its levels reach the allocator as Routing.levels)."""
    from policies.base import Routing

    def choose(layer, hidden, ids, gates):
        ids_np = ids.cpu().numpy()
        levels = None if level_fn is None else level_fn(layer, hidden, ids, gates)
        demand = policies.decide(layer, Routing(ids_np, gates.float().cpu().numpy(), levels)).demand
        policies.finish(layer)
        out = np.empty(ids_np.shape, np.uint8)
        for t, token in enumerate(demand.per_token):
            got = dict(token)
            out[t] = [got[e] for e in ids_np[t].tolist()]
        return out
    return choose


def perplexity(model: MoETransformer, windows: torch.Tensor, fn: LevelExperts, batch: int = 32) -> float:
    """Held-out loss (nats per byte) with the experts computed by fn (executor/train.py evaluate)."""
    model.set_expert_fn(fn)            # evaluate() runs it and resets the hook
    return evaluate(model, windows, batch=batch)


def heldout_windows(n: Optional[int] = 256, seq: Optional[int] = None, max_seq: int = 256) -> torch.Tensor:
    """n evenly spaced windows of the held-out split the model was scored on (executor/corpus.py)."""
    return eval_windows(stdlib_corpus(max_bytes=1).heldout, seq or max_seq, n)


# -- the table ---------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    ladder: str
    base_fit: str
    level: str
    avg_bits: float
    stored_bits: float
    loss_nats: float
    perplexity: float
    vs_bf16_pct: float = 0.0


def allocator_bundle(model: MoETransformer, ladder: str, group: int, allocator: str, **options):
    """A policy bundle around `allocator` with room for every expert (nothing is loaded here)."""
    from policies import build_online_policies
    fmt = make_format("mwq", expert_shapes(model), ladder=ladder, group=group)
    return build_online_policies(model_arch(model), fmt, 2 ** 62, allocator=allocator, allocator_options=options)


def eval_table(model: MoETransformer, windows: torch.Tensor, *, ladders: Sequence[str] = ("v1", "v2"),
               fits: Sequence[str] = BASE_FITS, plain_bits: Sequence[int] = (8, 4, 2, 3, 5, 6, 7),
               allocators: Sequence[str] = ALLOCATOR_ROWS, routers: Optional[dict] = None,
               base_fit: str = DEFAULT_BASE_FIT, quiet: bool = False, notes: Optional[list] = None) -> list[Row]:
    """The rows (module doc). routers: {ladder: BitRouter} for the `learned` rows (missing: row
    left out, with a line in `notes`); allocator rows use `base_fit`."""
    from policies import ALLOCATORS
    routers = routers or {}
    notes = notes if notes is not None else []
    act, group = model.cfg.activation, store_group(model)
    jobs: list = [("bf16", lambda: bf16_levels(model), None, "", "", "")]
    jobs += [(f"INT{b}", (lambda b=b: int_levels(model, b, group)), None, "", "", str(b)) for b in plain_bits]
    cache: dict = {}

    def lw(ladder, fit):
        if (ladder, fit) not in cache:
            cache[(ladder, fit)] = mwq_levels(model, ladder, fit, group)
        return cache[(ladder, fit)]
    for ladder in ladders:
        b1, bK = MWQ_LADDERS[ladder]
        for fit in fits:
            for k in range(bK - b1 + 1):
                jobs.append((f"MWQ INT{b1 + k} (fixed {k})", (lambda ladder=ladder, fit=fit: lw(ladder, fit)),
                             fixed_level(k), ladder, fit, str(k)))
        for name in allocators:
            if name not in ALLOCATORS:
                notes.append(f"allocator {name!r} is not registered (policies/__init__.py): row left out")
                continue
            level_fn = None
            if name == "learned":
                level_fn = routers.get(ladder)
                if level_fn is None:
                    notes.append(f"learned {ladder.upper()}: no bit router (train one: `moelab train-bit-router "
                                 f"--ladder {ladder}`): row left out")
                    continue
                if getattr(level_fn, "base_fit", base_fit) != base_fit:
                    notes.append(f"learned {ladder.upper()}: the router was trained on base fit "
                                 f"{level_fn.base_fit!r}, evaluated on {base_fit!r}")
            for label, options in allocator_variants(name, bK - b1 + 1):
                bundle = allocator_bundle(model, ladder, group, name, **options)
                jobs.append((label, (lambda ladder=ladder: lw(ladder, base_fit)), allocator_levels(bundle, level_fn),
                             ladder, base_fit, "mixed"))
    rows: list[Row] = []
    for method, weights, choose, ladder, fit, level in tqdm(jobs, disable=quiet, desc="eval", unit="row"):
        fn = LevelExperts(weights(), act, choose)
        nats = perplexity(model, windows, fn)
        rows.append(Row(method, ladder.upper(), fit, level, fn.bits / fn.slots, fn.stored / fn.slots, nats,
                        math.exp(nats)))
    base = rows[0].perplexity
    for r in rows:
        r.vs_bf16_pct = 100 * (r.perplexity / base - 1)
    return rows


def rows_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def rows_markdown(rows: Sequence[Row], title: str = "", notes: Sequence[str] = ()) -> str:
    """The table, then the level-by-level comparison of the base fits against plain INT."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| method | ladder | base fit | avg bits | stored bits | perplexity | vs bf16 |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.ladder or '-'} | {r.base_fit or '-'} | {r.avg_bits:.2f} | "
                     f"{r.stored_bits:.2f} | {r.perplexity:.4f} | {r.vs_bf16_pct:+.2f}% |")
    plain = {r.level: r.perplexity for r in rows if r.method.startswith("INT")}
    fixed = [r for r in rows if r.method.startswith("MWQ")]
    fits = sorted({r.base_fit for r in fixed}, key=lambda f: BASE_FITS.index(f) if f in BASE_FITS else 99)
    if fixed:
        lines += ["", "Level by level (perplexity):", "",
                  "| ladder | level | plain INT | " + " | ".join(f"MWQ {f}" for f in fits) + " |",
                  "|---|---|---:|" + "---:|" * len(fits)]
        seen = []
        for r in fixed:
            if (r.ladder, r.level) in seen:
                continue
            seen.append((r.ladder, r.level))
            bits = r.method.split()[1]
            by_fit = {x.base_fit: x.perplexity for x in fixed if (x.ladder, x.level) == (r.ladder, r.level)}
            p = plain.get(bits[3:])
            lines.append(f"| {r.ladder} | {bits} | {'-' if p is None else f'{p:.4f}'} | "
                         + " | ".join(f"{by_fit[f]:.4f}" if f in by_fit else "-" for f in fits) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Row], out_dir, title: str = "", notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """eval.csv and eval.md in out_dir, each written atomically."""
    out = Path(out_dir)
    csv_path, md_path = out / "eval.csv", out / "eval.md"
    atomic_write(csv_path, rows_csv(rows))
    atomic_write(md_path, rows_markdown(rows, title, notes))
    return csv_path, md_path


def run_eval(model_dir=None, out_dir="runs/eval", *, windows: Optional[int] = 128,
             ladders: Sequence[str] = ("v1", "v2"), fits: Sequence[str] = BASE_FITS,
             base_fit: Optional[str] = None, bit_routers: Sequence[str] = (), quiet: bool = False):
    """`moelab eval`: the table for the trained model in model_dir (default: the shipped tiny-moe),
    printed and written to out_dir (eval.csv, eval.md). bit_routers: router files for the learned
    rows (default: bit_router-LADDER.safetensors beside the model, where present)."""
    base_fit = base_fit or DEFAULT_BASE_FIT
    for name, values, allowed in (("--ladder", ladders, MWQ_LADDERS), ("--base-fit", list(fits) + [base_fit],
                                                                       BASE_FITS)):
        for v in values:
            if v not in allowed:
                raise ConfigError(f"eval: {name} {v!r} unknown; allowed: {', '.join(allowed)}")
    model_dir = Path(model_dir or DEFAULT_MODEL)
    model, _, cfg = load_trained(model_dir)
    routers = {}
    for path in bit_routers:
        r = load_bit_router(path, model)
        routers[r.ladder] = r
    for ladder in ladders:
        if ladder not in routers and default_path(model_dir, ladder).is_file():
            routers[ladder] = load_bit_router(default_path(model_dir, ladder), model)
    win = heldout_windows(windows, max_seq=cfg.max_seq)
    notes: list[str] = []
    rows = eval_table(model, win, ladders=ladders, fits=fits, routers=routers, base_fit=base_fit, quiet=quiet,
                      notes=notes)
    notes.insert(0, f"model {model_dir.name}; held-out text: {win.shape[0]} windows of {win.shape[1] - 1} bytes "
                    f"({win[:, 1:].numel()} bytes; executor/corpus.py split); group size {store_group(model)}; "
                    f"allocator rows on base fit {base_fit!r}")
    title = f"Held-out perplexity per byte of {model_dir.name} by expert precision"
    paths = write_table(rows, out_dir, title, notes)
    print(rows_markdown(rows, title, notes), end="")
    if not quiet:
        print(f"wrote {paths[0]} and {paths[1]}")
    return rows
