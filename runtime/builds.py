"""What a pipeline runs: the ONNX graph of each component (onnxruntime backends) or an engine build
(tensorrt), chosen from the precisions asked for; and whether a build's profiles take a request.

Everything here reads the manifest and the engines' metadata files only: no TensorRT, no GPU.

    files, build = choose_graphs(bundle, "tensorrt", None, "int8", None, {})   # the build with an int8 transformer
    check_request(bundle, height, width, num_images, cfg, t5_seq, build=build)  # before any engine runs
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Mapping

from sd3trt import precision as words
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import build_flavour, build_precisions, newest_build
from sd3trt.profiles import SINGLE_BATCH, EngineProfiles, request_shapes
from sd3trt.spec import COMPONENTS, T5_DEFAULT_LENGTH, request_dims

ENV_BUILD = "SD3TRT_ENGINE_BUILD"  # which engines/<build> to use when a bundle holds several


def _flavour_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_build(bundle, build: str | None = None, transformer_precision: str | None = None,
                 vae_precision: str | None = None) -> tuple[str, dict]:
    """(name, manifest entry) of the engine build to use: `build`, $SD3TRT_ENGINE_BUILD, or the newest
    build whose TensorRT flavour is installed; a given precision must be the build's (or picks the build)."""
    if transformer_precision is not None:
        words.check(transformer_precision, words.ENGINE, "transformer precision")
    if vae_precision is not None:
        words.check(vae_precision, words.FLOATS, "VAE engine precision")
    engines = bundle.engine_builds()
    if not engines:
        raise Sd3trtError(
            f"bundle {bundle.root} has no TensorRT engines; build them with "
            f"`sd3trt build --bundle {bundle.root} --precision {transformer_precision or 'fp16'}` "
            "(or use --backend onnxruntime)"
        )

    def fits(entry: dict) -> bool:
        tp, vp = build_precisions(entry)
        return transformer_precision in (None, tp) and vae_precision in (None, vp)

    build = build or os.environ.get(ENV_BUILD)
    if build:
        entry = bundle.engine_build(build)  # refuses a name that is not one of the builds, naming them
        if not fits(entry):
            tp, vp = build_precisions(entry)
            raise Sd3trtError(
                f"engine build {build!r} runs the transformer in {tp} and the VAE in {vp}, not the "
                f"{transformer_precision or tp} / {vae_precision or vp} asked for; build that with "
                f"`sd3trt build --bundle {bundle.root} --precision {transformer_precision or vae_precision}` or pick "
                "another build"
            )
        return build, entry
    candidates = [n for n, e in engines.items() if fits(e)]
    if not candidates:
        have = ", ".join(f"{n} ({'/'.join(build_precisions(e))})" for n, e in sorted(engines.items()))
        want = transformer_precision or vae_precision
        raise Sd3trtError(
            f"bundle {bundle.root} has no engine build with a {want} "
            f"{'transformer' if transformer_precision else 'VAE'} (it has {have}); build one with "
            f"`sd3trt build --bundle {bundle.root} --precision {want}`"
        )
    usable = [n for n in candidates if _flavour_installed(build_flavour(engines[n]))] or candidates
    name = newest_build(engines, usable)
    return name, engines[name]


def read_metadata(bundle, build: str, entry: dict, component: str) -> dict:
    files = bundle.engine_files(entry, component)
    if files is None:
        raise Sd3trtError(
            f"engine build {build!r} has no {component} engine; run `sd3trt build --bundle {bundle.root} "
            f"--name {build} --components {component}` with the build's options"
        )
    path = files[1]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"cannot read engine metadata {path} ({e}); re-run `sd3trt build`") from None


