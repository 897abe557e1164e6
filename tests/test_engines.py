"""`sd3trt build` without a GPU: real TensorRT-RTX engines for every tiny-bundle component (fp16, bf16).

What CPU-only CI can check: the ONNX graphs parse with no unsupported nodes, the parsed network's
bindings (names, dtypes, ranks, fixed dims) are the manifest's, profiles follow the named request,
metadata and the manifest's engines section are right and verifiable, re-runs reuse engines, and
requests outside the profiles are refused with a clear message. The precision passes are checked on
ONNX Runtime. Running the engines is in test_trt_runner.py (GPU tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

trt = pytest.importorskip("tensorrt_rtx")

from sd3trt.cli import main as sd3trt_main  # noqa: E402
from sd3trt.engines import cli as build_cli  # noqa: E402
from sd3trt.engines.build import BuildOptions, build_engines, check_precision, unsupported_nodes  # noqa: E402
from sd3trt.engines.mixed_precision import DEFAULT_KEEP_FP32, apply_precision, autocast, keep_fp32_islands, load_graph  # noqa: E402
from sd3trt.runtime.flavour import load_flavour  # noqa: E402
from sd3trt.sizes import parse_size  # noqa: E402
from sd3trt.profiles import EngineProfiles, Range, ShapeRequest  # noqa: E402
from sd3trt.errors import Sd3trtError  # noqa: E402
from sd3trt.export.bundle import export_bundle  # noqa: E402
from sd3trt.manifest import load_bundle, sha256_file  # noqa: E402
from sd3trt.runtime.builds import check_request  # noqa: E402
from sd3trt.spec import concrete_shape, request_dims  # noqa: E402
from helpers import quiet  # noqa: E402

ALL = ("clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer")
# Small ranges keep every build around a second; two image ranges would double the profiles.
REQUEST = ShapeRequest(images=(Range(64, 128, 256),), image_step=16, batch=Range(1, 1, 2), cfg="both",
                       t5_seq=Range(8, 16, 32))


def _copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def fp32_bundle(tiny_sd3, tmp_path_factory):
    """A private copy of the session's fp32 tiny bundle (builds write into the bundle)."""
    return _copy_bundle(tiny_sd3[1], tmp_path_factory.mktemp("b32") / "bundle")


@pytest.fixture(scope="module")
def fp16_bundle(tiny_sd3, tmp_path_factory):
    out = tmp_path_factory.mktemp("b16") / "bundle"
    export_bundle(tiny_sd3[0], out, dtype="fp16", log=quiet)
    return out


@pytest.fixture(scope="module")
def bf16_text_bundle(tiny_sd3, tmp_path_factory):
    """A native bf16 bundle. Only the text encoders: bf16 export of any graph with a Conv fails on CPU
    (ONNX's type check rejects bf16 Conv below opset 22), which is why bf16 engines for the VAE and the
    transformer are derived from the fp32 bundle (autocast) - see fp32_bf16_build."""
    out = tmp_path_factory.mktemp("bbf16") / "bundle"
    export_bundle(tiny_sd3[0], out, dtype="bf16", components=("clip_l", "clip_g", "t5"), log=quiet)
    return out


def _build(bundle, **kw):
    return build_engines(bundle, BuildOptions(request=REQUEST, **kw), log=quiet)


@pytest.fixture(scope="module")
def fp16_build(fp16_bundle):
    return fp16_bundle, _build(fp16_bundle, precision="fp16", compute_capabilities=("8.9",))


@pytest.fixture(scope="module")
def fp32_bf16_build(fp32_bundle):
    return fp32_bundle, _build(fp32_bundle, precision="bf16", compute_capabilities=("8.6", "12.0"))


@pytest.fixture(scope="module")
def bf16_native_build(bf16_text_bundle):
    return bf16_text_bundle, _build(bf16_text_bundle, precision="bf16", compute_capabilities=("8.9",))


def _meta(bundle_dir, entry, component):
    return json.loads((bundle_dir / entry["components"][component]["metadata"]).read_text())


# --------------------------------------------------------------------------- builds, metadata, manifest


