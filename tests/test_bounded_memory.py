"""The full-size paths at tiny scale: `make-random` built group by group, weights streamed into external data,
the fp32 precision rules, and the low-memory pipeline, each against the plain path it must equal."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from sd3trt.errors import Sd3trtError
from sd3trt.export import random_model
from sd3trt.export.bundle import export_bundle
from sd3trt.manifest import load_bundle
from sd3trt.spec import FP32_RULES, Fp32Rule, fp32_rules, node_scope, read_model_facts

# Real structure (every component, tokenizers, scheduler, index), toy widths: seconds instead of minutes.
SMALL_ARCH = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                  pos_embed_max_size=32, qk_norm="rms_norm")


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture()
def small_arch(monkeypatch):
    """random_model with its architecture tables shrunk (the code path is the full-size one)."""
    monkeypatch.setattr(random_model, "TRANSFORMERS", {"sd3.5-large": SMALL_ARCH})
    monkeypatch.setattr(random_model, "FULL_DEPTH", {"sd3.5-large": {"transformer": 2, "clip_l": 2, "clip_g": 2, "t5": 2}})
    monkeypatch.setattr(random_model, "ARCHS", ("sd3.5-large",))
    monkeypatch.setattr(random_model, "CLIP_L", dict(hidden_size=24, intermediate_size=48, num_attention_heads=2,
                                                     projection_dim=32, hidden_act="quick_gelu"))
    monkeypatch.setattr(random_model, "CLIP_G", dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                     projection_dim=32, hidden_act="gelu"))
    monkeypatch.setattr(random_model, "T5_XXL", dict(d_model=64, d_ff=96, num_heads=4, d_kv=16, feed_forward_proj="gated-gelu",
                                                     relative_attention_num_buckets=8))
    monkeypatch.setattr(random_model, "SD3_VAE", dict(random_model.SD3_VAE, block_out_channels=(8, 16, 16, 16),
                                                      layers_per_block=1, norm_num_groups=4))
    monkeypatch.setattr(random_model, "CLIP_VOCAB", 1000)  # still above the tiny tokenizers' ids
    monkeypatch.setattr(random_model, "T5_VOCAB", 1000)


def _tensors(model_dir):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_make_random_in_groups_and_shards_is_a_loadable_diffusers_model(small_arch, monkeypatch, tmp_path):
    whole = random_model.make_random("sd3.5-large", tmp_path / "whole", dtype="fp32", log=_quiet)
    monkeypatch.setattr(random_model, "GROUP_BYTES", 4096)  # one small module at a time
    monkeypatch.setattr(random_model, "SHARD_BYTES", 64 * 1024)
    parts = random_model.make_random("sd3.5-large", tmp_path / "parts", dtype="fp32", log=_quiet)
    again = random_model.make_random("sd3.5-large", tmp_path / "again", dtype="fp32", log=_quiet)
    assert len(list((parts / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 3
    index = json.loads((parts / "text_encoder_3" / "model.safetensors.index.json").read_text())
    assert "shared.weight" in index["weight_map"] and "encoder.embed_tokens.weight" not in index["weight_map"]
    a, b, c = _tensors(whole), _tensors(parts), _tensors(again)
    assert b.keys() == c.keys() and all(np.array_equal(b[k], c[k]) for k in b)  # deterministic for a seed
    # Groups change which module-level inits of transformers run (a parent re-initializes its children),
    # never the tensors saved, their shapes, or the computed buffers.
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert np.array_equal(a["transformer/pos_embed.pos_embed"], b["transformer/pos_embed.pos_embed"])

    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(parts)
    t5 = pipe.text_encoder_3
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    # buffers are computed, not random: the positional table is the sin-cos one
    pos = pipe.transformer.pos_embed.pos_embed
    assert float(pos.abs().max()) <= 1.0 and set(np.unique(pos[0, 0].numpy())) == {0.0, 1.0}  # sin 0, cos 1 at (0, 0)
    assert float(pipe.vae.encoder.down_blocks[0].resnets[0].norm1.weight.detach().min()) == 1.0
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    read_model_facts(parts)  # what export reads


def test_make_random_refuses_bad_options(tmp_path):
    (tmp_path / "taken").mkdir()
    cases = [
        (dict(arch="sd4"), "unknown architecture 'sd4'"),
        (dict(arch="sd3-medium", depth={"unet": 2}), "depth unet=2: name one of transformer, clip_l, clip_g, t5"),
        (dict(arch="sd3-medium", dtype="int8"), "unknown --dtype 'int8'"),
        (dict(arch="sd3-medium", out=tmp_path / "taken"), "already exists"),
    ]
    for kw, message in cases:
        kw.setdefault("out", tmp_path / "new")
        with pytest.raises(Sd3trtError, match=message):
            random_model.make_random(log=_quiet, **kw)
    assert not (tmp_path / "new").exists()


def test_streamed_weights_give_the_same_bundle_and_images(tiny_sd3, tmp_path):
    """stream_bytes=0 sends every component's weights, tensor by tensor, to external data; the graphs,
    the weights and the images (also with --low-memory) are the plain export's."""
    from sd3trt.runtime.pipeline import Img2Img

    model_dir, plain = tiny_sd3
    streamed = export_bundle(model_dir, tmp_path / "streamed", stream_bytes=0, log=_quiet)
    a, b = load_bundle(plain), load_bundle(streamed)
    for name in ("clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer"):
        data = b.onnx_path(name).with_name(b.onnx_path(name).name + ".data")
        assert data.is_file() and not a.onnx_path(name).with_name(data.name).exists(), name
        ga = onnx.load(str(a.onnx_path(name)))
        gb = onnx.load(str(b.onnx_path(name)))
        assert [n.SerializeToString() for n in ga.graph.node] == [n.SerializeToString() for n in gb.graph.node]
        ia = {i.name: onnx.numpy_helper.to_array(i) for i in ga.graph.initializer}
        ib = {i.name: onnx.numpy_helper.to_array(i) for i in gb.graph.initializer}
        assert list(ia) == list(ib) and all(np.array_equal(ia[k], ib[k]) for k in ia), name
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    kw = dict(strength=0.6, steps=4, seed=3)
    with Img2Img(a) as p:
        ref = p(pixels, "a fox", **kw).array
    for low_memory in (False, True):
        with Img2Img(b, low_memory=low_memory) as p:
            assert np.array_equal(p(pixels, "a fox", **kw).array, ref), low_memory


