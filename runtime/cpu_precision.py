"""Which graphs the openvino backend runs in bf16: the CPU must have it, and the graph's bf16 image must have
passed the accuracy gate (`sd3trt gate`, recorded in the manifest like the quantized graphs' gates).

    graph_precisions(bundle, "auto", files)   # {"transformer": "bf16", "t5": "fp32", ...}

A gate record is keyed by the graph a component runs: its bundle graph ("transformer") or a quantized one
("transformer.int8"), and names the sha256 of the file it measured, so a re-export or re-quantization
voids it. "auto" takes bf16 where the CPU and the gate allow and says once when the gate was never run;
an explicit "bf16" with no passed graph is refused with the command that gates it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import CPU_GATES, QUANTIZED, quantized_key

GATE_KEY = "openvino.bf16"  # manifest[CPU_GATES][GATE_KEY]: the bf16 gate of the openvino backend
log = logging.getLogger(__name__)


def graph_key(bundle, component: str, path: Path) -> tuple[str, str] | None:
    """(gate key, sha256) of the graph `component` runs from `path`: the bundle's own or a quantized graph;
    None for a graph passed in from outside the bundle (never gated: it runs in fp32)."""
    path = Path(path)
    entry = bundle.component(component)
    if path == bundle.onnx_path(component):
        return component, entry["files"][entry["file"]]
    for precision_name in ("int8", "fp8"):
        q = bundle.data.get(QUANTIZED, {}).get(quantized_key(precision_name, component))
        if q is not None and path == bundle.path(q["file"]):
            return f"{component}.{precision_name}", q["files"][q["file"]]
    return None


def passed_graphs(bundle) -> dict[str, str]:
    """{gate key: sha256} of the graphs whose bf16 image passed the gate on this bundle."""
    record = bundle.data.get(CPU_GATES, {}).get(GATE_KEY) or {}
    return {k: g["sha256"] for k, g in record.get("graphs", {}).items() if g.get("passed")}


def graph_precisions(bundle, asked: str | None, files: Mapping[str, Path]) -> dict[str, str]:
    """{component: "fp32" | "bf16"} for the openvino backend running `files`."""
    from sd3trt.runtime.ov_runner import resolve_cpu_precision

    resolved = resolve_cpu_precision(asked or "auto")
    if bundle.dtype == "bf16":  # the graphs are bf16 already: computing in bf16 rounds nothing more
        return {name: resolved for name in files}
    out = {name: "fp32" for name in files}
    if resolved == "fp32":
        return out
    passed = passed_graphs(bundle)
    for name, path in files.items():
        key = graph_key(bundle, name, path)
        if key is not None and passed.get(key[0]) == key[1]:
            out[name] = "bf16"
    if "bf16" not in out.values():
        fix = f"`sd3trt gate --bundle {bundle.root}` (it measures each graph's bf16 image against fp32)"
        if asked == "bf16":
            raise Sd3trtError(f"no graph of bundle {bundle.root} has passed the bf16 accuracy gate on OpenVINO; run "
                              f"{fix}, or use --cpu-precision fp32")
        log.warning("this CPU computes bf16 natively but no graph of %s has passed the bf16 gate, so OpenVINO runs "
                    "fp32; %s enables bf16 where it passes", bundle.root, fix)
    return out
