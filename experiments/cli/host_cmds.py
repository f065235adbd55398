"""`moelab profile` and `moelab validate`: this host measured as the executor uses it, and the
simulator's predictions checked against it.

Both measure the host, so both refuse a busy one (other work on the cores is measured too)
unless `--force`, and both can pin the whole process to N cores (`--cores N`: the host as it
will be used, e.g. a 2-core device checked on a bigger machine at 1 and at 2 cores).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from devices.units import ConfigError
from experiments.cli.args import check_out_file, check_torch_device, device_storage, positive_float, positive_int

DEFAULT_HOST_PROFILE = "runs/host.yaml"
BUSY = 0.5              # a 1-minute load average at or above this share of the host's cores is busy


def pin_cores(n: int | None) -> list[int]:
    """Pin this process to the first `n` CPUs it may run on (None: leave it), with the OS's
    affinity: every thread it has now (os.sched_setaffinity per thread of /proc/self/task) and
    so every thread it starts later (the executor's I/O and decompression workers, torch's and
    numba's pools inherit it); torch's intra-op threads set to match (all cores but one, as the
    executor's default). Returns the CPUs it may run on."""
    if not hasattr(os, "sched_setaffinity"):
        if n is not None:
            raise ConfigError("--cores: this OS has no os.sched_setaffinity (Linux has); run without --cores")
        return list(range(os.cpu_count() or 1))
    allowed = sorted(os.sched_getaffinity(0))
    if n is None:
        return allowed
    if n > len(allowed):
        raise ConfigError(f"--cores {n}: this process may run on {len(allowed)} CPUs "
                          f"({','.join(map(str, allowed))}); give at most {len(allowed)}")
    cpus = allowed[:n]
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):     # a thread that ended meanwhile
            pass
    import torch
    from executor.profile_host import host_torch_threads
    torch.set_num_threads(host_torch_threads("cpu"))
    return cpus


def busy_host_warning(load: float | None = None, cores: int | None = None) -> str | None:
    """Why the host counts as busy (None: quiet): other work already keeps its cores busy, so the
    executor's runs would measure that work too (a quick validation beside a 2-process sweep
    measured 2-3x the profile's times). `cores`: the host's, since other processes may run on
    the cores this one is pinned to."""
    load = os.getloadavg()[0] if load is None else load
    cores = (os.cpu_count() or 1) if cores is None else cores
    if load < BUSY * cores:
        return None
    return (f"warning: the host is busy (load average {load:.1f} on {cores} cores): the executor's runs will "
            f"measure that work too; validate (and profile) on a quiet host")


def check_quiet_host(force: bool, what: str) -> None:
    """Refuse to measure on a busy host (a one-line error naming --force); with --force, warn."""
    busy = busy_host_warning()
    if busy is None:
        return
    if not force:
        raise ConfigError(f"{busy.removeprefix('warning: ')} (or give --force to {what} anyway: the load it saw "
                          f"is recorded)")
    print(f"{busy}; measuring anyway (--force)", file=sys.stderr)


def host_setup(args, what: str) -> list[int]:
    """What profile and validate do before measuring: check the throttle and the torch device by
    name, refuse a busy host, pin the cores."""
    if args.throttle:                   # a wrong name fails before measuring
        args.throttle = ":".join(device_storage(args.throttle))
    check_torch_device(args.torch_device)
    check_quiet_host(args.force, what)
    return pin_cores(args.cores)


def cmd_profile(args) -> None:
    from executor.host_probe import SPREAD_LIMIT, spread, unsteady_warning
    from executor.profile_host import write_profile
    from experiments.calibrate import measure_host
    out = check_out_file(args.out)
    host_setup(args, "profile")
    m = measure_host(args.model_dir, quick=args.quick, quiet=args.quiet, throttle=args.throttle,
                     torch_device=args.torch_device)
    device = write_profile(out, m, "moelab " + " ".join(args.argv))
    print(device.describe())
    print("\n".join(line.lstrip("# ") for line in m["provenance"].splitlines()))
    if spread(m["probes"]) > SPREAD_LIMIT:
        print(f"warning: the host's speed moved {100 * spread(m['probes']):.0f}% while it was profiled (another "
              f"tenant of the machine? the load average does not see one): its figures mix speeds; profile again "
              f"on a quiet host before validating against it", file=sys.stderr)
    if warning := unsteady_warning(m["steadiness"], "it was profiled"):
        print(warning, file=sys.stderr)


def cmd_validate(args) -> None:
    from executor.host_probe import unsteady_warning
    from experiments.validate import QUICK_PROFILE, Validator, host_drift, host_steadiness, profile_is_quick, summary
    from experiments.validate_stats import summary_lines
    host_setup(args, "validate")
    if not Path(args.profile).exists():
        from executor.profile_host import write_profile
        from experiments.calibrate import measure_host
        print(f"no host profile at {args.profile}: measuring it first (`moelab profile --out {args.profile}`)",
              file=sys.stderr)
        command = f"moelab profile --out {args.profile}" + (" --quick" if args.quick else "") + \
            (f" --cores {args.cores}" if args.cores else "") + \
            (f" --torch-device {args.torch_device}" if args.torch_device != "cpu" else "")
        write_profile(args.profile, measure_host(args.model_dir, quick=args.quick, quiet=args.quiet,
                                                 torch_device=args.torch_device), command)
    if profile_is_quick(args.profile):
        print(f"warning: {args.profile} was {QUICK_PROFILE}", file=sys.stderr)
    v = Validator(args.out, args.profile, throttle=args.throttle, quick=args.quick, repeats=args.repeats,
                  max_repeats=args.max_repeats or 2 * args.repeats, spread_limit=args.spread_limit,
                  torch_device=args.torch_device, model_dir=args.model_dir, quiet=args.quiet, reduced=args.reduced)
    rows = v.run()
    for s in summary(rows):
        med, mx = s["err_tpot_s_mean"]
        print(f"throttle {s['throttle']}: {s['configs']} configurations, decisions identical in {s['identical']}; "
              f"|TPOT error| median {100 * med:.1f}%, max {100 * mx:.1f}% (executor spread median "
              f"{100 * s['tpot_spread'][0]:.1f}%)")
    for line in summary_lines(rows):
        print(line)
    print(host_drift(args.out, args.profile))
    print(host_steadiness(v.host, args.profile))
    if warning := unsteady_warning(v.host["steadiness"], "it was validated"):
        print(warning, file=sys.stderr)
    print(f"wrote {Path(args.out) / 'validation.csv'}, validation.md, validation.png")


def add_host_options(p) -> None:
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--cores", type=positive_int, metavar="N",
                   help="pin the whole process (its I/O and decompression threads too) to N of the CPUs it may run "
                        "on (os.sched_setaffinity; torch threads N - 1, at least 1), as on an N-core device")
    p.add_argument("--force", action="store_true", help="measure even on a busy host (load average >= half the "
                                                        "cores); the load seen is recorded")
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"], help="where experts compute")


