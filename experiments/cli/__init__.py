"""`moelab`: the command line, one module per command family, each a thin layer over the run
functions (experiments/run.py, experiments/run_exec.py) and the library.

Errors the user can fix (bad options, files, names) are one line, `error: ...`, exit 2;
Ctrl-C is one line, exit 130; a closed stdout (`| head`) ends the run quietly only after its
outputs are written.
"""
from __future__ import annotations

import argparse
import os
import sys

from devices.units import MoelabError
from experiments.cli import host_cmds, info_cmds, model_cmds, run_cmds, study_cmds, trace_cmds
from experiments.cli.args import SIZE_UNITS, HelpFormatter, Parser, negative_value

FAMILIES = (run_cmds, trace_cmds, study_cmds, info_cmds, model_cmds, host_cmds)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="moelab", description="On-device MoE serving policies: simulate, execute, compare. "
                                           f"Sizes: {SIZE_UNITS}.", formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or chatter")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(group, name, **kw):          # every subcommand takes --quiet and shows its defaults
        kw.setdefault("formatter_class", HelpFormatter)
        return group.add_parser(name, parents=[common], **kw)

    for family in FAMILIES:
        family.add_parsers(sub, add)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        negative = negative_value(argv)
        if negative:
            raise MoelabError(negative)
        if argv[:1] == ["execute"] and any(a == "--device" or a.startswith("--device=") for a in argv):
            raise MoelabError("execute runs on this host and has no --device: --throttle DEVICE[:STORAGE] makes "
                              "the disk behave like a device's storage, --cost-profile DEVICE[:STORAGE] sets the "
                              "costs planning policies read")
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.command == "devices" and args.action == "show" and not args.name:
            raise MoelabError("`moelab devices show NAME` needs a device name")
        args.func(args)
        sys.stdout.flush()
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from experiments.pool import Terminated
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"{what}: nothing more was written", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `moelab ... | head`: the outputs are written; stop printing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # so the interpreter's own flush at exit does not fail
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
