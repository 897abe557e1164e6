"""Q/DQ graphs of the transformer's linear layers (onnx + numpy, no ONNX Runtime): the pass that writes
them, and their lowering for a TensorRT engine.

    plan = plan_layers(model, keep=DEFAULT_KEEP)              # which layers, which kept and why
    qmodel, report = quantize_model(model, "int8", plan, act_amax)
    lowered, report = lower_qdq(qmodel, "fp16")               # what the engine builder parses

What the pass writes, for each quantized layer (MatMul, or Gemm rewritten as MatMul + Add):

    x --QuantizeLinear(s_x, 0)--> x_q --DequantizeLinear(s_x)--> MatMul <--DequantizeLinear(s_w[N], axis=1)-- W_q

* activations: per-tensor symmetric scale from calibration (`amax / qmax`), zero point 0; one Q/DQ
  pair per consuming layer (ONNX Runtime fuses Q -> DQ -> MatMul <- DQ <- W into its integer GEMM,
  MatMulIntegerToFloat, only when the Q feeds that one DQ; TensorRT fuses either form);
* weights: stored quantized (int8, or float8e4m3fn) in the [K, N] layout MatMul takes, so no
  Transpose sits between a weight and its DQ (TensorRT wants DQ(weight) feeding the GEMM directly, and
  ONNX Runtime CPU then evaluates float8 graphs as they are), with per-output-channel scales (axis 1)
  by default. Gemm(transB=1) weights are transposed here, in numpy.
* nothing else changes: normalizations, the patch-embedding Conv, attention softmax, and every layer
  the keep-list names stay in the graph's float type.

INT8 Q/DQ graphs keep the bundle's opset (>= 13); FP8 needs opset 19 (float8 types), so the graph is
converted to 19 first. Layer names are the diffusers module paths, recovered from the exporter's node
names (`/transformer/transformer_blocks.0/attn/to_q/MatMul` -> `transformer_blocks.0.attn.to_q`);
attention matmuls are `<block>.attn.qk` (Q K^T) and `<block>.attn.pv` (softmax V); quantizing one puts a
Q/DQ pair on both of its inputs (Q and K^T; the softmax output P and V), as NVIDIA's FP8 attention recipe
does. KEEP holds each precision's keep-list (FP8: NVIDIA's ModelOpt SD3 recipe), LEVELS the levels.

`lower_qdq` turns the stored graph (fp32 around the Q/DQ pairs, so ONNX Runtime can run it) into a
network in fp16/bf16: the autocast pass (engines/mixed_precision.py) puts matmuls, elementwise and
data-movement ops in the low type and keeps normalizations in fp32; then every QuantizeLinear takes its
input and every DequantizeLinear produces its output in that low type (scales converted), so TensorRT
sees `x16 -> Q -> DQ -> MatMul16` and `W8 -> DQ -> MatMul16` with no Cast in between - the pattern it
fuses into INT8/FP8 GEMMs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sd3trt import precision as words
from sd3trt.engines.mixed_precision import DEFAULT_KEEP_FP32, LOW_TYPES, autocast, elem_types
from sd3trt.errors import Sd3trtError

QMAX = {"int8": 127.0, "fp8": 448.0}
QTYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}
MIN_OPSET = {"int8": 13, "fp8": 19}
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}

# Layers that stay in the graph's float type unless the caller says otherwise: the most sensitive ones when
# measured (docs/quantization.md); the adaLN modulations run at M = batch rows, so keeping them costs memory only.
DEFAULT_KEEP = (
    "time_text_embed.*",  # timestep and pooled-text embedding MLPs
    "*norm1.linear",  # adaLN modulation of each block (image stream)
    "*norm1_context.linear",  # adaLN modulation of each block (text stream)
    "norm_out.linear",  # final adaLN modulation
    "proj_out",  # final projection to patches
)
# ModelOpt's default filter for diffusion transformers (its diffusers example, `filter_func_default`), as
# module globs of SD3: the embeddings stay 16-bit (the patch embedding `pos_embed.proj` is a Conv, never
# quantized by this pass anyway; SD3 has no `x_embedder`, other MMDiTs do).
MODELOPT_FILTER = ("time_text_embed.*", "context_embedder", "pos_embed.*", "x_embedder*", "norm_out.*")
# FP8 follows NVIDIA's ModelOpt SD3 recipe (TensorRT demo/Diffusion): that filter plus `proj_out` and the
# adaLN modulations. INT8 quantizes `context_embedder` (+0.4 dB measured, docs/quantization.md).
FP8_KEEP = DEFAULT_KEEP + tuple(p for p in MODELOPT_FILTER if p not in DEFAULT_KEEP)
KEEP = {"int8": DEFAULT_KEEP + ("pos_embed.*", "x_embedder*"), "fp8": FP8_KEEP}
# Blocks kept in high precision by model depth, as NVIDIA's demo does for SD3.5-Large (38 blocks): its
# block 35. Applied on top of any keep-list by the quantizer (transformer_quant.plan).
KEEP_BY_DEPTH = {38: ("transformer_blocks.35.*",)}
# Quantization levels, like NVIDIA's demo: the linear layers only, or those plus the attention batched
# matmuls (Q.K^T and P.V, with the softmax output P quantized). `sd3trt quantize` defaults to the fastest
# level that passes the gate (transformer_quant.DEFAULT_LEVELS).
LEVELS = ("linear", "attention")
# TensorRT fuses FP8 Q/DQ attention into its fused multi-head attention kernels when head_dim % 16 == 0.
FP8_HEAD_MULTIPLE = 16
# Not MatMul/Gemm, so never quantized by this pass; listed in the coverage report for completeness.
NEVER = {"Conv": "patch embedding (Conv)", "LayerNormalization": "normalization"}


@dataclass
class Layer:
    name: str  # diffusers module path, e.g. "transformer_blocks.0.attn.to_q"
    node: str  # ONNX node name
    op: str  # "MatMul" | "Gemm"
    kind: str  # "linear" | "attention"
    activation: str  # tensor name of the data input
    weight: str | None = None  # initializer name (linear layers)
    weight_shape: tuple = ()  # [K, N] as the (rewritten) MatMul takes it
    quantize: bool = True
    reason: str = ""  # why it is kept, when it is

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape)) if self.weight_shape else 0


@dataclass
class Plan:
    layers: list[Layer]
    other: dict = field(default_factory=dict)  # op_type -> count of compute nodes this pass never touches
    keep: tuple = ()
    attention: bool = False

    @property
    def quantized(self) -> list[Layer]:
        return [l for l in self.layers if l.quantize]

    @property
    def kept(self) -> list[Layer]:
        return [l for l in self.layers if not l.quantize]

    def taps(self) -> list[str]:
        """Activation tensors whose range calibration must measure (every candidate, kept or not)."""
        return list(dict.fromkeys(l.activation for l in self.layers))

    def coverage(self) -> dict:
        lin = [l for l in self.layers if l.kind == "linear"]
        total = sum(l.params for l in lin)
        done = sum(l.params for l in lin if l.quantize)
        return {
            "quantized": [l.name for l in self.quantized],
            "kept": {l.name: l.reason for l in self.kept},
            "not_linear": {NEVER.get(op, op): n for op, n in sorted(self.other.items())},
            "linear_layers": len(lin),
            "linear_quantized": sum(l.quantize for l in lin),
            "attention_matmuls": sum(l.kind == "attention" for l in self.layers),
            "attention_quantized": sum(l.quantize and l.kind == "attention" for l in self.layers),
            "weight_params": total,
            "weight_params_quantized": done,
            "weight_fraction_quantized": round(done / total, 4) if total else 0.0,
            "keep_patterns": list(self.keep),
        }


# --------------------------------------------------------------------------- finding layers


def layer_name(node: onnx.NodeProto, index: int) -> str:
    """`/transformer/transformer_blocks.0/attn/to_q/MatMul` -> `transformer_blocks.0.attn.to_q`."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) < 2:
        return node.name or f"{node.op_type}_{index}"
    if parts[0] == "transformer":  # the export wrapper's attribute
        parts = parts[1:]
    return ".".join(parts[:-1]) or f"{node.op_type}_{index}"


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def expand_keep(patterns, names: list[str]) -> tuple[str, ...]:
    """`@first_block` / `@last_block` -> the glob of the first / last transformer block."""
    blocks = sorted({int(m.group(1)) for n in names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))})
    out = []
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        if p in ("@first_block", "@last_block"):
            if blocks:
                out.append(f"transformer_blocks.{blocks[0] if p == '@first_block' else blocks[-1]}.*")
        elif p.startswith("@"):
            raise Sd3trtError(f"unknown keep-list token {p!r}; use a layer glob, @first_block or @last_block")
        else:
            out.append(p)
    return tuple(out)


