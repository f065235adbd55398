"""The on-disk expert store: round trip, sizes, index validation, integrity, resumable builds,
provenance (stale stores rebuilt), repair, atomic rebuilds and concurrent builds."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from devices.units import ConfigError
from executor import encoders
from executor.encoders import get_encoder, register_encoder
from executor.model import MoEConfig, MoETransformer, init_weights
from executor.store import IntegrityError, Store
from executor.store_build import build_store, ensure_store, model_experts, store_lock
from executor.weights import check_weights, matrix_names
from policies.base import Key
from workloads.formats import make_format
from workloads.store_index import ALIGN, INDEX, JOURNAL

SHAPES = [(64, 32), (64, 32), (32, 64)]
ARCH = {"name": "toy", "d_model": 32, "d_ff": 64}


def weights(layer: int, expert: int, fmt, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(matrix_names(fmt), fmt.shapes)}


def experts(fmt, layers=2, per_layer=3, fail_after: int | None = None, calls: list | None = None):
    """(layer, expert, weights) in a fixed order; raises after `fail_after` experts (a crash)."""
    n = 0
    for layer in range(layers):
        for e in range(per_layer):
            if fail_after is not None and n == fail_after:
                raise KeyboardInterrupt("simulated crash")
            n += 1

            def load(layer=layer, e=e):
                if calls is not None:
                    calls.append((layer, e))
                return weights(layer, e, fmt)
            yield layer, e, load


class FakeZipEncoder:
    """A deterministic multi-part encoder with the zip format's exact part sizes (tests only)."""

    def encode(self, w, fmt):
        seed = b"".join(t.view(torch.int16).numpy().tobytes() for t in check_weights(w, fmt))
        out = []
        for p, n in enumerate(fmt.part_bytes):
            stream = b""
            while len(stream) < n:
                stream += hashlib.blake2b(seed + bytes([p, len(stream) % 251])).digest()
            out.append(stream[:n])
        return out

    def decode(self, parts, fmt, level):
        raise NotImplementedError


@pytest.fixture
def zip_fmt():
    old = encoders._ENCODERS.get("zip")
    register_encoder("zip", FakeZipEncoder())
    yield make_format("zip", SHAPES, chunks=3)
    if old is None:
        encoders._ENCODERS.pop("zip", None)
    else:
        register_encoder("zip", old)


def bf16():
    return make_format("bf16", SHAPES)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_bf16_round_trip_exact(tmp_path):
    fmt = bf16()
    st = build_store(tmp_path, experts(fmt), fmt, arch_info=ARCH, quiet=True)
    for layer in range(2):
        for e in range(3):
            got, want = st.load_expert(layer, e), weights(layer, e, fmt)
            assert list(got) == ["w1", "w3", "w2"]
            for n in want:
                assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n])
    assert st.arch == ARCH and st.format == fmt


def test_bf16_encoder_converts_float_and_checks_shapes():
    fmt = bf16()
    w = weights(0, 0, fmt, dtype=torch.float32)
    enc = get_encoder("bf16")
    back = enc.decode(enc.encode(w, fmt), fmt, 0)
    assert all(torch.equal(back[n], w[n].to(torch.bfloat16)) for n in w)
    with pytest.raises(ConfigError, match="w3"):
        enc.encode({"w1": w["w1"], "w2": w["w2"]}, fmt)
    with pytest.raises(ConfigError, match="shape"):
        enc.encode(dict(w, w2=w["w1"]), fmt)
    with pytest.raises(ConfigError, match="no encoder"):
        get_encoder("nope")


@pytest.mark.parametrize("which", ["bf16", "zip"])
def test_blob_sizes_are_the_format_part_bytes(tmp_path, zip_fmt, which):
    fmt = bf16() if which == "bf16" else zip_fmt
    st = build_store(tmp_path, experts(fmt), fmt, arch_info=ARCH, quiet=True)
    assert len(st.keys()) == 6 * fmt.n_parts
    for key in st.keys():
        info, item = st.blob_info(key), st.item(key)
        assert info.length == fmt.part_bytes[key.part] == len(st.read(key)) == item.nbytes
        assert item.resident_bytes == fmt.resident_bytes[key.part]
        assert item.decompress_bytes == fmt.decompress_bytes[key.part]
        assert info.offset % ALIGN == 0 and info.file == f"layer_{key.layer:04d}.bin"
    for f in st.files:
        assert os.path.getsize(tmp_path / f) % ALIGN == 0
    assert Store.open(tmp_path).format == fmt  # the format is rebuilt from the index
    assert not (tmp_path / JOURNAL).exists()


