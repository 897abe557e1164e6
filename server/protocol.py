"""uvicorn's h11 protocol with the connection limits a public server needs.

uvicorn 0.54 has a keep-alive timeout but no header or body timeout, and its ``limit_concurrency``
counts idle connections, so connections that send nothing starve every request, probes included.
This protocol adds, per connection:

  * a header timeout: the request line and headers must arrive within ``header_timeout_s`` of the
    connection opening (or of the previous response), however they are dripped; else 408 and close
    (an idle keep-alive connection, with no byte of a next request, is closed without a 408);
  * a body timeout: the whole body within ``body_timeout_s`` of the headers; else 408 and close;
  * caps on open connections, in total and per client address: a connection over either is answered
    at once (503 / 429) and closed, before it can hold anything.

Request concurrency is limited by the app (probes excluded), not here.

The hooks (``connection_made``, ``handle_events``, ``on_response_complete``, ``connection_lost``) and
the state they read (``cycle``, ``conn``, ``server_state``) are uvicorn's private API: pyproject.toml
pins uvicorn to the releases tested, and a unit test runs a real uvicorn protocol and fails when any
hook is not called.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sd3trt.server.config import ConnLimits

log = logging.getLogger("sd3trt.server")


def raw_response(status: int, reason: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Throttled:
    """A warning logged at most once per ``every_s`` seconds, with how many were suppressed."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.suppressed = every_s, 0.0, 0

    def warn(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last such line)" if self.suppressed else ""
        log.warning(msg + more, *args)
        self.last, self.suppressed = now, 0


def protocol_class(limits: ConnLimits, count: Callable[[str], None] = lambda name: None) -> type:
    """An H11Protocol subclass enforcing ``limits``; ``count(name)`` is told of each refusal/timeout."""
    refused_log, timeout_log = _Throttled(), _Throttled()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer = None
            per_client = self.server_state.__dict__.setdefault("per_client", {})
            self._peer = self.client[0] if self.client else "?"
            per_client[self._peer] = per_client.get(self._peer, 0) + 1
            if len(self.connections) > limits.max_connections:
                self._refuse(503, "Service Unavailable", f"the server has {limits.max_connections} connections "
                             "open, its limit; retry shortly")
            elif limits.max_per_client and per_client[self._peer] > limits.max_per_client:
                self._refuse(429, "Too Many Requests", f"more than {limits.max_per_client} connections from "
                             "your address; close idle ones and retry")
            else:
                self._arm(limits.header_timeout_s, self._header_timeout)

        def connection_lost(self, exc) -> None:
            self._disarm()
            per_client = self.server_state.__dict__.get("per_client", {})
            n = per_client.get(self._peer, 1) - 1
            if n > 0:
                per_client[self._peer] = n
            else:
                per_client.pop(self._peer, None)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before and self.cycle is not None:  # a request's headers arrived
                self._disarm()
                if self.conn.their_state is h11.SEND_BODY:
                    self._arm(limits.body_timeout_s, self._body_timeout)

        def on_response_complete(self) -> None:
            if self.conn.their_state is not h11.SEND_BODY:  # else the body timer still runs
                self._arm(limits.header_timeout_s, self._header_timeout)  # the next request's headers
            super().on_response_complete()

        # -- timers ----------------------------------------------------------------------------
        def _arm(self, seconds: float, fn) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, fn)

        def _disarm(self) -> None:
            if getattr(self, "_timer", None) is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timeout(self) -> None:
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.cycle is not None and not self.conn.trailing_data[0]:
                self.transport.close()  # an idle keep-alive connection: closed quietly, as uvicorn does
                return
            self._timed_out(f"the request headers did not arrive within {limits.header_timeout_s:g} s")

        def _body_timeout(self) -> None:
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self._timed_out(f"the request body did not arrive within {limits.body_timeout_s:g} s")

        def _timed_out(self, why: str) -> None:
            count("request_timeouts")
            timeout_log.warn("%s:%s: %s; connection closed", self._peer, self.client[1] if self.client else "?", why)
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                if cycle is not None and not cycle.response_complete:  # the app is reading the body
                    cycle.scope["state"]["timed_out"] = True
                    cycle.disconnected = True
                    cycle.message_event.set()
                self.transport.write(raw_response(408, "Request Timeout", why + "; send requests faster"))
            self.transport.close()

        def _refuse(self, status: int, reason: str, why: str) -> None:
            count("connections_refused")
            refused_log.warn("refused a connection from %s: %s", self._peer, why)
            self.transport.write(raw_response(status, reason, why))
            self.transport.close()

    return GuardedH11Protocol
