"""A run specification: one configuration, one shape, from every entry point.

`moelab simulate` flags, a sweep grid row, a preset plus flags, a `pick` file, the reproductions
and validation all state their runs as a `RunSpec`; the run functions (experiments/run.py,
experiments/run_exec.py) are the only places that turn one into a run. The YAML shape is flat,
the same as one entry of a grid's `runs:` list:

    device: jetson-orin-nano-8gb    # a profile name or a YAML path (default: jetson-agx-orin-64gb)
    storage: nvme                   # the device's storage option (default: its own)
    power_mode: 15W                 # the device's power mode (devices/power.py; default: its own)
    model: mixtral-8x7b             # a catalog name or a model folder (default: the trace's, else mixtral)
    trace: synthetic                # or a routing trace file, read with trace_options
    trace_options: {experts_field: topk_ids}
    skew: 0.4                       # the synthetic generator's popularity skew, locality, requests
    locality: 0.15
    requests: 4                     #   (default: the batch)
    format: {name: mwq, ladder: v1}
    policy: {cache: lru, scheduler: hebf}      # a bundle (policies/spec.py), or {preset: d2moe}
    budget: 2GB                     # or `all` (every expert resident); default: the device's
    batch: 4
    tokens: 16                      # new tokens per request: the prefill makes the first
    prompt_tokens: 16               # prompt tokens per request (synthetic)
    seed: 0
    store: runs/stores/x            # an expert store whose part sizes to use
    placement: cpu-static           # where experts compute (policies/placement.py; default gpu-only), or
                                    #   {name: cpu-static, options: {layers: 8}}
    host_budget: 16GB               # a host RAM level under the accelerator with this expert budget
                                    #   (default with a placement or host_cache: the profile's tier's)
    host_cache: lfu                 # the host level's cache policy, a name or {name, options} (default lru)

placement, host_budget and host_cache are written only when given (a run without them is the
one-level run it always was, and hashes as before); any of them (placement other than gpu-only)
makes the run use the device's host level (devices/tiers.py).

Errors name the file and key path (`where`) and the allowed values. `to_doc` writes every field,
so `RunSpec.from_doc(spec.to_doc()) == spec`.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from devices.units import ConfigError, parse_size
from policies.presets import bundle_from_doc, bundle_to_doc
from policies.spec import BundleSpec, PolicySpec
from workloads.formats import FormatSpec
from workloads.memory import KV_MODES

DEFAULT_DEVICE, DEFAULT_MODEL = "jetson-agx-orin-64gb", "mixtral-8x7b"
DEFAULT_TOKENS, DEFAULT_PROMPT_TOKENS = 64, 16
SYNTHETIC = "synthetic"
KEYS = ("device", "storage", "power_mode", "model", "trace", "trace_options", "skew", "locality", "requests", "format",
        "policy", "budget", "batch", "tokens", "prompt_tokens", "seed", "store", "kv", "placement", "host_budget",
        "host_cache", "dense_bits")
TIER_KEYS = ("placement", "host_budget", "host_cache")      # experiments/spec.py docstring
META_KEYS = ("picked", "description")          # a pick file's provenance; not part of the run


@dataclass(frozen=True)
class RunSpec:
    """One run's configuration (module docstring); None: the default, made explicit by `resolve`."""
    device: str | None = None
    storage: str | None = None
    power_mode: str | None = None     # a power mode of the device (devices/power.py); None: its default
    model: str | None = None
    trace: str = SYNTHETIC
    trace_options: tuple[tuple[str, str], ...] = ()
    skew: float = 0.4                 # calibrated on public Mixtral-8x7B decode traces (peers.md)
    locality: float = 0.15
    requests: int | None = None
    format: FormatSpec = field(default_factory=FormatSpec)
    policy: BundleSpec = field(default_factory=BundleSpec)
    budget: int | str | None = None
    batch: int = 1
    tokens: int | None = None
    prompt_tokens: int | None = None
    seed: int = 0
    store: str | None = None
    kv: str = "fixed"                 # the KV cache beside a fixed expert budget, or shared with it (workloads/memory.py)
    placement: PolicySpec | None = None     # None: gpu-only
    host_budget: int | None = None          # bytes of the host level; None: the profile's (when tiered)
    host_cache: PolicySpec | None = None    # None: lru (when tiered)
    dense_bits: int | None = None           # the non-expert weights' precision (DENSE_BITS); None: the model dtype's

    @property
    def synthetic(self) -> bool:
        return self.trace == SYNTHETIC

    @property
    def tiered(self) -> bool:
        """Whether the run uses the host level under the accelerator (a placement, a host budget or cache)."""
        return self.placement is not None or self.host_budget is not None or self.host_cache is not None

    # -- YAML ---------------------------------------------------------------------------------
    @classmethod
    def from_doc(cls, doc: dict, where: str = "run spec") -> "RunSpec":
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: a run spec is a mapping of {', '.join(KEYS)}")
        for key in doc:
            if key not in KEYS and key not in META_KEYS:
                raise ConfigError(f"{where}: {key}: unknown key; keys: {', '.join(KEYS)}")
        doc = {k: v for k, v in doc.items() if k in KEYS}
        out = {k: _check_scalar(k, v, where) for k, v in doc.items()
               if k not in ("format", "policy", "budget", "trace_options", *TIER_KEYS)}
        out.update(_tier_keys(doc, where))
        bundle = bundle_from_doc(doc.get("policy", "lru"), f"{where}: policy.")
        fmt = FormatSpec.from_doc(doc["format"], f"{where}: format") if "format" in doc else None
        preset = _preset(bundle)
        if preset is not None:                   # a preset brings its format (and maybe its budget)
            if fmt is not None and fmt != preset.format:
                raise ConfigError(f"{where}: format: preset {preset.name} sets the format "
                                  f"({preset.format.to_doc()}); give one or the other")
            fmt = preset.format
        options = doc.get("trace_options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: trace_options: must be a mapping of importer option: value")
        budget = _budget(doc.get("budget"), where)
        if preset is not None and preset.budget == "all":
            if budget not in (None, "all"):
                raise ConfigError(f"{where}: budget: preset {preset.name} holds every expert (budget all); "
                                  f"drop budget")
            budget = "all"
        spec = cls(**out, format=fmt or FormatSpec(), policy=bundle, budget=budget,
                   trace_options=tuple(sorted((str(k), str(v)) for k, v in options.items())))
        return spec.checked(where)

    def checked(self, where: str = "run spec") -> "RunSpec":
        """Combinations no single field can check."""
        if not self.synthetic:
            given = [k for k in ("tokens", "prompt_tokens", "requests") if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{where}: {' and '.join(given)}: a trace file brings its own requests and "
                                  f"lengths; drop {' and '.join(given)} (they shape synthetic routing only)")
        elif self.trace_options:
            raise ConfigError(f"{where}: trace_options: importer options need a trace file (trace is synthetic)")
        return self

    def to_doc(self) -> dict:
        doc = {"device": self.device, "storage": self.storage, "power_mode": self.power_mode, "model": self.model,
               "trace": self.trace,
               "trace_options": dict(self.trace_options), "skew": self.skew, "locality": self.locality,
               "requests": self.requests, "format": self.format.to_doc(), "policy": bundle_to_doc(self.policy),
               "budget": self.budget, "batch": self.batch, "tokens": self.tokens,
               "prompt_tokens": self.prompt_tokens, "seed": self.seed, "store": self.store}
        if self.kv != "fixed":           # (the default is left out: the hashes of earlier runs stay)
            doc["kv"] = self.kv
        if self.placement is not None:
            doc["placement"] = self.placement.to_doc()
        if self.host_budget is not None:
            doc["host_budget"] = self.host_budget
        if self.host_cache is not None:
            doc["host_cache"] = self.host_cache.to_doc()
        if self.dense_bits is not None:
            doc["dense_bits"] = self.dense_bits
        return doc

    @classmethod
    def load(cls, path) -> "RunSpec":
        return cls.from_doc(read_yaml(path, "run spec"), str(path))

    def save(self, path, header: str = "", extra: dict | None = None) -> Path:
        from devices.atomic import atomic_write
        body = yaml.safe_dump({**self.to_doc(), **(extra or {})}, sort_keys=False)
        return atomic_write(Path(path), header + body)

    def with_(self, **changes) -> "RunSpec":
        return replace(self, **changes)

    def config_hash(self) -> str:
        """The hash of the run this spec makes (of its resolved form; the preset label aside)."""
        doc = dict(self.to_doc(), policy=self.policy.to_doc())     # a preset as the bundle it names
        body = json.dumps(doc, sort_keys=True, default=str)
        return hashlib.sha1(body.encode()).hexdigest()[:16]


