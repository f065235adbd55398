"""Running a model through the runtime: the store, the policies, the steps, the outputs.

Two ways to route (DESIGN.md): the model's own router (real), or forced from a routing
trace, step by step as the simulator batches it (workloads/batching.py), for an
apples-to-apples comparison with `moelab simulate` on the same trace.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from devices.units import ConfigError
from executor.io import BlobReader, DecompressPool, IOWorkers, StorageThrottle
from executor.model import MoETransformer
from executor.record import gate_lookahead
from executor.runtime import ExpertRuntime, StepInfo
from executor.store import Store
from policies import Policies
from workloads.batching import batch_steps
from workloads.trace import RoutingTrace


def strip_experts(model: MoETransformer) -> MoETransformer:
    """Drop the resident routed experts: from now on they come from the store."""
    for layer in model.moe_layers:
        layer.experts = torch.nn.ModuleList()
    return model


def default_torch_threads(torch_device: str) -> int:
    """On CPU, all cores but one: the I/O and decompression workers need a core, and torch's
    intra-op pool waits for all its threads at every op. On 2 cores with 2 torch threads, a
    [1, 128] zeros_like took 250-340 us instead of 32 (its second thread had no core), and
    decode ran 1.1-1.4x slower (executor/benchmark.py)."""
    if torch_device != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) - 1)


def _set_numba_threads(fmt, threads: int | None) -> int | None:
    """MWQ's dequantization kernel (numba) runs on the same cores as torch's intra-op pool:
    give it the same thread count, for the same reason (default_torch_threads). With numba's
    default of every core, a 2-core host busy with I/O took 24 ms instead of 0.15 ms for a
    tiny-moe expert's dequantization (its second thread had no core; `moelab profile`).
    Returns the previous count (None: the format does not use numba)."""
    if threads is None or fmt.name not in ("mwq", "copies"):
        return None
    import numba
    saved = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return saved


@dataclass
class Run:
    timeline: object
    tokens: torch.Tensor          # [requests, prompt + generated]
    peak_rss_bytes: int
    reader_mode: str
    logits: list | None = None    # each request group's last step's logits [batch, vocab] (CPU, float)


def execute(model: MoETransformer, store: Store, policies: Policies, prompts: torch.Tensor, new_tokens: int, *,
            trace: RoutingTrace | None = None, batch: int | None = None, io_concurrency: int = 2,
            throttle: StorageThrottle | None = None, decompress_workers: int = 2, torch_device: str = "cpu",
            torch_threads: int | None = None, read_mode: str = "auto", quiet: bool = False,
            meta: dict | None = None, level_fn=None, predict_fn=None, link=None, link_throttle=None) -> Run:
    """Greedy generation of `new_tokens` per prompt ([requests, P] token ids) in groups of
    `batch` requests decoded in lockstep. With `trace`, routing is forced from it and the
    step structure is the trace's (its prompt lengths and output counts win). torch_threads:
    torch's intra-op threads during the run (default: on CPU, all cores but one). level_fn: a
    bit-width router (executor/runtime.py ExpertRuntime). predict_fn: gate lookahead (default, for a
    prefetcher that reads predictions: the model's own next-layer routers, executor/record.py).
    A bundle with a host level (policies/tiers.py) runs on executor/tiers.py's TieredRuntime:
    `link` is the profile's devices.tiers.Link (its timeline lane), `link_throttle` a
    StorageThrottle holding each copy to that link's time (None: as fast as this host copies)."""
    model.eval()
    if torch_threads is not None and torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {torch_threads}")
    threads = torch_threads or default_torch_threads(torch_device)
    saved_threads = torch.get_num_threads()
    with BlobReader(store, mode=read_mode) as reader, \
            IOWorkers(reader, io_concurrency, throttle) as io, DecompressPool(decompress_workers) as dec:
        kw = dict(activation=model.cfg.activation, torch_device=torch_device, dtype=model.output.weight.dtype,
                  io=io, decompress=dec, meta=dict(meta or {}, read_mode=reader.mode, torch_threads=threads),
                  level_fn=level_fn, predict_fn=predict_fn or _default_lookahead(model, policies))
        if policies.lower is not None:
            from executor.tiers import TieredRuntime
            rt = TieredRuntime(store, policies, link=link, link_throttle=link_throttle, **kw)
        else:
            rt = ExpertRuntime(store, policies, **kw)
        model.set_expert_fn(rt)
        home = model.output.weight.device
        model.to(torch_device)                  # the dense part runs where the experts do
        torch.set_num_threads(threads)
        saved_numba = _set_numba_threads(store.format, threads)
        try:
            if trace is not None:
                tokens = _forced_run(model, rt, trace, batch or 1, prompts, quiet)
            else:
                tokens = _real_run(model, rt, prompts, new_tokens, batch or prompts.shape[0], quiet)
        finally:
            rt.close()
            torch.set_num_threads(saved_threads)
            _set_numba_threads(store.format, saved_numba)
            model.set_expert_fn(None)
            model.set_forced_routing(None)
            model.to(home)                      # the caller's model stays where it was
        rt.timeline.meta["peak_expert_bytes"] = rt.memory.peak
        rt.timeline.meta["policy_report"] = policies.report()
        mode = reader.mode
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    return Run(rt.timeline, tokens, rss, mode, rt.group_logits)


@torch.no_grad()
def _generate_group(model, rt, prompt: torch.Tensor, decode_steps: int, group: int, step0: int, bar,
                    forced_steps=None):
    """Prefill `prompt` [B, P] (one step), then `decode_steps` lockstep decode steps."""
    B, P = prompt.shape
    dev = model.output.weight.device
    prompt = prompt.to(dev)
    model.setup_caches(B, P + decode_steps + 1)
    steps = iter(forced_steps or [])
    step = step0
    rt.begin_step(StepInfo(step, group, True, B * P, B))
    _force(model, rt, next(steps, None), B)
    logits = model(prompt, torch.arange(P, device=dev))
    _record_kv(model, rt)
    nxt = logits[:, -1].argmax(-1)
    out = [prompt, nxt[:, None]]
    bar.update(1)
    for i in range(decode_steps):
        step += 1
        rt.begin_step(StepInfo(step, group, False, B, B))
        _force(model, rt, next(steps, None), B)
        logits = model(nxt[:, None], torch.tensor([P + i], device=dev))
        _record_kv(model, rt)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt[:, None])
        bar.update(1)
    rt.group_logits.append(logits[:, -1].float().cpu())
    return torch.cat(out, dim=1).cpu(), step + 1


