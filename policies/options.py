"""Policy options, declared once in each policy's class (`options = (Option(...), ...)`).

The declaration is the one place that knows an option's name, type, default, unit and help:
the factory (policies/__init__.py) converts and checks every value through it, whether it came
from the command line (a string), a grid, a preset or a pick file (YAML scalars); `moelab
policies NAME` prints it and the command line's help is generated from it. A range or a
combination the type cannot say (a share in (0, 1), thresholds per level) the policy itself
checks when it is built.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.units import ConfigError

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
TYPES = ("int", "float", "bool", "str", "floats")


@dataclass(frozen=True)
class Option:
    """One option of a policy. `type`: int | float | bool | str | floats (a list of numbers, from
    a YAML list or "0.3,0.4,0.3"); `choices`: the allowed values of a str option; `special`:
    words allowed besides a number (split: "plan"); `default` None means the policy chooses
    (its help says how)."""
    name: str
    type: str
    default: object = None
    help: str = ""
    unit: str = ""
    choices: tuple = ()
    special: tuple = ()

    def __post_init__(self):
        assert self.type in TYPES, f"option {self.name}: type {self.type!r} not in {TYPES}"

    def parse(self, value, who: str):
        """`value` as this option's type, or a one-line error naming the policy and the option."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() in self.special:
            return value.strip().lower()
        try:
            out = _CONVERT[self.type](value)
        except (TypeError, ValueError):
            raise ConfigError(f"{who}: option {self.name}: expected {self.kind()}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{who}: option {self.name}: must be one of {', '.join(map(str, self.choices))}, "
                              f"got {value!r}")
        return out

    def kind(self) -> str:
        """The type in words, as errors and help show it."""
        words = {"int": "a whole number", "float": "a number", "bool": "true or false (yes/no, 1/0)",
                 "str": "a word", "floats": "numbers separated by commas"}[self.type]
        if self.choices:
            words = " | ".join(map(str, self.choices))
        if self.special:
            words += " or " + " | ".join(self.special)
        return words

    def describe(self) -> str:
        default = "the policy's own" if self.default is None else _show(self.default)
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.name}={self.type}{unit}: {self.help} [{self.kind()}; default: {default}]"


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(value)


def _int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip()) if isinstance(value, str) else int(value)


def _float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(value)
    return out


def _floats(value) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(value)
    return tuple(_float(v) for v in value)


def _str(value) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value.strip()


_CONVERT = {"int": _int, "float": _float, "bool": _bool, "str": _str, "floats": _floats}


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def declared(cls) -> dict[str, Option]:
    """The options a policy class declares (its own and its bases'), by name."""
    out: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        for opt in klass.__dict__.get("options", ()):
            out[opt.name] = opt
    return out


def convert(cls, values: dict, who: str | None = None) -> dict:
    """`values` checked against cls's declaration and converted to their types; an unknown option
    is named with the ones cls takes."""
    who = who or cls.name
    known = declared(cls)
    out = {}
    for key, value in values.items():
        if key not in known:
            listed = ", ".join(f"{o.name} ({o.type})" for o in known.values()) or "none"
            raise ConfigError(f"{who}: unknown option {key!r}; options: {listed}")
        out[key] = known[key].parse(value, who)
    return out


def as_yaml(values: dict) -> dict:
    """Typed option values as plain YAML scalars and lists (a tuple becomes a list)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(values.items())}
