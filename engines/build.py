"""`sd3trt build`: one TensorRT engine per bundle component, with metadata, listed in manifest.json.

Layout inside the bundle (one directory per named build):
  engines/<build>/<component>.engine   the serialized engine
  engines/<build>/<component>.json     its metadata (flavour, version, precision, profiles, target, ...)
  engines/timing-<flavour>-<version>.cache   persistent timing cache (full TensorRT only)
manifest.json gains engines[<build>] = {..., "components": {...}, "files": {path: sha256}}; it is
rewritten atomically after every engine of the build is on disk. A re-run reuses a component whose
fingerprint (source ONNX sha256, options, profiles, TensorRT version) and engine file still match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import sd3trt
from sd3trt.runtime.flavour import Flavour, gpu_mismatch, load_flavour
from sd3trt.engines.precision import DEFAULT_KEEP_FP32, apply_precision, load_graph
from sd3trt.profiles import Profile, ShapeRequest, component_profiles
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import MANIFEST, load_bundle, sha256_file, update_manifest, write_bytes_atomic, write_json_atomic
from sd3trt.sizes import parse_size
from sd3trt.spec import COMPONENTS

PRECISIONS = ("fp32", "fp16", "bf16")
LATER_PRECISIONS = ("fp4", "int4")
QUANTIZED_PRECISIONS = ("int8", "fp8")  # the transformer from `sd3trt quantize`, the rest in fp16/bf16
META_FORMAT = "sd3trt-engine"
META_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# TensorRT DataType name -> numpy-style dtype name used by the manifest
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


@dataclass
class BuildOptions:
    precision: str
    name: str | None = None
    components: tuple[str, ...] | None = None
    request: ShapeRequest = field(default_factory=ShapeRequest)
    flavour: str | None = None  # None/"auto" | "tensorrt" | "tensorrt_rtx"
    compute_capabilities: tuple[str, ...] = ()  # tensorrt_rtx AOT targets: "8.6", "8.9", "12.0", "current"
    workspace: int | None = None  # bytes; None: TensorRT's default (device memory)
    opt_level: int | None = None  # builder optimization level 0..5; None: TensorRT's default (3)
    refit: bool = False
    strip_weights: bool = False  # weight-stripped plan, refit from the bundle's ONNX at load time
    weight_streaming: bool = False
    timing_cache: Path | None = None  # full TensorRT only; default engines/timing-<flavour>-<version>.cache
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    force: bool = False  # rebuild even when a component's fingerprint matches

    def to_dict(self) -> dict:
        return {
            "workspace": self.workspace, "opt_level": self.opt_level, "refit": self.refit or self.strip_weights,
            "strip_weights": self.strip_weights, "weight_streaming": self.weight_streaming,
            "keep_fp32": list(self.keep_fp32),
        }


def check_precision(bundle_dtype: str, precision: str) -> str:
    """How the graph for `precision` comes from the bundle: "as-exported" or "autocast"; else a clear error."""
    if precision in LATER_PRECISIONS:
        raise Sd3trtError(f"--precision {precision} is not supported yet; use fp16, bf16, fp32, int8 or fp8")
    if precision not in PRECISIONS:
        raise Sd3trtError(f"unknown --precision {precision!r}; use fp16, bf16, fp32, int8 or fp8")
    if bundle_dtype == precision:
        return "as-exported"
    if precision == "bf16" and bundle_dtype == "fp32":
        # Workaround: bf16 ONNX export fails on CPU (ONNX type check of bf16 Conv at opset < 22), so bf16
        # engines are derived from the fp32 graph by an autocast pass (see precision.py).
        return "autocast"
    hint = "fp32 (or bf16)" if precision == "bf16" else precision
    raise Sd3trtError(
        f"{precision} engines need a bundle exported in {precision}, this bundle is {bundle_dtype}; "
        f"re-export with `sd3trt export --dtype {hint}`"
    )


def _make_logger(trt):
    class CaptureLogger(trt.ILogger):
        """Keeps TensorRT's errors for the exception message; prints nothing below errors."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return CaptureLogger()


