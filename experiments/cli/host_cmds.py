"""`moelab profile` and `moelab validate`: this host measured as the executor uses it, and the
simulator's predictions checked against it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from experiments.cli.args import check_out_file, device_storage, positive_int

DEFAULT_HOST_PROFILE = "runs/host.yaml"

def cmd_profile(args) -> None:
    from executor.profile_host import write_profile
    from experiments.calibrate import measure_host
    out = check_out_file(args.out)
    busy = busy_host_warning()
    if busy:
        print(busy, file=sys.stderr)
    if args.throttle:                   # a wrong name fails before measuring
        args.throttle = ":".join(device_storage(args.throttle))
    m = measure_host(args.model_dir, quick=args.quick, quiet=args.quiet, throttle=args.throttle)
    device = write_profile(out, m, "moelab " + " ".join(args.argv))
    print(device.describe())

def busy_host_warning(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when other work already keeps the host's cores busy: the executor's runs would
    then measure that work too (a quick validation beside a 2-process sweep measured 2-3x the
    profile's times)."""
    load = os.getloadavg()[0] if load is None else load
    cores = (os.cpu_count() or 1) if cores is None else cores
    if load < 0.5 * cores:
        return None
    return (f"warning: the host is busy (load average {load:.1f} on {cores} cores): the executor's runs will "
            f"measure that work too; validate (and profile) on a quiet host")

def cmd_validate(args) -> None:
    from experiments.validate import Validator, summary
    if args.throttle:
        args.throttle = ":".join(device_storage(args.throttle))
    busy = busy_host_warning()
    if busy:
        print(busy, file=sys.stderr)
    if not Path(args.profile).exists():
        from executor.profile_host import write_profile
        from experiments.calibrate import measure_host
        print(f"no host profile at {args.profile}: measuring it first (`moelab profile --out {args.profile}`)",
              file=sys.stderr)
        write_profile(args.profile, measure_host(args.model_dir, quick=args.quick, quiet=args.quiet),
                      f"moelab profile --out {args.profile}" + (" --quick" if args.quick else ""))
    rows = Validator(args.out, args.profile, throttle=args.throttle, quick=args.quick, repeats=args.repeats,
                     model_dir=args.model_dir, quiet=args.quiet).run()
    for s in summary(rows):
        med, mx = s["err_tpot_s_mean"]
        print(f"throttle {s['throttle']}: {s['configs']} configurations, decisions identical in {s['identical']}; "
              f"|TPOT error| median {100 * med:.1f}%, max {100 * mx:.1f}% (executor spread median "
              f"{100 * s['tpot_spread'][0]:.1f}%)")
    print(f"wrote {Path(args.out) / 'validation.csv'}, validation.md, validation.png")


def add_parsers(sub, add) -> None:
    p = add(sub, "profile", help="measure this host as the executor uses it; write a device profile YAML")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--out", default=DEFAULT_HOST_PROFILE, help="profile YAML to write")
    p.add_argument("--quick", action="store_true", help="fewer token counts and repeats (tests)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]",
                   help="hold the forced runs' reads to a device's storage: the run figures (dense, decision path, "
                        "contention) measured in that regime, for `validate --throttle` with the same storage")
    p.set_defaults(func=cmd_profile)

    p = add(sub, "validate", help="the simulator's prediction against the executor's measurement on this host")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--profile", default=DEFAULT_HOST_PROFILE,
                   help="measured host profile (`moelab profile`; measured first if missing)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="hold the executor's reads to a device's storage "
                                                                  "(and simulate that storage)")
    p.add_argument("--repeats", type=positive_int, default=3, help="executor runs per configuration")
    p.add_argument("--quick", action="store_true", help="a small matrix and a short trace (tests)")
    p.add_argument("--out", default="runs/validate", help="folder for validation.csv / .md / .png (resumable)")
    p.set_defaults(func=cmd_validate)
