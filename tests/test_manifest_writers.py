"""manifest.json has one writer, update_manifest: under a lock, so writers in separate processes never
lose each other's entries."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from sd3trt.manifest import MANIFEST, set_entry, update_manifest

N = 40  # entries each process adds, one read-modify-write each


def _writer(root: str, tag: str, start) -> None:
    start.wait(30)
    for i in range(N):
        set_entry(Path(root), "engines", f"{tag}-{i}", {"i": i})


def test_two_processes_writing_at_once_both_land(tmp_path):
    update_manifest(tmp_path, lambda _: {"format": "sd3trt-bundle", "engines": {}})
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tag, start)) for tag in ("build", "quantize")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    engines = json.loads((tmp_path / MANIFEST).read_text())["engines"]
    assert sorted(engines) == sorted(f"{t}-{i}" for t in ("build", "quantize") for i in range(N))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left


def test_update_returns_what_it_wrote_and_removal_is_idempotent(tmp_path):
    data = update_manifest(tmp_path, lambda m: {**m, "dtype": "fp32"})
    assert data == {"dtype": "fp32"} == json.loads((tmp_path / MANIFEST).read_text())
    set_entry(tmp_path, "quantized", "transformer.int8", {"file": "x"})
    assert set_entry(tmp_path, "quantized", "transformer.int8", None)["quantized"] == {}
    assert set_entry(tmp_path, "quantized", "transformer.int8", None)["quantized"] == {}
