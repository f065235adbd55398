"""Issue 23 from the command line: record a Hugging Face model's routing, its statistics, a fit,
routing synthesised from the fit, a comparison, and a simulation on it."""
import json

import pytest

from experiments.cli import main

pytest.importorskip("transformers")


def test_record_stats_fit_synth_compare_simulate(tmp_path, capsys):
    from test_hf_record import build
    folder = build("mixtral", tmp_path / "m")
    t, fit, synth = tmp_path / "t.npz", tmp_path / "fit.yaml", tmp_path / "s.npz"
    assert main(["trace", "record", "--hf", str(folder), "--requests", "4", "--tokens", "8", "--batch", "2",
                 "--out", str(t), "--quiet"]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["trace", "stats", str(t)]) == 0
    assert "x-layer" in capsys.readouterr().out
    assert main(["trace", "fit", str(t), "--out", str(fit), "--iterations", "3", "--quiet"]) == 0
    assert main(["trace", "synth", "--fit", str(fit), "--requests", "3", "--prompt-tokens", "6", "--tokens", "5",
                 "--out", str(synth)]) == 0
    assert ": 30 tokens x" in capsys.readouterr().out      # 3 x (6 prompt + 4 decode): 5 new tokens each
    assert main(["trace", "compare", str(t), str(synth)]) == 0
    out = capsys.readouterr().out
    assert "30 tokens, 3 requests" in out and "LRU miss-ratio curve distance (max |difference|): " in out
    assert main(["simulate", "--trace", str(synth), "--device", "jetson-orin-nano-8gb", "--prefetch",
                 "gate-lookahead", "--budget", "1GB", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["generated_tokens"] == 3 * 5          # --tokens new tokens per request, as every command counts
