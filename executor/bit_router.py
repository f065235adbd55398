"""D²MoE's bit-width router: per MoE layer, a linear map from the token's hidden state to
logits over the K levels of an MWQ ladder, for each expert (papers.md, "Dual routing").

    router = train_bit_router(model, "v1", minutes=15)      # the paper's loss, on the trained model
    save_bit_router(router, path); router = load_bit_router(path, model)
    levels = router(layer, hidden [T, d], ids [T, k], gates)  # numpy uint8 [T, k]: a level_fn

Module. Layer l holds one nn.Linear(d_model, experts * K): the K logits of token x in front of
expert e are rows e*K .. e*K+K-1 (about 6.2k parameters per layer for V1 on tiny-moe). p = softmax
of those logits; the token's score for that expert is its expected level sum_k k p_k.

Loss (the paper's eq. 1): KL(full-precision model || model with the routed levels) on the LM
head's next-byte distributions, plus alpha times the expected bits, sum_k p_k b_k, averaged over
(token, slot) and layers. The full-precision model is the shipped one with its bf16 experts; the
quantized experts are every MWQ level dequantized in memory (executor/levels.py mwq_levels).

Capacities c_k (sum 1; V1 {0.3, 0.4, 0.3}, V2 0.25 each). The paper lets each token take its
level and drops the tokens over c_k*T at random (they skip the expert). Here the capacities are
enforced by rank instead, in training as at inference: of the tokens routed to an expert, the
c_1 with the lowest scores run at level 0, the next c_2 at level 1, and so on. The router then
always meets the capacities, so its average bits are theirs (V1 3.0, V2 6.5), the bits the
`capacity` allocator (which ranks by gate score) uses: the two differ only in the ranking. In
training the rank is taken within the batch and the choice is made differentiable with a
straight-through estimator (forward: the one-hot level; backward: through p, every level's
expert output is computed). At inference a step has too few tokens to rank, so per (layer,
expert) thresholds on the score, the capacities' quantiles over calibration text (run through the
routed, quantized model, layer by layer), give the level: the paper's selection rule is unknown.

Initialisation and alpha (measured on tiny-moe, V1, 96 held-out windows). Zero-initialised,
163 steps reached perplexity 3.5622 (capacity allocator: 3.5582). Started from the expert
router instead (init_from_router: level k's logits are (k - (K-1)/2) times the router's logit
of the expert, a gate-like ranking) it starts at 3.5579; with alpha = 0.01 the expected-bits
gradient (0.01 x ~3 bits against a KL of ~0.006 nats) outweighed the distillation and moved it
to 3.5648 in 135 steps; with alpha = 0, 797 steps ended at 3.5593. Under rank-enforced
capacities the bits term cannot change the average bits, only reshuffle the ranking, so the
default alpha is small (1e-4).

Saved as safetensors (atomically): layers.{l}.weight, layers.{l}.bias, thresholds [L, E, K-1],
with the ladder, capacities, alpha, base fit and training figures in the metadata.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from devices.atomic import save_safetensors_atomic
from devices.units import ConfigError
from executor.corpus import eval_windows, sample_batch, stdlib_corpus
from executor.levels import mwq_levels
from executor.model import MoETransformer, run_expert
from executor.mwq import DEFAULT_BASE_FIT
from workloads.formats import MWQ_LADDERS

CAPACITIES = {"v1": (0.3, 0.4, 0.3), "v2": (0.25, 0.25, 0.25, 0.25)}


def default_path(model_dir: Union[str, Path], ladder: str) -> Path:
    """Where a bit router of `ladder` lives beside its model."""
    return Path(model_dir) / f"bit_router-{ladder}.safetensors"


def check_capacities(capacities: Sequence[float], levels: int, where: str = "bit router") -> tuple:
    c = tuple(float(x) for x in capacities)
    if len(c) != levels or any(x < 0 for x in c) or abs(sum(c) - 1) > 1e-6:
        raise ConfigError(f"{where}: capacities must be {levels} non-negative numbers summing to 1 (one per level), "
                          f"got {list(c)}")
    return c


def rank_levels(score: torch.Tensor, ids: torch.Tensor, capacities: Sequence[float]) -> torch.Tensor:
    """Levels [T, k] (long): per expert, its tokens by ascending score, the first c_1 share at
    level 0, the next c_2 at level 1, ... (shares rounded at the cumulative bounds)."""
    levels = torch.empty_like(ids)
    cum = torch.tensor(np.cumsum(capacities)[:-1], dtype=torch.float64)
    flat_ids, flat_score, flat_lv = ids.reshape(-1), score.reshape(-1), levels.view(-1)
    for e in flat_ids.unique().tolist():
        pos = torch.where(flat_ids == e)[0]
        order = pos[torch.argsort(flat_score[pos], stable=True)]
        bounds = torch.round(cum * len(pos)).long()
        flat_lv[order] = torch.bucketize(torch.arange(len(pos)), bounds, right=True)
    return levels


class BitRouter(nn.Module):
    """One linear map per MoE layer: hidden [T, d] -> logits [T, experts, K]; called as a level_fn."""

    def __init__(self, n_layers: int, d_model: int, experts: int, ladder: str = "v1",
                 capacities: Optional[Sequence[float]] = None, base_fit: str = DEFAULT_BASE_FIT, meta=None):
        super().__init__()
        if ladder not in MWQ_LADDERS:
            raise ConfigError(f"bit router: unknown ladder {ladder!r}; known: {', '.join(MWQ_LADDERS)}")
        b1, bK = MWQ_LADDERS[ladder]
        self.ladder, self.levels, self.experts, self.base_fit = ladder, bK - b1 + 1, experts, base_fit
        self.capacities = check_capacities(capacities or CAPACITIES.get(ladder, [1 / self.levels] * self.levels),
                                           self.levels)
        self.register_buffer("bits", torch.arange(b1, bK + 1, dtype=torch.float32), persistent=False)
        self.proj = nn.ModuleList([nn.Linear(d_model, experts * self.levels) for _ in range(n_layers)])
        for p in self.proj:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.register_buffer("thresholds", torch.zeros(n_layers, experts, self.levels - 1))
        self.meta = dict(meta or {})

    def logits(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[T, k, K]: the level logits of each token for each of its routed experts."""
        z = self.proj[layer](hidden.float()).view(hidden.shape[0], self.experts, self.levels)
        return z.gather(1, ids[..., None].expand(-1, -1, self.levels))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected level under softmax(logits), [T, k]."""
        return (logits.softmax(-1) * torch.arange(self.levels, dtype=logits.dtype)).sum(-1)

    @torch.no_grad()
    def init_from_router(self, model: MoETransformer) -> "BitRouter":
        """Start from the expert router: level k's logit for expert e is (k - (K-1)/2) times the
        router's logit of e, so a token's score rises with its router logit (a gate-score-like
        ranking that training then refines)."""
        steps = torch.arange(self.levels, dtype=torch.float32) - (self.levels - 1) / 2
        for proj, moe in zip(self.proj, model.moe_layers):
            w = moe.router.weight.detach().float()                              # [E, d]
            proj.weight.copy_((steps[None, :, None] * w[:, None, :]).reshape(-1, w.shape[1]))
            proj.bias.zero_()
        return self

    @torch.no_grad()
    def forward(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, gates=None) -> np.ndarray:
        """The executor's level_fn: uint8 levels [T, k] from the thresholds."""
        dev = self.bits.device                  # the router stays where it was loaded (CPU)
        hidden, ids = hidden.to(dev), ids.to(dev, torch.long)
        s = self.score(self.logits(layer, hidden, ids))
        thr = self.thresholds[layer][ids]                      # [T, k, K-1]
        return (s[..., None] > thr).sum(-1).to(torch.uint8).cpu().numpy()