def test_read_into_buffer_and_unknown_key(tmp_path):
    fmt = bf16()
    st = build_store(tmp_path, experts(fmt, 1, 2), fmt, arch_info=ARCH, quiet=True)
    buf = bytearray(fmt.part_bytes[0] + 100)
    view = st.read((0, 1, 0), buf)
    assert bytes(view) == bytes(st.read((0, 1, 0))) and bytes(buf[: len(view)]) == bytes(view)
    with pytest.raises(KeyError, match=r"\(5, 0, 0\)"):
        st.item((5, 0, 0))


def _edit_index(path: Path, edit) -> None:
    data = json.loads((path / INDEX).read_text())
    edit(data)
    (path / INDEX).write_text(json.dumps(data))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("format"), "missing field 'format'"),
    (lambda d: d["format"].update(name="bogus"), "field 'format'.*unknown format 'bogus'"),
    (lambda d: d["format"].update(shapes=[[64, "x"]]), "format.shapes"),
    (lambda d: d["blobs"][1].update(offset=100), r"blobs\[1\]\.'offset'.*multiple of 4096"),
    (lambda d: d["blobs"][0].update(length=5), r"blobs\[0\]\.'length' must be"),
    (lambda d: d["blobs"][0].update(file="../x.bin"), r"blobs\[0\]\.'file'"),
    (lambda d: d["blobs"][0].update(checksum=7), r"blobs\[0\]\.'checksum' must be str"),
    (lambda d: d["blobs"][0].update(part=3), r"blobs\[0\]\.'part'"),
    (lambda d: d["blobs"][0].pop("layer"), r"missing field blobs\[0\]\.'layer'"),
    (lambda d: d["blobs"].append(d["blobs"][0]), "appears twice"),
    (lambda d: d.update(moelab_store=99), "version 1"),
    (lambda d: d["blobs"][0].update(file="layer_0009.bin"), "layer_0009.bin.*missing"),
])
def test_index_validation_names_file_and_field(tmp_path, edit, match):
    fmt = bf16()
    build_store(tmp_path, experts(fmt, 1, 2), fmt, arch_info=ARCH, quiet=True)
    _edit_index(tmp_path, edit)
    with pytest.raises(ConfigError, match=match) as err:
        Store.open(tmp_path)
    assert str(tmp_path / INDEX) in str(err.value)


