"""The HTTP server: the hosted SD3-Large img2img API (same path, fields, defaults and status codes).

    POST /v1/stable-diffusion-3-large-img2img   x-api-key header, JSON body -> image bytes
    GET  /healthz  /readyz  /metrics  /docs  /openapi.json

A request is checked in this order, and nothing is charged until every check has passed:
body size (413) -> key (401) -> ready (503) -> JSON and fields (400/422) -> image: base64 or URL,
format, pixels (400/413) -> queue room (429) -> debit (406) -> queue -> generate (500 refunds).
"""

from __future__ import annotations

import asyncio
import base64 as b64
import json
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import images as imgs
from sd3trt.runtime import scheduler as sch
from sd3trt.runtime.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, Img2Img
from sd3trt.server import inputs
from sd3trt.server.fetch import FetchError, FetchPolicy, fetch
from sd3trt.server.keystore import InsufficientCredits, KeyStore
from sd3trt.server.metrics import Metrics
from sd3trt.server.worker import Draining, Job, Output, QueueFull, Worker

log = logging.getLogger("sd3trt.server")

PATH = "/v1/stable-diffusion-3-large-img2img"
PROBES = ("/healthz", "/readyz", "/metrics")  # logged at debug level: orchestrators poll them
MAX_SEED = 2**63 - 1


