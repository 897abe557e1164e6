"""The ASGI layer around the app: body size, request concurrency (probes exempt), metrics, one log
line per request, and the answers no route gives: a generic 500 (JSON, with the credit header when
the key is known), 499 for a client that left, 503 for a request cancelled by shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from starlette.requests import ClientDisconnect

from sd3trt.server.metrics import Metrics
from sd3trt.server.schema import error_response

log = logging.getLogger("sd3trt.server")

PROBES = ("/healthz", "/readyz", "/metrics")  # never limited; logged at debug level (orchestrators poll them)
CLIENT_GONE = 499  # nginx's status for "the client closed the connection before the answer"


class BodyTooLarge(Exception):
    pass


class Gate:
    """Pure ASGI middleware. ``hooks`` is the app's side: ``stopping()``, ``credit_headers(state)`` (async),
    ``finished(state)`` (releases what the request held)."""

    def __init__(self, app, limit: int, concurrency: int, metrics: Metrics, routes: set[str], hooks):
        self.app, self.limit, self.concurrency, self.metrics, self.routes = app, limit, concurrency, metrics, routes
        self.hooks = hooks
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        state = scope.setdefault("state", {})
        sent = {"status": None}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                state["answered"] = True
            await send(message)

        async def answer(response):
            if sent["status"] is None:
                await response(scope, receive, send_wrapper)

        counted = route not in PROBES
        try:
            if counted and self.active >= self.concurrency:
                counted = False
                return await answer(error_response(503, "busy", f"the server is handling {self.concurrency} "
                                                   "requests, its limit; retry shortly", headers={"Retry-After": "2"}))
            if counted:
                self.active += 1
            refusal = self._length_refusal(scope)
            if refusal is not None:
                return await answer(refusal)
            await self.app(scope, self._limited(receive), send_wrapper)
        except asyncio.CancelledError:
            if state.get("client_gone") or state.get("timed_out"):
                return  # nobody to answer; logged below
            if not self.hooks.stopping():
                raise
            await self._answer_quietly(answer, error_response(
                503, "shutting_down", "the server shut down before this request finished; no credits were taken, "
                "retry later", headers={"Retry-After": "5", **await self._credit_headers(state)}))
        except ClientDisconnect:
            state["client_gone"] = True
        except Exception as e:  # noqa: BLE001 - a bug: one JSON 500 and one logged traceback, never a crash
            log.error("unhandled %s in %s %s rid=%s: %s", type(e).__name__, scope.get("method"), route,
                      state.get("request_id", "-"), str(e)[:300], exc_info=e)
            await self._answer_quietly(answer, error_response(
                500, "internal_error", "the server failed while processing the request; retry, and report it if "
                "it persists", headers=await self._credit_headers(state)))
        finally:
            if counted:
                self.active -= 1
            self.hooks.finished(state)
            status = sent["status"] or 500
            if state.get("timed_out"):
                status = 408
            elif state.get("client_gone"):
                status = CLIENT_GONE
            dt = time.perf_counter() - t0
            self.metrics.request(scope.get("method", "?"), route, status, dt)
            log.log(logging.DEBUG if route in PROBES else logging.INFO, "%s %s %s %.3fs rid=%s key=%s",
                    scope.get("method", "?")[:16], route if route != "other" else "-", status, dt,
                    state.get("request_id", "-"), state.get("key_id", "-"))

    def _length_refusal(self, scope):
        length = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = -1
        if length is not None and length < 0:
            return error_response(400, "bad_request", "the Content-Length header is invalid; send the body's "
                                  "size in bytes")
        if length is not None and length > self.limit:
            return error_response(413, "body_too_large", f"the request body is larger than {self.limit} bytes; "
                                  "send a smaller image")
        return None

    def _limited(self, receive) -> Callable[[], Awaitable[dict]]:
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message
        return limited_receive

    async def _credit_headers(self, state) -> dict[str, str]:
        try:
            return await asyncio.wait_for(self.hooks.credit_headers(state), 5)
        except Exception:  # noqa: BLE001 - the answer goes out without the header rather than not at all
            return {"x-request-id": state["request_id"]} if "request_id" in state else {}

    @staticmethod
    async def _answer_quietly(answer, response) -> None:
        try:
            await answer(response)
        except Exception:  # noqa: BLE001 - the connection is gone; nothing more to do
            pass
