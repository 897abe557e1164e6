"""LoRA: fused at export and merged at load time, both against diffusers' load_lora_weights + fuse_lora.

The LoRAs are rank-4 PEFT/diffusers-named files made here for the tiny models: transformer attention
(joint and, on SD3.5, the dual-attention attn2) and feed-forward layers, and (the first) CLIP-L's first layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusers_ref import run_reference
from sd3trt.cli import main as cli_main
from sd3trt.errors import Sd3trtError
from sd3trt.lora import LoraSpec, linear_shapes, parse_arg, read_lora
from sd3trt.manifest import load_bundle
from sd3trt.runtime.pipeline import Img2Img, Noise
from test_pipeline_parity import MAX_FLOAT, MAX_LEVELS, picture

TRANSFORMER = re.compile(r"transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                         r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))$")
CLIP = re.compile(r"text_model\.encoder\.layers\.0\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1)$")


def make_lora(model_dir: Path, path: Path, seed: int = 0, rank: int = 4, text_encoder: str | None = "text_encoder",
              transformer: bool = True, metadata: dict | None = None) -> Path:
    """A rank-`rank` LoRA in diffusers' PEFT naming whose deltas change the image clearly (tens of levels).
    metadata: diffusers' saved LoraConfig ({"transformer.lora_alpha": ...}), stored as lora_adapter_metadata."""
    rng = np.random.default_rng(seed)
    groups = []
    if transformer:
        groups.append(("transformer", linear_shapes(model_dir / "transformer"), TRANSFORMER))
    if text_encoder:
        groups.append((text_encoder, linear_shapes(model_dir / text_encoder), CLIP))
    tensors = {}
    for prefix, shapes, pattern in groups:
        for module, entry in sorted(shapes.items()):
            if pattern.search(module):
                out, inp = entry["shape"]
                tensors[f"{prefix}.{module}.lora_A.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float32)
                tensors[f"{prefix}.{module}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.2).astype(np.float32)
    extra = None
    if metadata:
        for prefix, _, pattern in groups:
            metadata.setdefault(f"{prefix}.r", rank)
            metadata.setdefault(f"{prefix}.target_modules", sorted({k.split(".lora_")[0][len(prefix) + 1:]
                                                                    for k in tensors if k.startswith(prefix + ".")}))
        extra = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}
    save_file(tensors, str(path), metadata=extra)
    return path


@pytest.fixture(scope="module")
def lora_files(tiny_factory, tmp_path_factory):
    """variant -> (LoRA with transformer + CLIP-L, transformer-only LoRA)."""
    root, made = tmp_path_factory.mktemp("loras"), {}

    def get(variant):
        if variant not in made:
            model, _ = tiny_factory(variant)
            made[variant] = (make_lora(model, root / f"{variant}-a.safetensors", 1),
                             make_lora(model, root / f"{variant}-b.safetensors", 2, text_encoder=None))
        return made[variant]

    return get


def _inputs(w=64, h=64):
    rng = np.random.default_rng(123)
    return (picture(w, h), rng.standard_normal((1, 16, h // 8, w // 8), dtype=np.float32),
            rng.standard_normal((1, 16, h // 8, w // 8), dtype=np.float32))


def _compare(res, ref_u8, ref_float):
    ours_float = np.clip(res.decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return int(np.abs(res.array.astype(int) - ref_u8.astype(int)).max()), float(np.abs(ours_float - ref_float).max())


CASES = [("sd3", (0.5,)), ("sd3", (1.5,)), ("sd3", (0.7, 1.3)), ("sd35", (0.5,)), ("sd35", (1.5,)), ("sd35", (0.7, 1.3))]


@pytest.mark.parametrize("variant,scales", CASES, ids=[f"{v}-{'+'.join(map(str, s))}" for v, s in CASES])
def test_export_and_load_time_match_diffusers(tiny_factory, lora_files, tmp_path, variant, scales):
    model, bundle = tiny_factory(variant)
    loras = list(zip(lora_files(variant), scales))
    image, latents, posterior = _inputs()
    args = dict(strength=0.6, steps=4, guidance_scale=7.0)
    ref_u8, ref_float = run_reference(model, image, "a fox", "blurry", 0.6, 4, 7.0, 1, latents, posterior, loras=loras)
    plain_u8, _ = run_reference(model, image, "a fox", "blurry", 0.6, 4, 7.0, 1, latents, posterior)
    assert np.abs(ref_u8.astype(int) - plain_u8).max() > 10  # the LoRA changes the image

    fused = tmp_path / "fused"
    from sd3trt.export.bundle import export_bundle

    export_bundle(model, fused, log=lambda s: None, loras=[f"{p}:{s}" for p, s in loras])
    data = json.loads((fused / "manifest.json").read_text())
    assert [(r["file"], r["scale"]) for r in data["loras"]] == [(Path(p).name, s) for p, s in loras]
    assert data["loras"][0]["components"] == ["clip_l", "transformer"]
    with Img2Img.from_bundle(fused) as pipe:
        export_figures = _compare(pipe(image, "a fox", negative_prompt="blurry", noise=Noise(latents, posterior),
                                       **args), ref_u8, ref_float)
    with Img2Img.from_bundle(bundle, loras=loras) as pipe:
        assert sorted(pipe.lora_components) == ["clip_l", "transformer"]
        load_figures = _compare(pipe(image, "a fox", negative_prompt="blurry", noise=Noise(latents, posterior),
                                     **args), ref_u8, ref_float)
    print(f"LoRA parity {variant} scales {scales}: export {export_figures}, load time {load_figures}")
    for levels, err in (export_figures, load_figures):
        assert levels <= MAX_LEVELS and err <= MAX_FLOAT


def test_saved_lora_config_alpha_matches_diffusers(tiny_sd3, tmp_path):
    """A LoRA saved by diffusers' trainers carries its LoraConfig: lora_alpha != rank, and an alpha_pattern."""
    from sd3trt.export.bundle import export_bundle

    model, bundle = tiny_sd3
    meta = {"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_q": 2},
            "text_encoder.lora_alpha": 2}
    path = make_lora(model, tmp_path / "alpha.safetensors", 5, metadata=meta)
    lora = read_lora(LoraSpec(path, 0.8))  # alpha / rank: 8/4, the pattern's 2/4, CLIP-L's 2/4
    assert [lora.scaling(c, m) for c, m in (("transformer", "transformer_blocks.0.attn.to_k"),
            ("transformer", "transformer_blocks.0.attn.to_q"), ("clip_l", "text_model.encoder.layers.0.mlp.fc1"))] \
        == [2.0, 0.5, 0.5]
    image, latents, posterior = _inputs()
    ref_u8, ref_float = run_reference(model, image, "a fox", "blurry", 0.6, 4, 7.0, 1, latents, posterior,
                                      loras=[(path, 0.8)])
    kw = dict(negative_prompt="blurry", strength=0.6, steps=4, noise=Noise(latents, posterior))
    export_bundle(model, tmp_path / "fused", log=lambda s: None, loras=[f"{path}:0.8"])
    for pipe in (Img2Img.from_bundle(tmp_path / "fused"), Img2Img.from_bundle(bundle, loras=[(path, 0.8)])):
        levels, err = _compare(pipe(image, "a fox", **kw), ref_u8, ref_float)
        assert levels <= MAX_LEVELS and err <= MAX_FLOAT


def test_load_time_lora_leaves_other_pipelines_alone(tiny_sd3, lora_files):
    """The merged weights live in one session: a pipeline without the LoRA still gives the plain image."""
    _, bundle = tiny_sd3
    image, latents, posterior = _inputs()
    kw = dict(strength=0.6, steps=2, noise=Noise(latents, posterior))
    plain = Img2Img.from_bundle(bundle)(image, "a fox", **kw).array
    with_lora = Img2Img.from_bundle(bundle, loras=[lora_files("sd3")[0]])(image, "a fox", **kw).array
    again = Img2Img.from_bundle(bundle)(image, "a fox", **kw).array
    assert np.array_equal(plain, again) and not np.array_equal(plain, with_lora)


# ---------------------------------------------------------------- bad input: one clear error, nothing written


def _bad_files(tmp_path: Path, model: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": rng.standard_normal((96, 4)).astype(np.float32)},
              str(unknown))
    shape = tmp_path / "shape.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 48), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((32, 4), np.float32)}, str(shape))
    module = tmp_path / "module.safetensors"
    save_file({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": np.ones((4, 32), np.float32),
               "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": np.ones((32, 4), np.float32)}, str(module))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    return {"unknown keys": (unknown, "not an SD3 LoRA"), "shape": (shape, "is [32, 32] (out, in)"),
            "module": (module, "has no linear weight"), "not safetensors": (junk, "is not a safetensors file"),
            "missing": (tmp_path / "nope.safetensors", "does not exist")}


def test_bad_loras_are_refused_at_export_and_load(tiny_sd3, tmp_path):
    from sd3trt.export.bundle import export_bundle

    model, bundle = tiny_sd3
    for what, (path, words) in _bad_files(tmp_path, model).items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        with pytest.raises(Sd3trtError, match=re.escape(words)):
            export_bundle(model, out, log=lambda s: None, loras=[path])
        assert not out.exists(), what
        with pytest.raises(Sd3trtError, match=re.escape(words)):
            Img2Img.from_bundle(bundle, loras=[f"{path}:0.5"])


@pytest.mark.parametrize("text", ["a.safetensors:nan", "a.safetensors:inf", "a.safetensors:-inf", "a.safetensors:x1"])
def test_scale_must_be_a_finite_number(text):
    with pytest.raises(Sd3trtError, match="is not a finite number"):
        parse_arg(text)


def test_scale_grammar():
    assert parse_arg("dir/x.safetensors").scale == 1.0
    assert parse_arg("dir/x.safetensors:0.25") == parse_arg("dir/x.safetensors:.25")
    assert str(parse_arg("/a:b/x.safetensors:2").path) == "/a:b/x.safetensors"


def test_text_encoder_lora_on_a_bundle_without_that_encoder(tiny_sd3, tmp_path):
    from sd3trt.runtime import lora as lora_runtime

    model, bundle_dir = tiny_sd3
    path = make_lora(model, tmp_path / "te2.safetensors", text_encoder="text_encoder_2", transformer=False)
    bundle = load_bundle(bundle_dir)
    del bundle.data["components"]["clip_g"]
    with pytest.raises(Sd3trtError, match=r"changes the CLIP-G text encoder \(text_encoder_2\), which bundle"):
        lora_runtime.overrides(bundle, [path], {})


def test_cli_refuses_and_writes_nothing(tiny_sd3, lora_files, tmp_path, capsys):
    model, bundle = tiny_sd3
    lora = lora_files("sd3")[0]
    assert cli_main(["export", "--model", str(model), "--out", str(tmp_path / "b"), "--lora", f"{lora}:nan"]) == 2
    assert "is not a finite number" in capsys.readouterr().err and not (tmp_path / "b").exists()
    picture(64, 64).save(tmp_path / "in.png")
    argv = ["img2img", "--bundle", str(bundle), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--steps", "1",
            "--out", str(tmp_path / "out.png")]
    assert cli_main(argv + ["--lora", str(tmp_path / "in.png")]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err and not (tmp_path / "out.png").exists()
    assert cli_main(argv + ["--lora", f"{lora}:0.5"]) == 0 and (tmp_path / "out.png").is_file()


def test_quantized_transformer_refuses_a_load_time_lora(tiny_sd3, lora_files):
    _, bundle = tiny_sd3
    for precision in ("int8", "fp8"):
        with pytest.raises(Sd3trtError, match="fuse it before quantizing: `sd3trt export --lora"):
            Img2Img.from_bundle(bundle, transformer_precision=precision, loras=[lora_files("sd3")[0]])


def test_tensorrt_backend_points_to_refit(tiny_sd3, lora_files):
    _, bundle = tiny_sd3
    with pytest.raises(Sd3trtError, match="sd3trt refit"):
        Img2Img.from_bundle(bundle, backend="tensorrt", loras=[lora_files("sd3")[0]])


# ---------------------------------------------------------------- TensorRT refit plan (CPU)


def _fake_build(bundle_dir: Path, dest: Path, refit: bool = True, source: str = "as-exported") -> Path:
    """A copy of the bundle whose manifest lists an engine build (the plan reads its metadata, not its engines:
    refittable engines can only be built on a GPU with tensorrt_rtx 1.7)."""
    import shutil

    shutil.copytree(bundle_dir, dest)
    data = json.loads((dest / "manifest.json").read_text())
    comps = {}
    for c, entry in data["components"].items():
        meta = {"precision_source": source, "source_onnx": {"file": entry["file"], "sha256": entry["files"][entry["file"]]}}
        (dest / "engines" / "b").mkdir(parents=True, exist_ok=True)
        (dest / "engines" / "b" / f"{c}.json").write_text(json.dumps(meta))
        comps[c] = {"engine": f"engines/b/{c}.engine", "metadata": f"engines/b/{c}.json"}
    data["engines"] = {"b": {"options": {"refit": refit}, "components": comps, "flavour": "tensorrt_rtx"}}
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest


def test_refit_plan_matches_the_graphs_weights(tiny_sd3, lora_files, tmp_path):
    import onnx
    from onnx import numpy_helper

    from sd3trt.engines.refit import check_refittable, refit_plan
    from sd3trt.runtime.lora import delta, weight_maps

    _, bundle_dir = tiny_sd3
    bundle = _fake_build(bundle_dir, tmp_path / "b")
    a, b = lora_files("sd3")
    plan = refit_plan(bundle, [f"{a}:0.5", f"{b}:1.5"])
    assert plan.build == "b" and sorted(plan.weights) == ["clip_l", "transformer"]
    maps = weight_maps(load_bundle(bundle))
    for comp, weights in plan.weights.items():
        graph = onnx.load(str(bundle / "onnx" / f"{comp}.onnx")).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        refittable = {n: (tuple(v.shape), v.dtype.name) for n, v in inits.items()}
        check_refittable(plan, comp, refittable)  # names, shapes and dtypes of the graph TensorRT refits by
        by_init = {e["initializer"]: (m, e) for m, e in maps[comp].items()}
        for name, merged in weights.items():  # and the values: base (read by onnx) + the LoRA deltas
            module, entry = by_init[name]
            d = sum(delta(read_lora(LoraSpec(p, s)), comp, module) for p, s in ((a, 0.5), (b, 1.5))
                    if module in read_lora(LoraSpec(p, s)).modules.get(comp, {}))
            want = inits[name] + (d.T if entry["transposed"] else d)
            assert np.allclose(merged, want, atol=1e-6)
        with pytest.raises(Sd3trtError, match="is not refittable in this engine"):
            check_refittable(plan, comp, {})
        name = sorted(weights)[0]
        with pytest.raises(Sd3trtError, match=re.escape(f"refittable weight {name!r} is")):
            check_refittable(plan, comp, {**refittable, name: ((1, 2), "float32")})


def test_refit_refuses_unrefittable_builds(tiny_sd3, lora_files, tmp_path):
    from sd3trt.engines.refit import refit_plan

    _, bundle_dir = tiny_sd3
    lora = lora_files("sd3")[0]
    with pytest.raises(Sd3trtError, match="no engine build made with --refit"):
        refit_plan(bundle_dir, [lora])
    with pytest.raises(Sd3trtError, match="was not built with --refit"):
        refit_plan(_fake_build(bundle_dir, tmp_path / "a", refit=False), [lora], "b")
    with pytest.raises(Sd3trtError, match="fuse the LoRA before quantizing"):
        refit_plan(_fake_build(bundle_dir, tmp_path / "q", source="quantized (fp16 elsewhere)"), [lora])


def test_refit_plan_only_cli(tiny_sd3, lora_files, tmp_path, capsys):
    bundle = _fake_build(tiny_sd3[1], tmp_path / "b")
    assert cli_main(["refit", "--bundle", str(bundle), "--lora", f"{lora_files('sd3')[0]}:0.8", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "transformer:" in out and "clip_l:" in out


def test_server_refuses_a_bad_lora_at_start(tiny_sd3, tmp_path, capsys):
    pytest.importorskip("uvicorn")
    rc = cli_main(["serve", "--bundle", str(tiny_sd3[1]), "--db", str(tmp_path / "keys.db"),
                   "--lora", str(tmp_path / "missing.safetensors:0.5")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_server_config_carries_the_allowed_loras():
    from sd3trt.cli import build_parser

    a = build_parser().parse_args(["serve", "--bundle", "b", "--lora", "x.safetensors:0.5", "--lora", "y.safetensors"])
    assert a.lora == ["x.safetensors:0.5", "y.safetensors"]


def test_server_pipeline_runs_the_loras_named_at_start(tiny_sd3, lora_files, tmp_path):
    pytest.importorskip("fastapi")
    from sd3trt.server.config import ServerConfig
    from sd3trt.server.service import Server

    _, bundle = tiny_sd3
    image, latents, posterior = _inputs()
    kw = dict(strength=0.6, steps=2, noise=Noise(latents, posterior))
    lora = f"{lora_files('sd3')[0]}:0.8"
    served = Server(ServerConfig(bundle, tmp_path / "keys.db", loras=(lora,)))._load()
    direct = Img2Img.from_bundle(bundle, loras=[lora])
    plain = Img2Img.from_bundle(bundle)
    got = served(image, "a fox", **kw).array
    assert np.array_equal(got, direct(image, "a fox", **kw).array)
    assert not np.array_equal(got, plain(image, "a fox", **kw).array)


def _gpu() -> str | None:
    """Why the refit cannot run here (None: a GPU the installed TensorRT can target)."""
    from sd3trt.runtime.cuda import find_gpu

    try:
        from sd3trt.engines.gpu_targets import gpu_mismatch
        from sd3trt.runtime.flavour import load_flavour

        return gpu_mismatch(load_flavour(), *find_gpu(0))
    except Exception as e:  # no cuda-bindings, no GPU, no TensorRT
        return str(e) or type(e).__name__


@pytest.mark.gpu
def test_refit_on_the_gpu_matches_the_load_time_lora(tiny_sd3, lora_files, tmp_path):
    """Refit a --refit fp32 build with two LoRAs; the transformer and CLIP-L engines then agree with ONNX Runtime
    running the same LoRAs at load time (TF32 tolerance, as test_trt_runner's fp32 check)."""
    import shutil

    problem = _gpu()
    if problem:
        pytest.skip(f"needs a GPU TensorRT can target: {problem}")
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.engines.refit import apply_refit, refit_plan
    from sd3trt.profiles import Range, ShapeRequest
    from sd3trt.runtime.flavour import load_flavour
    from sd3trt.runtime.trt_runner import TrtRunner
    from sd3trt.spec import concrete_shape, request_dims

    bundle = tmp_path / "b"
    shutil.copytree(tiny_sd3[1], bundle)
    request = ShapeRequest(images=(Range(64, 64, 64),), batch=Range(1, 1, 1), cfg="off", t5_seq=Range(16, 16, 16))
    ccs = ("current",) if load_flavour().is_rtx else ()
    build_engines(bundle, BuildOptions("fp32", name="r", request=request, compute_capabilities=ccs, refit=True,
                                       components=("clip_l", "transformer")), log=lambda s: None)
    loras = [(p, s) for p, s in zip(lora_files("sd3"), (0.7, 1.3))]
    entry = apply_refit(bundle, refit_plan(bundle, [f"{p}:{s}" for p, s in loras], "r"), "r-lora", log=lambda s: None)
    assert entry["refit_from"] == "r" and len(entry["loras"]) == 2
    b = load_bundle(bundle)
    ref = Img2Img(b, loras=loras)
    rng = np.random.default_rng(0)
    for comp in ("clip_l", "transformer"):
        feeds = {}
        for t in b.component(comp)["inputs"]:
            shape = concrete_shape(t["shape"], request_dims(b.facts, 1, 64, 64, 16))
            feeds[t["name"]] = (rng.integers(3, 300, shape) if t["dtype"] == "int64"
                                else rng.standard_normal(shape).astype(np.float32))
        runner = TrtRunner.from_bundle(b, comp, build="r-lora")
        try:
            got, want = runner.run(feeds), ref.runner(comp).run(feeds)
        finally:
            runner.close()
        for name, w in want.items():
            assert float(np.abs(got[name] - w).max() / max(np.abs(w).max(), 1e-6)) < 5e-3, (comp, name)


def test_load_time_refusals_name_the_fix(tiny_sd3, lora_files, tmp_path):
    """A bundle exported before weight maps existed, and a weight the export folded, each name the fix."""
    from sd3trt.runtime import lora as lora_runtime

    _, bundle_dir = tiny_sd3
    lora = lora_files("sd3")[1]  # transformer only
    bundle = load_bundle(bundle_dir)
    del bundle.data["components"]["transformer"]["lora_map"]
    with pytest.raises(Sd3trtError, match="records no weight names for its transformer; re-export it"):
        lora_runtime.overrides(bundle, [lora], {})
    bundle = load_bundle(bundle_dir)
    folded = tmp_path / "transformer.lora.json"
    wmap = json.loads(bundle.path(bundle.component("transformer")["lora_map"]).read_text())
    wmap["transformer_blocks.0.attn.to_q"]["initializer"] = None
    folded.write_text(json.dumps(wmap))
    bundle.data["components"]["transformer"]["lora_map"] = str(folded)  # absolute: Path join keeps it
    with pytest.raises(Sd3trtError, match=r"folded the weight of transformer transformer_blocks\.0\.attn\.to_q"):
        lora_runtime.overrides(bundle, [lora], {})


def test_fp16_bundle_load_time_equals_export_time(tiny_sd3, lora_files, tmp_path):
    """fp16: both modes add the summed deltas to W in float32 and round once to fp16."""
    from sd3trt.export.bundle import export_bundle

    model, _ = tiny_sd3
    a, b = lora_files("sd3")
    loras = [(a, 0.7), (b, 1.3)]
    plain = export_bundle(model, tmp_path / "p16", dtype="fp16", log=lambda s: None)
    fused = export_bundle(model, tmp_path / "f16", dtype="fp16", log=lambda s: None,
                          loras=[f"{p}:{s}" for p, s in loras])
    image, latents, posterior = _inputs()
    kw = dict(strength=0.6, steps=3, noise=Noise(latents, posterior))
    x = Img2Img.from_bundle(fused)(image, "a fox", **kw)
    y = Img2Img.from_bundle(plain, loras=loras)(image, "a fox", **kw)
    z = Img2Img.from_bundle(plain)(image, "a fox", **kw)
    assert np.abs(x.array.astype(int) - y.array).max() <= MAX_LEVELS < np.abs(x.array.astype(int) - z.array).max()
