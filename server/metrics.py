"""A few Prometheus metrics in the text exposition format (no client library needed).

Every label value comes from a fixed set, so no request can grow the output: methods outside
``METHODS`` are counted as ``other`` (routes are mapped the same way by the caller).
"""

from __future__ import annotations

import threading
from typing import Callable

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    esc = (lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(d.items())) + "}"


HELPS = {
    "images_generated": "Images generated and returned.",
    "credits_debited": "Credits charged for delivered images.",
    "credits_refunded": "Credits given back after a failed or abandoned request.",
    "inference_failures": "Generations that raised an error.",
    "connections_refused": "Connections closed at once: over the per-address or total connection cap.",
    "request_timeouts": "Connections closed because the request headers or body arrived too slowly.",
    "clients_gone": "Requests whose client disconnected before the answer (cancelled, refunded).",
}


class _Histogram:
    def __init__(self, buckets: tuple):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.latency: dict[tuple, _Histogram] = {}
        self.counters = {name: 0 for name in HELPS}
        self.inference = _Histogram(LATENCY_BUCKETS)
        self.gauges: dict[str, Callable[[], float]] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        status = status if 100 <= status <= 599 else 500
        with self._lock:
            k = (method, route, str(status))
            self.requests[k] = self.requests.get(k, 0) + 1
            h = self.latency.setdefault((method, route), _Histogram(LATENCY_BUCKETS))
            h.observe(seconds)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def observe_inference(self, seconds: float) -> None:
        with self._lock:
            self.inference.observe(seconds)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP sd3trt_http_requests_total HTTP requests by method, route and status.",
                    "# TYPE sd3trt_http_requests_total counter"]
            for (m, r, s), n in sorted(self.requests.items()):
                out.append(f"sd3trt_http_requests_total{_labels({'method': m, 'route': r, 'status': s})} {n}")
            out += ["# HELP sd3trt_http_request_duration_seconds HTTP request latency.",
                    "# TYPE sd3trt_http_request_duration_seconds histogram"]
            for (m, r), h in sorted(self.latency.items()):
                out += self._hist("sd3trt_http_request_duration_seconds", h, {"method": m, "route": r})
            for name, v in self.counters.items():
                out += [f"# HELP sd3trt_{name}_total {HELPS[name]}", f"# TYPE sd3trt_{name}_total counter",
                        f"sd3trt_{name}_total {v}"]
            out += ["# HELP sd3trt_inference_seconds Time per generation in the worker (encode included).",
                    "# TYPE sd3trt_inference_seconds histogram"]
            out += self._hist("sd3trt_inference_seconds", self.inference, {})
        for name, (help_, fn) in sorted(self.gauges.items()):
            out += [f"# HELP sd3trt_{name} {help_}", f"# TYPE sd3trt_{name} gauge", f"sd3trt_{name} {fn()}"]
        return "\n".join(out) + "\n"

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_, fn)

    @staticmethod
    def _hist(name: str, h: _Histogram, labels: dict) -> list[str]:
        lines = []
        for b, c in zip(h.buckets, h.counts):
            lines.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(b))})} {c}")
        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
        lines.append(f"{name}_sum{_labels(labels)} {h.sum}")
        lines.append(f"{name}_count{_labels(labels)} {h.count}")
        return lines