def check_request(bundle, height: int, width: int, num_images: int = 1, cfg: bool = True,
                  t5_seq: int = T5_DEFAULT_LENGTH, build: str | None = None) -> str:
    """Refuse a whole img2img request before any engine runs if some engine's profiles cannot take it.
    Returns the build name. Needs no GPU."""
    name, entry = select_build(bundle, build)
    facts = bundle.facts
    for component in [c for c in COMPONENTS if bundle.has(c)]:
        meta = read_metadata(bundle, name, entry, component)
        batch = 1 if component in SINGLE_BATCH else num_images * (2 if cfg and component == "transformer" else 1)
        dims = request_dims(facts, batch, height, width, t5_seq)
        index, why = EngineProfiles.from_metadata(meta).explain(request_shapes(meta["io"]["inputs"], dims))
        if index is None:
            raise Sd3trtError(
                f"engine build {name!r} cannot take a {width}x{height} px request with {num_images} image(s), "
                f"CFG {'on' if cfg else 'off'} and T5 length {t5_seq} ({component}: {why}); rebuild with "
                "`sd3trt build` and --image-size/--batch/--cfg/--t5-seq ranges that cover it"
            )
    return name


def choose_graphs(bundle, backend: str, build: str | None, transformer: str | None, vae: str | None,
                  files: Mapping) -> tuple[dict[str, Path], str | None]:
    """({component: ONNX file} for onnxruntime backends, or {} and the engine build's name for tensorrt).

    None precisions take the bundle's float graphs / the newest build; on onnxruntime "int8"/"fp8" take the
    graphs of `sd3trt quantize`; on tensorrt a precision takes the build that has it. `files` overrides."""
    if transformer is not None:
        words.check(transformer, words.ENGINE, "transformer precision")
    if vae is not None:
        words.check(vae, words.FLOATS + words.VAE_QUANTIZED, "VAE precision")
    if vae in words.VAE_QUANTIZED and backend not in ("onnxruntime", "openvino"):
        raise Sd3trtError(f"the int8 VAE is a CPU graph, not for the {backend} backend; use --backend onnxruntime "
                          "or openvino, or the fp16/bf16 VAE of a GPU engine build")
    if backend == "tensorrt":
        if files:
            raise Sd3trtError("onnx_files picks ONNX Runtime graphs; the tensorrt backend runs an engine build "
                              "(engine_build)")
        return {}, select_build(bundle, build, transformer, vae)[0]
    for word, allowed, what in ((transformer, words.TRANSFORMER, "transformer"), (vae, words.VAE, "VAE")):
        if word is not None and word not in allowed:
            raise Sd3trtError(f"the {backend} backend runs the {what} in {' or '.join(allowed)}; {word} is a "
                              f"TensorRT engine precision: use --backend tensorrt and `sd3trt build --precision {word}`")
    chosen = {name: bundle.onnx_path(name) for name in bundle.component_names()}
    if transformer not in (None, "fp32"):
        chosen["transformer"] = bundle.quantized_path(transformer)
    if vae not in (None, "fp32"):  # the VAE parts the bundle has in int8 (the encoder may have failed its gate)
        for name in bundle.quantized_parts(vae, ("vae_decoder", "vae_encoder")):
            chosen[name] = bundle.quantized_path(vae, name)
    unknown = sorted(set(files) - set(chosen))
    if unknown:
        raise Sd3trtError(f"onnx_files names {unknown}, which this bundle does not have; use {sorted(chosen)}")
    return {**chosen, **{name: Path(p) for name, p in files.items()}}, build


def check_weights(backend: str, weights: str | None) -> None:
    """Refuse a `weights` choice the backend cannot run (before any graph is chosen)."""
    if weights is None:
        return
    words.check(weights, words.WEIGHTS, "weights")
    if backend not in ("onnxruntime", "openvino"):
        raise Sd3trtError(f"8-bit weights are graphs for the CPU backends, not {backend}; use --backend openvino "
                          "or onnxruntime (TensorRT builds its own precisions)")


def compressed_graphs(bundle, chosen: Mapping) -> dict[str, Path]:
    """The 8-bit-weight graphs (`sd3trt compress-weights`) to run in place of `chosen` bundle graphs."""
    return {name: path for name, path in bundle.compressed_graphs().items()
            if Path(chosen.get(name, "")) == bundle.onnx_path(name)}