def block_count(names) -> int:
    """Transformer blocks among layer or node names (`transformer_blocks.<i>.` / `/transformer_blocks.<i>/`)."""
    return len({m.group(1) for n in names if (m := re.search(r"transformer_blocks\.(\d+)[./]", n))})


def keep_for_depth(model: onnx.ModelProto) -> tuple[str, ...]:
    """The blocks KEEP_BY_DEPTH keeps for a transformer of this many blocks (none for other depths)."""
    return KEEP_BY_DEPTH.get(block_count(n.name for n in model.graph.node), ())


def _head_dims(model: onnx.ModelProto) -> dict[str, int]:
    """tensor name -> static last dimension, from ONNX shape inference (no weights needed)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    out = {}
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = int(dims[-1].dim_value)
    return out


def _const_value(name: str, prod: dict, inits: dict):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    n = prod.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(n.attribute[0].t)
    return None


def _head_dim_from_reshape(q: str, prod: dict, inits: dict) -> int | None:
    """head_dim of the attention whose query tensor is `q`, read from the graph when shape inference cannot:
    the Reshape [B, S, heads, head_dim] (or [B, -1, heads, head_dim] with head_dim computed) upstream of q,
    and the width N of the linear layer feeding it (head_dim = N / heads)."""
    seen, todo = set(), [q]
    while todo:
        x = todo.pop(0)
        n = prod.get(x)
        if n is None or id(n) in seen or len(seen) > 64:
            continue
        seen.add(id(n))
        if n.op_type == "Reshape":
            shape = _const_value(n.input[1], prod, inits)
            parts = None
            if shape is None and (c := prod.get(n.input[1])) is not None and c.op_type == "Concat":
                parts = [_const_value(i, prod, inits) for i in c.input]
                parts = [None if v is None or v.size != 1 else int(v.reshape(-1)[0]) for v in parts]
            elif shape is not None:
                parts = [int(v) for v in shape.reshape(-1)]
            if not parts or len(parts) != 4:
                continue
            if parts[3] is not None and parts[3] > 0:
                return parts[3]
            heads = parts[2]
            y, w = n.input[0], None
            for _ in range(4):  # through the bias Add to the MatMul / Gemm
                m = prod.get(y)
                if m is None:
                    break
                if m.op_type in ("MatMul", "Gemm") and m.input[1] in inits:
                    dims = tuple(inits[m.input[1]].dims)
                    w = dims[0] if m.op_type == "Gemm" and _attr(m, "transB", 0) else dims[-1]
                    break
                y = m.input[0] if m.input[0] not in inits else m.input[1]
            if heads and heads > 0 and w and w % heads == 0:
                return w // heads
            continue
        if n.op_type in ("MatMul", "Gemm", "Softmax"):
            continue
        todo += [i for i in n.input if i and i not in inits]
    return None


def plan_layers(model: onnx.ModelProto, keep=DEFAULT_KEEP, attention: bool = False,
                head_multiple: int | None = None) -> Plan:
    """Every MatMul/Gemm of the graph as a Layer; `quantize` False (with a reason) for kept ones.
    `head_multiple`: quantize an attention matmul only when its head_dim is a multiple of this (FP8: 16)."""
    inits = {i.name: i for i in model.graph.initializer}
    head_dims = _head_dims(model) if attention and head_multiple else {}
    prod = _producers(model)
    layers: list[Layer] = []
    other: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in NEVER:
            other[node.op_type] = other.get(node.op_type, 0) + 1
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        name = layer_name(node, i)
        a, b = node.input[0], node.input[1]
        if b in inits:
            dims = tuple(inits[b].dims)
            layer = Layer(name, node.name, node.op_type, "linear", a, b)
            if node.op_type == "Gemm":
                if _attr(node, "transA", 0) or abs(_attr(node, "alpha", 1.0) - 1.0) > 0 or (
                    len(node.input) > 2 and node.input[2] and abs(_attr(node, "beta", 1.0) - 1.0) > 0
                ):
                    layer.quantize, layer.reason = False, "Gemm with transA/alpha/beta (not rewritten)"
                dims = dims[::-1] if _attr(node, "transB", 0) else dims
            if len(dims) != 2:
                layer.quantize, layer.reason = False, f"weight of rank {len(dims)}"
            layer.weight_shape = dims
        elif a not in inits and b not in inits:
            src = prod.get(a)
            suffix = "pv" if src is not None and src.op_type == "Softmax" else "qk"
            layer = Layer(f"{name}.{suffix}", node.name, node.op_type, "attention", a)
            if not attention:
                layer.quantize, layer.reason = False, "attention matmul (quantize with attention=True)"
            elif head_multiple:  # head_dim: the last dim of Q (the data input of Q.K^T)
                qk = node if suffix == "qk" else None
                if qk is None:  # P.V: find its Q.K^T through the softmax
                    sm = prod.get(a)
                    qk = prod.get(sm.input[0]) if sm is not None else None
                    while qk is not None and qk.op_type not in ("MatMul",) and qk.input:
                        qk = prod.get(qk.input[0])
                hd = None
                if qk is not None:
                    hd = head_dims.get(qk.input[0]) or _head_dim_from_reshape(qk.input[0], prod, inits)
                if hd is None or hd % head_multiple:
                    layer.quantize, layer.reason = False, (
                        f"attention head_dim {hd if hd is not None else 'unknown'} is not a multiple of "
                        f"{head_multiple} (TensorRT's fused 8-bit attention)")
        else:
            continue  # constant data input: not a layer
        layers.append(layer)
    keep = expand_keep(keep, [l.name for l in layers])
    for layer in layers:
        if layer.quantize:
            hit = next((p for p in keep if fnmatch.fnmatchcase(layer.name, p)), None)
            if hit:
                layer.quantize, layer.reason = False, f"keep-list {hit!r}"
    seen: dict[str, int] = {}
    for layer in layers:  # unique names (a module called twice would repeat)
        if layer.name in seen:
            seen[layer.name] += 1
            layer.name = f"{layer.name}#{seen[layer.name]}"
        else:
            seen[layer.name] = 0
    return Plan(layers, other, keep, attention)


# --------------------------------------------------------------------------- numerics


def to_fp8(x: np.ndarray) -> np.ndarray:
    """float32 -> float8 e4m3fn (round to nearest even, saturating at +-448, as QuantizeLinear does)."""
    import ml_dtypes

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)


def quantize_weight(w: np.ndarray, precision: str, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float weight -> (quantized [K, N], scale [N] or scalar), symmetric, zero point 0."""
    w = w.astype(np.float32)
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scale = np.maximum(amax, 1e-12).astype(np.float32) / np.float32(QMAX[precision])
    if precision == "int8":
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    else:
        q = to_fp8(w / scale)
    return q, scale.astype(np.float32)


