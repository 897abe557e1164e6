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
from sd3trt.spec import ModelFacts, component_specs

SUPPORTED_OPSETS = range(17, 21)
TWO_GB = 2**31 - 1


def export_component(
    model_dir: Path, facts: ModelFacts, component: str, dest: Path, dtype: str = "fp32", opset: int = 17
) -> list[Path]:
    """Export `component` to `dest` (an .onnx path). Returns the files written (graph, maybe external data).

    Nothing appears at `dest` until the graph has passed onnx.checker and shape inference.
    """
    if opset not in SUPPORTED_OPSETS:
        raise Sd3trtError(f"opset {opset} is not supported; use one of {list(SUPPORTED_OPSETS)}")
    spec = component_specs(facts)[component]
    module = wrap(component, load_source(model_dir, component, dtype))
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
        del module
        model = onnx.load(str(raw), load_external_data=True)
        model.doc_string = f"sd3trt {component} ({dtype})"
        staged = Path(tmp) / dest.name
        data_name = dest.name + ".data"
        large = model.ByteSize() > TWO_GB if _fits_proto(model) else True
        if large:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        del model
        onnx.checker.check_model(str(staged), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(staged), str(staged), check_type=True, strict_mode=False)
        written = [dest]
        if large:
            os.replace(Path(tmp) / data_name, dest.parent / data_name)
            written.append(dest.parent / data_name)
        else:
            (dest.parent / data_name).unlink(missing_ok=True)
        os.replace(staged, dest)
        shutil.rmtree(raw.parent, ignore_errors=True)
    return written


def _fits_proto(model: onnx.ModelProto) -> bool:
    """ByteSize() itself fails past 2 GB on some protobuf builds; treat that as large."""
    try:
        model.ByteSize()
        return True
    except Exception:
        return False
