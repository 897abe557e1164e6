"""One inference worker (a thread owning one pipeline) per accelerator, fed by a bounded queue.

Jobs run one at a time, in arrival order, never batched: batching gained nothing measurable at real
model sizes while making each request wait for the whole batch (figures and how to re-measure them:
"No batching" in server/README.md).

The worker never touches credits: it hands each result (or exception) back to the request's event
loop, and the request handler commits or refunds its own debit. A job whose request was cancelled is
skipped if still queued, and stopped at its next denoising step if running (``Job.check``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("sd3trt.server")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


class JobCancelled(Exception):
    """Raised inside a generation whose request was cancelled (its client left): it stops at the next step."""


@dataclass
class Job:
    plan: Any  # the pipeline's Plan of the request (checked, with its seed and noise)
    output_format: str
    request_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def check(self) -> None:
        """Called between denoising steps: stop the work of a request nobody waits for any more."""
        if self.cancelled:
            raise JobCancelled()


@dataclass
class Output:
    data: bytes
    media_type: str
    seconds: float
    warnings: list[str]


class Worker:
    """``make_pipe()`` builds the pipeline (in the worker thread); ``render(pipe, job)`` -> Output."""

    def __init__(self, make_pipe: Callable[[], Any], render: Callable[[Any, Job], Output], queue_size: int,
                 on_done: Callable[[float], None] | None = None, name: str = "worker-0"):
        self.make_pipe = make_pipe
        self.render = render
        self.queue_size = queue_size
        self.on_done = on_done
        self.name = name
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._stop = False
        self.ready = threading.Event()  # the engines are loaded
        self.loaded = threading.Event()  # loading has ended, either way (load_error says how)
        self.load_error: str | None = None
        self._thread = threading.Thread(target=self._main, name=f"sd3trt-{name}", daemon=True)

    # -- the request side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return len(self._jobs)

    def busy(self) -> int:
        return self._busy

    def full(self) -> bool:
        return len(self._jobs) >= self.queue_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def accepting(self) -> bool:
        return not self._closed and self.ready.is_set() and self.load_error is None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Draining()
            if len(self._jobs) >= self.queue_size:
                raise QueueFull()
            self._jobs.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Stop accepting jobs (queued ones still run)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stop(self, timeout: float) -> list[Job]:
        """Close, let queued jobs finish for up to ``timeout`` s, then fail the rest (their handlers refund)."""
        self.close()
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._jobs or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            left = list(self._jobs)
            self._jobs.clear()
            self._stop = True
            self._cond.notify_all()
        for job in left:
            self._resolve(job, exc=Draining())
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()) + 1)
        return left

    # -- the worker thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.pipe = self.make_pipe()
        except BaseException as e:  # noqa: BLE001 - reported by /readyz and the start-up log
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("%s: loading the engines failed: %s", self.name, self.load_error)
            with self._cond:
                self._closed = True
                left = list(self._jobs)
                self._jobs.clear()
            for job in left:
                self._resolve(job, exc=Draining())
            self.loaded.set()
            return
        self.ready.set()
        self.loaded.set()
        log.info("%s: engines loaded", self.name)
        try:
            self._serve_jobs()
        finally:  # engines are released by the thread that used them (TensorRT saves its runtime cache)
            close = getattr(self.pipe, "close", None)
            if close is not None:
                close()

    def _serve_jobs(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop and not self._jobs:
                    return
                job = self._jobs.popleft()
                if job.cancelled:
                    self._cond.notify_all()
                    continue
                self._busy += 1
            try:
                t0 = time.perf_counter()
                try:
                    out = self.render(self.pipe, job)
                except BaseException as e:  # noqa: BLE001 - the handler maps it to a status and refunds
                    self._resolve(job, exc=e)
                else:
                    self._resolve(job, result=out)
                if self.on_done:
                    self.on_done(time.perf_counter() - t0)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    @staticmethod
    def _resolve(job: Job, result: Any = None, exc: BaseException | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
