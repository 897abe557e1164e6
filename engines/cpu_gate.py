"""`sd3trt gate`: which graphs may run in bf16 on OpenVINO, decided by the image like the quantized graphs.

For every graph of the bundle (each component's own, and the quantized graphs of `sd3trt quantize`) the
img2img image with that one graph in bf16 is compared with the all-fp32 OpenVINO pipeline (same requests,
noise and prompts): worst PSNR and SSIM against accuracy.GATE. Then the graphs that passed run in bf16
together (once with the bundle's float graphs, and per quantized precision once with the quantized graphs
that passed and the float graphs of the other components); a set that fails together keeps only its
transformer graph in bf16. The verdicts go to the manifest
(manifest[cpu_gates]["openvino.bf16"], read by runtime/cpu_precision.py).

    record = gate_bf16(Path("bundle"), GateSettings(), threads=2)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.engines.accuracy import GATE, gate, psnr_db, ssim, summary
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import CPU_GATES, load_bundle, set_entry
from sd3trt.runtime.cpu_precision import GATE_KEY, graph_key


@dataclass(frozen=True)
class GateSettings:
    runs: int = 2  # img2img requests (calibration pictures and prompts 0..runs-1)
    steps: int = 8
    strength: float = 0.75
    size: int = 256  # px, capped by the model's largest side

    def requests(self, facts) -> list[dict]:
        from sd3trt.engines.calibrate import CalibSettings, run_inputs

        cs = CalibSettings(prompts=self.runs + 1, holdout=self.runs, steps=self.steps, strength=self.strength,
                           size=self.size).checked(facts)
        return [run_inputs(cs, i) for i in range(self.runs)]


def graphs_of(bundle) -> dict[str, tuple[str, Path]]:
    """{gate key: (component, ONNX path)} of every graph the bundle has: its own and its quantized ones."""
    out = {name: (name, bundle.onnx_path(name)) for name in bundle.component_names()}
    for component, _precision, path, _sha256 in bundle.quantized_graphs().values():
        key = graph_key(bundle, component, path)
        if key is not None:
            out[key[0]] = (component, path)
    return out


def _pipeline(bundle, threads: int, bf16: dict[str, Path]):
    """The all-fp32 OpenVINO pipeline with the graphs in `bf16` ({component: path}) swapped in, in bf16."""
    from sd3trt.runtime.ov_runner import OvRunner
    from sd3trt.runtime.pipeline import Img2Img

    def make(name: str):
        return OvRunner(name, bundle.component(name), bf16.get(name, bundle.onnx_path(name)),
                        precision="bf16" if name in bf16 else "fp32", threads=threads)

    return Img2Img(bundle, backend="openvino", cpu_precision="fp32", threads=threads, onnx_files=bf16,
                   prompt_cache=0, runner_factory=make)


def images(pipe, requests: list[dict]) -> list[np.ndarray]:
    with pipe:
        return [np.clip(pipe(**r).decoded / 2 + 0.5, 0, 1) for r in requests]


def compare(ref: list[np.ndarray], test: list[np.ndarray]) -> dict:
    return {"image": {"psnr_db": summary([psnr_db(a, b) for a, b in zip(ref, test)]),
                      "ssim": summary([ssim(a, b) for a, b in zip(ref, test)])}}


def gate_bf16(root: Path, settings: GateSettings = GateSettings(), threads: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Measure and record the bf16 gate of every graph of the bundle at `root`; returns the record."""
    from sd3trt.runtime.ov_runner import openvino_version, resolve_cpu_precision

    resolve_cpu_precision("bf16")  # refuses a CPU without native bf16 before any work
    bundle = load_bundle(root)
    if bundle.dtype != "fp32":
        raise Sd3trtError(f"`sd3trt gate` measures bf16 against an fp32 bundle; {root} is {bundle.dtype}")
    graphs = graphs_of(bundle)
    requests = settings.requests(bundle.facts)
    t0 = time.perf_counter()
    ref = images(_pipeline(bundle, threads, {}), requests)
    verdicts = {}
    for key, (component, path) in graphs.items():
        figures = compare(ref, images(_pipeline(bundle, threads, {component: path}), requests))
        ok, why = gate("bf16", figures)
        verdicts[key] = {"passed": ok, "sha256": graph_key(bundle, component, path)[1], **figures,
                         **({"failures": why} if why else {})}
        img = figures["image"]
        log(f"gate: {key} in bf16: PSNR {img['psnr_db']['min']:.2f} dB, SSIM {img['ssim']['min']:.4f} - "
            f"{'pass' if ok else 'FAIL (runs in fp32)'}")
    floats = [k for k in graphs if "." not in k]
    combos = {"float graphs": floats}
    for precision_name in sorted({k.split(".")[1] for k in graphs if "." in k}):
        # each precision's graphs that passed, with the float graphs of the other components (as img2img runs them)
        mine = [k for k in graphs if k.endswith("." + precision_name) and verdicts[k]["passed"]]
        swapped = {graphs[k][0] for k in mine}
        combos[f"{precision_name} graphs"] = mine + [k for k in floats if k not in swapped]
    together = {}
    for label, keys in combos.items():
        keys = [k for k in keys if verdicts[k]["passed"]]
        if len(keys) < 2:
            continue
        figures = compare(ref, images(_pipeline(bundle, threads, {graphs[k][0]: graphs[k][1] for k in keys}),
                                        requests))
        ok, why = gate("bf16", figures)
        together[label] = {"graphs": keys, "passed": ok, **figures}
        img = figures["image"]
        log(f"gate: {label} in bf16 together ({', '.join(keys)}): PSNR {img['psnr_db']['min']:.2f} dB, SSIM "
            f"{img['ssim']['min']:.4f} - {'pass' if ok else 'FAIL: only the transformer stays in bf16'}")
        if not ok:
            for k in keys:
                if not k.startswith("transformer"):
                    verdicts[k].update(passed=False, failures=[f"fails together with {', '.join(keys)}: {why[0]}"])
    record = {"openvino": openvino_version(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "thresholds": dict(GATE), "settings": asdict(settings), "graphs": verdicts, "together": together,
              "seconds": round(time.perf_counter() - t0, 1)}
    set_entry(Path(root), CPU_GATES, GATE_KEY, record)
    return record