def add_parsers(sub, add) -> None:
    p = add(sub, "profile", help="measure this host as the executor uses it; write a device profile YAML")
    add_host_options(p)
    p.add_argument("--out", default=DEFAULT_HOST_PROFILE, help="profile YAML to write")
    p.add_argument("--quick", action="store_true", help="fewer token counts and repeats (tests)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]",
                   help="hold the forced runs' reads to a device's storage: the run figures (dense, decision path, "
                        "contention) measured in that regime, for `validate --throttle` with the same storage")
    p.set_defaults(func=cmd_profile)

    p = add(sub, "validate", help="the simulator's prediction against the executor's measurement on this host")
    add_host_options(p)
    p.add_argument("--profile", default=DEFAULT_HOST_PROFILE,
                   help="measured host profile (`moelab profile`; measured first if missing)")
    p.add_argument("--throttle", metavar="DEVICE[:STORAGE]", help="hold the executor's reads to a device's storage "
                                                                  "(and simulate that storage)")
    p.add_argument("--repeats", type=positive_int, default=3, help="executor runs per configuration")
    p.add_argument("--max-repeats", type=positive_int, metavar="N",
                   help="runs per configuration at most: one whose TPOT spread over its first --repeats runs exceeds "
                        "--spread-limit is run again up to N times (default: 2 x --repeats)")
    p.add_argument("--spread-limit", type=positive_float, default=0.15, metavar="SHARE",
                   help="the TPOT spread (sd / median of the runs) above which a configuration gets more runs")
    p.add_argument("--quick", action="store_true", help="a small matrix and a short trace (tests)")
    p.add_argument("--reduced", action="store_true", help="every format with LRU and its paper's cache at half "
                                                          "the experts' bytes, batch 1 and 4, prefetch none and "
                                                          "oracle (20 configurations, the full trace)")
    p.add_argument("--out", default="runs/validate", help="folder for validation.csv / .md / .png (resumable)")
    p.set_defaults(func=cmd_validate)
