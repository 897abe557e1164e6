"""Precision passes over an ONNX graph, applied before TensorRT parses it into a strongly typed network.

In a strongly typed network the ONNX types *are* the engine's precision, so precision is decided here:

* `keep_fp32_islands` (bundle already in fp16/bf16): normalization ops (LayerNormalization,
  InstanceNormalization - which is how GroupNorm exports at opset 17 - and GroupNormalization) get a
  Cast to fp32 on their inputs and a Cast back on their output. Their mean/variance reductions are
  the ops whose fp16 range/rounding error matters (variance of large activations overflows fp16).
  Matmuls, convolutions and attention stay in the low type (TensorRT accumulates them in fp32 and
  fuses attention only when the softmax chain stays in one type). The ops the model code already
  upcasts (T5 RMSNorm, SD3.5 q/k RMSNorm, the sinusoidal timestep embedding) arrive in fp32 already.

* `autocast` (fp32 bundle -> bf16 engines, the workaround for bf16 ONNX export failing on CPU): an
  autocast-style rewrite of the fp32 graph. MatMul/Gemm/Conv/Einsum and embedding Gathers run in the
  low type, elementwise and data-movement ops follow their inputs, and everything else (norms,
  reductions, pow/sqrt/exp/log/sin/cos, index and position math) stays fp32. Graph inputs and
  outputs keep fp32, so the engine's bindings match the fp32 bundle's manifest.

Both passes only add Cast nodes: initializers keep their names, types and (external) data, so the
edited graph can be parsed with the bundle's ONNX path for external weights, and refit from it.
TensorRT folds Cast(constant) at build time, so weights are stored in the low type.
"""

from __future__ import annotations

import collections

import onnx
from onnx import TensorProto, helper

from sd3trt.errors import Sd3trtError

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization")
DEFAULT_KEEP_FP32 = NORM_OPS

# autocast: ops that start low precision (their float inputs are cast to the low type) ...
LOW_START = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
# ... ops that run in whatever type their inputs have (low if any input is low) ...
FOLLOW = {
    "Add", "Sub", "Mul", "Div", "Neg", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Gelu",
    "Softmax", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather",
    "Expand", "Tile", "Pad", "Resize", "Identity", "Where", "Max", "Min", "Clip", "DepthToSpace", "SpaceToDepth",
    "MaxPool", "AveragePool",
}
# ... and which inputs carry the data type T for them (default: every float input).
T_INPUTS = {
    "Resize": (0,), "Pad": (0, 2), "Where": (1, 2), "Gather": (0,), "Expand": (0,), "Reshape": (0,), "Slice": (0,),
    "Tile": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Split": (0,),
}
# Ops that accept any type and need no Cast in front.
TYPE_AGNOSTIC = {"Cast", "Shape", "Size", "IsNaN", "IsInf", "CastLike"}
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
SUFFIX = "__sd3trt"


def load_graph(path) -> onnx.ModelProto:
    """The graph without its external weights (they stay on disk; the parser reads them by path)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise Sd3trtError(f"cannot read ONNX file {path} ({str(e).splitlines()[0]}); re-run `sd3trt export`") from None


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name ONNX shape inference can type (plus initializers, Constants, Casts)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # a graph ONNX cannot fully infer (e.g. bf16 Conv at opset < 22): type what we can below
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
        elif node.op_type == "Cast":
            types.setdefault(node.output[0], next(a.i for a in node.attribute if a.name == "to"))
    return types


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.names = {n for node in model.graph.node for n in list(node.input) + list(node.output)}
        self.names |= {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        self.casts: dict[tuple[str, int], str] = {}
        self.out: list[onnx.NodeProto] = []
        self.n_casts = 0

    def fresh(self, base: str) -> str:
        name, i = f"{base}{SUFFIX}", 0
        while name in self.names:
            i += 1
            name = f"{base}{SUFFIX}{i}"
        self.names.add(name)
        return name

    def cast(self, src: str, to: int) -> str:
        """Name of `src` cast to `to`, emitting the Cast once (right before its first user)."""
        key = (src, to)
        if key not in self.casts:
            dst = self.fresh(f"{src}/{TensorProto.DataType.Name(to).lower()}")
            self.out.append(helper.make_node("Cast", [src], [dst], to=to, name=self.fresh(f"Cast_{src}")))
            self.casts[key] = dst
            self.n_casts += 1
        return self.casts[key]

    def finish(self) -> onnx.ModelProto:
        g = self.model.graph
        del g.node[:]
        g.node.extend(self.out)
        del g.value_info[:]  # stale types; TensorRT and ONNX re-infer them
        return self.model


def _check_no_subgraphs(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise Sd3trtError(
                f"node {node.name or node.op_type} has a subgraph ({node.op_type}); the precision pass does not "
                "handle control flow, export the component without it"
            )


def _copy(model: onnx.ModelProto, inplace: bool) -> onnx.ModelProto:
    return model if inplace else onnx.ModelProto.FromString(model.SerializeToString())


def keep_fp32_islands(model: onnx.ModelProto, low: str, ops=DEFAULT_KEEP_FP32,
                      inplace: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Run the `ops` nodes whose data input is in the low type in fp32 (Casts around them)."""
    low_t = LOW_TYPES[low]
    model = _copy(model, inplace)
    types = elem_types(model)
    rw = _Rewriter(model)
    counts: collections.Counter = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ops and node.input and types.get(node.input[0]) == low_t:
            for i, name in enumerate(node.input):
                if name and types.get(name) == low_t:
                    node.input[i] = rw.cast(name, TensorProto.FLOAT)
            y = node.output[0]
            node.output[0] = rw.fresh(f"{y}/fp32")
            rw.out.append(node)
            rw.out.append(helper.make_node("Cast", [node.output[0]], [y], to=low_t, name=rw.fresh(f"Cast_{y}")))
            rw.n_casts += 1
            counts[node.op_type] += 1
        else:
            rw.out.append(node)
    return rw.finish(), {"pass": "fp32_islands", "fp32_ops": dict(counts), "casts_added": rw.n_casts}