class Img2ImgRequest(BaseModel):
    """The hosted API's fields and defaults, plus seed, num_inference_steps and guidance_scale."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["image-to-image"] = Field("image-to-image", description="the only mode of this endpoint")
    image: str = Field(..., min_length=1, description="base64 of a PNG/JPEG/WEBP file, or an http(s) URL")
    prompt: str = Field(..., description="what to render")
    negative_prompt: str = Field("", description="what to steer away from")
    strength: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False,
                            description="0 keeps the input, 1 ignores it almost entirely")
    output_format: str = Field("jpeg", description="encoding of the result (jpg is accepted for jpeg)",
                               json_schema_extra={"enum": list(imgs.OUTPUT_FORMATS)})
    base64: bool = Field(False, description="return the encoded image as base64 text instead of raw bytes")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted; echoed in x-seed")
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, description="denoising schedule length")
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=0.0, le=30.0, allow_inf_nan=False,
                                  description="classifier-free guidance; <= 1 turns it off")

    @field_validator("output_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        try:
            return imgs.normalize_format(v)
        except Sd3trtError as e:
            raise ValueError(str(e)) from None


@dataclass
class ServerConfig:
    bundle: Path | None
    db: Path
    backend: str = "onnxruntime"
    engine_build: str | None = None  # tensorrt backend: which `sd3trt build` output
    host: str = "127.0.0.1"
    port: int = 8000
    low_memory: bool = False
    threads: int = 0
    credits_per_image: int = 1
    queue_size: int = 16
    max_image_bytes: int = 10 * 1024 * 1024
    max_body_bytes: int | None = None  # default: base64 of max_image_bytes + 64 KiB
    max_pixels: int = 16_777_216  # 4096 x 4096
    max_prompt_chars: int = 2000
    max_steps: int = 150
    input_formats: tuple[str, ...] = inputs.DEFAULT_INPUT_FORMATS
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    graceful_timeout_s: float = 60.0  # after SIGTERM: how long the queue keeps being worked through
    inflight_grace_s: float = 30.0  # then: how long the request being generated may still finish
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0

    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 4 * math.ceil(self.max_image_bytes / 3) + 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "code": code, "status": status}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def queue_full() -> ApiError:
    return ApiError(429, "queue_full", "the server is busy (queue full); retry shortly", headers={"Retry-After": "2"})


def shutting_down(what: str) -> ApiError:
    return ApiError(503, "shutting_down", f"the server shut down before this request {what}; no credits were taken, "
                    "retry later", headers={"Retry-After": "5"})


class BodyTooLarge(Exception):
    pass


class LimitsAndMetrics:
    """Pure ASGI middleware: body size limit (Content-Length and streamed), request metrics and log."""

    def __init__(self, app, limit: int, metrics: Metrics, routes: set[str]):
        self.app, self.limit, self.metrics, self.routes = app, limit, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        path = scope.get("path", "")
        route = path if path in self.routes else "other"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = None
            for k, v in scope.get("headers", []):
                if k == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        length = -1
            if length is not None and length < 0:
                return await error_response(400, "bad_request", "the Content-Length header is invalid")(
                    scope, receive, send_wrapper)
            if length is not None and length > self.limit:
                return await error_response(413, "body_too_large", f"the request body is larger than {self.limit} "
                                            "bytes")(scope, receive, send_wrapper)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise BodyTooLarge()
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            self.metrics.request(scope.get("method", "?"), route, status["code"], dt)
            state = scope.get("state", {})
            log.log(logging.DEBUG if route in PROBES else logging.INFO, "%s %s %s %.3fs rid=%s key=%s",
                    scope.get("method"), route if route != "other" else "-", status["code"], dt,
                    state.get("request_id", "-"), state.get("key_id", "-"))


class Server:
    """Holds the state the routes share: config, key store, worker, metrics."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.store: KeyStore | None = None
        self.draining = False
        self.bundle = None  # set by the worker once the pipeline is built
        self.worker = Worker(self._load, self._render, cfg.queue_size, on_done=self.metrics.observe_inference)
        self.metrics.gauge("queue_depth", "Requests waiting for the inference worker.", self.worker.depth)
        self.metrics.gauge("inflight", "Requests being generated now.", self.worker.busy)
        self.metrics.gauge("ready", "1 when the engines are loaded and requests are accepted.",
                           lambda: int(self.ready()))

    # -- pipeline -------------------------------------------------------------------------------
    def _load(self) -> Img2Img:
        """Runs in the worker thread: build the pipeline and load every engine before /readyz says ready."""
        pipe = Img2Img.from_bundle(self.cfg.bundle, backend=self.cfg.backend, low_memory=self.cfg.low_memory,
                                   threads=self.cfg.threads, engine_build=self.cfg.engine_build)
        pipe.load_all()
        self.bundle = pipe.bundle
        return pipe

    def _render(self, pipe, job: Job) -> Output:
        t0 = time.perf_counter()
        res = pipe(job.image, job.prompt, negative_prompt=job.negative_prompt or None, strength=job.strength,
                   steps=job.steps, guidance_scale=job.guidance_scale, seed=job.seed, num_images=1,
                   max_pixels=self.cfg.max_pixels)
        data = imgs.encode_image(res.images[0], job.output_format)
        return Output(data, imgs.MEDIA_TYPES[job.output_format], time.perf_counter() - t0, list(res.warnings))

    def ready(self) -> bool:
        return self.worker.accepting and not self.draining and self.store is not None

    def not_ready_reason(self) -> str:
        if self.worker.load_error:
            return "the engines failed to load: " + self.worker.load_error
        if self.draining or self.worker.closed:
            return "the server is shutting down"
        return "the engines are still loading"

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.store = KeyStore(self.cfg.db, stale_after_s=self.cfg.stale_after_s)
        self.store.register_instance()
        n = self.store.recover()
        if n:
            log.warning("refunded %d pending debit(s) left by a server that stopped mid-request", n)
        self.worker.start()
        self._hb = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await run_in_threadpool(self.store.heartbeat)
                n = await run_in_threadpool(self.store.recover)
                if n:
                    log.warning("refunded %d pending debit(s) of a server that is gone", n)
            except Exception as e:  # noqa: BLE001 - keep beating
                log.error("heartbeat failed: %s", e)

    async def drain(self) -> None:
        """Refuse new requests (503), run the queue for up to graceful_timeout_s, fail the rest (refunded)."""
        self.draining = True
        left = await run_in_threadpool(self.worker.stop, self.cfg.graceful_timeout_s)
        if left:
            log.warning("shutdown: %d queued request(s) not run; refunded", len(left))

    async def shutdown(self) -> None:
        """The lifespan's end. Under `sd3trt serve` the queue was drained already (see serve()); under
        another host (Ray Serve) this drains it: queued work runs for up to graceful_timeout_s, what is
        left is answered 503 and refunded by its handler. Then any debit of ours still pending is refunded."""
        self._hb.cancel()
        await self.drain()
        await asyncio.sleep(0)  # let cancelled handlers run their refunds
        if self.store is not None:
            for debit_id, _key, amount, owner in self.store.pending():
                if owner == self.store.instance_id and self.store.refund(debit_id, "server shut down"):
                    self.metrics.inc("credits_refunded", amount)
            self.store.unregister_instance()
            self.store.close()

    # -- the endpoint ---------------------------------------------------------------------------
    async def img2img(self, request: Request, x_api_key: str | None) -> Response:
        cfg = self.cfg
        rid = secrets.token_hex(6)
        request.scope.setdefault("state", {})["request_id"] = rid
        key_id = self.store.authenticate(x_api_key)
        if key_id is None:
            raise ApiError(401, "unauthorized", "missing or unknown API key; send it in the x-api-key header")
        request.scope["state"]["key_id"] = key_id
        hdr = {"x-request-id": rid}

        def credits_hdr() -> dict[str, str]:
            return {**hdr, "x-remaining-credits": str(self.store.balance(key_id))}

        try:
            if not self.ready():
                raise ApiError(503, "not_ready", f"{self.not_ready_reason()}; retry later",
                               headers={"Retry-After": "5"})
            try:
                raw = await request.body()
            except BodyTooLarge:
                raise ApiError(413, "body_too_large", f"the request body is larger than {cfg.body_limit()} bytes") from None
            req = self._parse(raw)
            image = await self._image(req.image)
            self._check_fits(req, image)
            if self.worker.full():
                raise queue_full()
        except ApiError as e:
            e.headers = {**credits_hdr(), **e.headers}
            raise

        cost = cfg.credits_per_image
        try:
            debit_id, _ = self.store.debit(key_id, cost, note=rid)
        except InsufficientCredits as e:
            raise ApiError(406, "insufficient_credits",
                           f"not enough credits: this request costs {cost}, the key has {e.remaining}",
                           headers=credits_hdr()) from None
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        loop = asyncio.get_running_loop()
        job = Job(image, req.prompt, req.negative_prompt, req.strength, req.num_inference_steps,
                  req.guidance_scale, seed, req.output_format, rid, loop, loop.create_future())
        settled = False
        try:
            try:
                self.worker.submit(job)
            except QueueFull:
                raise queue_full() from None
            except Draining:
                raise shutting_down("ran") from None
            try:
                out: Output = await job.future
            except asyncio.CancelledError:
                if not self.draining:
                    raise
                raise shutting_down("finished") from None  # uvicorn's shutdown gave up waiting for it
            except Draining:
                raise shutting_down("ran") from None
            except Exception as e:  # noqa: BLE001 - any generation failure is the server's
                self.metrics.inc("inference_failures")
                log.error("generation failed rid=%s: %s: %s", rid, type(e).__name__, str(e)[:300])
                raise ApiError(500, "generation_failed",
                               f"the server failed while generating (request {rid}); no credits were taken") from None
            settled = True
            if self.store.commit(debit_id):
                self.metrics.inc("credits_debited", cost)
            else:  # recovery judged this server gone (stale heartbeat) and refunded it: the image is free
                log.warning("rid=%s: debit %s was refunded by recovery before the image was ready", rid, debit_id)
            self.metrics.inc("images_generated")
        except ApiError as e:
            self._refund(job, debit_id, cost)
            settled = True
            e.headers = {**credits_hdr(), **e.headers}
            raise
        finally:
            if not settled:  # cancelled (client gone at shutdown) or an unexpected error
                self._refund(job, debit_id, cost)
        headers = {**credits_hdr(), "x-seed": str(seed), "x-inference-time": f"{out.seconds:.3f}"}
        if out.warnings:
            headers["x-warnings"] = "; ".join(out.warnings)[:500].encode("ascii", "replace").decode()
        if req.base64:
            return PlainTextResponse(b64.b64encode(out.data).decode("ascii"), headers=headers)
        return Response(out.data, media_type=out.media_type, headers=headers)

    def _refund(self, job: Job, debit_id: int, cost: int) -> None:
        job.cancelled = True
        if self.store.refund(debit_id, "request failed"):
            self.metrics.inc("credits_refunded", cost)

    def _parse(self, body: bytes) -> Img2ImgRequest:
        def no_constants(name):
            raise ValueError(f"{name} is not valid JSON")

        try:
            data = json.loads(body, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_field", "the request body must be a JSON object")
        try:
            req = Img2ImgRequest.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        for name in ("prompt", "negative_prompt"):
            if len(getattr(req, name)) > self.cfg.max_prompt_chars:
                raise ApiError(422, "invalid_field", f"{name} is longer than {self.cfg.max_prompt_chars} characters",
                               field=name)
        if req.num_inference_steps > self.cfg.max_steps:
            raise ApiError(422, "invalid_field",
                           f"num_inference_steps must be at most {self.cfg.max_steps}", field="num_inference_steps")
        try:
            sch.img2img_start_index(req.num_inference_steps, req.strength)
        except Sd3trtError as e:
            raise ApiError(422, "invalid_field", str(e), field="strength") from None
        return req

    async def _image(self, value: str):
        cfg = self.cfg
        try:
            if inputs.is_url(value):
                data = await run_in_threadpool(fetch, value, cfg.fetch, cfg.max_image_bytes)
            else:
                data = inputs.decode_base64(value, cfg.max_image_bytes)
            image = await run_in_threadpool(inputs.open_image, data, cfg.max_pixels, cfg.input_formats)
        except (inputs.InputError, FetchError) as e:
            raise ApiError(e.status, e.code, str(e), field="image") from None
        return image

    def _check_fits(self, req: Img2ImgRequest, image) -> None:
        """The runtime's own size rules and (tensorrt) the engines' profiles, before any credit moves."""
        facts = self.bundle.facts
        try:
            width, height = imgs.target_size(image.width, image.height, multiple=facts.pixel_multiple,
                                             max_side=facts.max_image_side)
            if self.cfg.backend == "tensorrt":
                from sd3trt.runtime.trt_runner import check_request

                check_request(self.bundle, height, width, 1, req.guidance_scale > 1.0, build=self.cfg.engine_build)
        except Sd3trtError as e:
            raise ApiError(422, "invalid_field", str(e), field="image") from None


_FIELD_MSG = {
    "missing": "{f} is required",
    "extra_forbidden": "unknown field {f!r}; the fields are " + ", ".join(Img2ImgRequest.model_fields),
}


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False, include_input=False)[0]
    f = ".".join(str(p) for p in err["loc"]) or "body"
    tmpl = _FIELD_MSG.get(err["type"])
    msg = tmpl.format(f=f) if tmpl else f"{f}: {err['msg'].removeprefix('Value error, ')}"
    return ApiError(422, "invalid_field", msg, field=f)


