"""Train a small byte-level MoE language model on the Python standard library's sources
(the corpus, its fixed held-out split and its windows: executor/corpus.py).

    train(out_dir, minutes=15)       # the default model -> executor/assets/tiny-moe/
    load_trained()                   # (model, tokenizer, config) of the committed default

Written to out_dir (each file atomically: temp name + rename; train_log.json last):
model.safetensors (weights in bf16 by default, names like
layers.{i}.moe.experts.{j}.w1.weight), config.json (model_type "moelab"),
tokenizer.json, train_log.json (losses, held-out loss/perplexity per byte, unigram and
bigram baselines, routing load per layer, wall time, versions, corpus description).

Training: AdamW, linear warmup then cosine decay, cross-entropy plus a Switch-style
load-balancing loss at a small weight (routing stays skewed, as in real MoEs). With
`minutes`, a few timed steps set the number of steps that fits the budget, re-planned
from the measured pace at each evaluation in the first half of the run (the step count
is recorded in the log; pass `steps=` to repeat a run exactly).
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from devices.atomic import atomic_write, save_safetensors_atomic
from devices.units import ConfigError
from executor.corpus import Corpus, eval_windows, sample_batch, stdlib_corpus
from executor.hf_checkpoint import load_hf_moe
from executor.model import MoEConfig, MoETransformer, init_weights
from executor.tokenizer import ByteTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-moe"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# The committed default: 4 MoE layers x 16 experts, top-2; ~4.2M parameters (~8.4 MB in bf16)
DEFAULT_CONFIG = MoEConfig(vocab=257, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, experts=16, top_k=2,
                           d_ff=160, max_seq=256, rope_theta=10000.0, norm_topk=True)


# -- baselines ---------------------------------------------------------------------

def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of token frequencies from train, add-one smoothed."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


def bigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int, alpha: float = 0.1) -> float:
    """Held-out cross-entropy (nats/token) of P(next | previous token) from train, add-alpha smoothed."""
    counts = np.zeros((vocab, vocab), np.float64)
    np.add.at(counts, (train[:-1].astype(np.int64), train[1:].astype(np.int64)), 1.0)
    counts += alpha
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    return float(-logp[heldout[:-1].astype(np.int64), heldout[1:].astype(np.int64)].mean())


def _metric(nats: float) -> dict:
    return {"loss_nats": round(nats, 5), "perplexity": round(math.exp(nats), 4),
            "bits_per_token": round(nats / math.log(2), 5)}


# -- evaluation ----------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: MoETransformer, windows: torch.Tensor, batch: int = 32,
             route_counts: Optional[torch.Tensor] = None) -> float:
    """Mean next-token cross-entropy (nats) over windows [N, seq+1]; optionally counts routing per layer."""
    was = model.training
    model.eval()
    if route_counts is not None:
        model.set_expert_fn(_counting_expert_fn(model, route_counts))
    total, n = 0.0, 0
    try:
        for i in range(0, len(windows), batch):
            w = windows[i: i + batch]
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                     reduction="sum").item()
            n += w[:, 1:].numel()
    finally:
        model.set_expert_fn(None)
        model.train(was)
    return total / n


def _counting_expert_fn(model: MoETransformer, counts: torch.Tensor):
    """An expert_fn that tallies expert ids per layer, then runs the resident experts."""
    def fn(layer, hidden, ids, gates):
        counts[layer] += torch.bincount(ids.reshape(-1), minlength=counts.shape[1])
        return model.layers[layer].moe.resident_experts(layer, hidden, ids, gates)
    return fn


def routing_summary(counts: torch.Tensor) -> dict:
    frac = counts.double() / counts.sum(dim=1, keepdim=True)
    ent = -(frac * frac.clamp_min(1e-12).log()).sum(dim=1) / math.log(counts.shape[1])
    return {
        "tokens_x_topk_per_layer": int(counts[0].sum()),
        "fraction": [[round(x, 5) for x in row] for row in frac.tolist()],
        "max_over_mean": [round(x, 3) for x in (frac.max(dim=1).values * counts.shape[1]).tolist()],
        "normalized_entropy": [round(x, 4) for x in ent.tolist()],
    }


# -- the schedule ----------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to final_frac * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# -- checkpoints -----------------------------------------------------------------------

def save_checkpoint(model: MoETransformer, out_dir: Union[str, Path], tokenizer: Optional[ByteTokenizer] = None,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("output.weight")  # safetensors refuses shared storage; the loader re-ties
    save_safetensors_atomic(sd, out / "model.safetensors", metadata={"format": "pt", "model_type": "moelab"})
    atomic_write(out / "config.json", json.dumps({"model_type": "moelab", **model.cfg.to_dict()}, indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
    return out


def load_trained(path: Optional[Union[str, Path]] = None, *, dtype: torch.dtype = torch.float32,
                 resident_experts: bool = True):
    """(model, tokenizer, config) of a checkpoint written by train(); None: the committed default."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: no trained model here (config.json missing); run `moelab train` to make one")
    model, cfg = load_hf_moe(path, dtype=dtype, resident_experts=resident_experts)
    tok_path = path / "tokenizer.json"
    tok = ByteTokenizer.load(tok_path) if tok_path.exists() else ByteTokenizer()
    return model, tok, cfg


