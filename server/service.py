"""The img2img service behind the route: key, credits, input, the worker, and the lifecycle.

A request goes through these steps; nothing is charged before the debit, and no step blocks the
event loop (key-store calls, parsing, decoding and fetches run in the bounded pools of pools.py):

    key (401) -> ready (503) -> balance >= cost (406, body unread) -> requests of this key in flight (429)
    -> body (413; 408 after --body-timeout), JSON and fields (400/422) -> image: base64, or URL fetched
    under one deadline; format, pixels, sides (400/413/422) -> queue room (429) -> debit (406) -> queue
    -> generate (500)
    -> charge (the fence, see keystore.py) -> image handed to the connection.

The credit database may go away at any step (a PostgreSQL restart, a locked or full SQLite file): the
request is answered 503 ``db_unavailable`` with ``Retry-After`` (outage.py), the image of a request
whose charge could not be made is withheld, and every debit such a request leaves pending is settled
by this server itself once the database is back (credits.py: ``Credits.settle``, run by the lease thread).

A client that leaves is noticed as soon as its connection closes (a watcher task): a fetch not yet
started is dropped, queued work is cancelled, a generation stops at its next step, and the debit is
refunded. An image is charged when its bytes are handed to the connection; a client gone before that
(even after the image was made) is not charged.
"""

from __future__ import annotations

import asyncio
import base64 as b64
import logging
import os
import secrets
import time

from fastapi import Request
from fastapi.responses import Response

from sd3trt.runtime import images as imgs
from sd3trt.runtime.pipeline import Img2Img
from sd3trt.runtime.plan import Plan, RequestError
from sd3trt.server import fetch as fetching
from sd3trt.server import inputs
from sd3trt.server.config import ServerConfig
from sd3trt.server.credits import Credits, ImageResponse, insufficient
from sd3trt.server.keystore import CreditStore, open_store
from sd3trt.server.lease import Lease
from sd3trt.server.metrics import Metrics
from sd3trt.server.middleware import BodyTooLarge
from sd3trt.server.outage import OUTAGES, StoreUnavailable
from sd3trt.runtime.runners import release_heap
from sd3trt.server.pools import Pools, in_thread, run
from sd3trt.server.schema import ApiError, Img2ImgRequest, parse
from sd3trt.server.worker import Draining, Job, JobCancelled, Output, QueueFull, Worker

log = logging.getLogger("sd3trt.server")

BIG_BODY = 1 << 20  # after a body this large, freed heap pages are handed back to the OS
STORE_CHECK_S = 1.5  # how long /readyz reuses its last check of the credit database


def queue_full() -> ApiError:
    return ApiError(429, "queue_full", "the server is busy (queue full); retry shortly", headers={"Retry-After": "2"})


def shutting_down(what: str) -> ApiError:
    return ApiError(503, "shutting_down", f"the server shut down before this request {what}; no credits were taken, "
                    "retry later", headers={"Retry-After": "5"})


def make_pipeline(cfg: ServerConfig, bundle=None) -> Img2Img:
    """The pipeline the settings describe, engines not loaded yet: ``bundle`` (a loaded Bundle) or the one at
    ``cfg.bundle``. Raises Sd3trtError with one sentence for options the bundle or backend cannot take."""
    from sd3trt.manifest import load_bundle

    return Img2Img(bundle if bundle is not None else load_bundle(cfg.bundle), backend=cfg.backend,
                   low_memory=cfg.low_memory, threads=cfg.threads, engine_build=cfg.engine_build,
                   transformer_precision=cfg.precision, vae_precision=cfg.vae_precision,
                   cpu_precision=cfg.cpu_precision, loras=list(cfg.loras) or None)


