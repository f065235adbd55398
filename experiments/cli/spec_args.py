"""The command line as a run spec: `--spec FILE`, a policy file (`--policy FILE`), `--preset`, then
the flags given, in that order, into one `RunSpec` (experiments/spec.py) checked like any other.

A flag left out means "the spec's value"; every default lives in the spec, not in argparse.
"""
from __future__ import annotations

from pathlib import Path

from devices.units import ConfigError, MoelabError
from experiments.spec import RunSpec

SCALAR_FLAGS = {"device": "device", "storage": "storage", "power_mode": "power_mode", "model": "model", "trace": "trace",
                "batch": "batch", "tokens": "tokens", "prompt_tokens": "prompt_tokens", "requests": "requests", "skew": "skew",
                "locality": "locality", "seed": "seed", "store": "store", "budget": "budget",
                "kv": "kv"}
ROLE_FLAGS = {"cache": "policy", "scheduler": "scheduler", "allocator": "allocator", "prefetch": "prefetch"}
BUNDLE_FLAGS = ("format", "ladder", "codec", "scheduler", "allocator", "prefetch", "preset", "cache-option",
                "scheduler-option", "allocator-option", "prefetch-option")


def given(args, *flags: str) -> list[str]:
    """Which of these flags the command line names (`--x` or `--x=...`)."""
    argv = getattr(args, "argv", [])
    return [f"--{f}" for f in flags if any(a == f"--{f}" or a.startswith(f"--{f}=") for a in argv)]


def is_policy_file(text: str | None) -> bool:
    from policies import CACHES
    return text is not None and text not in CACHES and (text.endswith((".yaml", ".yml")) or Path(text).is_file())


def spec_from_args(args) -> RunSpec:
    """The run spec the command line states (errors name the flag or the file)."""
    base = RunSpec.load(args.spec).to_doc() if getattr(args, "spec", None) else {}
    if is_policy_file(getattr(args, "policy", None)):
        conflict = given(args, *BUNDLE_FLAGS)
        if conflict:
            raise MoelabError(f"--policy {args.policy} sets {', '.join(conflict)}: give one or the other")
        picked = RunSpec.load(args.policy)
        base.update(format=picked.format.to_doc(), policy=picked.policy.to_doc())
        if picked.budget is not None and getattr(args, "budget", None) is None:
            base["budget"] = picked.budget
    doc = dict(base)
    for flag, key in SCALAR_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            doc[key] = value
    if getattr(args, "option", None):
        doc["trace_options"] = dict(args.option)
    if getattr(args, "trace", None) or getattr(args, "option", None):
        # a trace given here replaces a spec's synthetic shape (its lengths come from the file)
        if getattr(args, "trace", None):
            for key in ("tokens", "prompt_tokens", "requests"):
                if getattr(args, key, None) is None:
                    doc.pop(key, None)
    _format_flags(args, doc)
    _bundle_flags(args, doc)
    try:
        return RunSpec.from_doc(doc, "command line")
    except ConfigError as e:
        raise ConfigError(_flag_words(str(e))) from None


def _format_flags(args, doc: dict) -> None:
    fmt = doc.get("format", "bf16")
    fmt = dict({"name": fmt} if isinstance(fmt, str) else fmt)
    if getattr(args, "format", None) and args.format != fmt["name"]:
        fmt = {"name": args.format}              # another format: the old one's options do not apply
    for key in ("ladder", "codec"):
        if getattr(args, key, None):
            fmt[key] = getattr(args, key)
    if fmt != ({"name": "bf16"} if "format" not in doc else doc["format"]):
        doc["format"] = fmt


def _bundle_flags(args, doc: dict) -> None:
    """--preset, the role names and the --ROLE-option flags onto the spec's bundle."""
    if getattr(args, "preset", None):
        conflict = given(args, "format", "ladder", "codec", "scheduler", "allocator", "prefetch")
        if conflict or not is_policy_file(args.policy) and args.policy is not None:
            named = conflict + (["--policy"] if args.policy is not None else [])
            raise MoelabError(f"--preset {args.preset} sets {', '.join(named)}: give one or the other "
                              f"(`moelab policies` lists what each preset sets)")
        from policies.presets import get_preset
        preset = get_preset(args.preset)
        doc["policy"] = {"preset": preset.name}
        doc.pop("format", None)
        bundle = preset.bundle.to_doc()
    else:
        bundle = _bundle_doc(doc.get("policy", "lru"))
    changed = False
    for role, flag in ROLE_FLAGS.items():
        name = getattr(args, flag, None)
        if name is not None and not (flag == "policy" and is_policy_file(name)):
            if _name(bundle[role]) != name:
                bundle[role], changed = name, True
        options = dict(getattr(args, f"{role}_option", None) or [])
        if options:
            current = bundle[role]
            merged = {**(current.get("options", {}) if isinstance(current, dict) else {}), **options}
            bundle[role], changed = {"name": _name(current), "options": merged}, True
    if changed:
        if getattr(args, "preset", None):           # options on top of a preset: the preset's format stays
            from policies.presets import get_preset
            doc["format"] = get_preset(args.preset).format.to_doc()
            if get_preset(args.preset).budget == "all" and "budget" not in doc:
                doc["budget"] = "all"
        doc["policy"] = bundle


def _bundle_doc(doc) -> dict:
    from policies.presets import bundle_from_doc
    return bundle_from_doc(doc, "policy.").to_doc()


def _name(role_doc) -> str:
    return role_doc["name"] if isinstance(role_doc, dict) else role_doc


FLAG_WORDS = {"policy.cache_options": "--cache-option", "policy.scheduler_options": "--scheduler-option",
              "policy.allocator_options": "--allocator-option", "policy.prefetch_options": "--prefetch-option",
              "policy.cache": "--policy", "policy.scheduler": "--scheduler", "policy.allocator": "--allocator",
              "policy.prefetch": "--prefetch", "prompt_tokens": "--prompt-tokens", "trace_options": "--option"}


def _flag_words(message: str) -> str:
    """A spec error in the command line's words (policy.cache_options -> --cache-option)."""
    body = message.removeprefix("command line: ")
    for key in ("ladder", "codec", "group"):            # format: codec lz4: ... -> --codec lz4: ...
        if body.startswith(f"format: {key} "):
            return "--" + body.removeprefix("format: ")
    for key, flag in FLAG_WORDS.items():
        if body.startswith(key + ":") or body.startswith(key + " "):
            return flag + body[len(key):]
    key = body.split(":", 1)[0]
    if key in SCALAR_FLAGS or key in ("format", "ladder", "codec"):
        return "--" + body.replace("_", "-", 1) if key == "prompt_tokens" else "--" + body
    return body