# -- training ----------------------------------------------------------------------------

def train(out_dir: Union[str, Path], *, minutes: float = 15.0, steps: Optional[int] = None, seed: int = 0,
          quiet: bool = False, config: Optional[Union[MoEConfig, dict]] = None, batch_size: int = 16,
          seq_len: Optional[int] = None, lr: float = 3e-3, weight_decay: float = 0.1, warmup: int = 100,
          aux_weight: float = 0.01, eval_every: int = 200, eval_windows_n: int = 32,
          final_eval_windows: Optional[int] = None, corpus: Optional[Corpus] = None,
          save_dtype: str = "bfloat16", threads: Optional[int] = None) -> dict:
    """Train a MoE LM and write it to out_dir; returns the training log (also train_log.json).

    minutes: wall-clock budget when steps is None (timed steps set the step count);
    final_eval_windows: held-out windows for the reported loss (None: the whole held-out split).
    """
    t_start = time.time()
    if threads:
        torch.set_num_threads(threads)
    tok = ByteTokenizer()
    cfg, seq = _train_config(config, seq_len, save_dtype, tok)
    data = corpus or stdlib_corpus(tokenizer=tok)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = init_weights(MoETransformer(cfg), seed=seed).train()
    opt = _optimizer(model, lr, weight_decay)
    small_eval = eval_windows(data.heldout, seq, eval_windows_n)
    final_windows = eval_windows(data.heldout, seq, final_eval_windows)

    def one_step(step: int, total: int) -> tuple[float, float]:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr, warmup)
        x, y = sample_batch(data.train, batch_size, seq, gen)
        logits = model(x)
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (ce + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return ce.item(), aux.item()

    run = _run_steps(model, opt, one_step, small_eval, len(final_windows), steps=steps, minutes=minutes,
                     t_start=t_start, eval_every=eval_every, quiet=quiet)
    train_s = time.time() - t_start

    # the numbers below belong to the shipped weights: round to the save dtype first
    dt = DTYPES[save_dtype]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dt).to(p.dtype))
    counts = torch.zeros(cfg.n_layers, cfg.experts, dtype=torch.long)
    final = evaluate(model, final_windows, route_counts=counts)
    uni = unigram_loss(data.train, data.heldout, cfg.vocab)
    bi = bigram_loss(data.train, data.heldout, cfg.vocab)

    out = Path(out_dir)
    save_checkpoint(model, out, tok, dt)
    log = {
        "model": {"config": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                  "checkpoint_bytes": (out / "model.safetensors").stat().st_size, "dtype": save_dtype},
        "training": _training_record(run, batch_size=batch_size, seq=seq, lr=lr, warmup=warmup,
                                     weight_decay=weight_decay, aux_weight=aux_weight, seed=seed,
                                     minutes=None if steps is not None else minutes, train_s=train_s),
        "heldout": {**_metric(final), "tokens": int(final_windows[:, 1:].numel()), "windows": len(final_windows),
                    "unit": "per token = per byte (plus one end-of-text token per file)",
                    "context": f"non-overlapping {seq}-token windows, each starting without context"},
        "baselines": {"unigram": _metric(uni), "bigram": _metric(bi),
                      "note": "trained on the train split, add-one (unigram) / add-0.1 (bigram) smoothing, "
                              "scored on the whole held-out split"},
        "routing_heldout": routing_summary(counts),
        "evals": run.evals, "history": run.history,
        "corpus": data.description,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0], "numpy": np.__version__,
                     "platform": platform.platform(), "threads": torch.get_num_threads()},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    atomic_write(out / "train_log.json", json.dumps(log, indent=1) + "\n")
    if not quiet:
        print(f"held-out: {final:.4f} nats/byte, perplexity {math.exp(final):.3f} "
              f"(unigram {math.exp(uni):.2f}, bigram {math.exp(bi):.2f}); wrote {out}")
    return log