@pytest.mark.parametrize("which", ["fp16_build", "fp32_bf16_build", "bf16_native_build"])
def test_build_metadata_and_manifest(request, which):
    bundle_dir, entry = request.getfixturevalue(which)
    bundle = load_bundle(bundle_dir, verify_checksums=True)  # every engine and metadata file, by sha256
    fl = load_flavour("tensorrt_rtx")
    expected = [c for c in ALL if bundle.has(c)]
    name = {"fp16_build": "fp16-rtx-sm89", "fp32_bf16_build": "bf16-rtx-sm86_sm120",
            "bf16_native_build": "bf16-rtx-sm89"}[which]
    assert name in bundle.data["engines"]
    assert bundle.data["engines"][name] == entry
    assert sorted(entry["components"]) == sorted(expected)
    assert entry["precision"] in ("fp16", "bf16") and entry["flavour"] == "tensorrt_rtx"
    assert entry["tensorrt_version"] == trt.__version__
    assert len(entry["files"]) == 2 * len(expected)
    for c in expected:
        meta = _meta(bundle_dir, entry, c)
        m_entry = bundle.component(c)
        engine = bundle_dir / meta["engine"]
        assert meta["format"] == "sd3trt-engine" and meta["component"] == c and meta["build"] == name
        assert meta["flavour"] == "tensorrt_rtx" and meta["tensorrt_version"] == fl.version
        assert meta["precision"] == entry["precision"] and meta["strongly_typed"] is True
        assert meta["target"]["mode"] == "aot"
        assert meta["target"]["compute_capabilities"] == {"fp16_build": ["8.9"], "fp32_bf16_build": ["8.6", "12.0"],
                                                          "bf16_native_build": ["8.9"]}[which]
        assert meta["engine_sha256"] == sha256_file(engine) == entry["files"][meta["engine"]]
        assert meta["engine_bytes"] == engine.stat().st_size > 100_000
        assert meta["source_onnx"]["sha256"] == m_entry["files"][m_entry["file"]] == sha256_file(bundle.onnx_path(c))
        assert meta["options"]["timing_cache"] is None  # TensorRT-RTX: timing cache calls are no-ops
        assert meta["request"]["images"] == [{"min": 64, "opt": 128, "max": 256}]
        # bindings: the manifest's names and shapes; dtypes per precision source
        for kind in ("inputs", "outputs"):
            want = m_entry[kind]
            got = meta["io"][kind]
            assert [t["name"] for t in got] == [t["name"] for t in want]
            assert [t["shape"] for t in got] == [t["shape"] for t in want]
            for g, w in zip(got, want):
                assert g["dtype"] == w["dtype"], (c, g)  # autocast keeps fp32 I/O; native keeps its dtype
                assert [d if isinstance(s, int) else -1 for d, s in zip(g["network_shape"], w["shape"])] == \
                    [s if isinstance(s, int) else -1 for s in w["shape"]], (c, g)
        if meta["precision_source"] == "autocast":
            assert meta["precision_pass"]["pass"] == "autocast" and meta["precision_pass"]["low_nodes"] > 10
        else:
            assert meta["precision_pass"]["pass"] == "fp32_islands"


def test_fp16_engines_keep_norms_in_fp32(fp16_build):
    bundle_dir, entry = fp16_build
    fp32_ops = {c: _meta(bundle_dir, entry, c)["precision_pass"]["fp32_ops"] for c in ALL}
    assert fp32_ops["transformer"].get("LayerNormalization", 0) >= 2
    assert fp32_ops["clip_l"].get("LayerNormalization", 0) >= 2
    assert fp32_ops["vae_decoder"].get("InstanceNormalization", 0) >= 2
    assert fp32_ops["t5"] == {}  # T5's RMSNorm is already fp32 in the export (transformers upcasts it)
    io = {t["name"]: t["dtype"] for t in _meta(bundle_dir, entry, "transformer")["io"]["inputs"]}
    want = {t["name"]: t["dtype"] for t in load_bundle(bundle_dir).component("transformer")["inputs"]}
    assert io == want and io["hidden_states"] == "float16"