def test_export_records_time_and_peak_memory(tiny_sd3):
    entry = load_bundle(tiny_sd3[1]).component("transformer")
    assert entry["export"]["seconds"] >= 0 and entry["export"]["peak_rss_mib"] > 100


def test_node_scopes_follow_the_exporter():
    assert node_scope("transformer", "transformer_blocks.35") == "/transformer/transformer_blocks.35/"
    assert node_scope("t5", "encoder.block.*.layer.*.DenseReluDense.wo") == "/model/encoder/block.*/layer.*/DenseReluDense/wo/"


def test_the_real_checkpoints_rules_are_chosen_by_config(tmp_path):
    sub = tmp_path / "transformer"
    sub.mkdir()
    large = dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, qk_norm="rms_norm")
    (sub / "config.json").write_text(json.dumps(large))
    assert [r.modules for r in fp32_rules(tmp_path, "transformer", "fp16")] == [("transformer_blocks.35",)]
    assert [r.modules for r in fp32_rules(tmp_path, "transformer", "bf16")] == [("transformer_blocks.35",)]
    assert fp32_rules(tmp_path, "transformer", "fp32") == ()
    (sub / "config.json").write_text(json.dumps(dict(large, num_layers=24, num_attention_heads=24)))  # SD3-Medium
    assert fp32_rules(tmp_path, "transformer", "fp16") == ()
    assert fp32_rules(tmp_path, "t5", "fp16")[0].upcast_by == "library"  # every T5 (no config to read)
    assert fp32_rules(tmp_path, "t5", "bf16") == ()  # bf16 has fp32's range; transformers upcasts for fp16 only


def _weights_in(graph_path, component, module):
    """{initializer: ONNX type} of the weights read by the nodes of `module`'s scope."""
    g = onnx.load(str(graph_path), load_external_data=False).graph
    types = {i.name: i.data_type for i in g.initializer}
    scope = node_scope(component, module)
    found = {i: types[i] for n in g.node if n.name.startswith(scope) for i in n.input if i in types and types[i] != onnx.TensorProto.INT64}
    assert found, scope
    return found


