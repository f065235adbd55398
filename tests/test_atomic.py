"""The one atomic writer (devices/atomic.py) and the import layering of the weight checks."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

import devices.atomic as atomic
from devices.atomic import atomic_open, atomic_write

ROOT = Path(__file__).resolve().parent.parent


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["out.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = atomic_write(tmp_path / "out.txt", "complete")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "complete" and os.listdir(tmp_path) == ["out.txt"]


def test_every_writer_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    """trace.save, the store's index, train's artifacts and write_json_atomic share the helper."""
    import torch

    from devices.atomic import save_safetensors_atomic
    from executor.store_build import build_store
    from executor.tokenizer import ByteTokenizer
    from timeline.events import write_json_atomic
    from workloads.formats import make_format
    from workloads.trace import RoutingTrace

    synced: list[Path] = []
    real = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    writers = {
        "trace": lambda d: RoutingTrace(np.zeros((1, 1, 1)), np.ones((1, 1, 1)), None, None).save(d / "t.npz"),
        "timeline": lambda d: write_json_atomic(d / "m.json", {"a": 1}),
        "tokenizer": lambda d: ByteTokenizer().save(d / "tokenizer.json"),
        "safetensors": lambda d: save_safetensors_atomic({"w": torch.zeros(2)}, d / "model.safetensors"),
        "store": lambda d: build_store(d, [(0, 0, {"w1": torch.ones(4, 2), "w3": torch.ones(4, 2),
                                                   "w2": torch.ones(2, 4)})],
                                       make_format("bf16", [(4, 2), (4, 2), (2, 4)]), arch_info={}, quiet=True),
    }
    for name, write in writers.items():
        folder = tmp_path / name
        folder.mkdir()
        synced.clear()
        write(folder)
        assert folder in synced, f"{name} did not fsync its folder after the rename"
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_formats_do_not_import_the_store():
    """executor/encoders.py imports the mwq and zip encoders; they take the weight checks from
    executor/weights.py, below all three (no import circle)."""
    for name in ("mwq.py", "zipcodec.py", "weights.py"):
        tree = ast.parse((ROOT / "executor" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"executor.store", "executor.encoders"}, name
    from executor import encoders, mwq, weights, zipcodec
    assert mwq.check_weights is weights.check_weights is zipcodec.check_weights is encoders.check_weights