def test_profiles_follow_the_request(fp16_build):
    bundle_dir, entry = fp16_build
    facts = load_bundle(bundle_dir).facts
    tr = _meta(bundle_dir, entry, "transformer")
    assert [p["label"] for p in tr["profiles"]] == ["cfg off, 64:128:256 px, batch 1:1:2, t5 8:16:32",
                                                    "cfg on, 64:128:256 px, batch 2:2:4, t5 8:16:32"]
    off, on = tr["profiles"]
    assert off["shapes"]["hidden_states"] == {"min": [1, 16, 8, 8], "opt": [1, 16, 16, 16], "max": [2, 16, 32, 32]}
    assert on["shapes"]["hidden_states"]["max"] == [4, 16, 32, 32]
    assert on["shapes"]["encoder_hidden_states"] == {"min": [2, 77 + 8, 96], "opt": [2, 77 + 16, 96],
                                                     "max": [4, 77 + 32, 96]}
    assert on["shapes"]["timestep"] == {"min": [2], "opt": [2], "max": [4]}
    for c in ("clip_l", "clip_g", "t5", "vae_encoder"):  # the pipeline calls these with batch 1
        (p,) = _meta(bundle_dir, entry, c)["profiles"]
        assert all(s["min"][0] == s["max"][0] == 1 for s in p["shapes"].values()), c
    (t5,) = _meta(bundle_dir, entry, "t5")["profiles"]
    assert t5["shapes"]["input_ids"] == {"min": [1, 8], "opt": [1, 16], "max": [1, 32]}
    (dec,) = _meta(bundle_dir, entry, "vae_decoder")["profiles"]
    assert dec["shapes"]["latent"] == {"min": [1, 16, 8, 8], "opt": [1, 16, 16, 16], "max": [2, 16, 32, 32]}
    # every profile shape is the manifest's symbolic shape at the profile's request dims
    for c in ALL:
        meta = _meta(bundle_dir, entry, c)
        for p in meta["profiles"]:
            for t in meta["io"]["inputs"]:
                for k in ("min", "opt", "max"):
                    d = request_dims(facts, p["dims"][k]["batch"], p["dims"][k]["height"], p["dims"][k]["width"],
                                     p["dims"][k]["t5_seq"])
                    assert p["shapes"][t["name"]][k] == list(concrete_shape(t["shape"], d))


def test_requests_outside_the_profiles_are_refused(fp16_build):
    bundle_dir, _ = fp16_build
    bundle = load_bundle(bundle_dir)
    build = "fp16-rtx-sm89"
    assert check_request(bundle, 128, 256, num_images=2, cfg=True, t5_seq=32, build=build) == build
    assert check_request(bundle, 64, 64, num_images=1, cfg=False, t5_seq=8, build=build) == build
    cases = [
        (dict(height=512, width=128), "height 512 not in 64..256"),
        (dict(height=128, width=128, num_images=3), "batch 3 not in 1..2"),
        (dict(height=128, width=128, t5_seq=64), "t5_seq 64 not in 8..32"),
        (dict(height=136, width=128), "height 136 is not a multiple of 16"),
    ]
    for kw, why in cases:
        with pytest.raises(Sd3trtError) as e:
            check_request(bundle, **{"num_images": 1, "t5_seq": 16, "build": build, **kw})
        assert why in str(e.value) and "sd3trt build" in str(e.value), str(e.value)
    # one engine, straight from input shapes: the transformer refuses an unbuilt latent size
    ep = EngineProfiles.from_metadata(json.loads((bundle_dir / "engines/fp16-rtx-sm89/transformer.json").read_text()))
    ok = {"hidden_states": (2, 16, 16, 8), "encoder_hidden_states": (2, 93, 96), "pooled_projections": (2, 64),
          "timestep": (2,)}
    assert ep.select(ok) in (0, 1)
    assert ep.select({**ok, "hidden_states": (4, 16, 16, 8), "encoder_hidden_states": (4, 93, 96),
                      "pooled_projections": (4, 64), "timestep": (4,)}) == 1  # only the CFG profile takes 4
    with pytest.raises(Sd3trtError, match="latent_height 40 not in 8..32"):
        ep.select({**ok, "hidden_states": (2, 16, 40, 8)})


def test_rebuild_reuses_unchanged_engines(fp16_build):
    bundle_dir, entry = fp16_build
    engine = bundle_dir / entry["components"]["t5"]["engine"]
    before = engine.stat().st_mtime_ns
    logs: list[str] = []
    again = build_engines(bundle_dir, BuildOptions("fp16", request=REQUEST, compute_capabilities=("8.9",),
                                                   components=("t5", "clip_l")), log=logs.append)
    assert "t5: unchanged, kept engines/fp16-rtx-sm89/t5.engine" in logs
    assert engine.stat().st_mtime_ns == before
    assert again["components"] == entry["components"]  # a subset re-run keeps the other components listed
    load_bundle(bundle_dir, verify_checksums=True)


