"""Writing a Q/DQ graph to disk one initializer at a time: peak memory is the largest weight, never the model.

    files = write_qdq(qdq, source_dir, Path(tmp) / "transformer.int8.onnx", external=True)   # graph + .data

`qdq` is a qdq_graph.QdqGraph over a graph loaded without its external data. Streamed, each initializer is
written to `<name>.data` in graph order: a weight of the source graph is copied byte for byte from the
source's external data (or its inline bytes), a new quantized weight is made by its pending job just
before it is written and dropped after. Tensors are page-aligned (consumers may mmap them); the ones under
INLINE_BELOW bytes (scales, zero points, shape constants) stay inside the graph. The graph itself (no
weights) is saved last and checked with onnx.checker on the path, which reads no weight data.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

INLINE_BELOW = 1024  # bytes
ALIGN = 4096


def _external(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def source_bytes(t: onnx.TensorProto, source_dir: Path, handles: dict) -> bytes:
    info = _external(t)
    f = handles.get(info["location"])
    if f is None:
        f = handles[info["location"]] = open(source_dir / info["location"], "rb")
    f.seek(int(info.get("offset", 0)))
    return f.read(int(info["length"])) if "length" in info else f.read()


def point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value


def write_qdq(qdq, source_dir: Path, dest: Path, external: bool) -> list[Path]:
    """Write `qdq.model` to `dest`, streamed to external data when `external` (a graph near or past ONNX's
    2 GB protobuf limit), else in one file (a small graph: its weights are made in memory); returns the
    files written."""
    if external:
        return write_streaming(qdq, source_dir, dest)
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(qdq.model, str(source_dir))
    for t in qdq.model.graph.initializer:
        if t.name in qdq.pending:
            t.CopyFrom(numpy_helper.from_array(qdq.pending.pop(t.name)(), t.name))
    onnx.save_model(qdq.model, str(dest))
    onnx.checker.check_model(str(dest))
    return [Path(dest)]


def write_streaming(qdq, source_dir: Path, dest: Path) -> list[Path]:
    """Write `qdq.model` to `dest` with its weights in `dest.name + ".data"`; returns both paths."""
    dest = Path(dest)
    data_name = dest.name + ".data"
    handles: dict = {}
    try:
        with open(dest.parent / data_name, "wb") as out:
            for t in qdq.model.graph.initializer:
                if t.name in qdq.pending:
                    raw = numpy_helper.from_array(qdq.pending.pop(t.name)(), t.name).raw_data
                elif uses_external_data(t):
                    raw = source_bytes(t, Path(source_dir), handles)
                elif t.HasField("raw_data"):
                    raw = t.raw_data
                else:
                    continue  # typed fields (small constants written by the exporter): stay inline
                if len(raw) < INLINE_BELOW:
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = raw
                    continue
                out.write(b"\0" * ((-out.tell()) % ALIGN))
                offset = out.tell()
                out.write(raw)
                point_to(t, data_name, offset, len(raw))
                del raw
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    if qdq.pending:
        raise RuntimeError(f"{len(qdq.pending)} quantized weights were never written (e.g. {next(iter(qdq.pending))})")
    onnx.save_model(qdq.model, str(dest))
    onnx.checker.check_model(str(dest))
    return [dest, dest.parent / data_name]


def weight_reader(model: onnx.ModelProto, source_dir: Path):
    """`read(name)` -> the float32 value of source initializer `name`, read from disk when it is external.
    Takes the initializers' descriptions now: the pass drops the float weights it replaces from the graph."""
    import numpy as np
    from onnx.external_data_helper import load_external_data_for_tensor

    described = {t.name: t for t in model.graph.initializer}

    def read(name: str):
        t = described[name]
        if uses_external_data(t):
            t = onnx.TensorProto.FromString(t.SerializeToString())
            load_external_data_for_tensor(t, str(source_dir))
        return np.asarray(numpy_helper.to_array(t), np.float32)

    return read