def test_index_not_json_or_missing(tmp_path):
    with pytest.raises(ConfigError, match="no index"):
        Store.open(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Store.open(tmp_path)


def test_corrupted_blob_is_named(tmp_path):
    fmt = bf16()
    st = build_store(tmp_path, experts(fmt), fmt, arch_info=ARCH, quiet=True)
    info = st.blob_info((1, 2, 0))
    with open(tmp_path / info.file, "r+b") as f:
        f.seek(info.offset + 77)
        b = f.read(1)
        f.seek(info.offset + 77)
        f.write(bytes([b[0] ^ 0x10]))
    st = Store.open(tmp_path)
    st.read((1, 1, 0))  # neighbours are fine
    with pytest.raises(IntegrityError, match=r"corrupted blob \(layer 1, expert 2, part 0\) in layer_0001.bin"):
        st.read((1, 2, 0))
    with pytest.raises(IntegrityError):
        st.verify()


def test_truncated_blob_is_named(tmp_path):
    fmt = bf16()
    st = build_store(tmp_path, experts(fmt), fmt, arch_info=ARCH, quiet=True)
    info = st.blob_info((0, 2, 0))
    os.truncate(tmp_path / info.file, info.offset + 10)
    st = Store.open(tmp_path)
    with pytest.raises(IntegrityError, match=r"truncated blob \(layer 0, expert 2, part 0\) in layer_0000.bin"):
        st.read((0, 2, 0))


@pytest.mark.parametrize("which", ["bf16", "zip"])
def test_interrupted_build_resumes_to_identical_store(tmp_path, zip_fmt, which):
    fmt = bf16() if which == "bf16" else zip_fmt
    clean = build_store(tmp_path / "clean", experts(fmt), fmt, arch_info=ARCH, quiet=True)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_store(out, experts(fmt, fail_after=4), fmt, arch_info=ARCH, quiet=True)
    assert not (out / INDEX).exists() and (out / JOURNAL).exists()
    with pytest.raises(ConfigError):  # a partial build is not a store
        Store.open(out)
    calls: list = []
    resumed = build_store(out, experts(fmt, calls=calls), fmt, arch_info=ARCH, quiet=True)
    assert calls == [(1, 1), (1, 2)]  # the 4 experts on disk were verified, not re-encoded
    assert snapshot(out) == snapshot(tmp_path / "clean")
    assert resumed.keys() == clean.keys()


def test_crash_mid_write_resumes_to_identical_store(tmp_path, zip_fmt):
    """A kill mid-expert: blob bytes written past the journal, a torn journal line, a bad blob."""
    fmt = zip_fmt
    build_store(tmp_path / "clean", experts(fmt), fmt, arch_info=ARCH, quiet=True)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        build_store(out, experts(fmt, fail_after=5), fmt, arch_info=ARCH, quiet=True)
    with open(out / "layer_0001.bin", "ab") as f:
        f.write(b"\x01" * 5000)                  # half an expert nobody recorded
    with open(out / JOURNAL, "a") as f:
        f.write('{"blobs": [{"layer": 1, "ex')  # torn line
    # corrupt the 4th expert's (layer 1, expert 0) last part: it and everything after is rebuilt
    lines = (out / JOURNAL).read_text().splitlines()
    bad = json.loads(lines[4])["blobs"][-1]
    with open(out / bad["file"], "r+b") as f:
        f.seek(bad["offset"])
        f.write(b"\xff\xff")
    calls: list = []
    build_store(out, experts(fmt, calls=calls), fmt, arch_info=ARCH, quiet=True)
    assert calls == [(1, 0), (1, 1), (1, 2)]
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_rebuild_of_complete_store_reuses_it(tmp_path):
    fmt = bf16()
    build_store(tmp_path, experts(fmt), fmt, arch_info=ARCH, quiet=True)
    before = snapshot(tmp_path)
    calls: list = []
    build_store(tmp_path, experts(fmt, calls=calls), fmt, arch_info=ARCH, quiet=True)
    assert calls == [] and snapshot(tmp_path) == before


def test_build_refuses_other_format_and_duplicates(tmp_path):
    fmt = bf16()
    with pytest.raises(KeyboardInterrupt):
        build_store(tmp_path, experts(fmt, fail_after=2), fmt, arch_info=ARCH, quiet=True)
    with pytest.raises(ConfigError, match="different format or arch"):
        build_store(tmp_path, experts(fmt), fmt, arch_info=dict(ARCH, name="other"), quiet=True)
    dup = [(0, 0, weights(0, 0, fmt)), (0, 0, weights(0, 0, fmt))]
    with pytest.raises(ConfigError, match="given twice"):
        build_store(tmp_path / "dup", dup, fmt, arch_info=ARCH, quiet=True)


def test_key_namedtuple_accepted(tmp_path):
    fmt = bf16()
    st = build_store(tmp_path, experts(fmt, 1, 1), fmt, arch_info=ARCH, quiet=True)
    assert st.blob_info(Key(0, 0, 0)).key == Key(0, 0, 0) == st.item((0, 0, 0)).key


# -- issue 9: provenance (stale stores), repair, atomic rebuilds, concurrent builds ------------
TINY = MoEConfig(vocab=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, experts=3, top_k=1, d_ff=32, max_seq=16)


def tiny_moe(seed=0) -> MoETransformer:
    return init_weights(MoETransformer(TINY), seed=seed).eval()


def first_w1(store) -> torch.Tensor:
    return store.load_expert(0, 0)["w1"].float()


def test_store_of_other_weights_is_rebuilt_not_reused(tmp_path, capsys):
    old = ensure_store(tiny_moe(seed=0), tmp_path / "s")
    assert old.build_info["action"] == "built" and "digest" in old.header["source"]
    assert ensure_store(tiny_moe(seed=0), tmp_path / "s", quiet=True).build_info["action"] == "reused"
    retrained = tiny_moe(seed=1)                      # same shapes, other weights
    new = ensure_store(retrained, tmp_path / "s")
    assert new.build_info["action"] == "rebuilt"
    assert "built from other weights" in capsys.readouterr().err
    want = retrained.moe_layers[0].experts[0].weights()["w1"].to(torch.bfloat16).float()
    assert torch.equal(first_w1(new), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]     # nothing left aside


def test_store_of_other_format_options_is_refused(tmp_path):
    ensure_store(tiny_moe(), tmp_path / "s", "zip", quiet=True, codec="lz4")
    with pytest.raises(ConfigError, match=r"holds a zip store with options .*'codec': 'lz4'.*asked for zip with "
                                          r".*'codec': 'zstd'.*refusing to overwrite it"):
        ensure_store(tiny_moe(), tmp_path / "s", "zip", quiet=True, codec="zstd")


def test_an_interrupted_rebuild_leaves_the_old_store_whole(tmp_path):
    model_a, model_b = tiny_moe(seed=0), tiny_moe(seed=1)
    folder = tmp_path / "s"
    old = ensure_store(model_a, folder, quiet=True)
    before = snapshot(folder)

    def crashing():
        for n, item in enumerate(model_experts(model_b)):
            if n == 4:
                raise KeyboardInterrupt("killed mid-rebuild")
            yield item
    with pytest.raises(KeyboardInterrupt):
        ensure_store(model_b, folder, quiet=True, experts=crashing)
    assert snapshot(folder) == before and Store.open(folder).header["source"] == old.header["source"]
    new = ensure_store(model_b, folder, quiet=True)          # resumes the partial rebuild, then swaps
    assert new.build_info["action"] == "rebuilt" and new.header["source"] != old.header["source"]
    new.verify()


def test_store_build_verifies_and_rewrites_bad_blobs(tmp_path, capsys):
    model = tiny_moe()
    clean = snapshot(ensure_store(model, tmp_path / "clean", quiet=True).path)
    folder = tmp_path / "s"
    ensure_store(model, folder, quiet=True)
    with open(folder / "layer_0000.bin", "r+b") as f:           # flip a byte in the first blob
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    size = (folder / "layer_0001.bin").stat().st_size
    os.truncate(folder / "layer_0001.bin", size // 2)            # and lose half of layer 1
    with pytest.raises(IntegrityError):
        Store.open(folder).verify()
    assert ensure_store(model, folder, quiet=True).build_info["action"] == "reused"   # no verify: cheap
    st = ensure_store(model, folder, verify=True)
    assert st.build_info["action"] == "repaired"
    assert st.build_info["repaired"][0] == [0, 0, 0] and [1, 2, 0] in st.build_info["repaired"]
    assert "rewrote" in capsys.readouterr().err
    st.verify()
    assert snapshot(folder) == clean
    assert ensure_store(model, folder, quiet=True, verify=True).build_info["action"] == "verified"


def test_two_first_builds_of_one_store_at_once(tmp_path):
    folder, results, errors = tmp_path / "s", [], []

    def build(seed_model):
        try:
            results.append(ensure_store(seed_model, folder, quiet=True))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=build, args=(tiny_moe(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(r.build_info["action"] for r in results) == ["built", "reused"]
    Store.open(folder).verify()


def test_a_build_waits_for_the_lock(tmp_path, capsys):
    folder, done = tmp_path / "s", []
    with store_lock(folder):
        t = threading.Thread(target=lambda: done.append(ensure_store(tiny_moe(), folder)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not done and not folder.exists()
    t.join()
    assert done[0].build_info["action"] == "built"
    assert "another process is building it; waiting" in capsys.readouterr().err
