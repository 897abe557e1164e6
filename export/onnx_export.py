"""Export one SD3 component to a checked ONNX file (atomic; external data past 2 GB)."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from sd3trt.errors import Sd3trtError
from sd3trt.export.components import example_inputs, load_source, wrap
from sd3trt.export.lora import fuse, write_weight_map
from sd3trt.spec import ModelFacts, component_specs

SUPPORTED_OPSETS = range(17, 21)


def export_component(
    model_dir: Path, facts: ModelFacts, component: str, dest: Path, dtype: str = "fp32", opset: int = 17,
    loras: list | None = None,
) -> list[Path]:
    """Export `component` to `dest` (an .onnx path). Returns the files written (graph, maybe external data,
    and for the transformer and CLIP encoders the LoRA weight map `<component>.lora.json`).
    loras: sd3trt.lora.LoraFile list fused into the weights before export.

    Nothing appears at `dest` until the graph has passed onnx.checker and shape inference.
    """
    if opset not in SUPPORTED_OPSETS:
        raise Sd3trtError(f"opset {opset} is not supported; use one of {list(SUPPORTED_OPSETS)}")
    spec = component_specs(facts)[component]
    source = load_source(model_dir, component, dtype)
    if loras:
        fuse(source, component, loras)
    module = wrap(component, source)
    args = example_inputs(facts, component, dtype)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{component}.") as tmp:
        raw = Path(tmp) / "raw" / "model.onnx"
        raw.parent.mkdir()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
        staged = Path(tmp) / dest.name
        data_name = dest.name + ".data"
        large = _consolidate(raw, staged, data_name)
        onnx.checker.check_model(str(staged), full_check=False)
        # bf16 Conv is typed only from opset 22; TensorRT parses it at 17, so skip the type check for bf16.
        onnx.shape_inference.infer_shapes_path(str(staged), str(staged), check_type=dtype != "bf16",
                                               strict_mode=False)
        lora_map = write_weight_map(module, component, staged, Path(tmp) / f"{component}.lora.json")
        del module
        written = [dest]
        if lora_map is not None:
            os.replace(lora_map, dest.parent / lora_map.name)
            written.append(dest.parent / lora_map.name)
        if large:
            os.replace(Path(tmp) / data_name, dest.parent / data_name)
            written.append(dest.parent / data_name)
        else:
            (dest.parent / data_name).unlink(missing_ok=True)
        os.replace(staged, dest)
        shutil.rmtree(raw.parent, ignore_errors=True)
    return written


def _consolidate(raw: Path, staged: Path, data_name: str) -> bool:
    """Write the exported graph to `staged`; weights go to one external file beside it when the graph is
    over 2 GB. Tensors are copied one at a time, so peak memory stays at the largest tensor."""
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    model.doc_string = "exported by sd3trt"
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not external:
        onnx.save_model(model, str(staged))
        return False
    with open(staged.parent / data_name, "wb") as out:
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            with open(raw.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
            pad = (-out.tell()) % 4096  # page-aligned tensors let consumers mmap them
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(data)
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(staged))
    return True


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
