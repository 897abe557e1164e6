"""A CUDA graph of one TensorRT execution context's enqueue, kept for the input shapes it was captured at.

TensorRT's rules (developer guide, "CUDA Graphs"): after input shapes change, enqueue once without
capture before capturing; a graph replays the shapes (and addresses) it was captured with; when a
capture fails, the context still runs without graphs. So, per context:

    run at the captured shapes   -> launch the graph
    run at other shapes          -> drop the graph, enqueue once (this run's result), capture for next time
    a capture failed once        -> plain enqueue from then on (logged once)

Capture always ends in `finally`, so an error inside it never leaves the stream capturing.
"""

from __future__ import annotations

import logging
from typing import Callable

from sd3trt.runtime.cuda import error_name

log = logging.getLogger(__name__)


class CudaGraph:
    def __init__(self, cuda, ctx, name: str):
        self.cuda, self.ctx, self.name = cuda, ctx, name
        self.exec = None  # the instantiated graph (cudaGraphExec_t)
        self.shapes = None  # the input shapes it was captured at
        self.failed = False  # a capture failed: run without graphs from now on

    def run(self, shapes, enqueue: Callable[[], None]) -> None:
        """Run once at `shapes` (hashable); `enqueue` queues the context's work on the stream or raises."""
        cuda = self.cuda
        if self.exec is not None and shapes == self.shapes:
            cuda.check(cuda.rt.cudaGraphLaunch(self.exec, cuda.stream), "cudaGraphLaunch")
            return
        self.drop()
        enqueue()  # the run itself, and the enqueue TensorRT needs after a shape change
        if not self.failed:
            self._capture(shapes, enqueue)

    def _capture(self, shapes, enqueue: Callable[[], None]) -> None:
        cuda, rt = self.cuda, self.cuda.rt
        cuda.sync()
        if hasattr(self.ctx, "is_stream_capturable") and not self.ctx.is_stream_capturable(cuda.stream_handle):
            self._give_up("TensorRT reports the context cannot be captured")
            return
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda.check(rt.cudaStreamBeginCapture(cuda.stream, mode), "cudaStreamBeginCapture")
        why = None
        try:
            enqueue()
        except Exception as e:  # an Sd3trtError from a refused enqueue, or TensorRT's own
            why = str(e)
        finally:
            err, graph = rt.cudaStreamEndCapture(cuda.stream)  # always leave capture mode
        if int(err) != 0:
            why = why or f"cudaStreamEndCapture: {error_name(rt, err)}"
        if why is None:
            err, exe = rt.cudaGraphInstantiate(graph, 0)
            if int(err) == 0:
                self.exec, self.shapes = exe, shapes
            else:
                why = f"cudaGraphInstantiate: {error_name(rt, err)}"
        if graph is not None:
            rt.cudaGraphDestroy(graph)
        if why is not None:
            rt.cudaGetLastError()  # a failed capture leaves a (non-sticky) error behind; clear it
            self._give_up(why)

    def _give_up(self, why: str) -> None:
        self.failed = True
        log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.name, why[:300])

    def drop(self) -> None:
        if self.exec is not None:
            self.cuda.rt.cudaGraphExecDestroy(self.exec)
        self.exec, self.shapes = None, None