def _find_gpu() -> tuple[str, str] | None:
    """("major.minor", name) of GPU 0 via cuda-bindings, or None when there is no usable GPU."""
    from sd3trt.runtime.cuda import find_gpu

    try:
        return find_gpu(0)
    except Sd3trtError:
        return None


def resolve_targets(fl: Flavour, wanted: tuple[str, ...]) -> tuple[list, dict]:
    """Builder compute-capability enums and the metadata's description of the target."""
    trt = fl.trt
    if not fl.can_target_compute_capability:
        if wanted:
            raise Sd3trtError(
                f"{fl.name} builds for the GPU it runs on; drop --compute-capability (ahead-of-time targets "
                "need tensorrt_rtx)"
            )
        gpu = _find_gpu()
        if gpu is None:
            raise Sd3trtError(f"{fl.name} needs an NVIDIA GPU to build engines; build on the target GPU or use --flavour tensorrt_rtx")
        return [], {"compute_capabilities": [gpu[0]], "mode": "build-gpu"}
    if not wanted:
        return [], {"compute_capabilities": [], "mode": "portable-default"}
    enums, names = [], []
    available = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    for w in wanted:
        if w.lower() == "current":
            gpu = _find_gpu()
            if gpu is None:
                raise Sd3trtError("--compute-capability current needs a GPU here; name the target instead, e.g. 8.9")
            problem = gpu_mismatch(fl, *gpu)
            if problem:
                raise Sd3trtError(problem)
            if len(wanted) > 1:
                raise Sd3trtError("--compute-capability current cannot be combined with other targets")
            enums.append(trt.ComputeCapability.CURRENT)
            names.append(gpu[0])
            continue
        key = "SM" + re.sub(r"^sm|[._\s]", "", w.strip().lower())
        if key not in available:
            shown = ", ".join(f"{a[2:-1]}.{a[-1]}" for a in available)
            raise Sd3trtError(f"{fl.name} {fl.version} cannot target compute capability {w!r}; use one of {shown}")
        enums.append(getattr(trt.ComputeCapability, key))
        names.append(f"{key[2:-1]}.{key[-1]}")
    return enums, {"compute_capabilities": names, "mode": "aot"}


def default_build_name(precision: str, fl: Flavour, target: dict) -> str:
    ccs = target["compute_capabilities"]
    tag = "_".join("sm" + c.replace(".", "") for c in ccs) if ccs else "portable"
    return f"{precision}-{fl.short}-{tag}"


def unsupported_nodes(fl: Flavour, graph: bytes, onnx_path: Path) -> list[str]:
    """ONNX nodes the parser reports as unsupported ("op_type name"), empty when everything parses."""
    trt = fl.trt
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not hasattr(parser, "supports_model_v2"):
        return []
    import onnx

    nodes = onnx.ModelProto.FromString(graph).graph.node
    if parser.supports_model_v2(graph, str(onnx_path)):
        return []
    bad = []
    for i in range(parser.num_subgraphs):
        if not parser.is_subgraph_supported(i):
            bad += [f"{nodes[j].op_type} {nodes[j].name}" for j in parser.get_subgraph_nodes(i)]
    return bad


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f" at node {e.node_name()} ({e.node_operator()})" if hasattr(e, "node_name") and e.node_name() else ""
        out.append(f"{e.desc()}{where}")
    return out


def _io(network) -> dict:
    def spec(t):
        return {"name": t.name, "dtype": TRT_DTYPES.get(t.dtype.name, t.dtype.name.lower()), "shape": list(t.shape)}

    return {
        "inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)],
    }


