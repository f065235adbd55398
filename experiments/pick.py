"""`moelab pick RESULTS`: the best policy bundle of a sweep under constraints, as a policy file.

`moelab simulate --policy FILE` and `moelab execute --policy FILE` take that file: study in
the simulator, deploy on the device. The file is YAML: the format (and ladder, codec), the
bundle (cache, scheduler, allocator, prefetch and their options), the budget, and where it
was picked from.
"""
from __future__ import annotations

import operator
import re
from pathlib import Path

import yaml

from devices.units import ConfigError, parse_size

METRICS = {"throughput": ("throughput_tok_s", max), "tpot": ("tpot_s_mean", min), "tpot_p99": ("tpot_s_p99", min),
           "ttft": ("ttft_s", min), "hit_ratio": ("hit_ratio", max), "bytes_read": ("bytes_read", min),
           "peak_memory": ("peak_expert_bytes", min)}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "=": operator.eq, "==": operator.eq}
POLICY_FILE_KEYS = ("format", "ladder", "codec", "cache", "scheduler", "allocator", "prefetch", "allocator_options",
                    "scheduler_options", "budget", "picked")


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


def pick(rows: list[dict], metric: str = "throughput", device: str | None = None, budget: int | None = None,
         constraints: list[str] = (), where: list[tuple[str, str]] = ()) -> dict:
    """The best row that ran, on `device`, within `budget` bytes, meeting every constraint."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: unknown; metrics: {', '.join(METRICS)}")
    column, best = METRICS[metric]
    cons = [parse_constraint(c) for c in constraints]
    for key, _, _ in cons:
        if rows and key not in rows[0]:
            raise ConfigError(f"--constraint {key}: no column {key!r}; columns: {', '.join(rows[0])}")
    cands = [r for r in rows if r.get("status") == "ok" and (device is None or r["device"] == device)
             and _fits(r, budget) and all(str(r.get(k)) == v for k, v in where)]
    cands = [r for r in cands if all(r.get(k) not in ("", None) and op(_num(r[k]), v) for k, op, v in cons)]
    if not cands:
        devices = sorted({r["device"] for r in rows})
        raise ConfigError(f"no run meets the request (device {device or 'any'}, budget "
                          f"{'any' if budget is None else budget} B, {len(cons)} constraints); devices in the "
                          f"results: {', '.join(devices)}")
    return best(cands, key=lambda r: (float(r[column]), r["config_hash"]))


def policy_document(row: dict, metric: str, results: str) -> dict:
    import json
    budget = row["budget_bytes"]
    return {"format": row["format"], "ladder": row["ladder"] or None, "codec": row["codec"] or None,
            "cache": row["cache"], "scheduler": row["scheduler"], "allocator": row["allocator"],
            "prefetch": row["prefetch"], "allocator_options": json.loads(row["allocator_options"] or "{}"),
            "scheduler_options": json.loads(row["scheduler_options"] or "{}"),
            "budget": "all" if budget == "all" else int(float(budget)),
            "picked": {"results": str(results), "config_hash": row["config_hash"], "metric": METRICS[metric][0],
                       "value": float(row[METRICS[metric][0]]), "device": row["device"], "model": row["model"],
                       "policy": row["policy"], "batch": int(row["batch"])}}


def write_policy(path, doc: dict) -> Path:
    from devices.atomic import atomic_write
    header = (f"# moelab policy bundle, picked from {doc['picked']['results']} ({doc['picked']['policy']}: "
              f"{doc['picked']['metric']} = {doc['picked']['value']:.4g} on {doc['picked']['device']})\n"
              f"# use it: moelab simulate --policy {path}   or   moelab execute --policy {path}\n")
    return atomic_write(Path(path), header + yaml.safe_dump(doc, sort_keys=False))


def load_policy(path) -> dict:
    """A policy file, checked: unknown keys and names are errors naming the file and the key."""
    from policies import ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS, lookup
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the policy file ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a policy file is a mapping of {', '.join(POLICY_FILE_KEYS)}")
    for key in doc:
        if key not in POLICY_FILE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; keys: {', '.join(POLICY_FILE_KEYS)}")
    for key, table in (("cache", CACHES), ("scheduler", SCHEDULERS), ("allocator", ALLOCATORS),
                       ("prefetch", PREFETCHERS)):
        if key in doc:
            try:
                lookup(table, key, str(doc[key]))
            except ConfigError as e:
                raise ConfigError(f"{path}: {key}: {e}") from None
    for key in ("allocator_options", "scheduler_options"):
        if not isinstance(doc.get(key) or {}, dict):
            raise ConfigError(f"{path}: {key}: must be a mapping")
    if "budget" in doc and doc["budget"] != "all":
        try:
            doc["budget"] = parse_size(doc["budget"], "budget") if isinstance(doc["budget"], str) else int(doc["budget"])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: budget: a size (e.g. 2GB) or `all`, got {doc['budget']!r}") from None
    return doc
