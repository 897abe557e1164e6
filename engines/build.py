"""`sd3trt build`: one TensorRT engine per bundle component, with metadata, listed in manifest.json.

Layout inside the bundle (one directory per named build):
  engines/<build>/<component>.engine   the serialized engine
  engines/<build>/<component>.json     its metadata (flavour, version, precision, profiles, target, ...)
  engines/timing-<flavour>-<version>.cache   persistent timing cache (full TensorRT only)
manifest.json gains engines[<build>] = {..., "components": {...}, "files": {path: sha256}}, merged under
the manifest's lock after every engine of the build is on disk. A re-run reuses a component whose
fingerprint (source ONNX sha256, options, profiles, TensorRT version) and engine file still match.

Every precision goes through the same loop. What differs is each component's source (`component_source`):
fp32/fp16/bf16 engines parse the bundle's graph (bf16 from an fp32 bundle through the autocast pass);
an int8/fp8 build parses the transformer's Q/DQ graph from `sd3trt quantize`, lowered by
`qdq_graph.lower_qdq`, and every other component in the bundle's fp16 (bf16 from an fp32 bundle).
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
from sd3trt import precision as words
from sd3trt.engines import gpu_targets
from sd3trt.engines.gpu_targets import built_for, check_target, default_build_name, resolve_targets
from sd3trt.engines.mixed_precision import DEFAULT_KEEP_FP32, apply_precision, load_graph
from sd3trt.engines.qdq_graph import lower_qdq
from sd3trt.errors import Sd3trtError
from sd3trt.files import graph_size, sha256_file, write_bytes_atomic, write_json_atomic
from sd3trt.manifest import (ENGINES, build_components, commit_entry, engine_digests, entry_file, entry_files,
                             load_bundle, quantized_summary, tensor_specs)
from sd3trt.memory import available_mib
from sd3trt.profiles import Profile, ShapeRequest, component_profiles
from sd3trt.runtime.flavour import Flavour, load_flavour
from sd3trt.sizes import parse_size
from sd3trt.spec import COMPONENTS

META_FORMAT = "sd3trt-engine"
META_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# TensorRT DataType name -> numpy-style dtype name used by the manifest
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # sd3trt.precision.ENGINE
    name: str | None = None
    components: tuple[str, ...] | None = None
    request: ShapeRequest = field(default_factory=ShapeRequest)
    flavour: str | None = None  # None/"auto" | "tensorrt" | "tensorrt_rtx"
    compute_capabilities: tuple[str, ...] = ()  # tensorrt_rtx AOT targets: "8.6", "8.9", "12.0", "current"
    workspace: int | str | None = None  # bytes or "4GiB"; None: TensorRT's default (device memory)
    opt_level: int | None = None  # builder optimization level 0..5; None: TensorRT's default (3)
    refit: bool = False
    strip_weights: bool = False  # weight-stripped plan, refit from the bundle's ONNX at load time
    weight_streaming: bool = False
    timing_cache: Path | None = None  # full TensorRT only; default engines/timing-<flavour>-<version>.cache
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    force: bool = False  # rebuild even when a component's fingerprint matches
    low: str | None = None  # int8/fp8 builds: the float type elsewhere (default: the bundle's fp16/bf16, else bf16)

    def to_dict(self) -> dict:
        return {
            "workspace": self.workspace, "opt_level": self.opt_level, "refit": self.refit or self.strip_weights,
            "strip_weights": self.strip_weights, "weight_streaming": self.weight_streaming,
            "keep_fp32": list(self.keep_fp32),
        }


def check_precision(bundle_dtype: str, precision: str) -> str:
    """How the float graph for `precision` comes from the bundle: "as-exported" or "autocast"; else a clear error."""
    words.check(precision, words.FLOATS, "--precision")
    if bundle_dtype == precision:
        return "as-exported"
    if precision == "bf16" and bundle_dtype == "fp32":
        # Workaround: bf16 ONNX export fails on CPU (ONNX type check of bf16 Conv at opset < 22), so bf16
        # engines are derived from the fp32 graph by an autocast pass (see mixed_precision.py).
        return "autocast"
    hint = "fp32 (or bf16)" if precision == "bf16" else precision
    raise Sd3trtError(
        f"{precision} engines need a bundle exported in {precision}, this bundle is {bundle_dtype}; "
        f"re-export with `sd3trt export --dtype {hint}`"
    )


@dataclass(frozen=True)
class Source:
    """What one component's engine is built from."""

    component: str
    precision: str  # of this engine: a float type, or int8/fp8 for the quantized transformer
    how: str  # the metadata's precision_source: "as-exported" | "autocast" | "quantized (<low> elsewhere)"
    file: str  # the graph, relative to the bundle
    onnx_path: Path
    files: dict  # the source's files, relative path -> sha256 (load_bundle has checked them)
    quantized: dict | None = None  # the manifest's quantized entry, for the int8/fp8 transformer
    low: str | None = None

    def graph(self, bundle_dtype: str, keep_fp32, keep_scopes: tuple[str, ...] = ()) -> tuple:
        """(the ONNX graph TensorRT parses, the precision pass's report)."""
        if self.quantized is not None:
            return lower_qdq(load_graph(self.onnx_path), self.low, keep_fp32)
        return apply_precision(load_graph(self.onnx_path), bundle_dtype, self.precision, keep_fp32, inplace=True,
                               keep_scopes=keep_scopes)

    def metadata(self) -> dict:
        if self.quantized is None:
            return {}
        return {"quantized": {**quantized_summary(self.quantized), "low_precision": self.low}}