def test_static_build(fp16_bundle):
    entry = build_engines(fp16_bundle, BuildOptions(
        "fp16", name="static", components=("transformer",), compute_capabilities=("8.9",),
        request=ShapeRequest(images=(Range(64, 96, 128),), batch=Range(1, 1, 2), cfg="on", t5_seq=Range(8, 16, 32),
                             static=True)), log=quiet)
    meta = _meta(fp16_bundle, entry, "transformer")
    (p,) = meta["profiles"]
    assert all(s["min"] == s["opt"] == s["max"] for s in p["shapes"].values())
    assert p["shapes"]["hidden_states"]["opt"] == [2, 16, 12, 12]  # batch 1 x CFG, 96 px / 8
    assert meta["request"]["static"] is True
    bundle = load_bundle(fp16_bundle, verify_checksums=True)
    assert set(bundle.data["engines"]) >= {"static", "fp16-rtx-sm89"}  # builds live side by side
    with pytest.raises(Sd3trtError, match=r"outside the optimization profiles.*batch 4 not in 2\.\.2"):
        EngineProfiles.from_metadata(meta).select({"hidden_states": (4, 16, 12, 12), "encoder_hidden_states": (4, 93, 96),
                                                   "pooled_projections": (4, 64), "timestep": (4,)})


def test_weight_stripped_build(fp16_bundle, capfd):
    """TensorRT-RTX 1.7 cannot build refittable (so neither weight-stripped) engines without a GPU (its
    Myelin JIT asks CUDA and prints an internal error first): refused before any build, in one sentence.
    Where the build can run (a GPU, or another TensorRT), the metadata must record it."""
    opts = BuildOptions("fp16", name="stripped", components=("clip_l",), compute_capabilities=("8.9",),
                        strip_weights=True, request=REQUEST)
    try:
        entry = build_engines(fp16_bundle, opts, log=quiet)
    except Sd3trtError as e:
        msg = str(e)
        assert "cannot build refittable or weight-stripped engines without a GPU" in msg, msg
        assert "drop --refit/--strip-weights" in msg
        assert "Internal Error" not in capfd.readouterr().err
        assert "stripped" not in load_bundle(fp16_bundle).data["engines"]  # nothing half-listed
    else:
        meta = _meta(fp16_bundle, entry, "clip_l")
        assert meta["options"]["strip_weights"] and meta["options"]["refit"]


# --------------------------------------------------------------------------- refusals and parsing


def test_precision_must_match_the_bundle():
    assert check_precision("fp16", "fp16") == "as-exported"
    assert check_precision("fp32", "bf16") == "autocast"
    assert check_precision("bf16", "bf16") == "as-exported"
    with pytest.raises(Sd3trtError, match=r"sd3trt export --dtype fp16"):
        check_precision("fp32", "fp16")
    with pytest.raises(Sd3trtError, match=r"sd3trt export --dtype fp32"):
        check_precision("fp16", "fp32")
    with pytest.raises(Sd3trtError, match=r"sd3trt export --dtype fp32 \(or bf16\)"):
        check_precision("fp16", "bf16")
    with pytest.raises(Sd3trtError, match=r"unknown --precision 'fp4'; use fp32 or fp16 or bf16"):
        check_precision("fp16", "fp4")


def test_bad_build_options_are_refused(fp16_bundle, fp32_bundle):
    def build(bundle, **kw):
        kw.setdefault("request", REQUEST)
        return build_engines(bundle, BuildOptions(**kw), log=quiet)

    with pytest.raises(Sd3trtError, match="--dtype fp16"):
        build(fp32_bundle, precision="fp16")
    with pytest.raises(Sd3trtError, match="largest side this model"):
        build(fp16_bundle, precision="fp16", request=ShapeRequest(images=(Range(256, 512, 1024),)))
    with pytest.raises(Sd3trtError, match="multiple of 16"):
        build(fp16_bundle, precision="fp16", request=ShapeRequest(images=(Range(64, 128, 256),), image_step=8))
    with pytest.raises(Sd3trtError, match=r"cannot target compute capability '9\.0'; use one of .*8\.9"):
        build(fp16_bundle, precision="fp16", compute_capabilities=("9.0",))
    with pytest.raises(Sd3trtError, match="no component 'unet'"):
        build(fp16_bundle, precision="fp16", components=("unet",))
    with pytest.raises(Sd3trtError, match="build name"):
        build(fp16_bundle, precision="fp16", name="../x")
    with pytest.raises(Sd3trtError, match="weight-stripped bf16 engines need a bf16 bundle"):
        build(fp32_bundle, precision="bf16", components=("clip_l",), strip_weights=True)
    with pytest.raises(Sd3trtError, match="MIN <= OPT <= MAX"):
        Range.parse("256:128", "--image-size")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(Sd3trtError, match="pip install tensorrt-cu13"):
            build(fp16_bundle, precision="fp16", flavour="tensorrt")
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(Sd3trtError, match="--workspace 'big' is not a size such as 4GiB"):
        parse_size("big")