def check_bindings(component: str, entry: dict, io: dict, host_dtype_override: str | None = None) -> dict:
    """Network I/O must be the manifest's: names, dtypes, ranks and fixed dims. Returns the metadata "io"."""
    result = {}
    for kind in ("inputs", "outputs"):
        want = {t["name"]: t for t in entry[kind]}
        got = {t["name"]: t for t in io[kind]}
        if set(want) != set(got):
            raise Sd3trtError(
                f"{component}: the ONNX graph's {kind} {sorted(got)} are not the manifest's {sorted(want)}; "
                "the bundle is inconsistent, re-run `sd3trt export`"
            )
        rows = []
        for name, w in want.items():
            g = got[name]
            if g["dtype"] != w["dtype"] or len(g["shape"]) != len(w["shape"]):
                raise Sd3trtError(
                    f"{component}: {name} parses as {g['dtype']} rank {len(g['shape'])}, the manifest says "
                    f"{w['dtype']} {w['shape']}; re-run `sd3trt export`"
                )
            for a, b in zip(w["shape"], g["shape"]):
                if isinstance(a, int) and b not in (a, -1):
                    raise Sd3trtError(f"{component}: {name} has shape {g['shape']}, the manifest says {w['shape']}; re-run `sd3trt export`")
            rows.append({"name": name, "dtype": g["dtype"], "shape": w["shape"], "network_shape": g["shape"]})
        result[kind] = rows
    return result


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(root: Path, meta_rel: str, fingerprint: str) -> dict | None:
    try:
        meta = json.loads((root / meta_rel).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    eng = root / meta["engine"]
    if not eng.is_file() or sha256_file(eng) != meta.get("engine_sha256"):
        return None
    return meta


def build_component(fl: Flavour, bundle, component: str, opts: BuildOptions, name: str, targets, target: dict,
                    timing_cache=None, log: Callable[[str], None] = print) -> dict:
    """Build one engine; returns its metadata (already written beside the engine)."""
    trt = fl.trt
    root = bundle.root
    entry = bundle.component(component)
    onnx_path = bundle.onnx_path(component)
    src_files = dict(sorted((rel, d) for rel, d in entry["files"].items()))
    for rel, digest in src_files.items():
        if sha256_file(root / rel) != digest:
            raise Sd3trtError(f"{root / rel} does not match the manifest's sha256; re-run `sd3trt export` to restore it")
    req = opts.request
    profiles: list[Profile] = component_profiles(bundle.facts, component, entry, req)
    how = check_precision(bundle.dtype, opts.precision)
    rel_dir = f"engines/{name}"
    engine_rel, meta_rel = f"{rel_dir}/{component}.engine", f"{rel_dir}/{component}.json"
    fp = _fingerprint({
        "src": src_files, "precision": opts.precision, "bundle_dtype": bundle.dtype, "flavour": fl.name,
        "version": fl.version, "target": target, "options": opts.to_dict(), "request": req.to_dict(),
        "profiles": [p.to_dict() for p in profiles], "sd3trt": sd3trt.__version__, "meta": META_VERSION,
    })
    if not opts.force:
        meta = _reusable(root, meta_rel, fp)
        if meta is not None:
            log(f"{component}: unchanged, kept {engine_rel}")
            return meta

    t0 = time.perf_counter()
    graph, prec_report = apply_precision(load_graph(onnx_path), bundle.dtype, opts.precision, opts.keep_fp32,
                                         inplace=True)
    graph_bytes = graph.SerializeToString()
    del graph
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph_bytes, str(onnx_path)):
        errors = _parser_errors(parser)
        bad = unsupported_nodes(fl, graph_bytes, onnx_path)
        detail = f"unsupported nodes: {', '.join(bad[:5])}" if bad else "; ".join(errors[:3])
        raise Sd3trtError(f"{fl.name} {fl.version} cannot parse {onnx_path} ({detail}); re-export with another --opset or file an issue")
    parse_s = time.perf_counter() - t0
    io = check_bindings(component, entry, _io(network))

    config = builder.create_builder_config()
    for p in profiles:
        prof = builder.create_optimization_profile()
        for inp, s in p.shapes.items():
            prof.set_shape(inp, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(prof) < 0:
            raise Sd3trtError(f"{component}: TensorRT rejected optimization profile {p.label!r} ({'; '.join(logger.errors[-2:])})")
    if opts.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace))
    if opts.opt_level is not None:
        if not 0 <= opts.opt_level <= 5:
            raise Sd3trtError(f"--opt-level {opts.opt_level} must be in 0..5")
        config.builder_optimization_level = int(opts.opt_level)
    if opts.refit or opts.strip_weights:
        config.set_flag(trt.BuilderFlag.REFIT)
    if opts.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if opts.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            if not config.set_compute_capability(cc, i):
                raise Sd3trtError(f"{fl.name} refused compute capability {target['compute_capabilities'][i]}")
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)

    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    if plan is None:
        why = "; ".join(dict.fromkeys(logger.errors[-3:])) or "no message"
        raise Sd3trtError(f"{component}: {fl.name} failed to build the engine ({why[:400]}); check the options")
    data = bytes(memoryview(plan))
    del plan, network, parser, builder
    write_bytes_atomic(root / engine_rel, data)

    meta = {
        "format": META_FORMAT, "format_version": META_VERSION, "sd3trt_version": sd3trt.__version__,
        "build": name, "component": component,
        "engine": engine_rel, "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data),
        "flavour": fl.name, "tensorrt_version": fl.version,
        "onnx_parser_version": str(getattr(trt, "get_nv_onnx_parser_version", lambda: "")()),
        "precision": opts.precision, "bundle_dtype": bundle.dtype, "precision_source": how,
        "precision_pass": prec_report, "strongly_typed": True,
        "target": target,
        "source_onnx": {"file": entry["file"], "sha256": src_files.get(entry["file"]), "files": src_files},
        "parsed_graph_sha256": hashlib.sha256(graph_bytes).hexdigest(),
        "io": io,
        "profiles": [p.to_dict() for p in profiles],
        "request": req.to_dict(bundle.facts),
        "options": {**opts.to_dict(), "timing_cache": str(opts.timing_cache) if timing_cache is not None else None,
                    "runtime_cache": "per engine at run time" if fl.has_runtime_cache else None},
        "timings_s": {"parse": round(parse_s, 3), "build": round(build_s, 3)},
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fp,
    }
    write_json_atomic(root / meta_rel, meta)
    log(f"{component}: built {engine_rel} in {build_s:.1f} s ({len(data) / 2**20:.1f} MiB, {len(profiles)} profile(s))")
    return meta