# --------------------------------------------------------------------------- the pass


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert to `opset` (FP8 and 16-bit scales need 19) with ONNX's version converter; a no-op when already
    there. Works on a graph loaded without its external data (the converter never reads weight values)."""
    if _opset(model) >= opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:
        raise Sd3trtError(
            f"cannot convert the transformer graph to opset {opset} for float8 ({str(e).splitlines()[0][:200]}); "
            f"re-export with `sd3trt export --opset {opset}`"
        ) from None


def _elem_types(model: onnx.ModelProto, names) -> dict[str, int]:
    want = set(names)
    types = {i.name: i.data_type for i in model.graph.initializer if i.name in want}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.name in want and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    if want - set(types):
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if vi.name in want and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types


def _np_float(elem_type: int):
    """numpy type of an ONNX float type (bf16 through ml_dtypes)."""
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return FLOAT_TYPES[elem_type]


def graph_float_type(model: onnx.ModelProto) -> int:
    """The graph's float type: that of its first float input (fp32, fp16 or bf16 bundles)."""
    for vi in model.graph.input:
        t = vi.type.tensor_type.elem_type
        if t in FLOAT_TYPES or t == TensorProto.BFLOAT16:
            return t
    return TensorProto.FLOAT


def target_opset(model: onnx.ModelProto, precision: str) -> int:
    """The opset the Q/DQ graph needs: FP8 types, and 16-bit scales of a 16-bit graph, are opset 19."""
    sixteen = graph_float_type(model) != TensorProto.FLOAT
    return max(_opset(model), 19 if precision == "fp8" or sixteen else MIN_OPSET[precision])