def test_current_target_on_a_gpu_tensorrt_rtx_cannot_run(monkeypatch):
    from sd3trt.engines import gpu_targets

    fl = load_flavour("tensorrt_rtx")
    monkeypatch.setattr(gpu_targets, "current_gpu", lambda: ("9.0", "NVIDIA H200"))
    with pytest.raises(Sd3trtError, match=r"cannot run engines on this NVIDIA H200 .*install full TensorRT .*"
                                          r"`sd3trt build --flavour tensorrt`"):
        gpu_targets.resolve_targets(fl, ("current",))
    monkeypatch.setattr(gpu_targets, "current_gpu", lambda: ("8.9", "NVIDIA GeForce RTX 4090"))
    assert gpu_targets.resolve_targets(fl, ("current",))[1] == {"compute_capabilities": ["8.9"], "mode": "aot"}


@pytest.mark.parametrize("source", ["fp16", "bf16-autocast"])
def test_every_graph_parses_without_unsupported_nodes(fp16_bundle, fp32_bundle, source):
    fl = load_flavour("tensorrt_rtx")
    bundle = load_bundle(fp16_bundle if source == "fp16" else fp32_bundle)
    for c in ALL:
        graph, _ = apply_precision(load_graph(bundle.onnx_path(c)), bundle.dtype, source[:4], DEFAULT_KEEP_FP32)
        assert unsupported_nodes(fl, graph.SerializeToString(), bundle.onnx_path(c)) == [], c


# --------------------------------------------------------------------------- precision passes (ONNX Runtime)


def _feeds(bundle, component, dims, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in bundle.component(component)["inputs"]:
        shape = concrete_shape(t["shape"], dims)
        feeds[t["name"]] = (rng.integers(3, 300, shape) if t["dtype"] == "int64"
                            else rng.standard_normal(shape).astype(np.float32))
    if component == "transformer":
        feeds["timestep"] = np.array([981.25, 500.5][: dims["batch"]], np.float32)
    return feeds


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("component", ALL)
def test_autocast_graph_is_well_typed_and_close(fp32_bundle, component):
    """The bf16 derivation pass, run with fp16 as the low type so ONNX Runtime on CPU can execute it:
    the graph type-checks and stays within fp16 rounding of the fp32 graph (measured <= 2e-3 rel.)."""
    bundle = load_bundle(fp32_bundle)
    src = load_graph(bundle.onnx_path(component))
    mixed, report = autocast(src, "fp16")
    onnx.checker.check_model(mixed, full_check=True)
    assert [i.type.tensor_type.elem_type for i in mixed.graph.output] == [1] * len(mixed.graph.output)
    assert report["low_nodes"] > 10 and report["casts_added"] > 0
    dims = request_dims(bundle.facts, 2, 64, 48, 12)
    feeds = _feeds(bundle, component, dims)
    ref = _session(src).run(None, feeds)
    got = _session(mixed).run(None, feeds)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        rel = float(np.abs(r - g).max() / np.abs(r).max())
        assert 0 < rel < 1e-2, (component, rel)  # > 0: the graph really computes in the low type


def test_autocast_keeps_sensitive_math_in_fp32(fp32_bundle):
    bundle = load_bundle(fp32_bundle)
    mixed, report = autocast(load_graph(bundle.onnx_path("transformer")), "bf16")
    producers = {o: n for n in mixed.graph.node for o in n.output}

    def cast_to(name):
        n = producers.get(name)
        return next(a.i for a in n.attribute if a.name == "to") if n is not None and n.op_type == "Cast" else None

    ops = {n.op_type: n for n in mixed.graph.node}
    assert "Sin" in ops and "Cos" in ops
    for n in mixed.graph.node:
        if n.op_type in ("Sin", "Cos", "LayerNormalization"):
            assert cast_to(n.input[0]) != onnx.TensorProto.BFLOAT16, n.name  # fp32 math
        if n.op_type == "LayerNormalization":
            assert cast_to(n.input[0]) == onnx.TensorProto.FLOAT  # low activations cast up before the norm
        if n.op_type in ("Gemm", "MatMul") and n.input[1] in {i.name for i in mixed.graph.initializer}:
            raise AssertionError(f"{n.name} reads an fp32 initializer directly")
    assert report["fp32_ops"] == {"LayerNormalization": 8}
    assert [i.type.tensor_type.elem_type for i in mixed.graph.input] == [onnx.TensorProto.FLOAT] * 4


def test_fp32_islands_wrap_norms(fp16_bundle):
    bundle = load_bundle(fp16_bundle)
    src = load_graph(bundle.onnx_path("vae_decoder"))
    wrapped, report = keep_fp32_islands(src, "fp16")
    onnx.checker.check_model(wrapped, full_check=True)
    n_norm = sum(n.op_type == "InstanceNormalization" for n in src.graph.node)
    assert report["fp32_ops"] == {"InstanceNormalization": n_norm} and n_norm > 0
    producers = {o: n for n in wrapped.graph.node for o in n.output}
    consumers = {}
    for n in wrapped.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in wrapped.graph.node:
        if n.op_type == "InstanceNormalization":
            assert all(producers[i].op_type == "Cast" for i in n.input)
            assert [c.op_type for c in consumers[n.output[0]]] == ["Cast"]
    # same function: ONNX Runtime gives the same result within fp16 rounding
    dims = request_dims(bundle.facts, 1, 64, 48, 12)
    feeds = {k: v.astype(np.float16) for k, v in _feeds(bundle, "vae_decoder", dims).items()}
    a, = _session(src).run(None, feeds)
    b, = _session(wrapped).run(None, feeds)
    assert float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) < 2e-2


