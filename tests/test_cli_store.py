"""`moelab store build` checks what it finds: reused stores are verified, bad blobs rewritten."""
from experiments.cli import main


def test_store_build_verifies_and_repairs(tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["store", "build", "--store", str(store), "--quiet"]) == 0
    assert "built" in capsys.readouterr().out
    blob = sorted(store.glob("*.bin"))[0]
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert main(["store", "build", "--store", str(store), "--quiet"]) == 0
    assert "repaired: rewrote 1 bad blobs" in capsys.readouterr().out
    assert main(["store", "build", "--store", str(store), "--quiet"]) == 0
    assert "verified" in capsys.readouterr().out