def _record_kv(model, rt) -> None:
    """The KV the model's caches hold at the end of a step (and the most they ever allocated)."""
    held, allocated = model.kv_bytes()
    meta = rt.timeline.meta
    meta.setdefault("kv_bytes_per_step", []).append(held)
    meta["kv_bytes_allocated"] = max(meta.get("kv_bytes_allocated", 0), allocated)


def _default_lookahead(model, policies):
    """The model's gate lookahead when the prefetcher reads predictions, else None."""
    if not getattr(policies.prefetcher, "needs_prediction", False):
        return None
    return gate_lookahead(model)


def _force(model, rt, routing, B) -> None:
    if routing is None:
        return
    experts, scores, rt.levels, rt.predicted = routing    # [tokens, layers, k], tokens request-major
    def forced(layer, input_pos):
        S = input_pos.shape[0]
        ids = torch.from_numpy(experts[:, layer].astype(np.int64)).view(B, S, -1)
        gates = torch.from_numpy(scores[:, layer].copy()).view(B, S, -1)
        return ids, gates
    model.set_forced_routing(forced)


def _real_run(model, rt, prompts, new_tokens, batch, quiet) -> torch.Tensor:
    outs, step = [], 0
    with tqdm(total=-(-prompts.shape[0] // batch) * new_tokens, disable=quiet, desc="execute", unit="step") as bar:
        for g, first in enumerate(range(0, prompts.shape[0], batch)):
            toks, step = _generate_group(model, rt, prompts[first:first + batch], new_tokens - 1, g, step, bar)
            outs.append(toks)
    return torch.cat(outs)


def _forced_run(model, rt, trace: RoutingTrace, batch: int, prompts, quiet) -> torch.Tensor:
    steps = batch_steps(trace, batch)
    groups: dict[int, list] = {}
    for s in steps:
        groups.setdefault(s.group, []).append(s)
    outs, step, first = [], 0, 0
    with tqdm(total=len(steps), disable=quiet, desc="execute (forced)", unit="step") as bar:
        for g, gsteps in groups.items():
            if not gsteps[0].prefill:
                raise ConfigError("forced trace: the executor needs prompt tokens (a prefill step) in every "
                                  "request group; record traces with `moelab trace record`")
            B = gsteps[0].new_tokens
            P = len(gsteps[0].tokens) // B
            if P * B != len(gsteps[0].tokens) or any(len(s.tokens) != B for s in gsteps[1:]):
                raise ConfigError("forced trace: requests decoded together must have equal prompt and output "
                                  f"lengths (group {g})")
            levels = getattr(trace, "levels", None)
            pred = getattr(trace, "predicted", None)
            routing = [(trace.experts[s.tokens], trace.scores[s.tokens], None if levels is None else levels[s.tokens],
                        None if pred is None else (pred[s.tokens], trace.predicted_scores[s.tokens]))
                       for s in gsteps]
            # the input tokens only feed attention: routing comes from the trace. Use the given
            # prompts where they fit, else a fixed filler.
            if prompts.shape[1] >= P and prompts.shape[0] >= first + B:
                prompt = prompts[first:first + B, :P]
            elif prompts.shape[1] >= P:
                prompt = prompts[:1, :P].expand(B, P)
            else:
                prompt = torch.arange(P).remainder(model.cfg.vocab).expand(B, P)
            first += B
            toks, step = _generate_group(model, rt, prompt.contiguous(), len(gsteps) - 1, g, step, bar, routing)
            outs.append(toks)
    return torch.cat(outs)
