"""The quantized transformer: calibrate, quantize, gate, and record it in the bundle (`sd3trt quantize`).

    entry = quantize_bundle("bundle", "int8")     # onnx/transformer.int8.onnx + manifest["quantized"]

The steps, in `quantize_bundle`'s order:
1. `resolve`: every option checked, the bundle (fp32 or fp16) and the calibration backend
   chosen (engines/calib_backends.py), before any work;
2. `plan`: the layers each level quantizes (engines/qdq_graph.py, the precision's recipe), and the tensors
   whose ranges that needs;
3. `check_time`: the estimated time (engines/calib_estimate.py); past an hour it is refused with the faster
   option named, unless allow_long;
4. `record`: the calibration inputs, recorded img2img runs of the bundle (engines/calibrate.py, cached npz);
5. `measure`: ranges of every candidate layer's input on the fitting runs (method max / percentile / mse),
   whole graph or block by block, written to the bundle's ranges file (calibration/ranges-*.json);
6. `try_level`, for each level tried (DEFAULT_LEVELS): the Q/DQ graph written by streaming its initializers
   (engines/qdq_writer.py) to a temporary directory beside the bundle's graphs, and the accuracy gate
   (engines/accuracy.py) on the held-out runs against the bundle's own graphs: image PSNR/SSIM (the same
   thresholds for every precision), transformer cosine/SNR as diagnostics; the first level that passes
   is kept;
7. `commit`: on a pass (or with force=True, recorded as failed), the graph, its data and the per-layer
   report move into place and manifest["quantized"]["transformer.<precision>"] lists them (commit_entry).

Unquantized layers keep the bundle's type (fp16 graphs stay fp16 around the Q/DQ pairs, which then carry
fp16 scales at opset 19): what a strongly typed TensorRT network takes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import sd3trt
from sd3trt import precision as words
from sd3trt.engines import accuracy as acc
from sd3trt.engines import calib_estimate
from sd3trt.engines.calib_backends import Backend, choose
from sd3trt.engines.calibrate import CalibSettings, activation_ranges, calib_dir, collect, recording_path
from sd3trt.engines.qdq_graph import FP8_HEAD_MULTIPLE, KEEP, LEVELS, keep_for_depth, plan_layers, rewrite
from sd3trt.engines.qdq_writer import weight_reader, write_qdq
from sd3trt.errors import Sd3trtError
from sd3trt.files import write_json_atomic
from sd3trt.manifest import MANIFEST, QUANTIZED, commit_entry, load_bundle, quantized_key

# Levels tried, in order, when the caller names none: the fastest level that passes the gate. FP8 tries the
# fused FP8 attention first (the main 8-bit gain at 1024 px on Hopper/Ada); INT8 keeps attention in 16-bit
# (an int8 softmax output has one step of 1/127 for probabilities mostly far below that; docs/quantization.md).
DEFAULT_LEVELS = {"int8": ("linear",), "fp8": ("attention", "linear")}
# Weight scales: NVIDIA's FP8 recipe is per-tensor (E4M3's exponent covers the channels' spread); INT8 keeps
# one scale per output channel (7 bits of uniform steps do not).
PER_CHANNEL = {"int8": True, "fp8": False}
SOURCE_TYPES = ("fp32", "fp16", "bf16")
# Block-by-block calibration when the transformer's weights pass this (bytes): the whole graph's session
# then holds them all; one block at a time gives the same ranges (docs/quantization.md) in bounded memory.
BLOCKS_ABOVE = 4 * 2**30
RANGES_FORMAT = 1
# The quantized graph goes to external data (streamed, one weight in memory at a time) when the source
# transformer's files pass this: ONNX's protobuf limit is 2 GB, and under it the graph is small.
EXTERNAL_ABOVE = 2**30


def load_source_bundle(bundle_dir, types=SOURCE_TYPES):
    """The bundle, when quantization can start from its type; its graphs are also the accuracy reference."""
    bundle = load_bundle(Path(bundle_dir))
    if bundle.dtype not in types:
        raise Sd3trtError(f"quantization starts from a {' or '.join(types)} bundle; {bundle.root} is {bundle.dtype}, "
                          f"re-export with `sd3trt export --dtype {types[0]}`")
    return bundle


@dataclass
class Job:
    """One quantization's resolved options (quantize_bundle's arguments, checked)."""

    bundle: object
    precision: str
    settings: CalibSettings
    levels: tuple
    keep: tuple
    per_channel: bool
    method: str
    percentile: float
    thresholds: dict
    image_gate: bool
    force: bool
    threads: int
    backend: object
    blocks: bool
    cache_dir: Path | None
    log: Callable[[str], None]
    timings: dict = field(default_factory=dict)

    @property
    def src_path(self) -> Path:
        return self.bundle.onnx_path("transformer")


def resolve(bundle_dir, precision, settings, method, percentile, keep, attention, per_channel, image_gate,
            thresholds, force, threads, cache_dir, level, calib_backend, blocks, log) -> Job:
    words.check(precision, words.QUANTIZED, "--precision")
    if level is None and attention is not None:
        level = "attention" if attention else "linear"
    if level is not None and level not in LEVELS:
        raise Sd3trtError(f"unknown quantization level {level!r}; use {' or '.join(LEVELS)}")
    if blocks not in ("auto", True, False):
        raise Sd3trtError(f"blocks must be auto, True or False, not {blocks!r}")
    bundle = load_source_bundle(bundle_dir)
    backend = choose(calib_backend, bundle, threads)
    settings = settings.checked(bundle.facts)
    if blocks == "auto":
        blocks = _weight_bytes(bundle.onnx_path("transformer")) > BLOCKS_ABOVE
    return Job(bundle, precision, settings, (level,) if level else DEFAULT_LEVELS[precision],
               KEEP[precision] if keep is None else tuple(keep),
               PER_CHANNEL[precision] if per_channel is None else per_channel, method, percentile,
               dict(acc.GATE if thresholds is None else thresholds), image_gate, force, threads, backend, blocks,
               cache_dir, log)


def _weight_bytes(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def plan(job: Job):
    """(graph without weights, {level: Plan}, the tensors to measure)."""
    import onnx

    graph = onnx.load(str(job.src_path), load_external_data=False)
    head_multiple = FP8_HEAD_MULTIPLE if job.precision == "fp8" else None
    keep = job.keep + keep_for_depth(graph)
    plans = {lv: plan_layers(graph, keep=keep, attention=lv == "attention", head_multiple=head_multiple)
             for lv in job.levels}
    nodes = {n.name: n for n in graph.graph.node}
    taps: list[str] = []
    for p in plans.values():
        taps += p.taps()
        taps += [nodes[l.node].input[1] for l in p.quantized if l.kind == "attention"]
    return graph, plans, list(dict.fromkeys(taps))


def check_time(job: Job, graph, taps: list[str], allow_long: bool, limit_s: float) -> calib_estimate.Estimate:
    """The estimate, printed; refused past `limit_s` (unless allow_long) with the faster options named."""
    from sd3trt.engines.calib_backends import NAMES

    dtype, workdir = job.bundle.dtype, job.src_path.parent
    gate_gflops = calib_estimate.measure_gflops(_gate_backend(job), dtype, workdir)

    def est(backend):
        recorded, key = _recording(job, backend)
        return calib_estimate.estimate(graph, job.bundle.facts, job.settings, backend, dtype, workdir,
                                       len(job.levels), job.method, len(taps), job.blocks,
                                       recorded.is_file(), gate_gflops, _reference_path(job, key).is_file())

    mine = est(job.backend)
    job.log(f"estimate: {mine.line()}")
    if mine.seconds > limit_s and not allow_long:
        others = []
        for name in NAMES[1:]:
            if name == job.backend.name:
                continue
            try:
                others.append(est(choose(name, job.bundle, job.threads)))
            except Sd3trtError:
                continue  # not usable here
        calib_estimate.refuse_if_long(mine, others, job.settings, limit_s)
    return mine


def _recording(job: Job, backend=None) -> tuple[Path, str]:
    """(where the recording of the job's settings on `backend` (default the job's) is cached, its key)."""
    return recording_path(job.bundle, job.settings, (backend or job.backend).describe(), job.cache_dir)


def record(job: Job):
    t0 = time.perf_counter()
    data = collect(job.bundle, job.settings, cache_dir=job.cache_dir, threads=job.threads, log=job.log,
                   backend=job.backend, blocks=job.blocks)
    job.timings["record"] = data.seconds or round(time.perf_counter() - t0, 1)
    job.timings["record_per_call"] = data.call_seconds
    return data


def _ranges_path(job: Job, data) -> Path:
    return calib_dir(job.bundle, job.cache_dir) / f"ranges-{data.key[:16]}-{job.method}.json"


def _reference_path(job: Job, recording_key: str) -> Path:
    """Where the gate keeps its reference outputs on a recording (the bundle's own graphs run as the gate runs
    them): beside the ranges, so every level and every precision gated on that recording reuses them."""
    how = json.dumps({"recording": recording_key, "blocks": job.blocks, "gate": _gate_backend(job).describe()},
                     sort_keys=True)
    return calib_dir(job.bundle, job.cache_dir) / f"reference-{hashlib.sha256(how.encode()).hexdigest()[:16]}.npz"


def measure(job: Job, taps: list[str], data, fit: list[int]) -> dict[str, float]:
    """The ranges of `taps`: from the ranges file when it holds them all for these inputs and this method,
    else measured and written there (one format whichever backend measured; it says which)."""
    path = _ranges_path(job, data)
    method_id = {"method": job.method, **({"percentile": job.percentile} if job.method == "percentile" else {}),
                 **({"precision": job.precision} if job.method == "mse" else {})}
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") == RANGES_FORMAT and saved.get("calibration_key") == data.key and \
                {k: saved.get(k) for k in method_id} == method_id and set(taps) <= set(saved["tensors"]):
            job.log(f"calibration: reusing the ranges in {path} ({saved['backend']})")
            # the time they took when measured, as the reused recording reports its own
            job.timings.update(ranges=saved["seconds"], ranges_per_call=saved["seconds_per_call"], ranges_reused=True)
            return {t: saved["tensors"][t] for t in taps}
    except (OSError, ValueError, KeyError):
        pass
    before = job.backend.timer.seconds.get("ranges", 0.0)
    t0 = time.perf_counter()
    ranges = activation_ranges(job.src_path, taps, data, fit, method=job.method, percentile=job.percentile,
                               precision=job.precision, threads=job.threads, log=job.log, backend=job.backend,
                               blocks=job.blocks, work_dir=job.cache_dir)
    seconds = time.perf_counter() - t0
    # Backend time per fitting call: every pass over it (and, block by block, every part) included.
    per_call = (job.backend.timer.seconds.get("ranges", 0.0) - before) / len(fit)
    job.timings.update(ranges=round(seconds, 1), ranges_per_call=round(per_call, 3))
    job.log(f"calibration: ranges of {len(taps)} tensors ({job.method}, {job.backend.describe()}"
            f"{', block by block' if job.blocks else ''}) from {len(fit)} calls in {seconds:.1f} s")
    write_json_atomic(path, {"format": RANGES_FORMAT, "calibration_key": data.key, **method_id,
                             "backend": job.backend.describe(), "blocks": job.blocks,
                             "seconds": round(seconds, 1), "seconds_per_call": round(per_call, 3),
                             "tensors": dict(sorted(ranges.items()))})
    return ranges


def try_level(job: Job, lv: str, level_plan, ranges, data, held, staged_dir: Path):
    """Write level `lv`'s graph into `staged_dir` and gate it: (files, figures, passed, failures, opset, report)."""
    import onnx

    cov = level_plan.coverage()
    job.log(f"quantize: level {lv}: {cov['linear_quantized']}/{cov['linear_layers']} linear layers "
            f"({100 * cov['weight_fraction_quantized']:.1f}% of linear weights) and {cov['attention_quantized']} "
            f"attention matmuls to {job.precision}; kept: {len(cov['kept'])}")
    for f in staged_dir.iterdir():
        f.unlink()
    model = onnx.load(str(job.src_path), load_external_data=False)
    qdq = rewrite(model, job.precision, level_plan, ranges, weight_reader(model, job.src_path.parent), job.per_channel)
    staged = write_qdq(qdq, job.src_path.parent, staged_dir / f"transformer.{job.precision}.onnx",
                       external=_weight_bytes(job.src_path) > EXTERNAL_ABOVE)
    opset = next(o.version for o in qdq.model.opset_import if o.domain in ("", "ai.onnx"))
    report = qdq.report
    del qdq, model
    job.log(f"quantize: graph written ({sum(p.stat().st_size for p in staged) / 2**20:.1f} MiB); running the "
            "accuracy gate")
    t0 = time.perf_counter()
    runner, reference = _gate_runner(job), acc.Reference(_reference_path(job, data.key))
    figures = {"transformer": acc.transformer_accuracy(job.src_path, staged[0], data, held, job.threads, runner,
                                                       reference)}
    job.log(f"accuracy: transformer on {len(held)} held-out calls: cosine min "
            f"{figures['transformer']['cosine']['min']:.5f}, SNR min {figures['transformer']['snr_db']['min']:.2f} dB "
            "(diagnostics)")
    if job.image_gate:
        runs = sorted({int(data.run[i]) for i in held})
        others = runner and (lambda name: job.backend.runner(name, job.bundle.component(name),
                                                              job.bundle.onnx_path(name), job.blocks))
        figures["image"] = acc.image_accuracy(job.bundle, staged[0], job.settings, runs, job.threads, job.log,
                                              runner, others, reference)
    job.timings["gate"] = round(job.timings.get("gate", 0.0) + time.perf_counter() - t0, 1)
    passed, failures = acc.gate(job.precision, figures, job.thresholds)
    return staged, figures, passed, failures, opset, report