# -- training -------------------------------------------------------------------------------
class _Experts:
    """expert_fn for training and calibration: each (token, slot) at its rank level (module doc);
    in training the output carries p's gradient (straight-through), in calibration (set_thresholds)
    each layer's thresholds are set from its scores before its experts run."""

    def __init__(self, router: BitRouter, lw, activation: str, calibrate: bool = False):
        self.router, self.lw, self.activation, self.calibrate = router, lw, activation, calibrate
        self.expected_bits: list[torch.Tensor] = []
        self.level_counts = torch.zeros(router.levels, dtype=torch.long)

    def __call__(self, layer, hidden, ids, gates):
        r = self.router
        logits = r.logits(layer, hidden, ids)
        p = logits.softmax(-1)
        self.expected_bits.append((p * r.bits).sum(-1).mean())
        score = (p * torch.arange(r.levels, dtype=p.dtype)).sum(-1).detach()
        if self.calibrate:
            _set_thresholds(r, layer, score, ids)
        levels = rank_levels(score, ids, r.capacities)
        self.level_counts += torch.bincount(levels.reshape(-1), minlength=r.levels)
        w = F.one_hot(levels, r.levels).to(p.dtype)
        if torch.is_grad_enabled():
            w = w + p - p.detach()                        # straight-through
        out = torch.zeros_like(hidden)
        W = self.lw.weights[layer]
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            x = hidden[tok]
            y = sum(w[tok, slot, k, None] * run_expert(x, W[e][k], self.activation) for k in range(r.levels))
            out = out.index_add(0, tok, y * gates[tok, slot, None].to(x.dtype))
        return out


