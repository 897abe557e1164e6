"""The quantized transformer: calibrate, quantize, gate, and record it in the bundle (`sd3trt quantize`).

    entry = quantize_bundle("bundle", "int8")     # onnx/transformer.int8.onnx + manifest["quantized"]

1. calibration inputs: recorded img2img runs of the bundle (engines/calibrate.py, cached npz);
2. ranges of every candidate layer's input on the fitting runs (method max / percentile / mse);
3. for each level tried (DEFAULT_LEVELS: fp8 "attention" then "linear"; int8 "linear"), the Q/DQ graph
   (engines/qdq_graph.py, the precision's recipe) written to a temporary file beside the bundle's graphs,
4. and the accuracy gate (engines/accuracy.py) on the held-out runs: image PSNR/SSIM vs the fp32 pipeline
   (the same thresholds for every precision), transformer cosine/SNR as diagnostics; the first level
   that passes is kept;
5. on a pass (or with force=True, recorded as failed), the graph moves into place as
   onnx/transformer.<precision>.onnx (+ .data past 2 GB), with onnx/transformer.<precision>.json (the
   per-layer report), and manifest.json gains quantized["transformer.<precision>"], rewritten atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import sd3trt
from sd3trt import precision as words
from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import CalibSettings, activation_ranges, collect
from sd3trt.engines.qdq_graph import FP8_HEAD_MULTIPLE, KEEP, LEVELS, plan_layers, quantize_model
from sd3trt.errors import Sd3trtError
from sd3trt.files import sha256_file, write_json_atomic
from sd3trt.manifest import MANIFEST, QUANTIZED, load_bundle, quantized_key, set_entry

TWO_GB = 2**31 - 1


def _save(model, dest: Path) -> list[Path]:
    """Save `model` at `dest` (external data past 2 GB); returns the files written."""
    import onnx

    try:
        large = model.ByteSize() > TWO_GB
    except Exception:
        large = True
    if large:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(dest))
        return [dest, dest.parent / (dest.name + ".data")]
    onnx.save_model(model, str(dest))
    onnx.checker.check_model(str(dest))
    return [dest]


def load_fp32_bundle(bundle_dir):
    """The bundle, when it is fp32: quantization starts from fp32 graphs, which are also the accuracy reference."""
    bundle = load_bundle(Path(bundle_dir))
    if bundle.dtype != "fp32":
        raise Sd3trtError(
            f"quantization starts from an fp32 bundle (its graphs are also the accuracy reference); {bundle.root} "
            f"is {bundle.dtype}, re-export with `sd3trt export --dtype fp32`"
        )
    return bundle


# Levels tried, in order, when the caller names none: the fastest level that passes the gate. FP8 tries the
# fused FP8 attention first (the main 8-bit gain at 1024 px on Hopper/Ada); INT8 keeps attention in 16-bit
# (an int8 softmax output has one step of 1/127 for probabilities mostly far below that; docs/quantization.md).
DEFAULT_LEVELS = {"int8": ("linear",), "fp8": ("attention", "linear")}
# Weight scales: NVIDIA's FP8 recipe is per-tensor (E4M3's exponent covers the channels' spread); INT8 keeps
# one scale per output channel (7 bits of uniform steps do not).
PER_CHANNEL = {"int8": True, "fp8": False}


def quantize_bundle(bundle_dir, precision: str, settings: CalibSettings = CalibSettings(), method: str = "max",
                    percentile: float = 99.99, keep=None, attention: bool | None = None,
                    per_channel: bool | None = None, image_gate: bool = True, thresholds: dict | None = None,
                    force: bool = False, threads: int = 0, cache_dir: Path | None = None, level: str | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Returns the manifest entry written. Raises Sd3trtError when the gate fails (unless force).

    keep: layer globs kept in float (default: the precision's recipe, qdq_graph.KEEP); level: "linear" or
    "attention" (default: DEFAULT_LEVELS, the first that passes); attention=True/False is level
    "attention"/"linear"; per_channel: weight scales per output channel (default: PER_CHANNEL)."""
    import onnx

    words.check(precision, words.QUANTIZED, "--precision")
    if level is None and attention is not None:
        level = "attention" if attention else "linear"
    if level is not None and level not in LEVELS:
        raise Sd3trtError(f"unknown quantization level {level!r}; use {' or '.join(LEVELS)}")
    levels = (level,) if level else DEFAULT_LEVELS[precision]
    keep = KEEP[precision] if keep is None else tuple(keep)
    per_channel = PER_CHANNEL[precision] if per_channel is None else per_channel
    head_multiple = FP8_HEAD_MULTIPLE if precision == "fp8" else None
    bundle = load_fp32_bundle(bundle_dir)
    src_entry = bundle.component("transformer")
    src_path = bundle.onnx_path("transformer")
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    data = collect(bundle, settings, cache_dir=cache_dir, threads=threads, log=log)
    record_s = time.perf_counter() - t0
    settings = CalibSettings(**data.settings)
    fit, held = data.split()

    graph = onnx.load(str(src_path), load_external_data=False)
    plans = {lv: plan_layers(graph, keep=keep, attention=lv == "attention", head_multiple=head_multiple)
             for lv in levels}
    nodes = {n.name: n for n in graph.graph.node}
    taps: list[str] = []
    for plan in plans.values():
        taps += plan.taps()
        taps += [nodes[l.node].input[1] for l in plan.quantized if l.kind == "attention"]
    taps = list(dict.fromkeys(taps))
    del graph, nodes
    t0 = time.perf_counter()
    ranges = activation_ranges(src_path, taps, data, fit, method=method, percentile=percentile,
                               precision=precision, threads=threads, log=log)
    ranges_s = time.perf_counter() - t0
    log(f"calibration: ranges of {len(taps)} tensors ({method}) from {len(fit)} calls in {ranges_s:.1f} s")

    th = dict(acc.GATE if thresholds is None else thresholds)
    onnx_dir = src_path.parent
    name = f"transformer.{precision}.onnx"
    tried = []
    with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=f".{name}.") as tmp:
        for i, lv in enumerate(levels):
            plan = plans[lv]
            cov = plan.coverage()
            if lv == "attention" and not cov["attention_quantized"] and len(levels) > 1:
                why = next((l.reason for l in plan.kept if l.kind == "attention"), "no attention matmuls")
                log(f"quantize: level attention has no attention matmul to quantize ({why}); trying the next level")
                tried.append({"level": lv, "skipped": why})
                continue
            log(f"quantize: level {lv}: {cov['linear_quantized']}/{cov['linear_layers']} linear layers "
                f"({100 * cov['weight_fraction_quantized']:.1f}% of linear weights) and {cov['attention_quantized']} "
                f"attention matmuls to {precision}; kept: {len(cov['kept'])}")
            model = onnx.load(str(src_path), load_external_data=True)
            qmodel, layer_report = quantize_model(model, precision, plan, ranges, per_channel=per_channel)
            del model
            for f in Path(tmp).iterdir():
                f.unlink()
            staged = _save(qmodel, Path(tmp) / name)
            del qmodel
            log(f"quantize: graph written ({sum(p.stat().st_size for p in staged) / 2**20:.1f} MiB); running the accuracy gate")
            figures = {"transformer": acc.transformer_accuracy(src_path, staged[0], data, held, threads)}
            log(f"accuracy: transformer on {len(held)} held-out calls: cosine min {figures['transformer']['cosine']['min']:.5f}, "
                f"SNR min {figures['transformer']['snr_db']['min']:.2f} dB (diagnostics)")
            if image_gate:
                runs = sorted({int(data.run[i]) for i in held})
                figures["image"] = acc.image_accuracy(bundle, staged[0], settings, runs, threads, log)
            passed, failures = acc.gate(precision, figures, th)
            tried.append({"level": lv, "passed": passed, "failures": failures,
                          "image": figures.get("image"), "transformer": figures["transformer"]})
            if passed:
                break
            if i + 1 < len(levels):
                log(f"quantize: level {lv} fails the gate ({'; '.join(failures)}); trying level {levels[i + 1]}")
        if not passed and not force:
            raise Sd3trtError(
                f"the {precision} transformer fails the accuracy gate ({'; '.join(failures)}); keep more layers in "
                "higher precision (--keep), try --method percentile or mse, or pass --force to record it anyway"
            )
        # Into place: unlist the old entry, move the graph (and its data), write the report, then list the
        # new entry (manifest rewritten atomically each time): the manifest never names a file in flux.
        set_entry(bundle.root, QUANTIZED, quantized_key(precision), None)
        files = {}
        for p in staged:
            os.replace(p, onnx_dir / p.name)
            files[f"onnx/{p.name}"] = sha256_file(onnx_dir / p.name)
        if len(staged) == 1:
            (onnx_dir / (name + ".data")).unlink(missing_ok=True)
    entry = {
        "component": "transformer", "precision": precision, "file": f"onnx/{name}",
        "source": {"file": src_entry["file"], "sha256": src_entry["files"][src_entry["file"]]},
        "loras": bundle.data.get("loras", []),  # fused at export, so quantized with the weights (ModelOpt's advice)
        "format": "onnx-qdq", "recipe": "nvidia-modelopt-sd3" if precision == "fp8" else "sd3trt-int8", "opset": 19 if precision == "fp8" else max(bundle.data.get("opset", 17), 13),
        "scheme": {"activations": "per-tensor symmetric, static (calibrated)",
                   "attention": "Q, K, softmax output and V quantized" if cov["attention_quantized"] else "16-bit",
                   "weights": f"{'per-output-channel' if per_channel else 'per-tensor'} symmetric",
                   "type": {"int8": "int8", "fp8": "float8e4m3fn"}[precision]},
        "method": method, **({"percentile": percentile} if method == "percentile" else {}),
        "level": lv, "levels_tried": tried,
        "calibration": {"settings": asdict(settings), "key": data.key, "calls_fit": len(fit), "calls_held_out": len(held),
                        "seconds": {"record": round(data.seconds or record_s, 1), "ranges": round(ranges_s, 1)},
                        "reused": data.reused},
        "coverage": cov,
        "accuracy": {**figures, "thresholds": th, "passed": passed, "failures": failures},
        "sd3trt_version": sd3trt.__version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report_rel = f"onnx/transformer.{precision}.json"
    write_json_atomic(bundle.root / report_rel, {**entry, "layers": layer_report})
    files[report_rel] = sha256_file(bundle.root / report_rel)
    entry["files"] = dict(sorted(files.items()))

    set_entry(bundle.root, QUANTIZED, quantized_key(precision), entry)
    log(f"quantize: {'passed' if passed else 'FAILED (recorded with --force)'}; {entry['file']} listed in {MANIFEST}")
    return entry
