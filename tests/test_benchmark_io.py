"""`python -m executor.benchmark_io` leaves nothing behind in the temp folder (issue 9)."""
import tempfile

import pytest

from executor import benchmark_io

TINY = ["--layers", "1", "--experts", "2", "--d-model", "64", "--d-ff", "32", "--concurrency", "1",
        "--repeats", "1", "--quiet"]


def test_the_default_store_is_removed_after_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = benchmark_io.main(TINY)
    assert result["blobs"] == 2 and list(tmp_path.iterdir()) == []


def test_the_default_store_is_removed_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*a, **k):
        assert any(tmp_path.iterdir())             # the store exists while the benchmark runs
        raise KeyboardInterrupt
    monkeypatch.setattr(benchmark_io, "sequential_read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        benchmark_io.main(TINY)
    assert list(tmp_path.iterdir()) == []


def test_a_given_dir_is_kept(tmp_path):
    benchmark_io.main([*TINY, "--dir", str(tmp_path / "store")])
    assert (tmp_path / "store" / "index.json").exists()
