"""One run specification, one run function: the same configuration gives the same run from every
entry point (issue 18), and every declared policy option is settable from the command line and a grid."""
import json
from pathlib import Path

import pytest

from devices.units import ConfigError
from experiments.cli import build_parser, main
from experiments.cli.spec_args import spec_from_args
from experiments.run import prepare, resolve, simulate
from experiments.spec import RunSpec
from experiments.sweep import load_grid, read_results, run_config
from policies import declared
from policies.spec import ROLES, BundleSpec, PolicySpec
from workloads.formats import FormatSpec


def cli_spec(argv):
    args = build_parser().parse_args(["simulate", *argv])
    args.argv = ["simulate", *argv]
    return spec_from_args(args)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def zip_store(tmp_path_factory):
    """A recorded trace of the shipped model and its zip store, where runs look for it."""
    root = tmp_path_factory.mktemp("fourways")
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["trace", "record", "--requests", "2", "--tokens", "6", "--out", "real.npz", "--quiet"]) == 0
        assert main(["store", "build", "--format", "zip", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return root


def timeline_of(folder: Path) -> list:
    return json.loads((folder / "timeline.json").read_text())["traceEvents"]


def test_one_configuration_four_ways_gives_one_run(zip_store, monkeypatch):
    """CLI flags, a one-row grid, a pick file, a preset plus flags: one hash, identical metrics and decisions.
    On the old main the grid took tokens as decode steps and assumed zip part sizes instead of the store's."""
    monkeypatch.chdir(zip_store)
    flags = ["--device", "jetson-orin-nano-8gb", "--trace", "real.npz", "--batch", "2", "--budget", "2500000",
             "--format", "zip", "--policy", "zipmoe", "--scheduler", "zipmoe", "--cache-option", "split=0.6"]
    assert main(["simulate", *flags, "--out", "a", "--quiet"]) == 0
    grid = write(zip_store / "g.yaml", "runs:\n  - {device: jetson-orin-nano-8gb, trace: real.npz, batch: 2, "
                                       "budget: 2500000, format: zip, policy: {cache: zipmoe, scheduler: zipmoe, "
                                       "cache_options: {split: 0.6}}}\n")
    assert main(["sweep", str(grid), "--out", "r.csv", "--jobs", "1", "--quiet"]) == 0
    assert main(["pick", "r.csv", "--out", "picked.yaml"]) == 0
    assert main(["simulate", "--spec", "picked.yaml", "--out", "b", "--quiet"]) == 0
    preset = ["--device", "jetson-orin-nano-8gb", "--trace", "real.npz", "--batch", "2", "--budget", "2500000",
              "--preset", "zipmoe-c"]
    assert main(["simulate", *preset, "--out", "c", "--quiet"]) == 0
    metrics = [json.loads((zip_store / d / "metrics.json").read_text()) for d in "abc"]
    row = read_results(zip_store / "r.csv")[0]
    assert len({m["config_hash"] for m in metrics} | {row["config_hash"]}) == 1
    assert resolve(cli_spec(flags)) == RunSpec.load(zip_store / "picked.yaml")
    for key in ("bytes_read", "generated_tokens", "hit_ratio", "tpot_s_mean", "loads", "throughput_tok_s"):
        assert len({m[key] for m in metrics}) == 1, key
        assert float(row[key]) == pytest.approx(metrics[0][key], rel=1e-12), key
    assert timeline_of(zip_store / "a") == timeline_of(zip_store / "b") == timeline_of(zip_store / "c")
    # part sizes came from the store (what `execute` reads), not the assumed exponent ratio
    from workloads.formats import stored_format
    store = stored_format(zip_store / "runs" / "stores" / "tiny-moe-zip")
    assert prepare(RunSpec.load(zip_store / "picked.yaml")).fmt.part_bytes == store.part_bytes


def test_synthetic_tokens_mean_new_tokens_in_a_grid_too(tmp_path):
    """`tokens: 16` in a grid and `--tokens 16` on the command line: 16 new tokens per request."""
    grid = write(tmp_path / "g.yaml", "tokens: 16\nruns:\n  - {model: olmoe-1b-7b, batch: 2, budget: 4GB}\n")
    (spec,) = load_grid(grid)
    row = run_config(spec)
    cli = simulate(cli_spec(["--model", "olmoe-1b-7b", "--tokens", "16", "--batch", "2", "--budget", "4GB"]),
                   timeline=False)
    assert row["generated_tokens"] == cli.metrics["generated_tokens"] == 2 * 16
    assert row["config_hash"] == cli.metrics["config_hash"]


def test_run_spec_round_trips_through_yaml(tmp_path):
    spec = RunSpec(device="raspberry-pi-5-8gb", storage="microsd", model="olmoe-1b-7b", skew=1.5, locality=0.3,
                   requests=3, format=FormatSpec("mwq", ladder="v2"), budget=123456789, batch=3, tokens=9,
                   prompt_tokens=4, seed=7,
                   policy=BundleSpec(cache=PolicySpec.make("cache", "page-cache", {"readahead_kb": 64}),
                                     scheduler=PolicySpec.make("scheduler", "hebf", {"count": "cumulative"}),
                                     allocator=PolicySpec.make("allocator", "capacity",
                                                               {"capacities": "0.2,0.3,0.5"})))
    assert RunSpec.from_doc(spec.to_doc()) == spec
    spec.save(tmp_path / "s.yaml")
    assert RunSpec.load(tmp_path / "s.yaml") == spec
    assert RunSpec.load(tmp_path / "s.yaml").config_hash() == spec.config_hash()


@pytest.mark.parametrize("doc,says", [
    ({"format": {"name": "bf16", "ladder": "v2"}}, "format: ladder v2: only mwq and copies have a ladder"),
    ({"format": {"name": "zip", "codec": "nope"}}, "codec: unknown codec 'nope'; known: lz4, lz4hc, zstd"),
    ({"policy": {"cache": "zipmoe", "cache_options": {"tiers": "maybe"}}}, "option tiers: expected true or false"),
    ({"policy": {"cache": "lru", "cache_options": {"x": 1}}}, "lru: unknown option 'x'; options: none"),
    ({"trace": "t.npz", "tokens": 4}, "tokens: a trace file brings its own"),
    ({"budget": "-1GB"}, "budget"),
    ({"batch": 0}, "batch: must be a whole number >= 1"),
    ({"prompt": 16}, "prompt: unknown key"),
])
def test_bad_specs_name_the_key_and_the_allowed_values(doc, says):
    with pytest.raises(ConfigError) as e:
        RunSpec.from_doc(doc, "f.yaml")
    assert str(e.value).startswith("f.yaml") and says in str(e.value), str(e.value)


# -- every declared option, from the command line and from a grid ------------------------------------
VALUES = {"level": 0, "thresholds": (0.2, 0.6), "top1_highest": False, "capacities": (0.2, 0.3, 0.5),
          "shares": (0.5, 0.25, 0.25), "max_drop": 2, "base": "capacity", "order": "expert-id",
          "count": "cumulative", "share": "proportional", "ratio": 2.5, "readahead_kb": 64, "victim": "lru",
          "tiers": False, "split": 0.6, "margin": 0.2, "thresholds_zip": "layer", "window": 16, "plan_after": 8,
          "dock": 123456, "width": 3, "threshold": 0.25,
          "mode": "corrected", "planner": "corrected", "plan_trace": "online"}
ATTRIBUTE = {"order": "order_by"}
BASE_OF = {"capacities": "capacity", "thresholds": "gate-score", "top1_highest": "gate-score"}  # level: fixed
FORMAT = {"allocator": "mwq", "zipmoe": "zip"}
ROLE_ATTR = {"cache": "cache", "scheduler": "scheduler", "allocator": "allocator", "prefetch": "prefetcher"}


def declared_options():
    for role, (table, _) in ROLES.items():
        for name, cls in table.items():
            for opt in (declared(cls) if cls is not None else {}).values():
                yield role, name, opt


def value_for(name, opt):
    if name == "zipmoe" and opt.name == "thresholds":
        return VALUES["thresholds_zip"]
    if opt.name in VALUES:
        return VALUES[opt.name]
    return generic_value(opt)


def generic_value(opt):
    """A valid value other than the default, from the declaration alone (a new option is covered too)."""
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.type == "bool":
        return not opt.default
    if opt.type == "int":
        return (opt.default or 0) + 2
    if opt.type == "float":
        return round((opt.default or 0) / 2 + 0.25, 6) if (opt.default or 0) < 1 else opt.default * 2
    pytest.fail(f"no generic value for {opt.type} option {opt.name}: add one to VALUES")


def as_text(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def read_back(policies, role, name, option):
    policy = getattr(policies, ROLE_ATTR[role])
    if name == "resident-first" and option not in ("base", "max_drop"):
        policy = policy.base
    if name == "resident-first" and option == "base":
        return policy.base.name
    got = getattr(policy, ATTRIBUTE.get(option, option))
    return tuple(got) if isinstance(got, list) else got


@pytest.mark.parametrize("role,name,opt", list(declared_options()), ids=lambda x: getattr(x, "name", x))
def test_every_declared_option_is_set_from_cli_and_grid(tmp_path, role, name, opt):
    value = value_for(name, opt)
    fmt = FORMAT.get(name, FORMAT.get(role, "bf16"))
    flag = "--policy" if role == "cache" else f"--{role}"
    argv = ["--model", "olmoe-1b-7b", "--tokens", "3", "--budget", "8GB", "--format", fmt, flag, name,
            f"--{role}-option", f"{opt.name}={as_text(value)}"]
    # resident-first passes a base allocator's option to the base that takes it
    base = BASE_OF.get(opt.name) if name == "resident-first" else None
    extra = ["--allocator-option", f"base={base}"] if base else []
    if name == "zipmoe" and role == "cache":
        argv += ["--scheduler", "zipmoe"]
    base_opts = {"base": base} if base else {}
    grid = write(tmp_path / "g.yaml", "runs:\n  - " + json.dumps({
        "model": "olmoe-1b-7b", "tokens": 3, "budget": "8GB", "format": fmt,
        "policy": {role: name, f"{role}_options": {opt.name: list(value) if isinstance(value, tuple) else value,
                                                    **base_opts},
                   **({"scheduler": "zipmoe"} if name == "zipmoe" and role == "cache" else {})}}) + "\n")
    for spec in (cli_spec(argv + extra), load_grid(grid)[0]):
        got = read_back(prepare(spec, timeline=False).policies, role, name, opt.name)
        assert got == (pytest.approx(value) if isinstance(value, (float, tuple)) and opt.type != "str" else value)


@pytest.mark.parametrize("word", ["false", "0", "no", "False", "off"])
def test_false_words_are_false(word):
    spec = cli_spec(["--format", "zip", "--policy", "zipmoe", "--cache-option", f"tiers={word}"])
    assert spec.policy.cache.opts == {"tiers": False}


@pytest.mark.parametrize("argv,says", [
    (["--format", "zip", "--policy", "zipmoe", "--cache-option", "tiers=maybe"],
     "error: --cache-option: zipmoe: option tiers: expected true or false"),
    (["--format", "zip", "--policy", "zipmoe", "--cache-option", "margin=abc"],
     "error: --cache-option: zipmoe: option margin: expected a number, got 'abc'"),
    (["--scheduler", "fifo", "--scheduler-option", "bogus=1"],
     "error: --scheduler-option: fifo: unknown option 'bogus'; options: order (str)"),
    (["--prefetch", "gate-topk", "--prefetch-option", "width=2.5"],
     "error: --prefetch-option: gate-topk: option width: expected a whole number, got '2.5'"),
])
def test_a_wrong_option_is_one_line(tmp_path, capsys, argv, says):
    assert main(["simulate", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1, err


def test_no_per_value_registrations():
    """Options are options: no policy is registered once per value of one of them."""
    from policies import CACHES
    assert not [n for n in CACHES if n.startswith("zipmoe-")]