# --------------------------------------------------------------------------- the CLI


def test_cli_build_command(fp16_bundle, capsys):
    parser = argparse.ArgumentParser(prog="sd3trt")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cli.add_build_command(sub)
    args = parser.parse_args(["build", "--bundle", str(fp16_bundle), "--precision", "fp16", "--name", "cli",
                              "--components", "clip_g,vae_encoder", "--image-size", "64:128", "--image-size", "256",
                              "--t5-seq", "8:32", "--cfg", "on", "--compute-capability", "8.9",
                              "--workspace", "256MiB", "--opt-level", "2", "--keep-fp32", "LayerNormalization",
                              "--weight-streaming"])
    assert args.command == "build" and args.func is build_cli._build
    args.func(args)
    out = capsys.readouterr().out
    assert "clip_g: built engines/cli/clip_g.engine" in out and "manifest updated" in out
    entry = load_bundle(fp16_bundle, verify_checksums=True).data["engines"]["cli"]
    enc = _meta(fp16_bundle, entry, "vae_encoder")
    assert [p["label"] for p in enc["profiles"]] == ["64:128:128 px", "256 px"]  # two --image-size -> two profiles
    assert enc["options"]["workspace"] == 256 << 20 and enc["options"]["opt_level"] == 2
    assert enc["options"]["keep_fp32"] == ["LayerNormalization"] and enc["options"]["weight_streaming"] is True
    assert enc["precision_pass"]["fp32_ops"] == {}  # InstanceNormalization not requested -> left in fp16
    assert build_cli._default_keep() == DEFAULT_KEEP_FP32
    # errors: one line on stderr, exit status 2
    assert sd3trt_main(["build", "--bundle", str(fp16_bundle), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd3trt build: error: fp32 engines need a bundle exported in fp32") and err.count("\n") == 1


def test_engine_files_match_their_digests(fp32_bf16_build):
    bundle_dir, entry = fp32_bf16_build
    for rel, digest in entry["files"].items():
        assert hashlib.sha256((bundle_dir / rel).read_bytes()).hexdigest() == digest


def test_sd35_transformer_bf16(tiny_factory, tmp_path):
    """SD3.5: q/k RMSNorm and dual attention layers go through the autocast pass and build for real."""
    bundle_dir = _copy_bundle(tiny_factory("sd35")[1], tmp_path / "bundle")
    bundle = load_bundle(bundle_dir)
    src = load_graph(bundle.onnx_path("transformer"))
    mixed, _ = autocast(src, "fp16")
    feeds = _feeds(bundle, "transformer", request_dims(bundle.facts, 2, 64, 48, 12))
    (ref,), (got,) = _session(src).run(None, feeds), _session(mixed).run(None, feeds)
    assert float(np.abs(ref - got).max() / np.abs(ref).max()) < 1e-2
    entry = build_engines(bundle_dir, BuildOptions("bf16", components=("transformer",), compute_capabilities=("8.9",),
                                                   request=REQUEST), log=quiet)
    meta = _meta(bundle_dir, entry, "transformer")
    assert meta["precision_source"] == "autocast" and meta["engine_bytes"] > 100_000
    load_bundle(bundle_dir, verify_checksums=True)