@dataclass
class LevelResult:
    """The level kept (the first that passed, else the last tried) and what trying it gave."""

    level: str
    coverage: dict
    staged: list
    figures: dict
    passed: bool
    failures: list
    opset: int
    report: dict
    tried: list


def pick_level(job: Job, plans: dict, ranges, data, held, staged_dir: Path) -> LevelResult:
    """Try the job's levels in order (a level with nothing to quantize is skipped); stop at the first pass."""
    tried: list = []
    result = None
    for i, lv in enumerate(job.levels):
        cov = plans[lv].coverage()
        if lv == "attention" and not cov["attention_quantized"] and len(job.levels) > 1:
            why = next((l.reason for l in plans[lv].kept if l.kind == "attention"), "no attention matmuls")
            job.log(f"quantize: level attention has no attention matmul to quantize ({why}); trying the next level")
            tried.append({"level": lv, "skipped": why})
            continue
        staged, figures, passed, failures, opset, report = try_level(job, lv, plans[lv], ranges, data, held, staged_dir)
        tried.append({"level": lv, "passed": passed, "failures": failures,
                      "image": figures.get("image"), "transformer": figures["transformer"]})
        result = LevelResult(lv, cov, staged, figures, passed, failures, opset, report, tried)
        if passed:
            break
        if i + 1 < len(job.levels):
            job.log(f"quantize: level {lv} fails the gate ({'; '.join(failures)}); trying level {job.levels[i + 1]}")
    return result


