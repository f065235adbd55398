"""Argument types and shared argument groups of the command line: one parser for each kind of
value (a size, a DEVICE[:STORAGE], a format), one group for each family of flags (the workload,
the policy bundle, the format), so one flag means one thing in every command.

A usage error is one line, `error: ...`, exit 2 (argparse prefixes "argument --X:").
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from devices.units import ConfigError, MoelabError, parse_size

SIZE_UNITS = "GB = 10^9 bytes, GiB = 2^30 bytes; also KB, MB, KiB, MiB, or a bare number of bytes"
TOKENS_HELP = ("new tokens per request: the prefill makes the first, each decode step one more "
               "(--tokens 1 is the prefill alone)")
RUN_FILES = ("metrics.json", "timeline.json", "gantt.png")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a MoelabError: one line, `error: ...`, exit 2."""

    def error(self, message):
        raise MoelabError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None / False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def size_arg(text: str) -> int:
    """A size in bytes ("3GB", "2.5MiB"): > 0 and finite."""
    try:
        value = parse_size(text, "size")
    except OverflowError:             # "1e400" reads as infinity
        value = None
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    if value is None or not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size between 1 byte and 2^63 bytes ({SIZE_UNITS})")
    return value


def capacities_arg(text: str) -> str:
    """Comma-separated positive integers, e.g. "8,16,32" (returned normalised)."""
    caps = []
    for c in (c.strip() for c in text.split(",")):
        if not c:
            continue
        try:
            caps.append(positive_int(c))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of experts >= 1, "
                                             f"e.g. 8,16,32; got {c!r} in {text!r}") from None
    if not caps:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of experts >= 1, got {text!r}")
    return ",".join(map(str, caps))


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. experts_field=topk_ids; got {text!r}")
    return key.strip(), value


def _probe_writable(folder: Path, option: str, target: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{option} {target}: cannot write in {folder} ({e.strerror})") from None


def _existing_ancestor(path: Path, option: str) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            return parent
    raise ConfigError(f"{option} {path}: no existing parent folder")


def check_out_dir(path, option: str = "--out", run_files: tuple[str, ...] | None = RUN_FILES) -> Path:
    """Before a run: `path` can become a folder we write. With run_files, an existing folder may
    hold only a previous run's outputs (it is replaced as a whole, never mixed)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path}: is a file; give a folder (new, or one a previous run wrote)")
        if run_files is not None:
            other = sorted(p.name for p in path.iterdir() if p.name not in run_files)
            if other:
                raise ConfigError(f"{option} {path}: holds other files ({', '.join(other[:3])}"
                                  f"{', ...' if len(other) > 3 else ''}); a run replaces its whole --out folder, "
                                  f"so give a new folder or one only a previous run wrote")
        _probe_writable(path if run_files is None else path.parent, option, path)
    else:
        _probe_writable(_existing_ancestor(path, option), option, path)
    return path


def check_out_file(path, option: str = "--out") -> Path:
    """Before a run: `path` can become a file we write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    _probe_writable(path.parent if path.parent.is_dir() else _existing_ancestor(path, option), option, path)
    return path


def trace_import_epilog() -> str:
    from experiments.run import importer_options
    lines = ["importer options (--option KEY=VALUE; also taken by `simulate` and `execute` with --trace):"]
    for fmt, names in importer_options().items():
        lines.append(f"  {fmt + ':':<7} {', '.join(names)}")
    lines.append("  npz:    none (moelab's own format)")
    return "\n".join(lines)


class EpilogFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_model_args(p) -> None:
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--hf", help="a local Hugging Face MoE checkpoint folder (Mixtral, Qwen2-MoE, OLMoE)")



def check_torch_device(device: str) -> None:
    """--torch-device cuda where torch has no CUDA device: one line saying which is missing."""
    if device != "cuda":
        return
    import torch
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"--torch-device cuda: {why} (torch {torch.__version__}); use --torch-device cpu")


def budget_arg(text: str):
    """--budget: a size, or `all` (every expert resident)."""
    return "all" if text.strip().lower() == "all" else size_arg(text)


def device_storage(text: str) -> tuple[str, str | None]:
    """DEVICE[:STORAGE] (--throttle, --cost-profile): the names checked against the profiles."""
    from devices.profile import load_device
    name, _, storage = text.partition(":")
    device = load_device(name)
    return device.name if not device.path or Path(device.path).stem == device.name else name, \
        device.storage_option(storage or None).name


def negative_value(argv: list[str]) -> str | None:
    """argparse reads `--budget -1GB` as two flags ("expected one argument"): name the real problem."""
    for flag, value in zip(argv, argv[1:]):
        if flag.startswith("--") and "=" not in flag and len(value) > 1 and value[0] == "-" and \
                (value[1].isdigit() or value[1] == "."):
            return (f"{flag} {value}: a negative value is not allowed here (sizes and counts are > 0); "
                    f"if you mean it, write {flag}={value}")
    return None


