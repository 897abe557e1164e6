"""`--backend auto`: the CPU kind from the CPU flags, and the backend and transformer precision picked for each kind
(the flags are monkeypatched, so every kind is checked on any machine)."""

from __future__ import annotations

import logging
import numpy as np
import pytest
from PIL import Image

import sd3trt.cpu
from sd3trt.benchmarks import machine
from sd3trt.cli import main as sd3trt_main
from sd3trt.manifest import load_bundle
from sd3trt.runtime import auto_backend
from sd3trt.runtime.pipeline import Img2Img

AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c"]  # amd-epyc-2c-avx2's key flags
AVX512 = AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
AVX512BF16 = AVX512 + ["avx512_bf16"]
AMX = AVX512BF16 + ["amx_tile", "amx_int8", "amx_bf16"]
KINDS = {"avx2": AVX2, "avx512": AVX512, "avx512bf16": AVX512BF16, "amx": AMX}
# kind -> (backend, measured?) that auto must pick
PICKS = {"avx2": ("onnxruntime", True), "avx512": ("onnxruntime", False), "avx512bf16": ("openvino", True),
         "amx": ("openvino", False)}


def _cpu(monkeypatch, flags):
    monkeypatch.setattr(sd3trt.cpu, "cpuinfo", lambda: {"model": "test CPU", "flags": list(flags)})


def test_cpu_kind_from_flags_names_the_bench_folders(monkeypatch):
    for kind, flags in KINDS.items():
        assert sd3trt.cpu.cpu_kind(flags) == kind
    assert sd3trt.cpu.cpu_kind(["sse4_2", "avx"]) == "x86"
    _cpu(monkeypatch, AVX2)
    assert sd3trt.cpu.cpu_kind() == "avx2"
    desc = {"cpu": {"model": "AMD EPYC 7B13", "usable_cpus": 2, "flags": AVX512BF16}, "gpus": []}
    assert machine.slug(desc) == "amd-epyc-7b13-2c-avx512bf16"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_auto_picks_backend_and_int8_per_cpu_kind(tiny_int8, monkeypatch, kind):
    _cpu(monkeypatch, KINDS[kind])
    monkeypatch.setattr(auto_backend, "openvino_installed", lambda: True)
    bundle = load_bundle(tiny_int8)
    backend, measured = PICKS[kind]
    assert auto_backend.choose(bundle) == auto_backend.Choice(backend, "int8", kind, measured)
    # an explicit precision is kept; load-time LoRAs run on ONNX Runtime's float graphs
    assert auto_backend.choose(bundle, "fp32").transformer_precision == "fp32"
    assert auto_backend.choose(bundle, None, ["style.safetensors"]) == auto_backend.Choice("onnxruntime", None, kind,
                                                                                          measured)


def test_a_bf16_bundle_takes_openvino_and_its_fastest_precision_on_the_kind(tiny_int8, monkeypatch):
    bundle = load_bundle(tiny_int8)
    monkeypatch.setattr(type(bundle), "dtype", property(lambda self: "bf16"))
    monkeypatch.setattr(auto_backend, "openvino_installed", lambda: True)
    _cpu(monkeypatch, AVX2)  # OpenVINO's INT8 transformer was slower than its fp32 there
    assert auto_backend.choose(bundle) == auto_backend.Choice("openvino", None, "avx2", True)
    _cpu(monkeypatch, AVX512BF16)
    assert auto_backend.choose(bundle) == auto_backend.Choice("openvino", "int8", "avx512bf16", True)


def test_auto_pipeline_runs_what_it_picked(tiny_int8, monkeypatch):
    _cpu(monkeypatch, AVX2)
    bundle = load_bundle(tiny_int8)
    pipe = Img2Img(bundle, backend="auto")
    assert pipe.backend == "onnxruntime" and pipe.auto_choice.cpu_kind == "avx2"
    assert pipe.onnx_files["transformer"] == bundle.quantized_path("int8")
    assert pipe.onnx_files["vae_decoder"] == bundle.onnx_path("vae_decoder")  # the INT8 VAE stays opt-in
    pytest.importorskip("openvino")
    _cpu(monkeypatch, AVX512BF16)
    pipe = Img2Img(bundle, backend="auto")
    assert pipe.backend == "openvino" and pipe.onnx_files["transformer"] == bundle.quantized_path("int8")
    assert set(pipe.graph_precisions) == set(pipe.onnx_files)


def test_auto_without_an_int8_graph_runs_the_float_graphs_and_says_so_once(tiny_sd3, monkeypatch, caplog):
    _cpu(monkeypatch, AVX2)
    bundle = load_bundle(tiny_sd3[1])
    with caplog.at_level(logging.WARNING, logger="sd3trt"):
        pipe = Img2Img(bundle, backend="auto")
    assert pipe.backend == "onnxruntime" and pipe.auto_choice.transformer_precision is None
    assert pipe.onnx_files["transformer"] == bundle.onnx_path("transformer")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no int8 transformer" in warnings[0] and "sd3trt quantize" in warnings[0]


def test_auto_without_openvino_takes_onnx_runtime(tiny_int8, monkeypatch, caplog):
    _cpu(monkeypatch, AVX512BF16)
    monkeypatch.setattr(auto_backend, "openvino_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sd3trt"):
        choice = auto_backend.choose(load_bundle(tiny_int8))
    assert choice == auto_backend.Choice("onnxruntime", "int8", "avx512bf16", True)
    assert any("not installed" in r.getMessage() for r in caplog.records)


def test_cli_backend_auto(tiny_int8, monkeypatch, tmp_path, capsys):
    _cpu(monkeypatch, AVX2)
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    sd3trt_main(["img2img", "--bundle", str(tiny_int8), "--image", str(image), "--prompt", "a cat", "--steps", "2",
                 "--backend", "auto", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_ov_kernel_table_shows_the_int8_layers(tiny_int8):
    """The kernel table the AVX2 investigation reads (benchmarks/ov_kernels.py): the Q/DQ transformer compiles to
    layers that read 8-bit tensors (OpenVINO's low-precision transformations), the fp32 one to none."""
    pytest.importorskip("openvino")
    from sd3trt.benchmarks.ov_kernels import tables

    def eight_bit(table):
        return {k for k in table if {"i8", "u8"} & set(k[3].split(","))}

    int8 = tables(tiny_int8, "int8", size=64, threads=2)["transformer"]
    fp32 = tables(tiny_int8, None, size=64, threads=2)["transformer"]
    assert any(layer == "FullyConnected" for layer, *_ in eight_bit(int8)), int8
    assert not eight_bit(fp32) and any(layer == "FullyConnected" for layer, *_ in fp32)