def create_app(cfg: ServerConfig) -> FastAPI:
    srv = Server(cfg)

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        msg = {404: "no such URL", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, codes.get(e.status_code, "http_error"), msg,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.error("unhandled %s: %s", type(e).__name__, str(e)[:300])
        return error_response(500, "internal_error", "the server failed while processing the request")

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
                413: "body or image too large", 422: "invalid field", 429: "queue full",
                500: "server failed while processing", 503: "not ready or shutting down"}.items()},
        },
    )
    async def img2img(request: Request, x_api_key: str | None = Header(None, description="your API key")):
        return await srv.img2img(request, x_api_key)

    @app.get("/healthz", summary="liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: engines loaded, accepting requests")
    async def readyz():
        if srv.ready():
            return {"status": "ready", "queue_depth": srv.worker.depth()}
        return JSONResponse({"status": "not ready", "reason": srv.not_ready_reason()}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = {PATH, "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc"}
    app.add_middleware(LimitsAndMetrics, limit=cfg.body_limit(), metrics=srv.metrics, routes=routes)
    return app


def serve(cfg: ServerConfig, log_level: str = "info", limit_concurrency: int | None = 256) -> bool:
    """Run the server until SIGINT/SIGTERM. Returns whether it started.

    Shutdown: stop listening, answer new requests on open connections with 503, let the worker
    finish queued work for up to ``graceful_timeout_s``, then answer what is still queued with 503
    (refunded); the request being generated may finish for ``inflight_grace_s`` more, after which
    its handler is cancelled, refunds, and answers 503 too.
    """
    import uvicorn

    app = create_app(cfg)
    srv: Server = app.state.server

    class _Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for listener in self.servers:  # stop accepting connections first
                listener.close()
            await srv.drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=cfg.inflight_grace_s, server_header=False,
                            limit_concurrency=limit_concurrency, timeout_keep_alive=5)
    server = _Uvicorn(config)
    server.run()
    return server.started