def low_type(bundle, low: str | None = None) -> str:
    """The float type around the quantized layers and of the other engines in an int8/fp8 build."""
    if low is not None:
        return words.check(low, words.LOW_TYPES, "type for the layers around the quantized ones")
    return bundle.dtype if bundle.dtype in words.LOW_TYPES else "bf16"


def component_source(bundle, component: str, precision: str, low: str | None = None) -> Source:
    """The source of `component`'s engine in a `precision` build (an Sd3trtError naming the fix when the
    bundle cannot give it: another dtype needed, or no current quantized graph)."""
    entry = bundle.component(component)
    if precision in words.QUANTIZED:
        low = low_type(bundle, low)
        if component == "transformer":
            q = bundle.quantized_entry(precision)  # refuses a missing or stale quantized graph, naming the fix
            return Source(component, precision, f"quantized ({low} elsewhere)", entry_file(q),
                          bundle.path(entry_file(q)), entry_files(q), q, low)
        precision = low
    how = check_precision(bundle.dtype, precision)
    return Source(component, precision, how, entry_file(entry), bundle.onnx_path(component), entry_files(entry))


def make_logger(trt):
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


def unsupported_nodes(fl: Flavour, graph: bytes, onnx_path: Path) -> list[str]:
    """ONNX nodes the parser reports as unsupported ("op_type name"), empty when everything parses."""
    trt = fl.trt
    logger = make_logger(trt)
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
        want = {t["name"]: t for t in tensor_specs(entry, kind)}
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


def _reusable(bundle, meta_rel: str, fingerprint: str) -> dict | None:
    try:
        meta = json.loads((bundle.root / meta_rel).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    eng = bundle.root / meta["engine"]
    if bundle.all_files().get(meta["engine"]) == meta.get("engine_sha256") and eng.is_file():
        return meta  # listed in the manifest with this digest: load_bundle has checked it
    if not eng.is_file() or sha256_file(eng) != meta.get("engine_sha256"):
        return None
    return meta


def _parse(fl: Flavour, source: Source, graph_bytes: bytes):
    """(builder, network, parser, logger) with `graph_bytes` parsed into a strongly typed network; an
    Sd3trtError naming the unsupported nodes (or the parser's errors) and the fix otherwise."""
    trt = fl.trt
    onnx_path = source.onnx_path
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph_bytes, str(onnx_path)):
        errors = _parser_errors(parser)
        bad = unsupported_nodes(fl, graph_bytes, onnx_path)
        detail = f"unsupported nodes: {', '.join(bad[:5])}" if bad else "; ".join(errors[:3])
        fix = "re-run `sd3trt quantize`" if source.quantized else "re-export with another --opset or file an issue"
        raise Sd3trtError(f"{fl.name} {fl.version} cannot parse {onnx_path} ({detail}); {fix}")
    return builder, network, parser, logger


def _builder_config(fl: Flavour, builder, logger, component: str, profiles: list[Profile], opts: BuildOptions,
                    targets, target: dict, timing_cache):
    """The builder config of one engine: its optimization profiles, options, targets and timing cache."""
    trt = fl.trt
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
    return config


