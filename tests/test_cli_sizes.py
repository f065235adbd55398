"""Both engines read the same bytes for the same forced trace, in every format: the simulator
takes its part sizes from the executor's store (issue 9, item 6)."""
import json

import pytest

from experiments.cli import main


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "real.npz"
    assert main(["trace", "record", "--quiet", "--requests", "2", "--tokens", "5", "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("fmt", ["bf16", "mwq", "zip", "copies"])
def test_simulate_reads_what_execute_reads(tmp_path, recorded, fmt):
    common = ["--quiet", "--trace", str(recorded), "--batch", "2", "--budget", "2.5MB", "--format", fmt]
    store = tmp_path / "store"
    assert main(["execute", *common, "--store", str(store), "--out", str(tmp_path / "e")]) == 0
    assert main(["simulate", *common, "--store", str(store), "--out", str(tmp_path / "s")]) == 0
    sim = json.loads((tmp_path / "s" / "metrics.json").read_text())
    ex = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert sim["bytes_read"] == ex["bytes_read"] > 0
    assert sim["hit_ratio"] == ex["hit_ratio"]


def test_simulate_mwq_on_the_trained_model_without_a_store(tmp_path, recorded):
    # the widths of tiny-moe (128, 160) take group 32 by the one rule both engines use
    assert main(["simulate", "--quiet", "--trace", str(recorded), "--format", "mwq", "--out", str(tmp_path)]) == 0


def test_store_of_another_format_is_refused(tmp_path, recorded, capsys):
    store = tmp_path / "store"
    assert main(["store", "build", "--quiet", "--store", str(store)]) == 0
    assert main(["simulate", "--quiet", "--trace", str(recorded), "--format", "zip", "--store", str(store),
                 "--out", str(tmp_path / "s")]) == 2
    assert "holds bf16 experts" in capsys.readouterr().err