def _train_config(config: Optional[Union[MoEConfig, dict]], seq_len: Optional[int], save_dtype: str,
                  tok: ByteTokenizer) -> tuple[MoEConfig, int]:
    """The model config (default: DEFAULT_CONFIG) and the training sequence length, checked."""
    cfg = config if isinstance(config, MoEConfig) else \
        MoEConfig.from_dict(config, "train config") if config is not None else MoEConfig(**DEFAULT_CONFIG.to_dict())
    seq = seq_len or cfg.max_seq
    if seq > cfg.max_seq:
        raise ConfigError(f"seq_len={seq} exceeds the model's max_seq={cfg.max_seq}")
    if save_dtype not in DTYPES:
        raise ConfigError(f"save_dtype {save_dtype!r} unknown; allowed: {', '.join(DTYPES)}")
    if cfg.vocab != tok.vocab_size:
        raise ConfigError(f"config vocab={cfg.vocab} must equal the byte tokenizer's {tok.vocab_size}")
    return cfg, seq


def _optimizer(model: MoETransformer, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95), weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


@dataclass
class _Run:
    """What the training loop did: steps taken and planned, its loss history and evaluations."""
    step: int = 0
    total: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)


def _run_steps(model: MoETransformer, opt, one_step, small_eval: torch.Tensor, n_final: int, *,
               steps: Optional[int], minutes: float, t_start: float, eval_every: int, quiet: bool) -> _Run:
    """`steps` steps of one_step(step, total), or as many as fit `minutes` from t_start, with a
    held-out evaluation on small_eval every eval_every steps (n_final: windows of the final one)."""
    run = _Run()
    t_eval = time.time()
    run.evals.append({"step": 0, "heldout_loss": round(evaluate(model, small_eval), 5)})
    eval_s = time.time() - t_eval

    # With a time budget: a few timed steps set the step count, and the pace measured at
    # each evaluation re-plans it while the cosine is still in its first half (another
    # process sharing the cores slows us down; the schedule then ends on time anyway).
    final_eval_s = eval_s * n_final / max(1, len(small_eval)) * 1.2

    def plan(step_now: int, step_s: float) -> int:
        left = minutes * 60 - (time.time() - t_start) - final_eval_s - min(5.0, 0.02 * minutes * 60)
        return max(step_now + 1, step_now + int(left / step_s))

    calibrate = 5
    total = steps if steps is not None else 10**9  # warmup lr depends only on the step index
    step = 0
    if steps is None:
        t_cal = time.time()
        for step in range(calibrate):
            ce, aux = one_step(step, total)
            run.history.append({"step": step, "loss": round(ce, 5), "aux": round(aux, 5)})
        step = calibrate
        # each step also pays its share of the periodic evaluations
        total = plan(step, (time.time() - t_cal) / calibrate + eval_s / eval_every)
    bar = tqdm(total=total, initial=step, disable=quiet, desc="train", unit="step")
    ema = None
    t_loop, loop_first = time.time(), step
    while step < total:
        if steps is None and time.time() - t_start > minutes * 60 * 1.1:
            run.stopped_early = True  # far slower than planned: stop rather than overrun
            break
        ce, aux = one_step(step, total)
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        if step % 10 == 0 or step == total - 1:
            run.history.append({"step": step, "loss": round(ce, 5), "aux": round(aux, 5),
                                "lr": round(opt.param_groups[0]["lr"], 7)})
        step += 1
        bar.update(1)
        if step % eval_every == 0 and step < total:
            run.evals.append({"step": step, "heldout_loss": round(evaluate(model, small_eval), 5)})
            bar.set_postfix(loss=f"{ema:.3f}", heldout=f"{run.evals[-1]['heldout_loss']:.3f}")
            if steps is None and step < total // 2:
                total = plan(step, (time.time() - t_loop) / (step - loop_first))
                bar.total = total
                bar.refresh()
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    run.step, run.total = step, total
    return run


def _training_record(run: _Run, *, batch_size: int, seq: int, lr: float, warmup: int, weight_decay: float,
                     aux_weight: float, seed: int, minutes: Optional[float], train_s: float) -> dict:
    """The log's "training" section: the run's settings and what the loop did."""
    return {"steps": run.step, "planned_steps": run.total, "stopped_early": run.stopped_early,
            "batch_size": batch_size, "seq_len": seq, "tokens_seen": run.step * batch_size * seq, "peak_lr": lr,
            "warmup": warmup, "schedule": "linear warmup, cosine to 0.1 x peak", "optimizer": "AdamW(0.9, 0.95)",
            "weight_decay": weight_decay, "aux_weight": aux_weight,
            "aux_loss": "Switch load balancing, E * sum(f_e * P_e), mean over layers",
            "seed": seed, "minutes_budget": minutes, "train_seconds": round(train_s, 1)}


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    train(a.out_dir, minutes=a.minutes, steps=a.steps, seed=a.seed, quiet=a.quiet)


if __name__ == "__main__":
    main()
