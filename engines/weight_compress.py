"""8-bit weights without calibration: each MatMul / Gemm weight stored as int8 with one scale per output channel
(symmetric, scale = max|W| / 127), expanded inside the graph as Cast(int8 -> the graph's float type) * scale.
Activations stay in the graph's float type, so nothing is measured on data. (Not DequantizeLinear: below opset
19 it outputs float32 only, and a Cast after it hides the pattern OpenVINO keeps compressed.)

OpenVINO's CPU plugin reads such weights as compressed weights (its FullyConnected layers take the int8
constants, the form NNCF's `compress_weights` produces); on SD3.5-Large that is what lets the 8.1 B transformer
run on a 24 GiB machine (README "Full size": the first call still prepares ~10 GiB of GEMM weights). ONNX
Runtime and TensorRT run the same graph.

The graph is written as sd3trt's other derived graphs are: initializers streamed one tensor at a time into
one external-data file beside it (a 16 GB source is never held in memory).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sd3trt.engines.qdq_writer import ALIGN, point_to, source_bytes
from sd3trt.errors import Sd3trtError

MIN_ELEMENTS = 4096  # smaller weights (biases, tiny projections) stay as they are
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _weight_axes(graph) -> dict[str, int]:
    """{initializer: output-channel axis} of the float 2-D weights that only MatMul / Gemm read, as their B."""
    inits = {i.name: i for i in graph.initializer}
    axes: dict[str, int] = {}
    other: set[str] = set()
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            init = inits[name]
            if node.op_type in ("MatMul", "Gemm") and k == 1 and len(init.dims) == 2 and init.data_type in FLOAT_TYPES \
                    and int(np.prod(init.dims)) >= MIN_ELEMENTS:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                axis = 0 if node.op_type == "Gemm" and trans_b else 1
                if axes.setdefault(name, axis) != axis:
                    other.add(name)
            else:
                other.add(name)
    return {n: a for n, a in axes.items() if n not in other}


def _as_float32(init, base_dir: str) -> np.ndarray:
    arr = numpy_helper.to_array(init, base_dir=base_dir)
    if init.data_type == TensorProto.BFLOAT16 and arr.dtype == np.uint16:  # older onnx: raw bf16 bits
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def _scale_tensor(scale: np.ndarray, name: str, to: int):
    """The scale in the graph's float type (bf16 rounded to nearest even from float32)."""
    if to == TensorProto.BFLOAT16:
        bits = scale.astype(np.float32).view(np.uint32)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        t = TensorProto(name=name, data_type=to, dims=scale.shape)
        t.raw_data = bits.tobytes()
        return t
    return numpy_helper.from_array(scale.astype(np.float16 if to == TensorProto.FLOAT16 else np.float32), name)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per channel along `axis`): symmetric, round to nearest."""
    reduce = 1 - axis
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = (1, -1) if axis == 1 else (-1, 1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


class _DataWriter:
    """Initializers into one page-aligned external-data file, one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")

    def put(self, init, data: bytes | memoryview) -> None:
        self.f.write(b"\0" * ((-self.f.tell()) % ALIGN))
        offset = self.f.tell()
        self.f.write(data)
        point_to(init, self.path.name, offset, len(data))

    def close(self) -> None:
        self.f.close()


def compress_weights(src: Path, dest: Path) -> dict:
    """Write the int8-weight graph of `src` to `dest` (+ `dest`.data); returns a report. Each weight is
    expanded back to its own float type (a 16-bit graph may keep some modules in fp32: spec.Fp32Rule)."""
    src, dest = Path(src), Path(dest)
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    base = str(src.parent)
    axes = _weight_axes(g)
    if not axes:
        raise Sd3trtError(f"{src} has no MatMul / Gemm weight to compress")
    writer = _DataWriter(dest.with_name(dest.name + ".data"))
    kept, new_inits, nodes, before, after = [], [], [], 0, 0
    handles: dict = {}
    try:
        for init in g.initializer:
            if init.name not in axes:
                if init.data_location == TensorProto.EXTERNAL:  # moved into the new data file as it is
                    writer.put(init, source_bytes(init, src.parent, handles))
                kept.append(init)
                continue
            w = _as_float32(init, base)
            before += w.size * (4 if init.data_type == TensorProto.FLOAT else 2)
            q, scale = quantize_weight(w, axes[init.name])
            after += q.size + scale.size * 4
            qi = TensorProto(name=f"{init.name}__int8", data_type=TensorProto.INT8, dims=q.shape)
            writer.put(qi, memoryview(np.ascontiguousarray(q)).cast("B"))
            shape = (1, -1) if axes[init.name] == 1 else (-1, 1)
            to = init.data_type
            new_inits += [qi, _scale_tensor(scale.reshape(shape), f"{init.name}__scale", to)]
            wide = f"{init.name}__expanded"
            nodes += [helper.make_node("Cast", [qi.name], [wide], to=to, name=f"{init.name}/Cast"),
                      helper.make_node("Mul", [wide, f"{init.name}__scale"], [init.name], name=f"{init.name}/Mul")]
            del w, q
    finally:
        writer.close()
        for f in handles.values():
            f.close()
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)  # the dequantized weights come first: every reader follows
    onnx.save_model(model, str(dest))
    return {"weights": len(axes), "bytes_before": before, "bytes_after": after}


