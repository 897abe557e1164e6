"""ONNX Runtime telemetry off: the runtime (and a self-hosted, possibly air-gapped server) resolves no host
name of its own.

Measured with ONNX Runtime 1.32 on Linux, in a network namespace: about 10 s after the first session
is created, its native 1DS telemetry looks up ``mobile.events.data.microsoft.com`` (DNS queries from
native threads), and ``onnxruntime.disable_telemetry_events()`` does not stop it. The environment
variable ``ORT_DISABLE_TELEMETRY=1`` does (and ONNX Runtime then no longer opens its offline event
store under ~/.cache/Microsoft/DeveloperTools), but only when it is set before onnxruntime is imported; so
importing ``sd3trt.runtime`` sets it (a user's own value wins), and every session the runtime opens
(runtime/ort_session.py) also calls ``disable_telemetry_events()`` first.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "ORT_DISABLE_TELEMETRY"
_too_late = False


def disable_before_import() -> None:
    global _too_late
    if ENV not in os.environ:
        _too_late = "onnxruntime" in sys.modules
        os.environ[ENV] = "1"


@functools.cache
def disable_events() -> None:
    """The API switch too (it covers event logging the variable may not), and a warning when too late."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.disable_telemetry_events()
    if _too_late:
        log.warning("onnxruntime was imported before sd3trt.runtime, so its telemetry may still look up a host; "
                    "set %s=1 in the environment that starts the program", ENV)
