"""The command line over the decision point: every cache policy replays, allocators and the
copies format are selectable, and planning policies get a cost model in the executor."""
import pytest

from experiments.cli import main
from policies import caches_for


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "t.npz"
    assert main(["trace", "synth", "--model", "olmoe-1b-7b", "--requests", "2", "--tokens", "12", "--out",
                 str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("policy", sorted(caches_for("bf16")))
def test_replay_takes_every_registered_cache_policy(trace_file, policy, capsys):
    assert main(["replay", "--trace", str(trace_file), "--policy", policy, "--capacities", "8,64,512",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["8", "64", "512"]
    assert rows[0][1] == "-" and "below the largest single-layer demand" in out   # 8 < one layer's 8 x top-8
    ratios = [float(r[1]) for r in rows[1:]]
    assert all(0 <= r <= 1 for r in ratios)
    if policy != "on-demand":
        assert ratios[1] > 0           # 512 experts hold most of olmoe's 16 x 64


def test_replay_unknown_policy_names_the_known_ones(trace_file, capsys):
    assert main(["replay", "--trace", str(trace_file), "--policy", "psychic", "--quiet"]) == 2
    assert "static-hot" in capsys.readouterr().err


def test_simulate_copies_format_and_allocator(tmp_path, capsys):
    import json
    assert main(["simulate", "--model", "olmoe-1b-7b", "--tokens", "3", "--format", "copies", "--allocator", "fixed",
                 "--out", str(tmp_path), "--quiet"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["format"] == "copies"
    assert main(["simulate", "--model", "olmoe-1b-7b", "--tokens", "3", "--allocator", "trace-levels",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "needs a level per (token, layer, slot)" in capsys.readouterr().err


def test_prefetch_options_reach_the_prefetcher(tmp_path, capsys):
    import json
    trace = tmp_path / "real.npz"
    assert main(["trace", "record", "--quiet", "--requests", "2", "--tokens", "6", "--out", str(trace)]) == 0
    prefetched = {}
    for width in ("1", "4"):
        out = tmp_path / f"w{width}"
        assert main(["simulate", "--quiet", "--trace", str(trace), "--batch", "2", "--budget", "3MB",
                     "--prefetch", "gate-topk", "--prefetch-option", f"width={width}",
                     "--prefetch-option", "threshold=0", "--out", str(out)]) == 0
        prefetched[width] = json.loads((out / "metrics.json").read_text())["prefetches"]
    assert 0 < prefetched["1"] < prefetched["4"]          # a wider guess prefetches more
    assert main(["simulate", "--quiet", "--trace", str(trace), "--prefetch", "gate-topk", "--prefetch-option",
                 "depth=2", "--out", str(tmp_path / "x")]) == 2
    assert "gate-topk: unknown option 'depth'; options: width (int), threshold (float)" in capsys.readouterr().err
