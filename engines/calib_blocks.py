"""The transformer (and T5) cut into per-block graphs, for calibration whose working set is one block.

    parts = cut(model)                       # [embeddings + block 0, block 1, ..., last block + output]
    for part in parts: part.inputs, part.outputs, part.nodes

A node belongs to the block its exporter name names (`/transformer/transformer_blocks.7/...`, T5's
`/model/encoder/block.7/...`); a node without one (embeddings, the final norm and projection, shape
arithmetic) to the latest part among the parts that produce its inputs, so it runs as soon as its inputs
exist. Nodes that read no graph input
(constant folding the exporter left) are copied into every part that reads them rather than passed
between parts. A part's inputs are the tensors it reads that earlier parts (or the graph's inputs)
produce; its outputs, the tensors later parts read, and the graph's outputs.

Between parts, every calibration sample's tensors go through a directory (one .npy per tensor and
sample, memory-mapped when read back; `Spill`), and a tensor's files are deleted once no later part reads
it: memory holds one part's graph and one sample's activations.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BLOCK = re.compile(r"(?:^|/)(?:transformer_blocks|encoder/block)\.(\d+)/")
# The components run in parts when calibration runs block by block: each alone is larger than the others together.
PARTED = ("transformer", "t5")


@dataclass
class Part:
    index: int
    nodes: list = field(default_factory=list)  # onnx.NodeProto, in graph order (constants copied in)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    reads: set = field(default_factory=set)  # every tensor its nodes read


def _block(node) -> int | None:
    m = BLOCK.search(node.name)
    return int(m.group(1)) if m else None


def cut(model) -> list[Part]:
    """The graph's parts in execution order (one part when it has no transformer blocks)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    graph_inputs = [i.name for i in g.input if i.name not in inits]
    blocks = sorted({b for n in g.node if (b := _block(n)) is not None})
    rank = {b: i for i, b in enumerate(blocks)}
    owner: dict[str, int] = {}  # tensor -> part that produces it (-1: a graph input)
    static: dict[str, object] = {}  # tensor -> the node computing it from constants only
    for name in graph_inputs:
        owner[name] = -1
    assign = []
    for node in g.node:
        dyn = [owner[i] for i in node.input if i and i in owner]
        if not dyn and all(not i or i in inits or i in static for i in node.input):
            for o in node.output:
                static[o] = node
            assign.append(None)
            continue
        part = max([max(dyn, default=0), rank.get(_block(node), 0)])
        for o in node.output:
            owner[o] = part
        assign.append(part)
    parts = [Part(i) for i in range(max(len(blocks), 1))]
    for node, part in zip(g.node, assign):
        if part is not None:
            parts[part].nodes.append(node)
    for p in parts:
        p.nodes = _with_constants(p.nodes, static, g.node)
        p.reads = {i for n in p.nodes for i in n.input if i}
        made = {o for n in p.nodes for o in n.output}
        p.inputs = sorted({t for t in p.reads if t in owner and owner[t] < p.index and t not in made})
    graph_outputs = {o.name for o in g.output}
    for p in parts:
        later = set().union(*(q.reads for q in parts[p.index + 1:])) if p.index + 1 < len(parts) else set()
        made = [o for n in p.nodes for o in n.output if owner.get(o) == p.index]
        p.outputs = [o for o in dict.fromkeys(made) if o in later or o in graph_outputs]
    return parts


def _with_constants(nodes: list, static: dict, order) -> list:
    """`nodes` plus the constant-only nodes they read (transitively), in the graph's order."""
    need, todo = set(), [i for n in nodes for i in n.input if i in static]
    while todo:
        node = static[todo.pop()]
        if id(node) in need:
            continue
        need.add(id(node))
        todo += [i for i in node.input if i in static]
    keep = need | {id(n) for n in nodes}
    return [n for n in order if id(n) in keep]


def part_model(model, part: Part, taps_out: list, extra_nodes: list, input_dims: dict, types: dict | None = None):
    """An onnx.ModelProto of `part`: its inputs (dims as the samples show them), its outputs, and the
    measurement nodes and outputs the caller adds. Initializers are shared with the source (external data
    resolves beside it). types: mixed_precision.elem_types(model), when the caller cuts more than one part."""
    import onnx
    from onnx import helper

    from sd3trt.engines.mixed_precision import elem_types

    g = model.graph
    types = types or elem_types(model)
    reads = part.reads | {i for n in extra_nodes for i in n.input}
    sub = helper.make_graph(
        list(part.nodes) + list(extra_nodes), f"part{part.index}",
        [helper.make_tensor_value_info(t, types[t], input_dims[t]) for t in part.inputs],
        [helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None) for t in part.outputs]
        + [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in taps_out],
        [i for i in g.initializer if i.name in reads],
    )
    out = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    return out


class Spill:
    """Per-sample tensors between parts, on disk: put(sample, name, array), get(sample, name), drop(name)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.names: dict[str, str] = {}

    def _path(self, sample: int, name: str) -> Path:
        key = self.names.setdefault(name, f"t{len(self.names)}")
        return self.root / f"{key}-{sample}.npy"

    def put(self, sample: int, name: str, value: np.ndarray) -> None:
        np.save(self._path(sample, name), np.ascontiguousarray(value))

    def get(self, sample: int, name: str) -> np.ndarray:
        return np.load(self._path(sample, name), mmap_mode="r")

    def drop(self, name: str) -> None:
        key = self.names.get(name)
        if key:
            for f in self.root.glob(f"{key}-*.npy"):
                f.unlink()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _later_reads(parts: list[Part], index: int) -> set:
    return set().union(*(q.reads for q in parts[index + 1:])) if index + 1 < len(parts) else set()


class PartsRunner:
    """A transformer (or T5) runner that runs the graph one part at a time, each part's graph loaded for the
    call and freed after it: memory holds one block's weights and one call's activations, at the cost of
    loading every part every call. For recording and gating a model too large to hold whole (`blocks`)."""

    def __init__(self, name: str, entry: dict, path: Path, backend):
        import onnx

        from sd3trt.engines.mixed_precision import elem_types
        from sd3trt.runtime.runners import Runner

        self._check = Runner(name, entry)  # the manifest's input checks, as every runner does them
        self.name, self.outputs = name, self._check.outputs
        self.path, self.backend = Path(path), backend
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.parts = cut(self.model)
        self.types = elem_types(self.model)
        self._needed = [_later_reads(self.parts, p.index) | set(self.outputs) for p in self.parts]

    def run(self, feeds: dict) -> dict:
        self._check.check(feeds)
        values = dict(feeds)
        for part, needed in zip(self.parts, self._needed):
            dims = {n: list(np.shape(values[n])) for n in part.inputs}
            run = self.backend.open(part_model(self.model, part, [], [], dims, self.types), self.path.parent,
                                    part.outputs, what="part")
            values.update(zip(part.outputs, run({n: values[n] for n in part.inputs})))
            del run
            values = {n: v for n, v in values.items() if n in needed}
        return {o: values[o] for o in self.outputs}

    def close(self) -> None:
        self.model = None