def build_component(fl: Flavour, bundle, source: Source, opts: BuildOptions, name: str, targets, target: dict,
                    timing_cache=None, log: Callable[[str], None] = print) -> dict:
    """Build one engine (or keep the one whose fingerprint matches); returns its metadata, written beside it."""
    trt = fl.trt
    component = source.component
    entry = bundle.component(component)
    req = opts.request
    profiles: list[Profile] = component_profiles(bundle.facts, component, entry, req)
    engine_rel, meta_rel = f"engines/{name}/{component}.engine", f"engines/{name}/{component}.json"
    fp = _fingerprint({
        "src": source.files, "precision": source.precision, "precision_source": source.how,
        "bundle_dtype": bundle.dtype, "flavour": fl.name, "version": fl.version, "target": target,
        "options": opts.to_dict(), "request": req.to_dict(), "profiles": [p.to_dict() for p in profiles],
        "sd3trt": sd3trt.__version__, "meta": META_VERSION,
    })
    if not opts.force:
        meta = _reusable(bundle, meta_rel, fp)
        if meta is not None:
            log(f"{component}: unchanged, kept {engine_rel}")
            return meta

    t0 = time.perf_counter()
    scopes = bundle.fp32_scopes(source.component, source.precision)
    graph, prec_report = source.graph(bundle.dtype, opts.keep_fp32, scopes)
    graph_bytes = graph.SerializeToString()
    del graph
    builder, network, parser, logger = _parse(fl, source, graph_bytes)
    parse_s = time.perf_counter() - t0
    io = check_bindings(component, entry, _io(network))
    config = _builder_config(fl, builder, logger, component, profiles, opts, targets, target, timing_cache)

    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    if plan is None:
        why = "; ".join(dict.fromkeys(logger.errors[-3:])) or "no message"
        fix = "check the target and the quantized graph (`sd3trt quantize`)" if source.quantized else "check the options"
        raise Sd3trtError(f"{component}: {fl.name} failed to build the {source.precision} engine ({why[:400]}); {fix}")
    data = bytes(memoryview(plan))
    del plan, network, parser, builder
    write_bytes_atomic(bundle.root / engine_rel, data)

    meta = {
        "format": META_FORMAT, "format_version": META_VERSION, "sd3trt_version": sd3trt.__version__,
        "build": name, "component": component,
        "engine": engine_rel, "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data),
        "flavour": fl.name, "tensorrt_version": fl.version,
        "onnx_parser_version": str(getattr(trt, "get_nv_onnx_parser_version", lambda: "")()),
        "precision": source.precision, "bundle_dtype": bundle.dtype, "precision_source": source.how,
        "precision_pass": prec_report, "strongly_typed": True,
        "target": target,
        "source_onnx": {"file": source.file, "sha256": source.files.get(source.file), "files": source.files},
        **source.metadata(),
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
    write_json_atomic(bundle.root / meta_rel, meta)
    log(f"{component}: built {engine_rel} ({source.precision}) in {build_s:.1f} s ({len(data) / 2**20:.1f} MiB, "
        f"{len(profiles)} profile(s))")
    return meta


def _timing_cache(fl: Flavour, path: Path):
    """The builder's timing cache, from `path` when it holds a usable one (full TensorRT only)."""
    blob = path.read_bytes() if path.is_file() else b""
    cfg = fl.trt.Builder(make_logger(fl.trt)).create_builder_config()
    try:
        cache = cfg.create_timing_cache(blob)
    except Exception:
        cache = None
    return cache if cache is not None else cfg.create_timing_cache(b"")  # damaged, or another version: a new one


def _check_strippable(precision: str, sources: dict[str, Source]) -> None:
    """Weight-stripped engines are refit from the bundle's ONNX at load: only from graphs used as exported."""
    derived = [s for s in sources.values() if s.how != "as-exported"]
    if any(s.quantized for s in derived):
        raise Sd3trtError(f"weight-stripped {precision} engines cannot be refit from the bundle's ONNX (it "
                          "holds the float transformer); drop --strip-weights")
    if derived:
        raise Sd3trtError(
            f"weight-stripped {derived[0].precision} engines need a {derived[0].precision} bundle (they are refit "
            f"from the bundle's ONNX); drop --strip-weights or export with --dtype {derived[0].precision}"
        )


def _list_build(bundle, name: str, opts: BuildOptions, fl: Flavour, target: dict, metas: dict[str, dict]) -> dict:
    """List the build's engines in manifest[engines][name], merged with the components of that build already
    listed (another build may have landed meanwhile); returns the entry."""
    built = {c: {"engine": m["engine"], "metadata": f"engines/{name}/{c}.json", "engine_sha256": m["engine_sha256"],
                 "precision": m["precision"], "precision_source": m["precision_source"]} for c, m in metas.items()}

    options = next(iter(metas.values()))["options"] if metas else {}

    def merge(previous: dict | None) -> dict:
        kept = {c: v for c, v in build_components(previous or {}).items() if c not in metas and bundle.has(c)}
        components = {**kept, **built}
        files = engine_digests(components)
        files.update({v["metadata"]: sha256_file(bundle.root / v["metadata"]) for v in kept.values()})
        return {
            "precision": opts.precision, "flavour": fl.name, "tensorrt_version": fl.version, "target": target,
            "request": opts.request.to_dict(bundle.facts), "options": options,
            "components": dict(sorted(components.items())), "files": files,
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    in_place = {v["metadata"]: bundle.root / v["metadata"] for v in built.values()}
    return commit_entry(bundle.root, ENGINES, name, in_place, merge)


# A build holds about this many times its graph's weights at its peak, plus a base for the process (TensorRT-RTX
# 1.7 on the CPU, measured: SD3.5-Large's T5-XXL in bf16, 8.9 GiB of weights, peaked at 18.2 GiB RSS, 2.0x; its
# FP8 Q/DQ transformer, 10.7 GiB, was killed by the OOM killer at 24.2 GiB, 2.2x, while parsing and building).
BUILD_MEMORY_FACTOR = 2.25
BUILD_MEMORY_BASE_MIB = 1024


def check_memory(sources: dict, wanted: list[str]) -> None:
    """Refuse, before any work, the engines whose build would not fit this machine's available memory."""
    available = available_mib()
    if available is None:
        return
    need = {}
    for c in wanted:
        need[c] = BUILD_MEMORY_FACTOR * graph_size(sources[c].onnx_path) / 2**20 + BUILD_MEMORY_BASE_MIB
    too_big = [c for c in wanted if need[c] > available]
    if too_big:
        c = max(too_big, key=need.get)
        rest = [x for x in wanted if x not in too_big]
        hint = f", or build the rest here with --components {','.join(rest)}" if rest else ""
        raise Sd3trtError(f"building the {c} engine needs about {need[c] / 1024:.0f} GiB of memory "
                          f"({BUILD_MEMORY_FACTOR:g}x its graph's weights) and this machine has "
                          f"{available / 1024:.0f} GiB available; build it on a machine with more memory "
                          f"(TensorRT-RTX builds ahead of time, without a GPU){hint}")


def build_engines(bundle_dir: Path, opts: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Build every (selected) component; returns the manifest's new engines[<build>] entry.
    `opts` is left as it is (the resolved options are a copy)."""
    words.check(opts.precision, words.ENGINE, "--precision")
    bundle = load_bundle(Path(bundle_dir))
    present = [c for c in COMPONENTS if bundle.has(c)]
    wanted = list(opts.components) if opts.components else present
    for c in wanted:
        if c not in present:
            raise Sd3trtError(f"bundle {bundle.root} has no component {c!r}; choose from {', '.join(present)}")
    sources = {c: component_source(bundle, c, opts.precision, opts.low) for c in wanted}
    check_memory(sources, wanted)
    if opts.strip_weights:
        _check_strippable(opts.precision, sources)
    if opts.opt_level is not None and not 0 <= opts.opt_level <= 5:
        raise Sd3trtError(f"--opt-level {opts.opt_level} must be in 0..5")
    opts = replace(opts, request=opts.request.validated(bundle.facts), workspace=parse_size(opts.workspace),
                   compute_capabilities=tuple(opts.compute_capabilities), keep_fp32=tuple(opts.keep_fp32))
    fl = load_flavour(opts.flavour)
    targets, target = resolve_targets(fl, opts.compute_capabilities)
    if opts.precision in words.QUANTIZED:
        check_target(opts.precision, built_for(fl, target))
    refittable = opts.refit or opts.strip_weights
    if refittable and fl.is_rtx and fl.version.startswith("1.7.") and gpu_targets.current_gpu() is None:
        # Its Myelin JIT asks CUDA for refittable graphs: each build fails after printing an internal error.
        raise Sd3trtError(f"{fl.name} {fl.version} cannot build refittable or weight-stripped engines without a GPU; "
                          "build on a GPU machine or drop --refit/--strip-weights")
    name = opts.name or default_build_name(opts.precision, fl, target)
    if not NAME_RE.fullmatch(name):
        raise Sd3trtError(f"build name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")

    timing_cache = None
    if fl.has_timing_cache:
        opts = replace(opts, timing_cache=Path(opts.timing_cache or
                                               bundle.root / "engines" / f"timing-{fl.name}-{fl.version}.cache"))
        timing_cache = _timing_cache(fl, opts.timing_cache)
    else:
        opts = replace(opts, timing_cache=None)

    log(f"building {name!r}: {opts.precision}, {fl.name} {fl.version}, target {target['mode']} "
        f"{' '.join(target['compute_capabilities'])}".rstrip())
    metas = {}
    t0 = time.perf_counter()
    for c in wanted:
        metas[c] = build_component(fl, bundle, sources[c], opts, name, targets, target, timing_cache, log)
    if timing_cache is not None:
        write_bytes_atomic(opts.timing_cache, bytes(memoryview(timing_cache.serialize())))

    entry = _list_build(bundle, name, opts, fl, target, metas)
    log(f"build {name!r} done in {time.perf_counter() - t0:.1f} s; manifest updated")
    return entry