class Server:
    """Holds the state the routes share: config, key store, pools, lease, worker, metrics."""

    def __init__(self, cfg: ServerConfig, pipe: Img2Img | None = None):
        self.cfg = cfg
        self._given_pipe = pipe  # built (and its options checked) by `sd3trt serve` before listening
        self.metrics = Metrics()
        self.lease: Lease | None = None
        self.draining = False
        self.pools = Pools(cfg.fetch_workers, cpu_workers=max(1, min(4, os.cpu_count() or 1)))
        self.credits = Credits(cfg, self.pools, self.metrics)
        self.credits.stopping = self.stopping
        self.per_key: dict[str, int] = {}
        self._store_check = (-STORE_CHECK_S, None)  # (when, why not) of the last readiness check of the database
        self.uploads = 0  # bodies being read and decoded now
        self.upload_slots = asyncio.Semaphore(cfg.max_uploads)
        self.fetches = 0
        self.deadlines: set[fetching.Deadline] = set()
        self.fetch_resolve, self.fetch_connect = fetching.default_resolve, fetching.default_connect  # test hooks
        self.worker = Worker(self._load, self._render, cfg.queue_size, on_done=self.metrics.observe_inference)
        self.metrics.gauge("queue_depth", "Requests waiting for the inference worker.", self.worker.depth)
        self.metrics.gauge("inflight", "Requests being generated now.", self.worker.busy)
        self.metrics.gauge("ready", "1 when the engines are loaded and requests are accepted.",
                           lambda: int(self.ready()))

    @property
    def store(self) -> CreditStore | None:
        return self.credits.store

    # -- pipeline -------------------------------------------------------------------------------
    def _load(self) -> Img2Img:
        """Runs in the worker thread: the pipeline (the one given, else built now from the bundle) with every
        engine loaded before /readyz says ready."""
        pipe, self._given_pipe = self._given_pipe or make_pipeline(self.cfg), None
        pipe.load_all()
        return pipe

    def _render(self, pipe, job: Job) -> Output:
        t0 = time.perf_counter()
        res = pipe.run(job.plan, progress=lambda i, n: job.check())
        data = imgs.encode_image(res.images[0], job.output_format)
        return Output(data, imgs.MEDIA_TYPES[job.output_format], time.perf_counter() - t0, list(res.warnings))

    # -- readiness ------------------------------------------------------------------------------
    def ready(self) -> bool:
        return (self.worker.accepting and not self.draining and self.store is not None
                and self.lease is not None and self.lease.fresh())

    def stopping(self) -> bool:
        return self.draining

    def not_ready_reason(self) -> str:
        if self.worker.load_error:
            return "the engines failed to load: " + self.worker.load_error
        if self.draining or self.worker.closed:
            return "the server is shutting down"
        if self.lease is not None and not self.lease.fresh():
            return (f"the key database has not taken this server's heartbeat for {self.lease.age():.0f} s; "
                    "check the database file and its disk")
        return "the engines are still loading"

    async def readiness(self) -> str | None:
        """None when ready, else why not: also when the credit database cannot be used, or the database or
        decode threads are all stuck (wedged)."""
        if not self.ready():
            return self.not_ready_reason()
        if self.lease.error is not None:
            return f"the key database failed this server's last heartbeat ({self.lease.error})"
        why = await self._check_store()
        if why is not None:
            return why
        try:
            await asyncio.wait_for(run(self.pools.cpu, int), 2.0)
        except asyncio.TimeoutError:
            return "every decode thread has been busy for over 2 s (the server is wedged); see the log"
        return None

    async def _check_store(self) -> str | None:
        """A read of the credit database in the db pool (so a wedged pool shows too), reused for STORE_CHECK_S:
        probes polled by a load balancer cost one query per interval, not one each. A failure any store of
        this process met meanwhile (a request, the heartbeat) counts at once."""
        at, why = self._store_check
        if time.monotonic() - at < STORE_CHECK_S:
            if why is None and OUTAGES.down(self.store.where):
                return f"the key database {self.store.where} is unavailable (see the log)"
            return why
        self._store_check = (time.monotonic(), why)  # probes arriving meanwhile reuse the last answer
        try:
            await asyncio.wait_for(run(self.pools.db, self.store.ping), 2.0)
            why = None
        except asyncio.TimeoutError:
            why = "every key database thread has been busy for over 2 s (the server is wedged); see the log"
        except StoreUnavailable as e:
            why = str(e)
        self._store_check = (time.monotonic(), why)
        return why

    async def engines_loaded(self, wait_s: float) -> str | None:
        """Wait up to ``wait_s`` for the engines to finish loading: None when they loaded, else why not."""
        if not await in_thread(self.worker.loaded.wait, wait_s):
            return f"the engines were still loading after {wait_s:g} s"
        if self.worker.load_error:
            return self.not_ready_reason()
        return None

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        cfg = self.cfg
        self.credits.store = await in_thread(open_store, cfg.db, cfg.stale_after_s)
        instance = await in_thread(self.store.register_instance)
        n = await in_thread(self.store.recover)
        if n:
            log.warning("refunded %d pending debit(s) left by a server that stopped mid-request", n)
        self.lease = Lease(cfg.db, instance, cfg.heartbeat_s, cfg.stale_after_s, settle=self.credits.settle)
        self.lease.start()
        self.worker.start()

    async def drain(self) -> None:
        """Refuse new requests (503), cut running fetches, run the queue for up to graceful_timeout_s, fail
        the rest (refunded). Runs in a thread of its own: never waits behind request work."""
        self.draining = True
        for d in list(self.deadlines):
            d.cancel()
        left = await in_thread(self.worker.stop, self.cfg.graceful_timeout_s)
        if left:
            log.warning("shutdown: %d queued request(s) not run; refunded", len(left))

    async def shutdown(self) -> None:
        """The lifespan's end. Under `sd3trt serve` the queue was drained already (see serve()); under
        another host (Ray Serve) this drains it: queued work runs for up to graceful_timeout_s, what is
        left is answered 503 and refunded by its handler. Then any debit of ours still pending is refunded."""
        if not self.draining:
            await self.drain()
        await asyncio.sleep(0.05)  # let cancelled handlers start their refunds
        if self.lease is not None:
            await in_thread(self.lease.stop)
        if self.store is not None:
            try:
                n = await in_thread(self.credits.refund_own_pending)
                if n:
                    self.metrics.inc("credits_refunded", n)
                await in_thread(self.store.unregister_instance)
            except StoreUnavailable as e:  # a peer's recovery (or the next start) refunds what is left pending
                log.warning("shutdown: %s; this server's pending debits are refunded by the next server to run", e)
            await in_thread(self.store.close)
        self.pools.close()

    # -- the hooks the middleware calls ---------------------------------------------------------
    async def credit_headers(self, state: dict) -> dict[str, str]:
        return await self.credits.headers(state)

    async def key_headers(self, key: str | None) -> dict[str, str]:
        """x-remaining-credits for a request no route took (404, 405), when its key is valid."""
        if not key or self.store is None:
            return {}
        try:
            key_id = await run(self.pools.db, self.store.authenticate, key)
        except StoreUnavailable:
            return {}
        return await self.credit_headers({"key_id": key_id}) if key_id else {}

    def finished(self, state: dict) -> None:
        if "request_id" in state:
            self.credits.end(state["request_id"])
        watcher = state.pop("watcher", None)
        if watcher is not None:
            watcher.cancel()
        key_id = state.pop("inflight_key", None)
        if key_id is not None:
            n = self.per_key.get(key_id, 1) - 1
            if n > 0:
                self.per_key[key_id] = n
            else:
                self.per_key.pop(key_id, None)

    # -- the endpoint ---------------------------------------------------------------------------
    async def img2img(self, request: Request, x_api_key: str | None) -> Response:
        state = request.scope.setdefault("state", {})
        state["request_id"] = secrets.token_hex(6)
        self.credits.begin(state["request_id"])  # before any debit: settle() spares it until finished()
        key_id = await run(self.pools.db, self.store.authenticate, x_api_key)
        if key_id is None:
            raise ApiError(401, "unauthorized", "missing or unknown API key; send it in the x-api-key header")
        state["key_id"] = key_id
        try:
            return await self._img2img(request, state, key_id)
        except ApiError as e:
            e.headers = {**await self.credit_headers(state), **e.headers}
            raise

    async def _img2img(self, request: Request, state: dict, key_id: str) -> Response:
        cfg, cost = self.cfg, self.cfg.credits_per_image
        if not self.ready():
            raise ApiError(503, "not_ready", f"{self.not_ready_reason()}; retry later", headers={"Retry-After": "5"})
        balance = await self.credits.balance(key_id)
        if balance < cost:  # before the body is read or any URL fetched
            raise insufficient(cost, balance)
        if self.per_key.get(key_id, 0) >= cfg.max_inflight_per_key:
            raise ApiError(429, "too_many_requests", f"this key has {cfg.max_inflight_per_key} requests in progress, "
                           "the limit per key; wait for one to finish", headers={"Retry-After": "2"})
        self.per_key[key_id] = self.per_key.get(key_id, 0) + 1
        state["inflight_key"] = key_id
        req, image = await self._read_input(request, state)
        if image is None:
            image = await self._fetched(req.image)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        plan = await run(self.pools.cpu, self._plan, req, image, seed)
        if self.worker.full():
            raise queue_full()
        debit_id = await self.credits.debit(key_id, cost, state["request_id"])
        return await self._generate(req, plan, state, debit_id, cost)

    async def _read_input(self, request: Request, state: dict) -> tuple[Img2ImgRequest, object | None]:
        """Body -> (request, decoded image or None for a URL), at most ``max_uploads`` bodies at a time."""
        cfg = self.cfg
        # A waiting body is not read, so the wait stays well inside the body timeout.
        try:
            await asyncio.wait_for(self.upload_slots.acquire(), min(cfg.upload_wait_s, cfg.conn.body_timeout_s / 2))
        except asyncio.TimeoutError:
            raise ApiError(429, "busy", f"the server is reading {cfg.max_uploads} other uploads; retry shortly",
                           headers={"Retry-After": "2"}) from None
        self.uploads += 1
        size = 0
        try:
            body = bytearray()

            async def read() -> None:
                async for chunk in request.stream():
                    body.extend(chunk)
            try:
                # The connection handler of `sd3trt serve` times the body out first (from its headers); behind
                # another HTTP server (Ray Serve's proxy has no body timeout) this one holds.
                await asyncio.wait_for(read(), cfg.conn.body_timeout_s)
            except BodyTooLarge:
                raise ApiError(413, "body_too_large", f"the request body is larger than {cfg.body_limit()} bytes; "
                               "send a smaller image") from None
            except asyncio.TimeoutError:
                self.metrics.inc("request_timeouts")
                raise ApiError(408, "body_timeout", f"the request body did not arrive within "
                               f"{cfg.conn.body_timeout_s:g} s; nothing was charged") from None
            size = len(body)
            state["watcher"] = self._watch(request, state, asyncio.current_task())
            return await run(self.pools.cpu, self._prepare, body)
        finally:
            self.uploads -= 1
            self.upload_slots.release()
            if size > BIG_BODY and self.uploads == 0:
                self.pools.cpu.submit(release_heap)

    def _prepare(self, body: bytearray) -> tuple[Img2ImgRequest, object | None]:
        """In the cpu pool: parse the body and decode a base64 image; the large strings die here."""
        cfg = self.cfg
        req = parse(body, cfg.max_prompt_chars, cfg.max_steps)
        body.clear()
        if inputs.is_image_url(req.image):
            return req, None
        try:
            data = inputs.decode_base64(req.image, cfg.max_image_bytes)
            req.image = ""
            return req, inputs.open_image(data, cfg.max_pixels, cfg.input_formats)
        except inputs.InputError as e:
            raise ApiError(e.status, e.code, str(e), field="image") from None

    async def _fetched(self, url: str):
        """The image at ``url``: fetched in the fetch pool under one deadline (counted from now, so time
        spent waiting for a fetch thread counts), then decoded in the cpu pool."""
        cfg = self.cfg
        if self.fetches >= 2 * cfg.fetch_workers:
            raise ApiError(429, "busy", f"the server is fetching {self.fetches} image URLs; retry shortly or send "
                           "the image as base64", headers={"Retry-After": "2"})
        deadline = fetching.Deadline(cfg.fetch.timeout_s)
        self.fetches += 1
        self.deadlines.add(deadline)
        fut = self.pools.fetch.submit(fetching.fetch, url, cfg.fetch, cfg.max_image_bytes, self.fetch_resolve,
                                      self.fetch_connect, deadline)
        try:
            data = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.fetch.timeout_s + 1.0)
            return await run(self.pools.cpu, inputs.open_image, data, cfg.max_pixels, cfg.input_formats)
        except asyncio.TimeoutError:  # the resolver outlived the deadline (the socket ones cannot)
            raise ApiError(400, "url_timeout", f"fetching the image URL took longer than {cfg.fetch.timeout_s:g} s; "
                           "use a faster host or send the image as base64", field="image") from None
        except (fetching.FetchError, inputs.InputError) as e:
            if self.draining:
                raise shutting_down("was read") from None
            raise ApiError(e.status, e.code, str(e), field="image") from None
        finally:
            fut.cancel()  # never started: never runs
            deadline.cancel()
            self.deadlines.discard(deadline)
            self.fetches -= 1

    # The pipeline's parameter names that the API spells otherwise.
    API_FIELDS = {"steps": "num_inference_steps"}

    def _plan(self, req: Img2ImgRequest, image, seed: int) -> Plan:
        """The pipeline's own checks of the request (sizes, schedule, engine profiles) before any credit moves."""
        try:
            return self.worker.pipe.prepare(image, req.prompt, req.negative_prompt or None, strength=req.strength,
                                            steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                                            seed=seed, max_pixels=self.cfg.max_pixels)
        except RequestError as e:
            raise ApiError(422, "invalid_field", str(e), field=self.API_FIELDS.get(e.field, e.field)) from None

    # -- generation and delivery ----------------------------------------------------------------
    async def _generate(self, req: Img2ImgRequest, plan: Plan, state: dict, debit_id: int, cost: int) -> Response:
        rid = state["request_id"]
        seed = plan.seed
        loop = asyncio.get_running_loop()
        job = Job(plan, req.output_format, rid, loop, loop.create_future())
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
                job.cancelled = True  # dropped if queued, stopped at its next step if running
                if state.get("client_gone") or not self.draining:
                    raise
                raise shutting_down("finished") from None  # uvicorn's shutdown gave up waiting for it
            except (Draining, JobCancelled):
                raise shutting_down("ran") from None
            except Exception as e:  # noqa: BLE001 - any generation failure is the server's
                self.metrics.inc("inference_failures")
                log.error("generation failed rid=%s: %s: %s", rid, type(e).__name__, str(e)[:300])
                raise ApiError(500, "generation_failed",
                               f"the server failed while generating (request {rid}); no credits were taken") from None
        except BaseException:
            await self.credits.refund(debit_id, cost, "client gone" if state.get("client_gone") else "request failed")
            raise
        headers = {"x-request-id": rid, "x-seed": str(seed), "x-inference-time": f"{out.seconds:.3f}"}
        if out.warnings:
            headers["x-warnings"] = "; ".join(out.warnings)[:500].encode("ascii", "replace").decode()
        if req.base64:
            return ImageResponse(self.credits, state, debit_id, cost, b64.b64encode(out.data),
                                 "text/plain; charset=utf-8", headers)
        return ImageResponse(self.credits, state, debit_id, cost, out.data, out.media_type, headers)

    def _watch(self, request: Request, state: dict, task: asyncio.Task) -> asyncio.Task:
        """A task that notices the client leaving (its connection closed) once the body is read: the
        request is cancelled, unless it is already answering (then ImageResponse sees the flag)."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            if state.get("answered"):
                return
            state["client_gone"] = True
            self.metrics.inc("clients_gone")
            if not state.get("delivering"):
                task.cancel()
        return asyncio.create_task(watch())
