"""A policy bundle as data: which policy fills each role, with which options.

`PolicySpec` is one registered name plus its options, checked and converted by the class's
declaration (policies/options.py); `BundleSpec` the four roles. They load from and save to the
same YAML shape everywhere (a grid's `policy:`, a run spec's `bundle:`, a preset, a pick file):

    cache: lru                                  # a name, or
    scheduler: {name: fifo, options: {order: expert-id}}
    allocator: capacity
    prefetch: none
    allocator_options: {capacities: [0.3, 0.4, 0.3]}   # also accepted beside a bare name

A bare string is the cache alone; `{preset: NAME}` is a named bundle (policies/presets.py
`bundle_from_doc`). Errors name the key path (`where`) and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from devices.units import ConfigError
from policies.options import as_yaml, convert, declared
from policies.registry import ALLOCATORS, CACHES, PLACEMENTS, PREFETCHERS, SCHEDULERS

ROLES = {"cache": (CACHES, "lru"), "scheduler": (SCHEDULERS, "fifo"), "allocator": (ALLOCATORS, "fixed"),
         "prefetch": (PREFETCHERS, "none")}
# roles a run spec names beside its bundle (experiments/spec.py: placement, host_cache), so that a
# bundle's document, label and hash stay what they were
EXTRA_ROLES = {"placement": (PLACEMENTS, "gpu-only")}
ALL_ROLES = ROLES | EXTRA_ROLES


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy and its options (typed; sorted by name so equal specs compare equal)."""
    name: str
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def make(cls, role: str, name: str, options: dict | None = None, where: str = "") -> "PolicySpec":
        table = ALL_ROLES[role][0]
        where = f"{where}{role}" if where else role
        if not isinstance(name, str) or name not in table:
            raise ConfigError(f"{where}: unknown {role} {name!r}; known: {', '.join(table)}")
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}_options: must be a mapping of option: value, got {options!r}")
        policy = table[name]
        if policy is None:                       # prefetch none
            if options:
                raise ConfigError(f"{where}_options: prefetch none takes no options, got {options}")
            return cls(name)
        try:
            typed = convert(policy, options)
        except ConfigError as e:
            raise ConfigError(f"{where}_options: {e}") from None
        return cls(name, tuple(sorted(typed.items())))

    @property
    def opts(self) -> dict:
        return dict(self.options)

    def to_doc(self):
        return self.name if not self.options else {"name": self.name, "options": as_yaml(self.opts)}


def _role_doc(doc: dict, role: str, where: str) -> tuple[str, dict]:
    """(name, options) of one role from a bundle document: `role: NAME` (+ `role_options`), or
    `role: {name: NAME, options: {...}}`."""
    value = doc.get(role, ROLES[role][1])
    extra = doc.get(f"{role}_options") or {}
    if isinstance(value, dict):
        if set(value) - {"name", "options"} or "name" not in value:
            raise ConfigError(f"{where}{role}: a name or {{name: NAME, options: {{...}}}}, got {value!r}")
        if extra:
            raise ConfigError(f"{where}{role}_options: give the options once (inside {role}: or beside it)")
        return value["name"], value.get("options") or {}
    return value, extra


@dataclass(frozen=True)
class BundleSpec:
    """The policies of a run, one per role; `preset` names the preset it came from (a label:
    an equal bundle written out is the same run)."""
    cache: PolicySpec = field(default_factory=lambda: PolicySpec("lru"))
    scheduler: PolicySpec = field(default_factory=lambda: PolicySpec("fifo"))
    allocator: PolicySpec = field(default_factory=lambda: PolicySpec("fixed"))
    prefetch: PolicySpec = field(default_factory=lambda: PolicySpec("none"))
    preset: str = field(default="", compare=False)

    KEYS = ("cache", "scheduler", "allocator", "prefetch", "cache_options", "scheduler_options",
            "allocator_options", "prefetch_options")

    @classmethod
    def from_doc(cls, doc, where: str = "") -> "BundleSpec":
        """A bundle from its YAML shape (module docstring); `where` prefixes errors ("grid.yaml: policy.")."""
        if isinstance(doc, str):
            doc = {"cache": doc}
        if not isinstance(doc, dict):
            raise ConfigError(f"{where.rstrip('.')}: a cache name or a mapping of {', '.join(cls.KEYS)}, got {doc!r}")
        for key in doc:
            if key not in cls.KEYS:
                raise ConfigError(f"{where}{key}: unknown key; keys: {', '.join(cls.KEYS)}")
        if "preset" in doc:
            raise ConfigError(f"{where}preset: a preset is read by policies/presets.py bundle_from_doc")
        roles = {role: PolicySpec.make(role, *_role_doc(doc, role, where), where=where) for role in ROLES}
        return cls(**roles)

    def to_doc(self) -> dict:
        """The YAML shape: every role named, options inside their role (presets.bundle_to_doc
        writes a preset's bundle as its name)."""
        return {role: getattr(self, role).to_doc() for role in ROLES}

    def with_options(self, role: str, options: dict) -> "BundleSpec":
        """This bundle with `options` added to one role's (command-line --ROLE-option)."""
        spec = getattr(self, role)
        merged = PolicySpec.make(role, spec.name, {**spec.opts, **options})
        return replace(self, **{role: merged})

    def label(self) -> str:
        """A short name: the preset, else the non-default choices and options joined by '+'."""
        if self.preset:
            return self.preset
        parts = [self.cache.name] + [getattr(self, r).name for r in ("scheduler", "allocator", "prefetch")
                                     if getattr(self, r).name != ROLES[r][1]]
        for role in ROLES:
            parts += [f"{k}={_short(v)}" for k, v in getattr(self, role).options]
        return "+".join(parts)

    def kwargs(self) -> dict:
        """Keyword arguments of policies.build_policies / build_online_policies."""
        out = {role: getattr(self, role).name for role in ROLES}
        out.update({f"{role}_options": getattr(self, role).opts for role in ROLES})
        return out


def _short(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def option_help(role: str) -> str:
    """Every option of every policy of a role, for the command line's help (generated, not typed)."""
    table = ALL_ROLES[role][0]
    lines = []
    for name, policy in table.items():
        opts = declared(policy) if policy is not None else {}
        if opts:
            lines.append(f"{name}: " + "; ".join(f"{o.name}={o.kind()}" for o in opts.values()))
    return " | ".join(lines) or "none take options"