def _set_thresholds(router: BitRouter, layer: int, score: torch.Tensor, ids: torch.Tensor) -> None:
    """Thresholds of `layer`: per expert, the capacities' cumulative quantiles of its tokens'
    scores (an expert with fewer than 8 tokens takes the layer's)."""
    cum = torch.tensor(np.cumsum(router.capacities)[:-1], dtype=torch.float32)
    everyone = torch.quantile(score.reshape(-1).float(), cum)
    for e in range(router.experts):
        s = score[ids == e].float()
        router.thresholds[layer, e] = torch.quantile(s, cum) if s.numel() >= 8 else everyone


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged (nats)."""
    V = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, V).float(), -1),
                    F.log_softmax(teacher_logits.reshape(-1, V).float(), -1), log_target=True,
                    reduction="batchmean")


def set_thresholds(router: BitRouter, model: MoETransformer, lw, windows: torch.Tensor, batch: int = 16) -> dict:
    """Calibrate the inference thresholds on `windows` [N, seq+1] (one routed, quantized forward;
    the last batch's quantiles win, so pass one batch's worth). Returns the level fractions."""
    fn = _Experts(router, lw, model.cfg.activation, calibrate=True)
    model.set_expert_fn(fn)
    try:
        with torch.no_grad():
            model(windows[:batch, :-1])
    finally:
        model.set_expert_fn(None)
    return {"level_fractions": [round(x, 4) for x in (fn.level_counts / fn.level_counts.sum()).tolist()]}


def train_bit_router(model: MoETransformer, ladder: str = "v1", *, minutes: float = 15.0,
                     steps: Optional[int] = None, alpha: float = 1e-4, lr: float = 1e-3, batch: int = 8,
                     seq: Optional[int] = None, capacities: Optional[Sequence[float]] = None,
                     base_fit: Optional[str] = None, calib_windows: int = 32, seed: int = 0,
                     quiet: bool = False, corpus=None, lw=None, init: str = "router") -> BitRouter:
    """Train a BitRouter on `model` (its resident experts are the full-precision teacher) with the
    paper's loss (module doc) for `steps` steps or `minutes` of wall time; thresholds are then
    calibrated on `calib_windows` windows of the train split. router.meta holds the log."""
    t0 = time.time()
    base_fit = base_fit or DEFAULT_BASE_FIT
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    seq = seq or cfg.max_seq
    data = corpus or stdlib_corpus(max_bytes=4_000_000)
    lw = lw or mwq_levels(model, ladder, base_fit)
    router = BitRouter(cfg.n_layers, cfg.d_model, cfg.experts, ladder, capacities, base_fit)
    if init == "router":
        router.init_from_router(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    fn = _Experts(router, lw, cfg.activation)
    budget = minutes * 60
    bar = tqdm(total=steps, disable=quiet, desc=f"train-bit-router {ladder}", unit="step")
    history, step, ema = [], 0, None
    t_loop = time.time()
    try:
        while (steps is None and time.time() - t0 < budget) or (steps is not None and step < steps):
            x, _ = sample_batch(data.train, batch, seq, gen)
            with torch.no_grad():
                model.set_expert_fn(None)
                teacher = model(x)
            model.set_expert_fn(fn)
            fn.expected_bits.clear()
            student = model(x)
            kl = kl_to_teacher(student, teacher)
            bits = torch.stack(fn.expected_bits).mean()
            loss = kl + alpha * bits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            ema = kl.item() if ema is None else 0.95 * ema + 0.05 * kl.item()
            if step % 10 == 0 or step == 1:
                history.append({"step": step, "kl": round(kl.item(), 6), "expected_bits": round(bits.item(), 4),
                                "seconds": round(time.time() - t0, 1)})
            if steps is None and step == 3:        # the pace sets the bar's length
                pace = (time.time() - t_loop) / step
                bar.total = max(step + 1, step + int((budget - (time.time() - t0)) / pace))
                bar.refresh()
            bar.update(1)
            bar.set_postfix(kl=f"{ema:.4f}", bits=f"{bits.item():.2f}")
    finally:
        model.set_expert_fn(None)
        bar.close()
    calib = set_thresholds(router, model, lw, eval_windows(data.train, seq, calib_windows), batch=calib_windows)
    router.meta = {"ladder": ladder, "capacities": list(router.capacities), "alpha": alpha, "lr": lr,
                   "batch": batch, "seq": seq, "steps": step, "seed": seed, "base_fit": base_fit,
                   "train_seconds": round(time.time() - t0, 1), "final_kl_ema": None if ema is None else round(ema, 6),
                   "calibration": {"windows": calib_windows, **calib}, "history": history,
                   "loss": "KL(full precision || routed levels) + alpha * expected bits (D2MoE eq. 1)"}
    return router


# -- files ------------------------------------------------------------------------------------
def save_bit_router(router: BitRouter, path: Union[str, Path]) -> Path:
    tensors = {f"layers.{i}.{n}": t.detach().contiguous() for i, p in enumerate(router.proj)
               for n, t in (("weight", p.weight), ("bias", p.bias))}
    tensors["thresholds"] = router.thresholds.contiguous()
    meta = {"format": "moelab-bit-router", "ladder": router.ladder, "capacities": json.dumps(router.capacities),
            "base_fit": router.base_fit, "layers": str(len(router.proj)), "experts": str(router.experts),
            "d_model": str(router.proj[0].in_features), "log": json.dumps(router.meta)}
    path = Path(path)
    save_safetensors_atomic(tensors, path, metadata=meta)
    return path


def load_bit_router(path: Union[str, Path], model: Optional[MoETransformer] = None) -> BitRouter:
    """A router saved by save_bit_router; with `model`, checked to fit it (layers, experts, d_model)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no bit router here; train one with `moelab train-bit-router`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                       # not a safetensors file
        raise ConfigError(f"{path}: not a bit router safetensors file ({e})") from None
    if meta.get("format") != "moelab-bit-router":
        raise ConfigError(f"{path}: metadata format is {meta.get('format')!r}, expected 'moelab-bit-router'")
    try:
        L, E, d = int(meta["layers"]), int(meta["experts"]), int(meta["d_model"])
        router = BitRouter(L, d, E, meta["ladder"], json.loads(meta["capacities"]), meta.get("base_fit", "topgrid"),
                           json.loads(meta.get("log", "{}")))
        router.load_state_dict({k.replace("layers.", "proj.", 1): v for k, v in tensors.items()})
    except (KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: bad bit router ({e})") from None
    if model is not None:
        want = {"layers": model.cfg.n_layers, "experts": model.cfg.experts, "d_model": model.cfg.d_model}
        for field, value in (("layers", L), ("experts", E), ("d_model", d)):
            if value != want[field]:
                raise ConfigError(f"{path}: bit router has {field}={value}, the model has {want[field]}")
    return router.eval()


def check_ladder(router: BitRouter, b1: int, bK: int, where: str = "--bit-router") -> None:
    """The router's levels must be the format's."""
    rb1, rbK = MWQ_LADDERS[router.ladder]
    if (rb1, rbK) != (b1, bK):
        raise ConfigError(f"{where}: the router chooses levels of ladder {router.ladder} (INT{rb1}-{rbK}); the "
                          f"format has INT{b1}-{bK}: use --format mwq with the same ladder")