# -- shared argument groups ---------------------------------------------------------------------------
def add_format_args(p) -> None:
    """--format / --ladder / --codec: names from the format registry (workloads/formats.py)."""
    from workloads.formats import CODECS, FORMATS, LADDERS
    g = p.add_argument_group("format")
    g.add_argument("--format", choices=list(FORMATS), help="expert storage format (default: bf16; copies: one "
                   "standalone INT copy per width, D²MoE's Matryoshka-Free)")
    g.add_argument("--ladder", choices=list(LADDERS), help="bit-width ladder of mwq and copies (default: v1): v1 = "
                   "INT2-4, v2 = INT5-8 (D²MoE); int4, int8: one width")
    g.add_argument("--codec", choices=list(CODECS), help="codec of --format zip (default: lz4hc)")


def add_policy_args(p) -> None:
    """The policy bundle: names checked against the registries and each option against its policy's
    declaration (policies/options.py), both when the command line is read."""
    from policies import ALLOCATORS, CACHES, PREFETCHERS, SCHEDULERS
    from policies.spec import option_help
    g = p.add_argument_group("policy bundle (`moelab policies NAME` lists a policy's options)")
    g.add_argument("--policy", metavar="NAME|FILE", help=f"cache policy (default: lru): {', '.join(CACHES)}; or a run "
                   f"spec file (YAML, `moelab pick` writes one), whose format, bundle and budget it takes")
    notes = {"prefetch": "; oracle and belady read the run's routing ahead (bounds: the simulator knows it, "
                         "execute needs --trace)",
             "allocator": "; fixed: every token at the format's top level, trace-levels: the levels a trace carries"}
    for role, table, default in (("scheduler", SCHEDULERS, "fifo"), ("allocator", ALLOCATORS, "fixed"),
                                 ("prefetch", PREFETCHERS, "none")):
        g.add_argument(f"--{role}", choices=list(table), metavar="NAME",
                       help=f"{role} (default: {default}): {', '.join(table)}{notes.get(role, '')}")
    for role in ("cache", "scheduler", "allocator", "prefetch"):
        g.add_argument(f"--{role}-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                       help=f"{role} option, repeatable: {option_help(role)}")
    g.add_argument("--preset", metavar="NAME", help="a named bundle (format + policies): d2moe, its ablations and "
                                                    "baselines, zipmoe and its (`moelab policies`)")


def add_trace_option_arg(p) -> None:
    p.add_argument("--option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="importer option for a --trace that is not .npz (repeatable; "
                        "`moelab trace import --help` lists them)")


def add_workload_args(p) -> None:
    """The routing: a trace file, or the seeded synthetic generator's parameters."""
    from experiments.spec import DEFAULT_MODEL, DEFAULT_PROMPT_TOKENS, DEFAULT_TOKENS, RunSpec
    d = RunSpec()
    g = p.add_argument_group("workload")
    g.add_argument("--model", help=f"architecture from `moelab models`, or a trained model folder (default: the "
                                   f"model the --trace names, else {DEFAULT_MODEL})")
    g.add_argument("--trace", help="routing trace (.npz, .jsonl, .csv dir, .npy); default: synthetic")
    add_trace_option_arg(g)
    g.add_argument("--batch", type=positive_int, help="requests decoded in lockstep (default: 1)")
    g.add_argument("--tokens", type=positive_int, help=f"{TOKENS_HELP} (synthetic; default: {DEFAULT_TOKENS})")
    g.add_argument("--prompt-tokens", type=int, help=f"prompt tokens per request (synthetic; default "
                                                     f"{DEFAULT_PROMPT_TOKENS})")
    g.add_argument("--requests", type=positive_int, help="requests in the synthetic trace (default: the batch)")
    g.add_argument("--skew", type=float, help=f"expert popularity skew (synthetic; 0 = uniform; default: {d.skew})")
    g.add_argument("--locality", type=float, help=f"per-slot reuse probability at the next token (synthetic; "
                                                  f"default: {d.locality})")
    g.add_argument("--seed", type=int, help=f"seed of the synthetic trace (default: {d.seed})")


def add_spec_arg(p) -> None:
    p.add_argument("--spec", metavar="FILE", help="a run spec (YAML: experiments/spec.py; `moelab pick` writes "
                                                  "one); flags given beside it override its fields")


def add_kv_arg(p) -> None:
    from workloads.memory import KV_MODES
    p.add_argument("--kv", choices=KV_MODES,
                   help="the KV cache beside a fixed expert budget (fixed: refused up front if it does not fit), or "
                        "sharing the memory with the expert cache, which yields as the KV grows (shared); "
                        "default: fixed")
