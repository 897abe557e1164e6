"""Bundle integrity: every load checks the files against the manifest's sha256, hashing a file only when
its stamp (.sd3trt-verified.json, or the per-user cache for a read-only bundle) does not vouch for it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3trt import manifest
from sd3trt.cli import main
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import LOCK, STAMPS, load_bundle


@pytest.fixture
def bundle(tiny_sd3, tmp_path, monkeypatch):
    """A private copy of the tiny bundle (the session's fixture is never changed), a private cache dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_sd3[1], copy)
    (copy / STAMPS).unlink(missing_ok=True)  # as exported: earlier tests may have loaded (and stamped) the original
    return copy


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed, in order."""
    calls: list[Path] = []
    real = manifest.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    return calls


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def listed(root: Path) -> dict[str, str]:
    return load_bundle(root).all_files()


def test_a_flipped_byte_stops_img2img_before_any_output(bundle, tmp_path, capsys):
    load_bundle(bundle)  # verified and stamped: the stamp must not hide a later change
    flip_middle_byte(bundle / "onnx" / "vae_decoder.onnx")
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    capsys.readouterr()
    rc = main(["img2img", "--bundle", str(bundle), "--image", str(src), "--prompt", "x", "--steps", "2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("sd3trt img2img: error: bundle file ")
    assert "onnx/vae_decoder.onnx is corrupted (sha256 does not match the manifest); re-run `sd3trt export" in err


def test_a_truncated_file_is_a_size_error_without_hashing(bundle, hashed):
    load_bundle(bundle)
    vae = bundle / "onnx" / "vae_decoder.onnx"
    size = vae.stat().st_size
    os.truncate(vae, size // 2)
    hashed.clear()
    with pytest.raises(Sd3trtError, match=f"vae_decoder.onnx has {size // 2} bytes instead of the {size} it had"):
        load_bundle(bundle)
    assert hashed == []  # the stat alone shows it
    with pytest.raises(Sd3trtError, match="vae_decoder.onnx is corrupted"):  # no stamp to compare with: hashed
        load_bundle(bundle, verify_checksums=True)


def test_the_second_load_only_stats(bundle, hashed, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(manifest, "LOG_HASHING_ABOVE", 0)  # the tiny bundle counts as large: one log line
    with caplog.at_level("INFO", logger="sd3trt.manifest"):
        files = listed(bundle)
        load_bundle(bundle)
    assert [r.getMessage().split(" of bundle")[0] for r in caplog.records] == [f"hashing {len(files)} file(s) (0.0 GiB)"]
    assert sorted(hashed) == sorted(bundle / rel for rel in files) and STAMPS not in files
    stamps = json.loads((bundle / STAMPS).read_text())["files"]
    assert {rel: s["sha256"] for rel, s in stamps.items()} == files
    hashed.clear()
    load_bundle(bundle)
    assert hashed == []
    load_bundle(bundle, verify_checksums=True)  # forces a full re-hash
    assert len(hashed) == len(files)
    # A copy of a stamped bundle carries the stamp file, but its files are new inodes: all hashed again.
    shutil.copytree(bundle, tmp_path / "copy")
    hashed.clear()
    load_bundle(tmp_path / "copy")
    assert sorted(hashed) == sorted(tmp_path / "copy" / rel for rel in files)
    # A file touched (new mtime) is hashed again, alone.
    hashed.clear()
    tok = bundle / "tokenizers" / "clip_l" / "tokenizer_config.json"
    st = tok.stat()
    os.utime(tok, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_bundle(bundle)
    assert hashed == [tok]
    # A file rewritten with its new sha256 in the manifest (as export/build/quantize do): hashed once, then trusted.
    tok.write_text(tok.read_text() + "\n")
    m = json.loads((bundle / "manifest.json").read_text())
    m["tokenizers"]["clip_l"]["files"]["tokenizers/clip_l/tokenizer_config.json"] = manifest.sha256_file(tok)
    manifest.write_json_atomic(bundle / "manifest.json", m)
    hashed.clear()
    load_bundle(bundle)
    load_bundle(bundle)
    assert hashed == [tok]
    # A stamp vouches only for the sha256 it was made with: with the old manifest back the file is refused.
    m["tokenizers"]["clip_l"]["files"]["tokenizers/clip_l/tokenizer_config.json"] = files[
        "tokenizers/clip_l/tokenizer_config.json"]
    manifest.write_json_atomic(bundle / "manifest.json", m)
    with pytest.raises(Sd3trtError, match="tokenizer_config.json is corrupted"):
        load_bundle(bundle)


def test_a_read_only_bundle_keeps_its_stamps_in_the_cache_dir(bundle, hashed, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes into a mode-555 directory: refuse it as a read-only file system would
        real = manifest.write_json_atomic

        def refuse_in_bundle(path, data):
            if Path(path).parent == bundle:
                raise PermissionError(13, "Permission denied", str(path))
            real(path, data)

        monkeypatch.setattr(manifest, "write_json_atomic", refuse_in_bundle)
    bundle.chmod(0o555)
    try:
        files = listed(bundle)
        hashed.clear()
        load_bundle(bundle)
    finally:
        bundle.chmod(0o755)
    assert hashed == [] and not (bundle / STAMPS).exists()
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()
    cached = json.loads((tmp_path / "cache" / "sd3trt" / "verified" / f"{key}.json").read_text())
    assert {rel: s["sha256"] for rel, s in cached["files"].items()} == files
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".") and p.name != LOCK] == []  # no temp file left


def test_verify_command(bundle, capsys, hashed):
    n = len(listed(bundle))
    hashed.clear()
    capsys.readouterr()
    assert main(["verify", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == n and all(line.startswith("ok ") for line in out), out
    assert len(hashed) == n  # stamps are ignored: every file re-hashed
    flip_middle_byte(bundle / "onnx" / "vae_decoder.onnx")
    (bundle / "tokenizers" / "clip_g" / "tokenizer.json").unlink()
    assert main(["verify", "--bundle", str(bundle)]) == 2
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == n
    assert [line.split() for line in lines if not line.startswith("ok ")] == [
        ["MISMATCH", "onnx/vae_decoder.onnx"], ["missing", "tokenizers/clip_g/tokenizer.json"]]
    assert cap.err.count("\n") == 1
    assert cap.err.startswith("sd3trt verify: error: bundle file ") and "vae_decoder.onnx is corrupted" in cap.err
    assert main(["verify", "--bundle", str(bundle.parent)]) == 2
    assert "not an sd3trt bundle" in capsys.readouterr().err


def test_the_server_refuses_a_corrupted_bundle(bundle, tmp_path):
    pytest.importorskip("fastapi")
    from test_server import ServerProcess

    flip_middle_byte(bundle / "onnx" / "vae_decoder.onnx")
    srv = ServerProcess(bundle, tmp_path / "keys.db", tmp_path / "server.log")
    with pytest.raises(AssertionError, match="server exited with 2"):
        srv.start()
    log = srv.log.read_text()
    assert "error: bundle file " in log and "vae_decoder.onnx is corrupted" in log, log
    assert "Uvicorn running" not in log and "Started server" not in log and not (tmp_path / "keys.db").exists()