COMPRESSIBLE = ("transformer", "t5", "clip_g", "clip_l")  # the GEMM-heavy graphs (the VAE is convolutions)


def compress_bundle(root: Path, components: tuple[str, ...] = ("transformer", "t5"), settings=None, threads: int = 0,
                    log: Callable[[str], None] = print) -> dict:
    """Write and list the 8-bit-weight graph of each of `components`; then, with GateSettings `settings`, gate
    them together by the image: img2img on OpenVINO with them vs the bundle's own graphs (same requests and
    noise; accuracy.GATE). Returns {component: manifest entry}."""
    from sd3trt.manifest import COMPRESSED, commit_entry, entry_sha256, load_bundle

    root = Path(root)
    bundle = load_bundle(root)
    for c in components:
        if c not in COMPRESSIBLE:
            raise Sd3trtError(f"--components: {c} is not compressed (choose from {', '.join(COMPRESSIBLE)})")
        bundle.component(c)  # refuses a component the bundle lacks
    entries = {}
    for c in components:
        t0 = time.perf_counter()
        rel = f"onnx/{c}.w8.onnx"
        with tempfile.TemporaryDirectory(dir=root / "onnx", prefix=f".{c}.w8.") as tmp:
            dest = Path(tmp) / f"{c}.w8.onnx"
            report = compress_weights(bundle.onnx_path(c), dest)
            entry = {"file": rel, "scheme": "int8 weights, symmetric, one scale per output channel; no calibration",
                     "source": {"component": c, "sha256": entry_sha256(bundle.component(c))},
                     "report": report, "seconds": round(time.perf_counter() - t0, 1), "gate": None}
            entries[c] = commit_entry(root, COMPRESSED, c, {rel: dest, f"{rel}.data": Path(f"{dest}.data")}, entry)
        log(f"{c}: {report['weights']} weights, {report['bytes_before'] / 2**30:.2f} -> "
            f"{report['bytes_after'] / 2**30:.2f} GiB in {entries[c]['seconds']:.0f} s")
    if settings is not None:
        verdict = _gate(root, settings, threads)
        for c in components:
            entries[c] = commit_entry(root, COMPRESSED, c, {}, lambda old: {**old, "gate": verdict})
        img = verdict["image"]
        log(f"gate: 8-bit weights of {', '.join(components)}: PSNR {img['psnr_db']['min']:.2f} dB, "
            f"SSIM {img['ssim']['min']:.4f} - {'pass' if verdict['passed'] else 'FAIL (they stay unused)'}")
    return entries


def _gate(root: Path, settings, threads: int) -> dict:
    from sd3trt.engines.accuracy import gate
    from sd3trt.engines.cpu_gate import compare, images
    from sd3trt.manifest import load_bundle
    from sd3trt.runtime.pipeline import Img2Img

    bundle = load_bundle(root)
    requests = settings.requests(bundle.facts)

    def run(weights):
        return images(Img2Img(bundle, backend="openvino", threads=threads, prompt_cache=0, weights=weights,
                              low_memory=True), requests)

    figures = compare(run(None), run("w8"))
    ok, why = gate("w8", figures)
    return {"passed": ok, "reference": f"the bundle's {bundle.dtype} graphs on OpenVINO", **figures,
            "settings": {"runs": settings.runs, "steps": settings.steps, "size": settings.size},
            **({"failures": why} if why else {})}
