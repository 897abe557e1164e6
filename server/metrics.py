"""The server's Prometheus metrics (prometheus_client, one registry per server).

Every label value comes from a fixed set, so no request can grow the output: methods outside
``METHODS`` are counted as ``other`` (routes are mapped the same way by the caller).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HELPS = {
    "images_generated": "Images generated and returned.",
    "credits_debited": "Credits charged for delivered images.",
    "credits_refunded": "Credits given back after a failed or abandoned request.",
    "inference_failures": "Generations that raised an error.",
    "connections_refused": "Connections closed at once: over the per-address or total connection cap.",
    "request_timeouts": "Connections closed because the request headers or body arrived too slowly.",
    "clients_gone": "Requests whose client disconnected before the answer (cancelled, refunded).",
}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("sd3trt_http_requests", "HTTP requests by method, route and status.",
                                 ("method", "route", "status"), registry=r)
        self._latency = Histogram("sd3trt_http_request_duration_seconds", "HTTP request latency.",
                                  ("method", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self._counters = {name: Counter(f"sd3trt_{name}", help_, registry=r) for name, help_ in HELPS.items()}
        self._inference = Histogram("sd3trt_inference_seconds", "Time per generation in the worker (encode included).",
                                    buckets=LATENCY_BUCKETS, registry=r)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        status = status if 100 <= status <= 599 else 500
        self._requests.labels(method, route, str(status)).inc()
        self._latency.labels(method, route).observe(seconds)

    def inc(self, name: str, n: int = 1) -> None:
        self._counters[name].inc(n)

    def observe_inference(self, seconds: float) -> None:
        self._inference.observe(seconds)

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        Gauge(f"sd3trt_{name}", help_, registry=self.registry).set_function(fn)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def counter(self, name: str) -> float:
        (family,) = self._counters[name].collect()
        return next(s.value for s in family.samples if s.name.endswith("_total"))

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Requests answered so far, by (method, route, status)."""
        (family,) = self._requests.collect()
        return {(s.labels["method"], s.labels["route"], s.labels["status"]): int(s.value)
                for s in family.samples if s.name.endswith("_total")}
