"""What limits D²MoE's reproduced numbers: the flow-shop bound of a run's layers, the storage's and
the compute's bounds on a published throughput, and the paper-implementation profile's calibration
from the paper's Fig. 3 (devices/*-d2moe-impl.yaml)."""
from __future__ import annotations

from collections import defaultdict

# Fig. 3 (LLaMA-MoE-3.5B, 32 requests, loading in expert-ID order): compute 2.04 s, I/O 2.6 s,
# the expert layer 3.55 s (https://arxiv.org/html/2504.15299v1)
PAPER_COMPUTE_S, PAPER_IO_S, PAPER_LAYER_S = 2.04, 2.6, 3.55


def flow_shop_bound(events, level_parts, latency: float, bandwidth: float) -> tuple[float, float]:
    """(actual, bound): summed over the decision points (step, layer), the time from a point's
    first read or compute to its last compute end, and a lower bound on that time that holds
    for every load order. A point is a two-stage flow shop: one read stream (storage's transfers
    are serial; the queue depth only overlaps latencies), then one compute stream, each compute
    waiting for its parts. So it takes at least
      - the reads' busy time (their union) plus the shortest compute that waits on a read:
        some compute must follow the last read;
      - every compute's time, plus, if every compute waits on a read, the shortest time to
        read one compute's parts (latency + bytes / bandwidth): none can start before.
    The computes' durations are the cost model's (they do not depend on the order), so the bound
    holds under any kernel; how close an order can come to it depends on the kernel: with compute
    flat in tokens every order is near it, with token-linear compute the order matters.
    actual / bound is how far any load order could shorten the layers; the bound need not be
    reachable."""
    from timeline.metrics import busy_time
    points = defaultdict(lambda: ([], []))
    for e in events:
        if e.resource == "io" or e.resource == "compute":
            points[e.step, e.layer][e.resource == "compute"].append(e)
    actual = bound = 0.0
    for reads, computes in points.values():
        if not computes:
            continue
        t0 = min(e.start for e in reads + computes)
        actual += max(e.end for e in computes) - t0
        read_bytes = defaultdict(int)
        for e in reads:
            read_bytes[e.expert, e.level] += e.bytes          # an io event's level is its part
        waits = []                                            # (compute seconds, bytes to read first)
        for e in computes:
            b = sum(read_bytes.get((e.expert, p), 0) for p in level_parts[e.level])
            if b:
                waits.append((e.end - e.start, b))
        total = sum(e.end - e.start for e in computes)
        b1 = busy_time([(e.start, e.end) for e in reads]) + min(w[0] for w in waits) if waits else 0.0
        b2 = total + (latency + min(w[1] for w in waits) / bandwidth if len(waits) == len(computes) else 0.0)
        bound += max(b1, b2)
    return actual, bound


def storage_bound(model_name: str, budget_mb: int, requests: int, bandwidth: float) -> dict:
    """What any policy must read per decode step at `requests` requests, and the throughput that
    allows. With top-k of E experts, n tokens leave one expert idle with probability
    C(E-1, k)/C(E, k) per token: (1 - k/E)^n (LLaMA-MoE and Mixtral at 32 requests: 1e-4), so every
    expert is active; the budget holds at most budget / INT2-size of them even at INT2, and the
    rest is read, at least at INT2."""
    from workloads.catalog import get_model
    from workloads.formats import make_format
    model = get_model(model_name)
    int2 = make_format("mwq", model.expert_shapes).level_bytes(0)
    active = model.layers * model.experts * (1 - (1 - model.top_k / model.experts) ** requests)
    held = min(active, budget_mb * 10**6 // int2)
    read = (active - held) * int2
    return {"active": active, "held": held, "int2_bytes": int2, "read_bytes": read,
            "tok_s": requests / (read / bandwidth) if read > 0 else float("inf")}


def needed_read_per_step(published_tok_s: float, requests: int, bandwidth: float) -> float:
    """The most a decode step may read for `requests` tokens per step at `published_tok_s`."""
    return requests / published_tok_s * bandwidth


def fig3_weight_bandwidth(env_device: str, run_fifo) -> dict:
    """The paper-implementation kernel's weight rate on `env_device` that makes Fig. 3's setup
    (+MWQ: expert-ID FIFO, LLaMA-MoE-3.5B, 32 requests) spend PAPER_COMPUTE_S / PAPER_IO_S of its I/O
    busy time computing. run_fifo(device) -> (timeline, metrics, format) runs that setup on a device
    profile. Decisions do not depend on timing, so one run (with any rate) gives it: under a
    one-token kernel with the dequantization fused, compute busy = the batched (prefill) calls,
    which do not depend on the rate, plus the sum over token calls of (overhead + level bytes /
    rate) when the weight read dominates a call (checked), so
    rate = sum(tokens x level bytes) / (ratio x I/O busy - batched - calls x overhead)."""
    from dataclasses import replace
    from devices.kernels import Kernel
    from devices.profile import load_device
    base = load_device(env_device)
    probe = Kernel(tokens_per_call=1, dequant="fused", weight_bandwidth=10e9, gemm_from=33)
    device = replace(base, compute=replace(base.compute, kernels={"mwq": probe, "copies": probe}))
    tl, m, fmt = run_fifo(device)
    computes = tl.of("compute")
    token = [e for e in computes if not probe.batched(e.tokens)]
    batched = sum(e.end - e.start for e in computes if probe.batched(e.tokens))
    calls = sum(e.tokens for e in token)
    token_bytes = sum(e.tokens * fmt.level_sizes[e.level] for e in token)
    io = m["io_busy_fraction"] * m["makespan_s"]
    rate = token_bytes / (PAPER_COMPUTE_S / PAPER_IO_S * io - batched - calls * base.compute.overhead)
    assert min(fmt.level_sizes) / rate > 2 * fmt.params / base.compute.flops, "the weight read must dominate"
    return {"weight_bandwidth": rate, "calls": calls, "token_bytes": token_bytes, "batched_s": batched,
            "io_busy_s": io}

