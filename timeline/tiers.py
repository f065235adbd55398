"""The metrics of a run with a host level or CPU placement (sim/tiers.py; both engines' timelines).

- link_bytes: {link resource: bytes copied over it} (e.g. `link:host-ram>gpu`);
  link_busy_fraction: {link resource: the share of the makespan it was copying};
- cpu_busy_fraction: the share of the makespan the CPU computed experts;
  cpu_token_share: of the (expert, token) computations, the share placed on the CPU
  (cpu tokens / (cpu + accelerator tokens));
- host_hit_ratio: of the host level's accesses (the accelerator's loads and the CPU share's parts),
  the share resident there before the decision point asked; host_peak_bytes: the most expert bytes
  resident in host RAM.
Runs without a host level have none of these keys (their metrics.json is unchanged).
"""
from __future__ import annotations

from timeline.metrics import busy_time

HOST_CACHE = "cache:host-ram"       # the host level's cache records (admit / prefetch / evict)


def tier_figures(events, host_hits: int, host_accesses: int, host_peak: int) -> dict:
    """What tier_metrics needs, from the link, CPU and host-cache events of a run."""
    links: dict[str, list] = {}
    cpu, cpu_tokens = [], 0
    for e in events:
        if e.resource.startswith("link:"):
            links.setdefault(e.resource, []).append(e)
        elif e.resource == "cpu":
            cpu.append((e.start, e.end))
            cpu_tokens += e.tokens
    return {"link_bytes": {r: sum(e.bytes for e in evs) for r, evs in links.items()},
            "link_busy_s": {r: busy_time((e.start, e.end) for e in evs) for r, evs in links.items()},
            "cpu_busy_s": busy_time(cpu), "cpu_tokens": cpu_tokens, "host_hits": host_hits,
            "host_accesses": host_accesses, "host_peak_bytes": host_peak}


def tier_metrics(f: dict, makespan: float, gpu_tokens: int) -> dict:
    """The module docstring's metrics from tier_figures' dict, the makespan and the accelerator's tokens."""
    def share(x):
        return x / makespan if makespan > 0 else None
    total = f["cpu_tokens"] + gpu_tokens
    return {"link_bytes": dict(f["link_bytes"]),
            "link_busy_fraction": {r: share(t) for r, t in f["link_busy_s"].items()},
            "cpu_busy_fraction": share(f["cpu_busy_s"]),
            "cpu_token_share": f["cpu_tokens"] / total if total else None,
            "host_hit_ratio": f["host_hits"] / f["host_accesses"] if f["host_accesses"] else None,
            "host_peak_bytes": f["host_peak_bytes"]}
