"""The typed readers of core/manifest.py on an exported bundle, and on entries as `sd3trt build` and
`sd3trt quantize` write them."""

from __future__ import annotations

import json

import pytest

from sd3trt.files import sha256_file
from sd3trt.manifest import (build_components, build_option, build_precisions, entry_files, entry_sha256,
                             gate_passed, load_bundle, newest_build, tensor_specs)


def test_readers_of_an_exported_bundle(tiny_sd3):
    bundle = load_bundle(tiny_sd3[1])
    data = json.loads((tiny_sd3[1] / "manifest.json").read_text())
    assert bundle.component_names() == list(data["components"]) and bundle.has("t5")
    assert bundle.tokenizer_names() == list(data["tokenizers"])
    record = bundle.source_record("transformer")
    assert record == {"file": "onnx/transformer.onnx", "sha256": sha256_file(tiny_sd3[1] / record["file"])}
    entry = bundle.component("vae_decoder")
    assert entry_sha256(entry) == sha256_file(bundle.onnx_path("vae_decoder"))
    assert list(entry_files(entry)) == sorted(entry["files"])
    assert [t["name"] for t in tensor_specs(entry, "inputs")] == ["latent"]
    assert [t["name"] for t in tensor_specs(entry, "outputs")] == ["image"]
    with pytest.raises(ValueError, match="'inputs' or 'outputs'"):
        tensor_specs(entry, "files")
    assert bundle.engine_builds() == {} and bundle.quantized_graphs() == {} and bundle.cpu_gate("openvino.bf16") == {}
    assert bundle.loras == data["loras"] and bundle.opset == data["opset"]
    for name, e in data["components"].items():
        assert bundle.lora_map_path(name) == (tiny_sd3[1] / e["lora_map"] if "lora_map" in e else None)
    assert bundle.lora_map_path("transformer") is not None  # export records where LoRAs go in the transformer
    exported = {**{r: d for e in data["components"].values() for r, d in e["files"].items()},
                **{r: d for e in data["tokenizers"].values() for r, d in e["files"].items()}}
    assert bundle.export_files() == exported == bundle.all_files()  # no engines or quantized graphs yet


def test_readers_of_engine_build_and_quantized_entries(tiny_sd3):
    bundle = load_bundle(tiny_sd3[1])
    data = json.loads(json.dumps(bundle.data))
    comps = {"vae_decoder": {"engine": "engines/a/vae_decoder.engine", "metadata": "engines/a/vae_decoder.json"}}
    data["engines"] = {"a": {"precision": "bf16", "transformer_precision": "int8", "options": {"refit": True},
                             "components": comps, "built_at": "2026-01-02T00:00:00+00:00"},
                       "b": {"precision": "fp16", "built_at": "2026-01-01T00:00:00+00:00"}}
    data["quantized"] = {"vae_decoder.int8": {"file": "onnx/vae_decoder.int8.onnx", "accuracy": {"passed": False},
                                              "files": {"onnx/vae_decoder.int8.onnx": "ab" * 32}}}
    data["cpu_gates"] = {"openvino.bf16": {"graphs": {}}}
    b = type(bundle)(bundle.root, data)
    builds = b.engine_builds()
    assert newest_build(builds, builds) == "a" and newest_build(builds, ["b"]) == "b"
    assert build_precisions(builds["a"]) == ("int8", "bf16") and build_precisions(builds["b"]) == ("fp16", "fp16")
    assert build_option(builds["a"], "refit") is True and build_option(builds["b"], "refit") is None
    assert build_components(builds["b"]) == {}
    assert b.engine_files(builds["a"], "vae_decoder") == (b.root / comps["vae_decoder"]["engine"],
                                                          b.root / comps["vae_decoder"]["metadata"])
    assert b.engine_files(builds["a"], "transformer") is None
    assert b.quantized_graphs() == {"vae_decoder.int8": ("vae_decoder", "int8", b.root / "onnx/vae_decoder.int8.onnx",
                                                         "ab" * 32)}
    assert not gate_passed(data["quantized"]["vae_decoder.int8"]) and gate_passed({"accuracy": {"passed": True}})
    assert b.cpu_gate("openvino.bf16") == {"graphs": {}}
