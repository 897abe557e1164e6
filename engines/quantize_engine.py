"""TensorRT engines from the quantized transformer: strongly typed, Q/DQ layers in INT8/FP8, the rest fp16/bf16.

    build_quantized_engine(bundle_dir, "fp8", compute_capabilities=("8.9",))   # engines/fp8-rtx-sm89/transformer.engine

The bundle's Q/DQ graph (onnx/transformer.<precision>.onnx, fp32 around the Q/DQ pairs so ONNX Runtime
can run it) is lowered for TensorRT by `lower_qdq`: the engine builder's autocast pass
(`sd3trt.engines.precision.autocast`) puts matmuls, elementwise and data-movement ops in fp16/bf16 and
keeps normalizations in fp32; then every QuantizeLinear takes its input and every DequantizeLinear
produces its output in that low type (scales converted), so TensorRT sees `x16 -> Q -> DQ -> MatMul16`
and `W8 -> DQ -> MatMul16` with no Cast in between - the pattern it fuses into INT8/FP8 GEMMs.

FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell); `check_target` refuses an
FP8 build for an older target (or for TensorRT-RTX's default portable set, which includes 8.6) before
TensorRT starts. The engine joins engines[<build>] in manifest.json next to engines `sd3trt build`
made for the other components, with the same metadata format, so `TrtRunner` loads it unchanged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sd3trt
from sd3trt.engines.quantize import upgrade_opset
from sd3trt.engines.quantized import PORTABLE_RTX, check_target  # noqa: F401
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle, sha256_file, update_manifest, write_bytes_atomic, write_json_atomic

LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


# --------------------------------------------------------------------------- graph lowering


def _low_scale(model: onnx.ModelProto, name: str, low: int, cache: dict, inits: dict) -> str:
    """A copy of scale initializer `name` in the low type (fp16 / bf16), made once."""
    if (name, low) in cache:
        return cache[(name, low)]
    arr = numpy_helper.to_array(inits[name]).astype(np.float32)
    new = f"{name}/{'fp16' if low == TensorProto.FLOAT16 else 'bf16'}"
    if low == TensorProto.FLOAT16:
        t = numpy_helper.from_array(arr.astype(np.float16), new)
    else:
        import ml_dtypes

        t = numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), new)
    model.graph.initializer.append(t)
    inits[new] = t
    cache[(name, low)] = new
    return new


def lower_qdq(model: onnx.ModelProto, low: str = "fp16") -> tuple[onnx.ModelProto, dict]:
    """fp32 Q/DQ graph -> the same Q/DQ in a `low` (fp16/bf16) network; graph inputs/outputs stay fp32."""
    from sd3trt.engines.precision import autocast, elem_types

    if low not in LOW:
        raise Sd3trtError(f"the layers around the quantized ones run in fp16 or bf16, not {low!r}")
    low_t = LOW[low]
    model, report = autocast(upgrade_opset(model, 19), low)  # fp16/bf16 Q/DQ need opset 19
    g = model.graph
    types = elem_types(model)
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    cache: dict = {}
    drop: set[int] = set()
    counts = {"dq_folded": 0, "q_folded": 0, "q_cast_added": 0}
    new_nodes: dict[int, list] = {}
    bypassed: list = []  # Casts (low -> fp32) that fed a Q; dropped below when nothing else reads them
    for node in g.node:
        if node.op_type == "DequantizeLinear":
            users = consumers.get(node.output[0], [])
            if node.output[0] in outputs or len(users) != 1:
                continue
            cast = users[0]
            if cast.op_type != "Cast" or next((a.i for a in cast.attribute if a.name == "to"), None) != low_t:
                continue
            node.input[1] = _low_scale(model, node.input[1], low_t, cache, inits)
            node.output[0] = cast.output[0]
            drop.add(id(cast))
            counts["dq_folded"] += 1
        elif node.op_type == "QuantizeLinear":
            src = prod.get(node.input[0])
            if src is not None and src.op_type == "Cast" and types.get(src.input[0]) == low_t:
                node.input[0] = src.input[0]
                counts["q_folded"] += 1
                bypassed.append(src)
            elif types.get(node.input[0]) != low_t:
                cast_out = f"{node.input[0]}/{low}_for_q"
                new_nodes.setdefault(id(node), []).append(
                    helper.make_node("Cast", [node.input[0]], [cast_out], to=low_t, name=f"{node.name}/cast_{low}"))
                node.input[0] = cast_out
                counts["q_cast_added"] += 1
            node.input[1] = _low_scale(model, node.input[1], low_t, cache, inits)
    still_read = {i for n in g.node for i in n.input} | outputs
    drop |= {id(c) for c in bypassed if c.output[0] not in still_read}
    out = []
    for n in g.node:
        if id(n) in drop:
            continue
        out.extend(new_nodes.get(id(n), []))
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    report = {**report, "pass": f"autocast+qdq-{low}", **counts}
    return model, report


# --------------------------------------------------------------------------- engine build


def _builder_api():
    """The engine builder's building blocks (engines/build.py); an Sd3trtError when they moved."""
    try:
        from sd3trt.engines import build as b
        from sd3trt.runtime.flavour import load_flavour
        from sd3trt.profiles import ShapeRequest, component_profiles

        api = {
            "load_flavour": load_flavour, "ShapeRequest": ShapeRequest, "component_profiles": component_profiles,
            "resolve_targets": b.resolve_targets, "make_logger": b._make_logger, "parser_errors": b._parser_errors,
            "unsupported_nodes": b.unsupported_nodes, "io": b._io, "check_bindings": b.check_bindings,
            "META_FORMAT": b.META_FORMAT, "META_VERSION": b.META_VERSION, "NAME_RE": b.NAME_RE,
        }
    except (ImportError, AttributeError) as e:
        raise Sd3trtError(f"the TensorRT engine builder is not available here ({e}); install sd3trt[engines]") from None
    return api