def _gate_backend(job: Job) -> Backend:
    """Where the gate runs the transformer: ONNX Runtime on the CPU in the bundle's type (what serves the CPU path)."""
    return Backend("onnxruntime", job.bundle.dtype, job.threads)


def _gate_runner(job: Job):
    """The gate's transformer runner: ONNX Runtime on the CPU (what serves the CPU path), the whole graph, or
    block by block when the job calibrates that way (then every component is released after use, and the
    other components, the same in both pipelines, run on the calibration backend)."""
    if not job.blocks:
        return None
    from sd3trt.engines.calib_blocks import PartsRunner

    gate_backend = _gate_backend(job)
    entry = job.bundle.component("transformer")
    return lambda path: PartsRunner("transformer", entry, path, gate_backend)


def _entry(job: Job, data, fit, held, r: LevelResult, t_start) -> dict:
    p, cov = job.precision, r.coverage
    total = round(time.perf_counter() - t_start, 1)
    t = job.timings
    return json.loads(json.dumps({  # as the manifest will hold it (tuples as lists)
        "component": "transformer", "precision": p, "file": f"onnx/transformer.{p}.onnx",
        "source": job.bundle.source_record("transformer"), "source_dtype": job.bundle.dtype,
        "loras": job.bundle.loras,  # fused at export, so quantized with the weights (ModelOpt's advice)
        "format": "onnx-qdq", "recipe": "nvidia-modelopt-sd3" if p == "fp8" else "sd3trt-int8", "opset": r.opset,
        "scheme": {"activations": "per-tensor symmetric, static (calibrated)",
                   "attention": "Q, K, softmax output and V quantized" if cov["attention_quantized"] else "16-bit",
                   "weights": f"{'per-output-channel' if job.per_channel else 'per-tensor'} symmetric",
                   "type": {"int8": "int8", "fp8": "float8e4m3fn"}[p],
                   "unquantized": job.bundle.dtype},
        "method": job.method, **({"percentile": job.percentile} if job.method == "percentile" else {}),
        "level": r.level, "levels_tried": r.tried,
        "calibration": {"settings": asdict(job.settings), "key": data.key, "calls_fit": len(fit),
                        "calls_held_out": len(held), "backend": job.backend.describe(), "blocks": job.blocks,
                        "size_px": job.settings.size,
                        "seconds": {"record": t.get("record"), "ranges": t.get("ranges"), "gate": t.get("gate"),
                                    "total": total},
                        "seconds_per_call": {"record": t.get("record_per_call"), "ranges": t.get("ranges_per_call")},
                        "estimated_seconds": t.get("estimate"),
                        "reused": data.reused, "ranges_reused": t.get("ranges_reused", False)},
        "coverage": cov,
        "accuracy": {**r.figures, "thresholds": job.thresholds, "passed": r.passed, "failures": r.failures},
        "sd3trt_version": sd3trt.__version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": total,
    }))