@dataclass
class QdqGraph:
    """The rewritten graph before its new weights exist: `model` lists each quantized weight (and its scale)
    as an empty initializer, `pending[name]()` makes its value, so a writer can produce one weight at a time
    (engines/qdq_writer.py streams them to disk). `report`: per layer, filled in as weights are made."""

    model: onnx.ModelProto
    pending: dict
    report: dict


class _WeightJob:
    """One layer's weight quantization, made on first use of either part and dropped once both are taken."""

    def __init__(self, read, layer: Layer, transpose: bool, precision: str, per_channel: bool, scale_type, entry: dict):
        self.read, self.layer, self.transpose = read, layer, transpose
        self.precision, self.per_channel, self.scale_type, self.entry = precision, per_channel, scale_type, entry
        self.parts: dict | None = None

    def part(self, which: str) -> np.ndarray:
        if self.parts is None:
            w = np.asarray(self.read(self.layer.weight), np.float32)
            if self.transpose:
                w = np.ascontiguousarray(w.T)  # stored [K, N]: no Transpose between the weight and its DQ
            q, scale = quantize_weight(w, self.precision, self.per_channel)
            deq = q.astype(np.float32) * scale
            self.entry.update({"weight": self.layer.weight, "weight_shape": list(w.shape),
                               "weight_per_channel": self.per_channel,
                               "weight_max_rel_error": float(np.abs(deq - w).max() / max(float(np.abs(w).max()), 1e-12))})
            self.parts = {"q": q, "scale": scale.astype(self.scale_type)}
        value = self.parts.pop(which)
        if not self.parts:
            self.parts = {}  # both taken: free the arrays (a later call would be a bug, and fails loudly)
        return value


