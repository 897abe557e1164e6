"""ONNX export: every component vs its PyTorch module at shapes other than the export-time ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sd3trt.errors import Sd3trtError
from sd3trt.export.bundle import export_bundle
from sd3trt.export.components import example_inputs, load_source, wrap
from sd3trt.manifest import load_bundle
from sd3trt.spec import component_specs, request_dims

# Measured on the tiny models (fp32, CPU, both shapes, SD3 and SD3.5): max |onnx - torch| was 8.7e-6
# (VAE decoder, outputs of magnitude ~1), 1.5e-6 (T5) and at most 1e-6 elsewhere. 2e-5 leaves ~2x for
# BLAS differences between machines; a real export bug (a wrong axis, a baked-in shape) is far larger.
ATOL = 2e-5

# Two request shapes that differ from the export-time example (batch 2, 48x64 px, T5 length 13).
SHAPES = [dict(batch=1, height=32, width=80, t5_seq=7), dict(batch=3, height=96, width=64, t5_seq=40)]


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
@pytest.mark.parametrize("component", ["clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer"])
def test_component_matches_torch(tiny_factory, variant, component):
    model_dir, bundle_dir = tiny_factory(variant)
    bundle = load_bundle(bundle_dir, verify_checksums=True)
    facts = bundle.facts
    spec = component_specs(facts)[component]
    sess = ort.InferenceSession(str(bundle.onnx_path(component)), providers=["CPUExecutionProvider"])
    module = wrap(component, load_source(model_dir, component))  # fresh module: see the README's T5 note
    for i, shape in enumerate(SHAPES):
        dims = request_dims(facts, **shape)
        args = example_inputs(facts, component, "fp32", dims, seed=10 + i)
        if component in ("clip_l", "clip_g", "t5"):  # ids inside the tiny vocabularies
            args = (torch.randint(3, 300, args[0].shape, generator=torch.Generator().manual_seed(i)),)
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        outs = sess.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})
        for t, r, o in zip(spec.outputs, ref, outs):
            assert o.shape == tuple(r.shape), f"{component}.{t.name} shape"
            err = float(np.abs(o - r.numpy()).max())
            assert err < ATOL, f"{component}.{t.name} at {shape}: max abs error {err}"


def test_manifest_describes_bundle(tiny_sd3):
    _, bundle_dir = tiny_sd3
    b = load_bundle(bundle_dir, verify_checksums=True)
    m = b.data
    assert m["format"] == "sd3trt-bundle" and m["format_version"] == 1
    assert set(m["components"]) == {"clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer"}
    assert m["model"]["vae_scaling_factor"] == pytest.approx(1.5305)
    assert m["model"]["latent_channels"] == 16 and m["model"]["patch_size"] == 2
    assert m["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    tr = m["components"]["transformer"]
    assert [t["name"] for t in tr["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert tr["inputs"][0]["shape"] == ["batch", 16, "latent_height", "latent_width"]
    for name, entry in m["components"].items():  # the ONNX graph itself agrees with the manifest
        sess = ort.InferenceSession(str(b.path(entry["file"])), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [t["name"] for t in entry["inputs"]]
        assert [o.name for o in sess.get_outputs()] == [t["name"] for t in entry["outputs"]]
    for name in ("clip_l", "clip_g", "t5"):
        assert (b.tokenizer_dir(name) / "tokenizer.json").is_file()


def test_missing_and_corrupted_files_are_reported(tiny_sd3, tmp_path):
    _, bundle_dir = tiny_sd3
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    onnx_file = copy / "onnx" / "vae_decoder.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(Sd3trtError, match="vae_decoder.onnx is corrupted"):  # the first load hashes every file
        load_bundle(copy)
    with pytest.raises(Sd3trtError, match="vae_decoder.onnx is corrupted"):
        load_bundle(copy, verify_checksums=True)
    onnx_file.unlink()
    with pytest.raises(Sd3trtError, match="vae_decoder.onnx is missing"):
        load_bundle(copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Sd3trtError, match="format version 99"):
        load_bundle(copy)


def test_rerun_keeps_unchanged_components(tiny_sd3, tmp_path):
    model_dir, bundle_dir = tiny_sd3
    out = tmp_path / "b"
    shutil.copytree(bundle_dir, out)
    lines = []
    export_bundle(model_dir, out, overwrite=True, log=lines.append)
    assert sum("unchanged, kept" in line for line in lines) == 6, lines
    # An interrupted export (manifest gone, one component half-written) resumes: only that one is redone.
    (out / "manifest.json").unlink()
    (out / "onnx" / "clip_g.onnx").write_bytes(b"partial")
    lines.clear()
    export_bundle(model_dir, out, overwrite=True, log=lines.append)
    assert [line for line in lines if "exporting" in line] == ["[2/6] clip_g: exporting ..."]
    load_bundle(out, verify_checksums=True)


def test_no_t5_bundle(tiny_factory):
    _, bundle_dir = tiny_factory("no_t5")
    b = load_bundle(bundle_dir, verify_checksums=True)
    assert not b.has("t5") and not b.facts.has_t5 and "t5" not in b.data["tokenizers"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sd3trt.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs(tiny_sd3, tmp_path):
    model_dir, bundle_dir = tiny_sd3
    cases = []
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("hello")
    cases.append((["export", "--model", str(not_model), "--out", str(tmp_path / "o1")], "not a diffusers model"))
    cases.append((["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")], "does not exist"))
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(broken / "vae")
    cases.append((["export", "--model", str(broken), "--out", str(tmp_path / "o3")], "vae is missing"))
    cases.append((["export", "--model", str(model_dir), "--out", str(bundle_dir)], "pass --overwrite"))
    cases.append((["export", "--model", str(model_dir), "--out", str(tmp_path / "o4"), "--dtype", "int4"], "unknown --dtype 'int4'; use fp32 or fp16 or bf16"))
    for args, message in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o1" / "manifest.json").exists()


def test_commands_print_no_third_party_noise(tmp_path):
    """make-tiny / export print their own progress only: no transformers advice on torchvision, no diffusers
    note on the T5 a --no-t5 model leaves out."""
    import subprocess
    import sys

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "sd3trt.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout + r.stderr

    out = run("make-tiny", "--out", tmp_path / "m", "--no-t5") + run("export", "--model", tmp_path / "m", "--out",
                                                                     tmp_path / "b")
    for noise in ("torchvision", "cannot be saved", "[transformers]", "Warning"):
        assert noise not in out, out


def test_export_imports_neither_runtime_nor_engines():
    """Layering: export builds on core only (a bundle is written without the runtime or TensorRT)."""
    import ast
    from pathlib import Path

    import sd3trt.export

    bad = []
    for path in sorted(Path(sd3trt.export.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.startswith(("sd3trt.runtime", "sd3trt.engines"))]
    assert not bad, bad
