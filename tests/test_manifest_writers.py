"""manifest.json is written under a lock (update_manifest, and commit_entry for an entry with its files),
so writers in separate processes never lose each other's entries."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

from sd3trt.files import sha256_file
from sd3trt.manifest import MANIFEST, commit_entry, set_entry, update_manifest

N = 40  # entries each process adds, one read-modify-write each


def _writer(root: str, tag: str, start) -> None:
    start.wait(30)
    for i in range(N):
        set_entry(Path(root), "engines", f"{tag}-{i}", {"i": i})


def _at_once(target, root: Path, tags: tuple[str, str]) -> None:
    """Run target(root, tag, barrier) in two spawned processes that start together; both must succeed."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=target, args=(str(root), tag, start)) for tag in tags]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_two_processes_writing_at_once_both_land(tmp_path):
    update_manifest(tmp_path, lambda _: {"format": "sd3trt-bundle", "engines": {}})
    _at_once(_writer, tmp_path, ("build", "quantize"))
    engines = json.loads((tmp_path / MANIFEST).read_text())["engines"]
    assert sorted(engines) == sorted(f"{t}-{i}" for t in ("build", "quantize") for i in range(N))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left


def test_update_returns_what_it_wrote_and_removal_is_idempotent(tmp_path):
    data = update_manifest(tmp_path, lambda m: {**m, "dtype": "fp32"})
    assert data == {"dtype": "fp32"} == json.loads((tmp_path / MANIFEST).read_text())
    set_entry(tmp_path, "quantized", "transformer.int8", {"file": "x"})
    assert set_entry(tmp_path, "quantized", "transformer.int8", None)["quantized"] == {}
    assert set_entry(tmp_path, "quantized", "transformer.int8", None)["quantized"] == {}


def _committer(root: str, tag: str, start) -> None:
    start.wait(30)
    for i in range(N):
        staged = Path(root) / f".stage-{tag}-{i}"
        staged.write_bytes(f"{tag} {i}".encode())
        commit_entry(Path(root), "quantized", f"{tag}-{i}", {f"onnx/{tag}-{i}.onnx": staged}, {"i": i})


def test_two_processes_committing_at_once_both_land(tmp_path):
    update_manifest(tmp_path, lambda _: {"format": "sd3trt-bundle"})
    _at_once(_committer, tmp_path, ("vae", "transformer"))
    quantized = json.loads((tmp_path / MANIFEST).read_text())["quantized"]
    assert sorted(quantized) == sorted(f"{t}-{i}" for t in ("vae", "transformer") for i in range(N))
    rel = "onnx/vae-3.onnx"
    assert quantized["vae-3"]["files"] == {rel: sha256_file(tmp_path / rel)}
    assert not list(tmp_path.glob(".stage-*"))  # every staged file moved into place


def test_commit_unlists_the_old_entry_while_its_files_move(tmp_path, monkeypatch):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "t.onnx.data").write_bytes(b"old weights")
    set_entry(tmp_path, "quantized", "transformer.int8", {"file": "onnx/t.onnx", "files": {"onnx/t.onnx": "0" * 64}})
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent.name == "onnx":  # not the manifest's own atomic write
            seen.append(json.loads((tmp_path / MANIFEST).read_text())["quantized"])
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    staged = tmp_path / "staged.onnx"
    staged.write_bytes(b"new graph")
    entry = commit_entry(tmp_path, "quantized", "transformer.int8",
                         {"onnx/t.onnx": staged, "onnx/t.onnx.data": None}, {"file": "onnx/t.onnx"})
    assert seen == [{}]  # the manifest named no file in flux
    assert (tmp_path / "onnx" / "t.onnx").read_bytes() == b"new graph" and not staged.exists()
    assert not (tmp_path / "onnx" / "t.onnx.data").exists()  # the leftover the new entry lacks is gone
    assert entry == {"file": "onnx/t.onnx", "files": {"onnx/t.onnx": sha256_file(tmp_path / "onnx" / "t.onnx")}}
    assert json.loads((tmp_path / MANIFEST).read_text())["quantized"]["transformer.int8"] == entry


def test_commit_in_place_merges_with_the_listed_entry_and_keeps_known_digests(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    set_entry(tmp_path, "engines", "b", {"components": ["vae"]})
    set_entry(tmp_path, "engines", "other", {"components": []})
    got = []

    def merge(previous):
        got.append(previous)
        return {"components": previous["components"] + ["clip"], "files": {"e.engine": "ab" * 32}}

    entry = commit_entry(tmp_path, "engines", "b", {"meta.json": tmp_path / "meta.json"}, merge)
    assert got == [{"components": ["vae"]}]
    assert entry == {"components": ["vae", "clip"],
                     "files": {"e.engine": "ab" * 32, "meta.json": sha256_file(tmp_path / "meta.json")}}
    assert (tmp_path / "meta.json").read_text() == "{}"  # in place: not moved
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())["engines"]) == ["b", "other"]