def build_engines(bundle_dir: Path, opts: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Build every (selected) component; returns the manifest's new engines[<build>] entry."""
    if opts.precision in QUANTIZED_PRECISIONS:
        return _build_quantized(Path(bundle_dir), opts, log)
    bundle = load_bundle(Path(bundle_dir))
    if check_precision(bundle.dtype, opts.precision) == "autocast" and opts.strip_weights:
        raise Sd3trtError(
            "weight-stripped bf16 engines need a bf16 bundle (they are refit from the bundle's ONNX); "
            "drop --strip-weights or export with --dtype bf16"
        )
    opts.request = opts.request.validated(bundle.facts)
    opts.workspace = parse_size(opts.workspace)
    fl = load_flavour(opts.flavour)
    targets, target = resolve_targets(fl, tuple(opts.compute_capabilities))
    if (opts.refit or opts.strip_weights) and fl.is_rtx and fl.version.startswith("1.7.") and _find_gpu() is None:
        # Its Myelin JIT asks CUDA for refittable graphs: each build fails after printing an internal error.
        raise Sd3trtError(f"{fl.name} {fl.version} cannot build refittable or weight-stripped engines without a GPU; "
                          "build on a GPU machine or drop --refit/--strip-weights")
    name = opts.name or default_build_name(opts.precision, fl, target)
    if not NAME_RE.fullmatch(name):
        raise Sd3trtError(f"build name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    present = [c for c in COMPONENTS if bundle.has(c)]
    wanted = list(opts.components) if opts.components else present
    for c in wanted:
        if c not in present:
            raise Sd3trtError(f"bundle {bundle.root} has no component {c!r}; choose from {', '.join(present)}")

    timing_cache = None
    if fl.has_timing_cache:
        if opts.timing_cache is None:
            opts.timing_cache = bundle.root / "engines" / f"timing-{fl.name}-{fl.version}.cache"
        tc_path = Path(opts.timing_cache)
        blob = tc_path.read_bytes() if tc_path.is_file() else b""
        cfg = fl.trt.Builder(_make_logger(fl.trt)).create_builder_config()
        try:
            timing_cache = cfg.create_timing_cache(blob)
        except Exception:
            timing_cache = None
        if timing_cache is None:  # damaged, or from another TensorRT version: start a new one
            timing_cache = cfg.create_timing_cache(b"")
    else:
        opts.timing_cache = None

    log(f"building {name!r}: {opts.precision}, {fl.name} {fl.version}, target {target['mode']} "
        f"{' '.join(target['compute_capabilities'])}".rstrip())
    metas = {}
    t0 = time.perf_counter()
    for c in wanted:
        metas[c] = build_component(fl, bundle, c, opts, name, targets, target, timing_cache, log)
    if timing_cache is not None:
        write_bytes_atomic(Path(opts.timing_cache), bytes(memoryview(timing_cache.serialize())))

    def merge(manifest: dict) -> None:  # into the manifest as it is now: another build may have landed meanwhile
        engines = manifest.setdefault("engines", {})
        previous = engines.get(name, {})
        components = {c: v for c, v in previous.get("components", {}).items() if c not in metas and bundle.has(c)}
        for c, m in metas.items():
            components[c] = {"engine": m["engine"], "metadata": f"engines/{name}/{c}.json",
                             "engine_sha256": m["engine_sha256"], "precision_source": m["precision_source"]}
        files = {}
        for c, v in components.items():
            files[v["engine"]] = v["engine_sha256"]
            files[v["metadata"]] = sha256_file(bundle.root / v["metadata"])
        engines[name] = {
            "precision": opts.precision, "flavour": fl.name, "tensorrt_version": fl.version, "target": target,
            "request": opts.request.to_dict(bundle.facts), "options": metas[wanted[0]]["options"] if wanted else {},
            "components": dict(sorted(components.items())), "files": dict(sorted(files.items())),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    entry = update_manifest(bundle.root, merge)["engines"][name]
    log(f"build {name!r} done in {time.perf_counter() - t0:.1f} s; manifest updated")
    return entry


def _build_quantized(bundle_dir: Path, opts: BuildOptions, log: Callable[[str], None]) -> dict:
    """int8/fp8: the quantized transformer (Q/DQ graph from `sd3trt quantize`) in a strongly typed engine,
    every other component in the bundle's fp16 (or bf16 from an fp32 bundle)."""
    from sd3trt.engines.quantize_engine import build_quantized_engine
    from sd3trt.engines.quantized import check_target

    bundle = load_bundle(bundle_dir)
    bundle.quantized_entry(opts.precision)  # refuses a missing or stale quantized graph, naming the fix
    check_target(opts.precision, list(opts.compute_capabilities))
    fl = load_flavour(opts.flavour)
    _, target = resolve_targets(fl, tuple(opts.compute_capabilities))
    name = opts.name or default_build_name(opts.precision, fl, target)
    low = bundle.dtype if bundle.dtype in ("fp16", "bf16") else "bf16"
    wanted = list(opts.components) if opts.components else [c for c in COMPONENTS if bundle.has(c)]
    others = tuple(c for c in wanted if c != "transformer")
    if others:
        build_engines(bundle_dir, replace(opts, precision=low, name=name, components=others), log)
    if "transformer" in wanted:
        build_quantized_engine(bundle_dir, opts.precision, opts.compute_capabilities, low, opts.request, name,
                               opts.flavour, opts.opt_level, log)
    return json.loads((bundle_dir / MANIFEST).read_text())["engines"][name]
