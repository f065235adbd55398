"""`moelab devices`, `moelab models`, `moelab policies [NAME]`: what there is to choose from.
"""
from __future__ import annotations

from devices.units import ConfigError, format_size

def cmd_devices(args) -> None:
    from devices.profile import list_devices, load_device
    from devices.power import describe_modes, load_power, power_file
    if args.name:
        d = load_device(args.name)
        modes = describe_modes(d.name)
        print(d.describe() + ("\n" + modes if modes else f"\n  power modes: none (no devices/power/{d.name}.yaml: "
                                                           f"energy metrics are null)"))
        return
    for name in list_devices():
        d = load_device(name)
        modes = ", ".join(load_power(name).modes) if power_file(name) else "-"
        print(f"  {name:<32} {format_size(d.memory_bytes):>9}  storage: {', '.join(d.storage)} "
              f"(default {d.default_storage}); power modes: {modes}")

def cmd_models(args) -> None:
    from workloads.catalog import CATALOG
    print(f"  {'name':<20} {'layers':>6} {'experts':>7} {'top-k':>5} {'d_model':>7} {'d_ff':>6} {'expert':>9}")
    for m in CATALOG.values():
        print(f"  {m.name:<20} {m.layers:>6} {m.experts:>7} {m.top_k:>5} {m.d_model:>7} {m.d_ff:>6} "
              f"{format_size(m.expert_bytes):>9}")

def cmd_policies(args) -> None:
    """The registered policies and presets; with a NAME, that policy's options (declared in its class)."""
    from policies.presets import PRESETS
    from policies.spec import ROLES
    if args.name:
        print_policy(args.name)
        return
    for role, (table, _) in ROLES.items():
        names = [f"{n} (offline bound)" if getattr(c, "offline", False) else n for n, c in table.items()]
        print(f"  {role + ':':<11} {', '.join(names)}")
    print("  presets (--preset NAME; D²MoE, ZipMoE and the baselines of their evaluations):")
    for p in PRESETS.values():
        print(f"    {p.name:<18} {p.description}")
    print("  `moelab policies NAME` lists a policy's options (--cache-option KEY=VALUE etc.)")


def print_policy(name: str) -> None:
    from policies import declared
    from policies.presets import PRESETS
    from policies.spec import ROLES
    found = [(role, table[name]) for role, (table, _) in ROLES.items() if name in table]
    if not found and name in PRESETS:
        p = PRESETS[name]
        print(f"preset {name}: {p.description}\n  format: {p.format.to_doc()}\n  bundle: {p.bundle.to_doc()}"
              + (f"\n  budget: {p.budget}" if p.budget else ""))
        return
    if not found:
        known = sorted({n for table, _ in ROLES.values() for n in table} | set(PRESETS))
        raise ConfigError(f"unknown policy or preset {name!r}; known: {', '.join(known)}")
    for role, cls in found:
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ") if cls is not None else "no prefetch"
        bound = " [offline bound: reads the run's own future; `pick` refuses it]" if getattr(cls, "offline", False) else ""
        print(f"{role} {name}: {' '.join(doc.split())}{bound}")
        opts = declared(cls) if cls is not None else {}
        flag = "--policy" if role == "cache" else f"--{role}"
        print(f"  options ({flag} {name} --{role}-option KEY=VALUE):" if opts else "  options: none")
        for o in opts.values():
            print(f"    {o.describe()}")


def add_parsers(sub, add) -> None:
    p = add(sub, "devices", help="list device profiles, or `devices show NAME`")
    p.add_argument("action", nargs="?", choices=["show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_devices)
    add(sub, "models", help="list the architecture catalog").set_defaults(func=cmd_models)
    p = add(sub, "policies", help="list the registered policies; `policies NAME` shows one's options")
    p.add_argument("name", nargs="?", help="a policy or preset")
    p.set_defaults(func=cmd_policies)