def build_quantized_engine(bundle_dir, precision: str, compute_capabilities=(), low: str = "fp16", request=None,
                           name: str | None = None, flavour: str | None = None, opt_level: int | None = None,
                           log: Callable[[str], None] = print) -> dict:
    """Build the quantized transformer's engine into engines/<name>/ and list it in manifest.json.

    compute_capabilities: TensorRT-RTX ahead-of-time targets ("8.9", "12.0", ...); FP8 needs >= 8.9.
    request: a profiles.ShapeRequest (default: the builder's default ranges). Returns the metadata.
    """
    api = _builder_api()
    bundle = load_bundle(Path(bundle_dir))
    qentry = bundle.quantized_entry(precision)
    ccs = tuple(compute_capabilities)
    fl = api["load_flavour"](flavour)
    if fl.is_rtx and not ccs:
        check_target(precision, PORTABLE_RTX)
    check_target(precision, [c for c in ccs if c.lower() != "current"])
    targets, target = api["resolve_targets"](fl, ccs)
    check_target(precision, target["compute_capabilities"])  # "current" resolved, or full TensorRT's own GPU
    req = (request or api["ShapeRequest"]()).validated(bundle.facts)
    tag = "_".join("sm" + c.replace(".", "") for c in target["compute_capabilities"]) or "portable"
    name = name or f"{precision}-{fl.short}-{tag}"
    if not api["NAME_RE"].fullmatch(name):
        raise Sd3trtError(f"build name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    entry = bundle.component("transformer")
    qpath = bundle.path(qentry["file"])
    profiles = api["component_profiles"](bundle.facts, "transformer", entry, req)

    t0 = time.perf_counter()
    graph, lower_report = lower_qdq(onnx.load(str(qpath), load_external_data=False), low)
    graph_bytes = graph.SerializeToString()
    del graph
    trt = fl.trt
    logger = api["make_logger"](trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph_bytes, str(qpath)):
        bad = api["unsupported_nodes"](fl, graph_bytes, qpath)
        detail = f"unsupported nodes: {', '.join(bad[:5])}" if bad else "; ".join(api["parser_errors"](parser)[:3])
        raise Sd3trtError(f"{fl.name} {fl.version} cannot parse {qpath} ({detail}); re-run `sd3trt quantize`")
    parse_s = time.perf_counter() - t0
    io = api["check_bindings"]("transformer", entry, api["io"](network))
    config = builder.create_builder_config()
    for p in profiles:
        prof = builder.create_optimization_profile()
        for inp, s in p.shapes.items():
            prof.set_shape(inp, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            if not config.set_compute_capability(cc, i):
                raise Sd3trtError(f"{fl.name} refused compute capability {target['compute_capabilities'][i]}")
    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    if plan is None:
        why = "; ".join(dict.fromkeys(logger.errors[-3:])) or "no message"
        raise Sd3trtError(f"transformer: {fl.name} failed to build the {precision} engine ({why[:400]}); "
                          "check the target and the quantized graph (`sd3trt quantize`)")
    data = bytes(memoryview(plan))
    del plan, network, parser, builder
    rel_dir = f"engines/{name}"
    engine_rel, meta_rel = f"{rel_dir}/transformer.engine", f"{rel_dir}/transformer.json"
    write_bytes_atomic(bundle.root / engine_rel, data)
    src_files = dict(sorted(qentry["files"].items()))
    meta = {
        "format": api["META_FORMAT"], "format_version": api["META_VERSION"], "sd3trt_version": sd3trt.__version__,
        "build": name, "component": "transformer",
        "engine": engine_rel, "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data),
        "flavour": fl.name, "tensorrt_version": fl.version,
        "onnx_parser_version": str(getattr(trt, "get_nv_onnx_parser_version", lambda: "")()),
        "precision": precision, "bundle_dtype": bundle.dtype, "precision_source": f"quantized ({low} elsewhere)",
        "precision_pass": lower_report, "strongly_typed": True, "target": target,
        "quantized": {**{k: qentry.get(k) for k in ("precision", "method", "file", "scheme")},
                      "coverage": {k: v for k, v in qentry["coverage"].items() if not isinstance(v, (list, dict))},
                      "accuracy_passed": qentry["accuracy"]["passed"]},
        "source_onnx": {"file": qentry["file"], "sha256": src_files.get(qentry["file"]), "files": src_files},
        "parsed_graph_sha256": hashlib.sha256(graph_bytes).hexdigest(),
        "io": io, "profiles": [p.to_dict() for p in profiles], "request": req.to_dict(bundle.facts),
        "options": {"opt_level": opt_level, "refit": False, "strip_weights": False, "weight_streaming": False,
                    "low_precision": low},
        "timings_s": {"parse": round(parse_s, 3), "build": round(build_s, 3)},
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["fingerprint"] = hashlib.sha256(json.dumps({k: meta[k] for k in ("source_onnx", "precision", "target",
                                                     "profiles", "options", "tensorrt_version")},
                                                    sort_keys=True, default=str).encode()).hexdigest()
    write_json_atomic(bundle.root / meta_rel, meta)

    def merge(manifest: dict) -> None:
        engines = manifest.setdefault("engines", {})
        prev = engines.get(name, {})
        comps = dict(prev.get("components", {}))
        comps["transformer"] = {"engine": engine_rel, "metadata": meta_rel, "engine_sha256": meta["engine_sha256"],
                                "precision_source": meta["precision_source"], "precision": precision}
        files = {}
        for v in comps.values():
            files[v["engine"]] = v["engine_sha256"]
            files[v["metadata"]] = sha256_file(bundle.root / v["metadata"])
        engines[name] = {
            **{k: v for k, v in prev.items() if k not in ("components", "files")},
            "precision": prev.get("precision", low), "transformer_precision": precision,
            "flavour": fl.name, "tensorrt_version": fl.version, "target": prev.get("target", target),
            "request": prev.get("request", req.to_dict(bundle.facts)),
            "components": dict(sorted(comps.items())), "files": dict(sorted(files.items())),
            "built_at": meta["built_at"],
        }

    update_manifest(bundle.root, merge)
    log(f"transformer ({precision}, {low} elsewhere): built {engine_rel} in {build_s:.1f} s "
        f"({len(data) / 2**20:.1f} MiB) for {target['mode']} {' '.join(target['compute_capabilities'])}".rstrip())
    return meta
