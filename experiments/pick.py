"""`moelab pick RESULTS`: the best run of a sweep under constraints, written as a run spec.

The file is the picked row's run spec (experiments/spec.py) plus where it was picked from:
`moelab simulate --spec FILE` reruns exactly that row; `--policy FILE` takes its format, bundle
and budget onto another workload (`moelab execute --policy FILE`: deploy on the device). Offline
bounds (belady, the oracle prefetcher) read the run's future and cannot be deployed: refused
unless asked for.
"""
from __future__ import annotations

import operator
import re
from pathlib import Path

from devices.units import ConfigError, parse_size
from policies.registry import offline_names

METRICS = {"throughput": ("throughput_tok_s", max), "tpot": ("tpot_s_mean", min), "tpot_p99": ("tpot_s_p99", min),
           "ttft": ("ttft_s", min), "hit_ratio": ("hit_ratio", max), "bytes_read": ("bytes_read", min),
           "peak_memory": ("peak_expert_bytes", min), "energy_per_token": ("energy_per_token_j", min)}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "=": operator.eq, "==": operator.eq}


def parse_constraint(text: str):
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>|=)\s*([^<>=\s]\S*)\s*", text)
    if not m:
        raise ConfigError(f"--constraint {text!r}: expected COLUMN<=VALUE (or >=, <, >, =), e.g. tpot_s_p99<=0.2")
    key, op, raw = m.groups()
    try:
        value = float(raw)
    except ValueError:
        try:
            value = float(parse_size(raw, "--constraint"))
        except ConfigError:
            if op not in ("=", "=="):
                raise ConfigError(f"--constraint {text!r}: {op} needs a number or a size, got {raw!r}") from None
            value = raw
    return key, OPS[op], value


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _fits(row, budget: int | None) -> bool:
    if budget is None:
        return True
    b = row["budget_bytes"]
    used = float(row["peak_expert_bytes"]) if b == "all" else float(b)
    return used <= budget


def offline(row: dict) -> bool:
    """A row whose bundle reads its run's future (policies declared `offline`): no device can run it."""
    return any(row.get(role) in names for role, names in offline_names().items())


def pick(rows: list[dict], metric: str = "throughput", device: str | None = None, budget: int | None = None,
         constraints: list[str] = (), where: list[tuple[str, str]] = (), allow_offline: bool = False) -> dict:
    """The best row that ran, on `device`, within `budget` bytes, meeting every constraint (online
    bundles only, unless allow_offline)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: unknown; metrics: {', '.join(METRICS)}")
    column, best = METRICS[metric]
    cons = [parse_constraint(c) for c in constraints]
    for key, _, _ in cons:
        if rows and key not in rows[0]:
            raise ConfigError(f"--constraint {key}: no column {key!r}; columns: {', '.join(rows[0])}")
    for key, _ in where:
        if rows and key not in rows[0]:
            raise ConfigError(f"--where {key}: no column {key!r}; columns: {', '.join(rows[0])}")
    cands = [r for r in rows if r.get("status") == "ok" and (device is None or r["device"] == device)
             and _fits(r, budget) and all(str(r.get(k)) == v for k, v in where)]
    cands = [r for r in cands if all(r.get(k) not in ("", None) and op(_num(r[k]), v) for k, op, v in cons)]
    if metric == "energy_per_token":      # a device without power figures has no energy (its energy_reason says why)
        measured = [r for r in cands if r.get(column) not in ("", None, "None")]
        if cands and not measured:
            reasons = sorted({r.get("energy_reason") or "no energy column" for r in cands})
            raise ConfigError(f"--metric energy_per_token: none of the {len(cands)} runs that meet the request has "
                              f"an energy per token ({'; '.join(reasons)[:300]})")
        cands = measured
    if not allow_offline:
        online = [r for r in cands if not offline(r)]
        if cands and not online:
            bounds = ", ".join(n for names in offline_names().values() for n in names)
            raise ConfigError(f"every run that meets the request uses an offline bound ({bounds}: they read the "
                              f"run's future, so no device can run them); give --allow-offline to pick one anyway")
        cands = online
    if not cands:
        devices = sorted({r["device"] for r in rows})
        raise ConfigError(f"no run meets the request (device {device or 'any'}, budget "
                          f"{'any' if budget is None else budget} B, {len(cons)} constraints); devices in the "
                          f"results: {', '.join(devices)}")
    return best(cands, key=lambda r: (float(r[column]), r["config_hash"]))


def picked_spec(row: dict):
    """The run spec of the picked row."""
    from experiments.spec import row_spec
    return row_spec(row, f"row {row['config_hash']}")


def write_policy(path, row: dict, metric: str, results) -> Path:
    """The picked row's run spec, with where it came from, written atomically."""
    spec = picked_spec(row)
    picked = {"results": str(results), "config_hash": row["config_hash"], "metric": METRICS[metric][0],
              "value": float(row[METRICS[metric][0]]), "policy": row["policy"]}
    header = (f"# moelab run spec, picked from {results} ({row['policy']}: {picked['metric']} = "
              f"{picked['value']:.4g} on {row['device']})\n"
              f"# rerun it: moelab simulate --spec {path}; deploy its bundle: moelab execute --policy {path}\n")
    return spec.save(path, header, extra={"picked": picked})