def commit(job: Job, staged: list[Path], entry: dict, layer_report: dict, staged_dir: Path) -> dict:
    """The graph, its data and the per-layer report into onnx/, listed in the manifest (commit_entry)."""
    report = staged_dir / f"transformer.{job.precision}.json"
    write_json_atomic(report, {**entry, "layers": layer_report})
    files = {f"onnx/{p.name}": p for p in staged + [report]}
    files.setdefault(f"onnx/{staged[0].name}.data", None)  # an earlier graph's weights, when this one has none
    return commit_entry(job.bundle.root, QUANTIZED, quantized_key(job.precision), files, entry)


def quantize_bundle(bundle_dir, precision: str, settings: CalibSettings = CalibSettings(), method: str = "max",
                    percentile: float = 99.99, keep=None, attention: bool | None = None,
                    per_channel: bool | None = None, image_gate: bool = True, thresholds: dict | None = None,
                    force: bool = False, threads: int = 0, cache_dir: Path | None = None, level: str | None = None,
                    calib_backend: str = "auto", blocks="auto", allow_long: bool = False,
                    time_limit_s: float = calib_estimate.LIMIT_S, log: Callable[[str], None] = print) -> dict:
    """Returns the manifest entry written. Raises Sd3trtError when the gate fails (unless force), or before any
    work when an option is wrong or the estimated time passes `time_limit_s` (unless allow_long).

    keep: layer globs kept in float (default: the precision's recipe, qdq_graph.KEEP); level: "linear" or
    "attention" (default: DEFAULT_LEVELS, the first that passes); attention=True/False is level
    "attention"/"linear"; per_channel: weight scales per output channel (default: PER_CHANNEL);
    calib_backend: "auto", "cuda", "openvino" or "onnxruntime" (calib_backends.py); blocks: "auto" (block by
    block past BLOCKS_ABOVE bytes of weights), True or False."""
    t_start = time.perf_counter()
    job = resolve(bundle_dir, precision, settings, method, percentile, keep, attention, per_channel, image_gate,
                  thresholds, force, threads, cache_dir, level, calib_backend, blocks, log)
    graph, plans, taps = plan(job)
    job.timings["estimate"] = round(check_time(job, graph, taps, allow_long, time_limit_s).seconds, 1)
    del graph
    data = record(job)
    fit, held = data.split()
    ranges = measure(job, taps, data, fit)
    log(f"calibration: {job.timings['record_per_call']:.3f} s per transformer call recording, "
        f"{job.timings['ranges_per_call']:.3f} s measuring ({job.backend.describe()}, {job.settings.size} px)")
    with tempfile.TemporaryDirectory(dir=job.src_path.parent, prefix=f".transformer.{precision}.") as tmp:
        result = pick_level(job, plans, ranges, data, held, Path(tmp))
        if not result.passed and not force:
            raise Sd3trtError(
                f"the {precision} transformer fails the accuracy gate ({'; '.join(result.failures)}); keep more "
                "layers in higher precision (--keep), try --method percentile or mse, or pass --force to record it "
                "anyway"
            )
        entry = _entry(job, data, fit, held, result, t_start)
        entry = commit(job, result.staged, entry, result.report, Path(tmp))
    log(f"quantize: {'passed' if result.passed else 'FAILED (recorded with --force)'}; {entry['file']} listed in "
        f"{MANIFEST}; {entry['seconds']:.1f} s in all")
    return entry