def test_fp16_export_keeps_the_ruled_modules_in_fp32(tiny_factory, tmp_path):
    """A rule of SD3.5-Large's kind, put on the tiny SD3.5's last block: its weights are fp32 in the graph,
    the other block's fp16; T5's `wo` stays fp32 (transformers' rule); the manifest records both; the graph
    runs on ONNX Runtime close to the fp32 bundle."""
    model_dir, fp32_bundle = tiny_factory("sd35")
    rule = Fp32Rule("transformer", ("transformer_blocks.1",), ("fp16",), {}, "sd3trt", "test")
    out = export_bundle(model_dir, tmp_path / "b16", dtype="fp16", fp32_rules={"transformer": (rule,)},
                        components=("transformer", "t5"), log=_quiet)
    b = load_bundle(out)
    kept = _weights_in(b.onnx_path("transformer"), "transformer", "transformer_blocks.1")
    other = _weights_in(b.onnx_path("transformer"), "transformer", "transformer_blocks.0")
    assert set(kept.values()) == {onnx.TensorProto.FLOAT} and set(other.values()) == {onnx.TensorProto.FLOAT16}
    wo = _weights_in(b.onnx_path("t5"), "t5", "encoder.block.1.layer.1.DenseReluDense.wo")
    ff = _weights_in(b.onnx_path("t5"), "t5", "encoder.block.1.layer.1.DenseReluDense.wi_0")
    assert set(wo.values()) == {onnx.TensorProto.FLOAT} and set(ff.values()) == {onnx.TensorProto.FLOAT16}
    assert b.component("transformer")["export"]["fp32_modules"][0]["modules"] == ["transformer_blocks.1"]
    assert b.component("t5")["export"]["fp32_modules"][0]["upcast_by"] == "library"
    assert [r.component for r in FP32_RULES] == ["transformer", "t5"]

    import onnxruntime as ort

    from sd3trt.export.components import example_inputs
    from sd3trt.spec import component_specs, request_dims

    facts = b.facts
    args = example_inputs(facts, "transformer", "fp32", request_dims(facts, 2, 64, 64, 8))
    names = [t.name for t in component_specs(facts)["transformer"].inputs]
    ref = ort.InferenceSession(str(load_bundle(fp32_bundle).onnx_path("transformer"))).run(
        None, {n: a.numpy() for n, a in zip(names, args)})[0]
    feeds = {n: a.numpy() if n == "timestep" else a.numpy().astype(np.float16) for n, a in zip(names, args)}
    got = ort.InferenceSession(str(b.onnx_path("transformer"))).run(None, feeds)[0]
    assert got.dtype == np.float16 and np.abs(got.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_a_rule_that_matches_nothing_is_refused(tiny_sd3, tmp_path):
    rule = Fp32Rule("transformer", ("transformer_blocks.35",), ("fp16",), {}, "sd3trt", "test")
    with pytest.raises(Sd3trtError, match=r"no module matches the fp32 rule \['transformer_blocks.35'\]"):
        export_bundle(tiny_sd3[0], tmp_path / "b", dtype="fp16", fp32_rules={"transformer": (rule,)},
                      components=("transformer",), log=_quiet)


def test_bf16_engines_from_an_fp32_bundle_keep_the_ruled_modules_in_fp32(tiny_factory, tmp_path):
    """An fp32 bundle records the rules for the 16-bit engines built from it; autocast keeps those scopes fp32."""
    from sd3trt.engines.mixed_precision import apply_precision, elem_types, load_graph

    model_dir = tiny_factory("sd35")[0]
    rule = Fp32Rule("transformer", ("transformer_blocks.1",), ("fp16", "bf16"), {}, "sd3trt", "test")
    b = load_bundle(export_bundle(model_dir, tmp_path / "b32", fp32_rules={"transformer": (rule,)},
                                  components=("transformer",), log=_quiet))
    scopes = b.fp32_scopes("transformer", "bf16")
    assert scopes == ("/transformer/transformer_blocks.1/",) and b.fp32_scopes("transformer", "fp32") == ()
    graph, report = apply_precision(load_graph(b.onnx_path("transformer")), "fp32", "bf16", keep_scopes=scopes)
    assert report["fp32_scopes"]["nodes"] > 20
    types = elem_types(graph)
    matmuls = {n.name: types.get(n.output[0]) for n in graph.graph.node if n.op_type == "MatMul"}
    inside = {k: v for k, v in matmuls.items() if k.startswith(scopes[0])}
    outside = {k: v for k, v in matmuls.items() if k.startswith("/transformer/transformer_blocks.0/")}
    assert inside and set(inside.values()) == {onnx.TensorProto.FLOAT}
    assert outside and set(outside.values()) == {onnx.TensorProto.BFLOAT16}


def test_an_engine_build_that_cannot_fit_is_refused_before_it_starts(tiny_sd3, monkeypatch):
    from sd3trt.engines import build
    from sd3trt.profiles import Range, ShapeRequest

    opts = build.BuildOptions(precision="fp32", request=ShapeRequest(images=(Range(64, 64, 64),)))
    monkeypatch.setattr(build, "available_mib", lambda: 1.0)
    with pytest.raises(Sd3trtError, match=r"building the \w+ engine needs about \d+ GiB of memory .* and this machine "
                                          r"has 0 GiB available; build it on a machine with more memory"):
        build.build_engines(tiny_sd3[1], opts, log=_quiet)
    b = load_bundle(tiny_sd3[1])
    sizes = {c: b.onnx_path(c).stat().st_size / 2**20 for c in ("clip_l", "t5")}
    assert sizes["clip_l"] < sizes["t5"]
    room = build.BUILD_MEMORY_BASE_MIB + build.BUILD_MEMORY_FACTOR * (sizes["clip_l"] + sizes["t5"]) / 2
    monkeypatch.setattr(build, "available_mib", lambda: room)  # CLIP-L fits, T5 does not
    with pytest.raises(Sd3trtError, match=r"building the t5 engine .* or build the rest here with --components clip_l$"):
        build.build_engines(tiny_sd3[1], replace(opts, components=("clip_l", "t5")), log=_quiet)