def _check_ranges(plan: Plan, model: onnx.ModelProto, act_amax: dict) -> set[str]:
    """The tensors that need a calibrated range; refuses a plan whose ranges are missing."""
    by_name = {n.name: n for n in model.graph.node}
    needed = {l.activation for l in plan.quantized}
    needed |= {by_name[l.node].input[1] for l in plan.quantized if l.kind == "attention"}
    missing = sorted(needed - set(act_amax))
    if missing:
        raise Sd3trtError(f"no calibrated range for {len(missing)} activation(s) (e.g. {missing[0]}); re-run calibration")
    return needed


class _Names:
    """Fresh tensor names in one graph, and the initializers made under them."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.used = {n for node in g.node for n in list(node.input) + list(node.output)}
        self.used |= {i.name for i in g.initializer}
        self.inits: list[onnx.TensorProto] = []

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}.{k}"
        self.used.add(name)
        return name

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def placeholder(self, base: str, elem_type: int, dims) -> str:
        """An initializer whose value a writer supplies later (QdqGraph.pending)."""
        name = self.fresh(base)
        t = TensorProto(name=name, data_type=elem_type)
        t.dims.extend(int(d) for d in dims)
        self.inits.append(t)
        return name


def _act_qdq(x: str, layer: Layer, precision: str, act_amax: dict, ftypes: dict, names: _Names,
             out: list) -> tuple[str, float]:
    """Q -> DQ of activation x for one layer. One pair per consumer, not one Q per tensor: ONNX Runtime
    fuses a Q/DQ pair into its integer GEMM only when the Q feeds a single DQ."""
    ftype = ftypes.get(x, TensorProto.FLOAT)
    if ftype not in FLOAT_TYPES and ftype != TensorProto.BFLOAT16:
        raise Sd3trtError(f"{layer.name}: input {x} is {TensorProto.DataType.Name(ftype)}, not a float; cannot quantize it")
    scale = np.float32(max(float(act_amax[x]), 1e-8) / np.float32(QMAX[precision]))
    s = names.const(f"{x}_scale", np.array(scale).astype(_np_float(ftype)))
    zp = names.const(f"{x}_zero_point", _zero(precision))
    xq, xdq = names.fresh(f"{x}_quantized"), names.fresh(f"{x}_dq_{layer.name}")
    out.append(helper.make_node("QuantizeLinear", [x, s, zp], [xq], name=names.fresh(f"{layer.name}/QuantizeLinear")))
    out.append(helper.make_node("DequantizeLinear", [xq, s, zp], [xdq], name=names.fresh(f"{layer.name}/DequantizeLinear")))
    return xdq, float(scale)


def _zero(precision: str) -> np.ndarray:
    return np.zeros((), np.int8) if precision == "int8" else to_fp8(np.zeros((), np.float32))



def _attention_nodes(layer: Layer, node, ctx) -> tuple[list, dict]:
    """Q/DQ on both inputs of an attention matmul (Q and K^T, or the softmax output P and V)."""
    new: list = []
    a, a_scale = _act_qdq(layer.activation, layer, ctx["precision"], ctx["amax"], ctx["ftypes"], ctx["names"], new)
    b = node.input[1]
    bdq, b_scale = _act_qdq(b, layer, ctx["precision"], ctx["amax"], ctx["ftypes"], ctx["names"], new)
    node.input[0], node.input[1] = a, bdq
    return new + [node], {"activation": layer.activation, "activation_amax": float(ctx["amax"][layer.activation]),
                          "activation_scale": a_scale, "b": b, "b_amax": float(ctx["amax"][b]), "b_scale": b_scale}


def _linear_nodes(layer: Layer, node, ctx) -> tuple[list, dict]:
    """Q/DQ activation, the stored-quantized weight's DQ, and the MatMul (a Gemm becomes MatMul + Add)."""
    names, precision, per_channel = ctx["names"], ctx["precision"], ctx["per_channel"]
    new: list = []
    xdq, a_scale = _act_qdq(layer.activation, layer, precision, ctx["amax"], ctx["ftypes"], names, new)
    entry = {"activation": layer.activation, "activation_amax": float(ctx["amax"][layer.activation]),
             "activation_scale": a_scale}
    ftype = ctx["ftypes"].get(layer.activation, TensorProto.FLOAT)
    k, n = layer.weight_shape
    job = _WeightJob(ctx["read"], layer, node.op_type == "Gemm" and bool(_attr(node, "transB", 0)), precision,
                     per_channel, _np_float(ftype), entry)
    wq = names.placeholder(f"{layer.name}.weight_quantized", QTYPE[precision], (k, n))
    ws = names.placeholder(f"{layer.name}.weight_scale", ftype, (n,) if per_channel else ())
    ctx["pending"][wq] = lambda: job.part("q")
    ctx["pending"][ws] = lambda: job.part("scale")
    wz = names.const(f"{layer.name}.weight_zero_point",
                     np.zeros((n,), _zero(precision).dtype) if per_channel else _zero(precision))
    wdq = names.fresh(f"{layer.name}.weight_dequantized")
    new.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [wdq], name=names.fresh(f"{layer.name}/weight_DequantizeLinear"),
                                **({"axis": 1} if per_channel else {})))
    if node.op_type == "Gemm":  # -> MatMul (+ Add bias): one pattern for ONNX Runtime's fusion and TensorRT
        y = node.output[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        mm_out = names.fresh(f"{y}_matmul") if bias else y
        new.append(helper.make_node("MatMul", [xdq, wdq], [mm_out], name=names.fresh(f"{node.name}_as_MatMul")))
        if bias:
            new.append(helper.make_node("Add", [mm_out, bias], [y], name=names.fresh(f"{node.name}_bias_Add")))
    else:
        node.input[0], node.input[1] = xdq, wdq
        new.append(node)
    return new, entry


def _splice(model: onnx.ModelProto, replace: dict[str, list], new_inits: list) -> None:
    """Put each replaced node's new nodes in its place, add the new initializers, drop the unused ones."""
    g = model.graph
    out = []
    for node in g.node:
        out.extend(replace.get(node.name, [node]))
    del g.node[:]
    g.node.extend(out)
    g.initializer.extend(new_inits)
    used = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    del g.value_info[:]  # stale after the rewrite; re-inferred on save/load


def rewrite(model: onnx.ModelProto, precision: str, plan: Plan, act_amax: dict[str, float], read_weight,
            per_channel: bool = True) -> QdqGraph:
    """The Q/DQ pass on `model` (changed in place; it may be loaded without its external data): each planned
    layer gets its Q/DQ pairs; its weight is read by `read_weight(initializer name)` only when the result is
    written. Steps: check the ranges, move to the opset the types need, rewrite each layer, splice."""
    words.check(precision, words.QUANTIZED, "quantization precision")
    needed = _check_ranges(plan, model, act_amax)
    model = upgrade_opset(model, target_opset(model, precision))
    by_name = {n.name: n for n in model.graph.node}
    ctx = {"precision": precision, "amax": act_amax, "ftypes": _elem_types(model, needed), "names": _Names(model),
           "read": read_weight, "pending": {}, "per_channel": per_channel}
    replace, report = {}, {}
    for layer in plan.quantized:
        node = by_name[layer.node]
        step = _attention_nodes if layer.kind == "attention" else _linear_nodes
        replace[layer.node], report[layer.name] = step(layer, node, ctx)
    _splice(model, replace, ctx["names"].inits)
    return QdqGraph(model, ctx["pending"], report)


def quantize_model(model: onnx.ModelProto, precision: str, plan: Plan, act_amax: dict[str, float],
                   per_channel: bool = True) -> tuple[onnx.ModelProto, dict]:
    """In memory, for graphs that fit (tests, tiny models): a copy of `model` with Q/DQ around every planned
    layer and its weights made. `act_amax`: tensor name -> calibrated absolute range of each quantized
    layer's data input (and of both inputs of attention matmuls). Returns (model, per-layer report)."""
    inits = {i.name: i for i in model.graph.initializer}
    q = rewrite(onnx.ModelProto.FromString(model.SerializeToString()), precision, plan, act_amax,
                lambda name: numpy_helper.to_array(inits[name]), per_channel)
    for t in q.model.graph.initializer:
        if t.name in q.pending:
            t.CopyFrom(numpy_helper.from_array(q.pending[t.name](), t.name))
    return q.model, q.report


# --------------------------------------------------------------------------- lowering for TensorRT


def _low_scale(model: onnx.ModelProto, name: str, low: int, cache: dict, inits: dict) -> str:
    """A copy of scale initializer `name` in the low type (fp16 / bf16), made once."""
    if (name, low) in cache:
        return cache[(name, low)]
    arr = numpy_helper.to_array(inits[name]).astype(np.float32)
    new = f"{name}/{TensorProto.DataType.Name(low).lower()}"
    if low == TensorProto.FLOAT16:
        t = numpy_helper.from_array(arr.astype(np.float16), new)
    else:
        import ml_dtypes

        t = numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), new)
    model.graph.initializer.append(t)
    inits[new] = t
    cache[(name, low)] = new
    return new