def autocast(model: onnx.ModelProto, low: str, keep_fp32=DEFAULT_KEEP_FP32,
             inplace: bool = False, keep_scopes: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """fp32 graph -> mixed graph: GEMM-like ops and what follows them in `low`, the rest fp32; fp32 I/O.
    `keep_fp32` op types stay fp32 even where they would follow a low input, and so does every node whose
    name starts with one of `keep_scopes` (fnmatch patterns: the bundle's fp32 modules, spec.Fp32Rule)."""
    import fnmatch

    low_t = LOW_TYPES[low]
    model = _copy(model, inplace)
    _check_no_subgraphs(model)
    types = elem_types(model)
    g = model.graph
    initializers = {i.name for i in g.initializer}
    rw = _Rewriter(model)
    low_tensors: set[str] = set()
    counts = collections.Counter()

    def is_float(name: str) -> bool:
        return bool(name) and (name in low_tensors or types.get(name) == TensorProto.FLOAT)

    for node in g.node:
        op = node.op_type
        idx = T_INPUTS.get(op, range(len(node.input)))
        t_inputs = [i for i in idx if i < len(node.input) and is_float(node.input[i])]
        scoped = any(fnmatch.fnmatchcase(node.name, scope + "*") for scope in keep_scopes)
        counts["scoped"] += scoped
        if op in keep_fp32 or scoped:
            go_low = False
        elif op in LOW_START:
            go_low = bool(t_inputs)
        elif op == "Gather":
            go_low = bool(t_inputs) and (node.input[0] in low_tensors or node.input[0] in initializers)
        elif op in FOLLOW:
            go_low = any(node.input[i] in low_tensors for i in t_inputs)
        else:
            go_low = False
        if go_low:
            for i in t_inputs:
                if node.input[i] not in low_tensors:
                    node.input[i] = rw.cast(node.input[i], low_t)
            for k, o in enumerate(node.output):
                # outputs of these ops carry T; untyped ones (inference gave up) are assumed float too
                if o and types.get(o, TensorProto.FLOAT) == TensorProto.FLOAT and not (op == "MaxPool" and k):
                    low_tensors.add(o)
            counts["low"] += 1
        else:
            if op not in TYPE_AGNOSTIC:
                for i, name in enumerate(node.input):
                    if name in low_tensors:
                        node.input[i] = rw.cast(name, TensorProto.FLOAT)
            if any(types.get(o) in FLOATS for o in node.output):
                counts["fp32"] += 1
                if op in keep_fp32:
                    counts[f"fp32:{op}"] += 1
        rw.out.append(node)

    # Graph outputs keep fp32: the low producer writes a renamed tensor, a Cast writes the output name.
    for out in g.output:
        if out.name in low_tensors:
            renamed = rw.fresh(f"{out.name}/{low}")
            for node in rw.out:
                node.output[:] = [renamed if o == out.name else o for o in node.output]
                node.input[:] = [renamed if i == out.name else i for i in node.input]
            rw.out.append(helper.make_node("Cast", [renamed], [out.name], to=TensorProto.FLOAT,
                                           name=rw.fresh(f"Cast_{out.name}")))
            rw.n_casts += 1
    report = {
        "pass": "autocast",
        "low_nodes": counts["low"],
        "fp32_nodes": counts["fp32"],
        "fp32_ops": {k[5:]: v for k, v in counts.items() if k.startswith("fp32:")},
        "casts_added": rw.n_casts,
    }
    if keep_scopes:
        report["fp32_scopes"] = {"scopes": list(keep_scopes), "nodes": counts["scoped"]}
    return rw.finish(), report


def apply_precision(model: onnx.ModelProto, bundle_dtype: str, precision: str, keep_fp32=DEFAULT_KEEP_FP32,
                    inplace: bool = False, keep_scopes: tuple[str, ...] = ()):
    """The graph TensorRT should parse for `precision`, and a report for the engine metadata.

    Callers have already refused the combinations export must provide (see build.check_precision).
    `inplace` edits `model` itself (the builder's fresh copy) instead of a copy. `keep_scopes`: node-name
    prefixes kept fp32 by autocast (a 16-bit bundle's graph has them in fp32 already, from export).
    """
    keep_fp32 = tuple(keep_fp32)
    if precision == "fp32":
        return model, {"pass": "none", "note": "fp32 graph as exported"}
    if bundle_dtype == precision:
        if not keep_fp32:
            return model, {"pass": "none", "note": f"{precision} graph as exported, no fp32 islands requested"}
        return keep_fp32_islands(model, precision, keep_fp32, inplace)
    if bundle_dtype == "fp32":
        return autocast(model, precision, keep_fp32, inplace, keep_scopes)
    raise Sd3trtError(f"no precision pass from a {bundle_dtype} graph to {precision}")
