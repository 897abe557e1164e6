"""Export one SD3 component to a checked ONNX file (atomic; weights streamed into external data past a size).

The graph is traced without its weights (`export_params=False`: the TorchScript exporter then lists every
parameter as a graph input, with exactly the name, type and shape its initializer would have). The weights
are attached afterwards, one tensor at a time, straight from the module: inline for a small graph, or
written page-aligned into one `<name>.onnx.data` file. No copy of the model's weights is ever held, so a
component exports in about its own size of memory (SD3.5-Large's 16 GB transformer on a 24 GiB machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from sd3trt.errors import Sd3trtError
from sd3trt.export.components import apply_fp32_rules, example_inputs, load_source, wrap
from sd3trt.export.lora import fuse, write_weight_map
from sd3trt.spec import ModelFacts, component_specs, node_scope

SUPPORTED_OPSETS = range(17, 21)
PROTOBUF_LIMIT = 2**31  # a ModelProto (graph + inline weights) must stay below this
STREAM_BYTES = PROTOBUF_LIMIT - 2**26  # weights past this go to the external-data file


def export_component(
    model_dir: Path, facts: ModelFacts, component: str, dest: Path, dtype: str = "fp32", opset: int = 17,
    loras: list | None = None, stream_bytes: int = STREAM_BYTES, fp32_rules: tuple = (),
) -> list[Path]:
    """Export `component` to `dest` (an .onnx path). Returns the files written (graph, maybe external data,
    and for the transformer and CLIP encoders the LoRA weight map `<component>.lora.json`).
    loras: sd3trt.lora.LoraFile list fused into the weights before export.
    stream_bytes: weights larger than this (and any graph too large to hold them inline) go to external data.
    fp32_rules: spec.Fp32Rule list for this component; the graph is checked to keep those weights in float32.

    Nothing appears at `dest` until the graph has passed onnx.checker and shape inference.
    """
    if opset not in SUPPORTED_OPSETS:
        raise Sd3trtError(f"opset {opset} is not supported; use one of {list(SUPPORTED_OPSETS)}")
    spec = component_specs(facts)[component]
    source = load_source(model_dir, component, dtype)
    if loras:
        fuse(source, component, loras)
    kept = apply_fp32_rules(component, source, fp32_rules, dtype)
    module = wrap(component, source)
    args = example_inputs(facts, component, dtype)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{component}.") as tmp:
        raw = Path(tmp) / "raw" / "model.onnx"
        raw.parent.mkdir()
        with torch.no_grad(), warnings.catch_warnings(), _traced_weights() as weights:
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                export_params=False,
                opset_version=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
        staged = Path(tmp) / dest.name
        data_name = dest.name + ".data"
        large = _attach_weights(raw, staged, data_name, weights, stream_bytes)
        _check_fp32(staged, component, kept)
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


def _check_fp32(graph_path: Path, component: str, kept: tuple[str, ...]) -> None:
    """Every weight read inside the modules kept in float32 is a float32 initializer of the exported graph."""
    if not kept:
        return
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer}
    for name in kept:
        scope = node_scope(component, name)
        weights = {i for n in graph.node if n.name.startswith(scope) for i in n.input if i in types}
        wrong = sorted(w for w in weights if types[w] in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))
        if wrong or not weights:
            raise Sd3trtError(f"internal: the exported graph does not keep {name} in float32 ({wrong[:3]})")


@contextlib.contextmanager
def _traced_weights():
    """The exporter's own initializers by graph name: the module's parameters (the same tensors, no copy) and
    the few it constant-folded from them (e.g. CLIP's transposed projections). The TorchScript exporter hands
    them to its initializer de-duplication pass just before it serializes; with export_params=False they are
    then dropped, so that pass is wrapped to keep its result."""
    captured: dict = {}
    original = torch._C._jit_pass_onnx_deduplicate_initializers

    def keep(graph, params, *rest):
        result = original(graph, params, *rest)
        captured.update(result)
        return result

    torch._C._jit_pass_onnx_deduplicate_initializers = keep
    try:
        yield captured
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = original
    if not captured:
        raise Sd3trtError(f"torch {torch.__version__}'s ONNX exporter did not report its weights; "
                          "use a torch release between 2.4 and 2.14")


ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
              torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.int64: onnx.TensorProto.INT64,
              torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in ONNX raw_data layout (C order, little-endian), without a copy where it can."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bf16; the bits are what ONNX stores
    return memoryview(t.numpy()).cast("B")


def _attach_weights(raw: Path, staged: Path, data_name: str, tensors: dict, stream_bytes: int) -> bool:
    """Turn the weight inputs of the traced graph at `raw` into initializers and write it to `staged`.
    Returns True when the weights went to `staged.parent / data_name`."""
    model = onnx.load(str(raw))
    model.doc_string = "exported by sd3trt"
    graph = model.graph
    weights = [vi for vi in graph.input if vi.name in tensors]
    total = sum(tensors[vi.name].numel() * tensors[vi.name].element_size() for vi in weights)
    external = total > min(stream_bytes, PROTOBUF_LIMIT - model.ByteSize() - 2**20)
    keep = [vi for vi in graph.input if vi.name not in tensors]
    del graph.input[:]
    graph.input.extend(keep)
    out = open(staged.parent / data_name, "wb") if external else None
    try:
        for vi in weights:
            t = tensors[vi.name]
            if ONNX_TYPES.get(t.dtype) != vi.type.tensor_type.elem_type:
                raise Sd3trtError(f"internal: the exporter typed weight {vi.name} unlike its {t.dtype} tensor")
            init = graph.initializer.add()
            init.name, init.data_type = vi.name, vi.type.tensor_type.elem_type
            init.dims.extend(t.shape)
            data = _tensor_bytes(t)
            if out is None:
                init.raw_data = data.tobytes()
                continue
            out.write(b"\0" * ((-out.tell()) % 4096))  # page-aligned tensors let consumers mmap them
            offset = out.tell()
            out.write(data)
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    finally:
        if out is not None:
            out.close()
    onnx.save_model(model, str(staged))
    return external