def lower_qdq(model: onnx.ModelProto, low: str = "fp16",
              keep_fp32=DEFAULT_KEEP_FP32) -> tuple[onnx.ModelProto, dict]:
    """fp32 Q/DQ graph -> the same Q/DQ in a `low` (fp16/bf16) network; graph inputs/outputs stay fp32,
    and so do the `keep_fp32` op types."""
    words.check(low, words.LOW_TYPES, "type for the layers around the quantized ones")
    low_t = LOW_TYPES[low]
    model, report = autocast(upgrade_opset(model, 19), low, keep_fp32)  # fp16/bf16 Q/DQ need opset 19
    g = model.graph
    types = elem_types(model)
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    cache: dict = {}
    drop: set[int] = set()
    counts = {"dq_folded": 0, "q_folded": 0, "q_cast_added": 0}
    new_nodes: dict[int, list] = {}
    bypassed: list = []  # Casts (low -> fp32) that fed a Q; dropped below when nothing else reads them
    for node in g.node:
        if node.op_type == "DequantizeLinear":
            users = consumers.get(node.output[0], [])
            if node.output[0] in outputs or len(users) != 1:
                continue
            cast = users[0]
            if cast.op_type != "Cast" or next((a.i for a in cast.attribute if a.name == "to"), None) != low_t:
                continue
            node.input[1] = _low_scale(model, node.input[1], low_t, cache, inits)
            node.output[0] = cast.output[0]
            drop.add(id(cast))
            counts["dq_folded"] += 1
        elif node.op_type == "QuantizeLinear":
            src = prod.get(node.input[0])
            if src is not None and src.op_type == "Cast" and types.get(src.input[0]) == low_t:
                node.input[0] = src.input[0]
                counts["q_folded"] += 1
                bypassed.append(src)
            elif types.get(node.input[0]) != low_t:
                cast_out = f"{node.input[0]}/{low}_for_q"
                new_nodes.setdefault(id(node), []).append(
                    helper.make_node("Cast", [node.input[0]], [cast_out], to=low_t, name=f"{node.name}/cast_{low}"))
                node.input[0] = cast_out
                counts["q_cast_added"] += 1
            node.input[1] = _low_scale(model, node.input[1], low_t, cache, inits)
    still_read = {i for n in g.node for i in n.input} | outputs
    drop |= {id(c) for c in bypassed if c.output[0] not in still_read}
    out = []
    for n in g.node:
        if id(n) in drop:
            continue
        out.extend(new_nodes.get(id(n), []))
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    report = {**report, "pass": f"autocast+qdq-{low}", **counts}
    return model, report
