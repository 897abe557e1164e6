"""The HTTP server: the hosted SD3-Large img2img API (same path, fields, defaults and status codes).

    POST /v1/stable-diffusion-3-large-img2img   x-api-key header, JSON body -> image bytes
    GET  /healthz  /readyz  /metrics  /docs  /openapi.json

The request's steps are in service.py; the connection limits in protocol.py; the ASGI layer (body
size, concurrency, metrics, log, 499/503/500 answers) in middleware.py.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd3trt.runtime import images as imgs
from sd3trt.server.config import ServerConfig
from sd3trt.server.credits import db_unavailable
from sd3trt.server.middleware import Gate
from sd3trt.server.outage import StoreUnavailable
from sd3trt.server.protocol import protocol_class
from sd3trt.server.schema import ApiError, Img2ImgRequest, error_response
from sd3trt.server.service import Server

__all__ = ["PATH", "Server", "ServerConfig", "create_app", "serve"]

log = logging.getLogger("sd3trt.server")

PATH = "/v1/stable-diffusion-3-large-img2img"


def create_app(cfg: ServerConfig, pipe=None) -> FastAPI:
    """The app; ``pipe``: an Img2Img already built from ``cfg`` (its engines are loaded at start), else the
    worker builds it."""
    srv = Server(cfg, pipe)

    @asynccontextmanager
    async def lifespan(app):
        await srv.startup()
        try:
            yield
        finally:
            await srv.shutdown()

    app = FastAPI(
        title="sd3trt img2img server",
        version="1",
        description="Self-hosted Stable Diffusion 3 img2img, request-compatible with the hosted SD3-Large "
                    "img2img API. Authenticate with the `x-api-key` header.",
        lifespan=lifespan,
    )
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, e: StoreUnavailable):
        # Not a bug: the store logged the outage once; the request gets its one log line (503) from the Gate.
        err = db_unavailable(e)
        return error_response(err.status, err.code, err.message, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        msg = {404: "no such URL; the endpoint is POST " + PATH,
               405: "method not allowed; the endpoint takes POST"}.get(e.status_code, str(e.detail))
        headers = {**(getattr(e, "headers", None) or {}), **await srv.key_headers(request.headers.get("x-api-key"))}
        return error_response(e.status_code, codes.get(e.status_code, "http_error"), msg, headers=headers)

    schema = Img2ImgRequest.model_json_schema()
    image_content = {t: {"schema": {"type": "string", "format": "binary"}} for t in imgs.MEDIA_TYPES.values()}
    image_content["text/plain"] = {"schema": {"type": "string", "description": "base64 (with base64: true)"}}
    err_schema = {"application/json": {"schema": {"type": "object", "properties": {
        "error": {"type": "string"}, "code": {"type": "string"}, "status": {"type": "integer"},
        "field": {"type": "string"}}}}}

    @app.post(
        PATH,
        summary="SD3 image-to-image",
        response_class=Response,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        responses={
            200: {"description": "the generated image (x-remaining-credits, x-seed headers)", "content": image_content},
            **{s: {"description": d, "content": err_schema} for s, d in {
                400: "malformed JSON or image", 401: "missing or unknown key", 406: "not enough credits",
                413: "body or image too large", 422: "invalid field", 429: "queue full or too many requests",
                500: "server failed while processing", 503: "not ready, busy or shutting down"}.items()},
        },
    )
    async def img2img(request: Request, x_api_key: str | None = Header(None, description="your API key")):
        return await srv.img2img(request, x_api_key)

    @app.get("/healthz", summary="liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: engines loaded, accepting requests, not wedged")
    async def readyz():
        why = await srv.readiness()
        if why is None:
            return {"status": "ready", "queue_depth": srv.worker.depth()}
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = {PATH, "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}
    app.add_middleware(Gate, limit=cfg.body_limit(), concurrency=cfg.limit_concurrency, metrics=srv.metrics,
                       routes=routes, hooks=srv)
    return app


def serve(cfg: ServerConfig, log_level: str = "info", pipe=None) -> bool:
    """Run the server until SIGINT/SIGTERM. Returns whether it started.

    Shutdown: stop listening, answer new requests on open connections with 503, cut running URL
    fetches, let the worker finish queued work for up to ``graceful_timeout_s``, then answer what is
    still queued with 503 (refunded); the request being generated may finish for ``inflight_grace_s``
    more, after which its handler is cancelled, refunds, and answers 503 too.
    """
    import uvicorn

    app = create_app(cfg, pipe)
    srv: Server = app.state.server

    class _Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for listener in self.servers:  # stop accepting connections first
                listener.close()
            await srv.drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=cfg.inflight_grace_s, server_header=False,
                            limit_concurrency=None,  # the app limits requests (probes exempt), protocol.py connections
                            timeout_keep_alive=5, http=protocol_class(cfg.conn, srv.metrics.inc))
    server = _Uvicorn(config)
    server.run()
    return server.started