def read_yaml(path, what: str):
    """A YAML file's document (safe_load), or a one-line error naming the file and what it should be."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable YAML {what} ({e})") from None


def _preset(bundle):
    if not bundle.preset:
        return None
    from policies.presets import get_preset
    return get_preset(bundle.preset)


DENSE_BITS = (4, 8, 16)        # the precisions a deployment stores its non-expert weights at
SCALAR_TYPES = {"dense_bits": int, "kv": str, "device": str, "storage": str, "power_mode": str, "model": str, "trace": str, "store": str, "skew": float,
                "locality": float, "requests": int, "batch": int, "tokens": int, "prompt_tokens": int, "seed": int}
MINIMUM = {"requests": 1, "batch": 1, "tokens": 1, "prompt_tokens": 0, "seed": 0, "skew": 0, "locality": 0}
NULLABLE = ("dense_bits", "device", "storage", "power_mode", "model", "requests", "tokens", "prompt_tokens", "store")


def _check_scalar(key: str, value, where: str):
    kind = SCALAR_TYPES[key]
    if value is None and key in NULLABLE:
        return None
    ok = (isinstance(value, kind) or (kind is float and isinstance(value, int))) and not isinstance(value, bool)
    if not ok or (key in MINIMUM and value < MINIMUM[key]):
        words = {str: "a name or path", float: "a number", int: "a whole number"}[kind]
        low = f" >= {MINIMUM[key]}" if key in MINIMUM else ""
        raise ConfigError(f"{where}: {key}: must be {words}{low}, got {value!r}")
    if key == "dense_bits" and value not in DENSE_BITS:
        raise ConfigError(f"{where}: dense_bits: {value!r} is not a precision of the dense weights; allowed: "
                          f"{', '.join(map(str, DENSE_BITS))}")
    if key == "kv" and value not in KV_MODES:
        raise ConfigError(f"{where}: kv: {value!r} is not a KV mode; allowed: {', '.join(KV_MODES)}")
    if key == "locality" and value > 1:
        raise ConfigError(f"{where}: locality: a probability in [0, 1], got {value!r}")
    return float(value) if kind is float else value


def _budget(value, where: str, key: str = "budget"):
    """Bytes, `all` (the budget only), or None (the engine's default)."""
    if value is None or (value == "all" and key == "budget"):
        return value
    try:
        out = parse_size(value, key) if isinstance(value, str) else value
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if isinstance(out, bool) or not isinstance(out, (int, float)) or not 0 < out < 2 ** 63 or int(out) != out:
        words = " or `all`" if key == "budget" else ""
        raise ConfigError(f"{where}: {key}: a size between 1 byte and 2^63 (e.g. 2GB, 512MiB){words}, "
                          f"got {value!r}")
    return int(out)


def _tier_keys(doc: dict, where: str) -> dict:
    """placement, host_budget and host_cache of a spec document, checked (gpu-only alone is the default)."""
    out = {}
    for key, role in (("placement", "placement"), ("host_cache", "cache")):
        value = doc.get(key)
        if value is None:
            continue
        name, options = (value.get("name"), value.get("options")) if isinstance(value, dict) else (value, None)
        if isinstance(value, dict) and (set(value) - {"name", "options"} or "name" not in value):
            raise ConfigError(f"{where}: {key}: a name or {{name: NAME, options: {{...}}}}, got {value!r}")
        spec = PolicySpec.make(role, name, options, where=f"{where}: {'host_' if role == 'cache' else ''}")
        if key == "placement" and spec == PolicySpec("gpu-only"):
            continue
        out[key] = spec
    if doc.get("host_budget") is not None:
        out["host_budget"] = _budget(doc["host_budget"], where, "host_budget")
    return out


@functools.lru_cache(maxsize=64)
def trace_model(path: str):
    """The model a trace file names (read once per file for a whole grid)."""
    from workloads.catalog import model_of_trace
    from workloads.importers import import_trace
    model = model_of_trace(import_trace(path).metadata, path)
    if model is None:
        raise ConfigError(f"{path}: the trace names no model; give model:")
    return model


# -- the rows of a sweep ---------------------------------------------------------------------------
ROW_FIELDS = ("config_hash", "device", "storage", "power_mode", "model", "trace", "trace_options", "policy", "preset", "cache",
              "cache_options", "scheduler", "scheduler_options", "allocator", "allocator_options", "prefetch",
              "prefetch_options", "budget_bytes", "batch", "format", "ladder", "codec", "tokens", "prompt_tokens",
              "requests", "skew", "locality", "seed", "store", "kv", "dense_bits", "placement", "host_budget", "host_cache")


def spec_row(spec: RunSpec, model_name: str | None = None) -> dict:
    """The config columns of a results row (a resolved spec, flattened; options as JSON). `model`
    shows the model's name also where the spec leaves it to the trace (`row_spec` undoes that)."""
    b, f = spec.policy, spec.format
    row = {"config_hash": spec.config_hash(), "device": spec.device, "storage": spec.storage,
           "power_mode": spec.power_mode or "",
           "model": spec.model or model_name,
           "trace": spec.trace, "trace_options": json.dumps(dict(spec.trace_options)), "policy": b.label(),
           "preset": b.preset, "budget_bytes": spec.budget, "batch": spec.batch, "format": f.name,
           "ladder": f.ladder or "", "codec": f.codec or "", "tokens": spec.tokens, "prompt_tokens": spec.prompt_tokens,
           "requests": spec.requests, "skew": spec.skew, "locality": spec.locality, "seed": spec.seed,
           "store": spec.store or "", "kv": spec.kv, "dense_bits": spec.dense_bits or "",
           # the host level (empty: one level); a policy as its JSON document
           "placement": json.dumps(spec.placement.to_doc()) if spec.placement else "",
           "host_budget": spec.host_budget or "",
           "host_cache": json.dumps(spec.host_cache.to_doc()) if spec.host_cache else ""}
    for role in ("cache", "scheduler", "allocator", "prefetch"):
        p = getattr(b, role)
        row[role] = p.name
        row[f"{role}_options"] = json.dumps(p.to_doc()["options"] if p.options else {})
    return row


def row_spec(row: dict, where: str = "row") -> RunSpec:
    """The run spec of a results row (what `pick` writes), checked as any spec is."""
    def num(key, kind):
        value = row.get(key)
        return None if value in (None, "", "None") else kind(float(value)) if kind is int else kind(value)

    policy = {role: {"name": row[role], "options": json.loads(row.get(f"{role}_options") or "{}")}
              for role in ("cache", "scheduler", "allocator", "prefetch")}
    fmt = {"name": row["format"], **({"ladder": row["ladder"]} if row.get("ladder") else {}),
           **({"codec": row["codec"]} if row.get("codec") else {})}
    budget = row.get("budget_bytes")
    model = row["model"] or None
    if row["trace"] != SYNTHETIC and model is not None:
        if trace_model(row["trace"]).name == model:     # the trace's own model, left to the trace
            model = None
    doc = {"device": row["device"], "storage": row.get("storage") or None,
           "power_mode": row.get("power_mode") or None, "model": model,
           "trace": row["trace"], "trace_options": json.loads(row.get("trace_options") or "{}"),
           "skew": num("skew", float), "locality": num("locality", float), "requests": num("requests", int),
           "format": fmt, "policy": policy, "budget": budget if budget == "all" else num("budget_bytes", int),
           "batch": num("batch", int), "tokens": num("tokens", int), "prompt_tokens": num("prompt_tokens", int),
           "seed": num("seed", int), "store": row.get("store") or None, "kv": row.get("kv") or "fixed",
           "dense_bits": num("dense_bits", int), "host_budget": num("host_budget", int),
           **{k: json.loads(row[k]) for k in ("placement", "host_cache") if row.get(k)}}
    spec = RunSpec.from_doc(doc, where)
    return spec.with_(policy=replace(spec.policy, preset=row.get("preset") or ""))
