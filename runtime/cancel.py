"""Stopping a run from another thread.

    token = Cancel()
    threading.Timer(2.0, token.cancel).start()
    try:
        pipe(image, "a cat", cancel=token)
    except Cancelled:
        ...

A run checks its token before each stage and before each denoising step, so it stops within one step
of cancel(). Any object with an is_set() method (threading.Event) serves as a token too.

Cancelled is not an Sd3trtError: nothing was wrong with the request, and a host that maps Sd3trtError
to "bad request" must not report a cancel as one.
"""

from __future__ import annotations

import threading

from sd3trt.errors import Sd3trtError


class Cancelled(Exception):
    """The run was cancelled through its token before it finished."""


class Cancel:
    """A cancellation token: cancel() from any thread; is_set() says whether it was."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def check_token(token) -> None:
    if token is not None and not callable(getattr(token, "is_set", None)):
        raise Sd3trtError(f"cancel must be an sd3trt Cancel or a threading.Event, got {type(token).__name__}")


def stop_if_cancelled(token, where: str) -> None:
    if token is not None and token.is_set():
        raise Cancelled(f"cancelled {where}")
