"""This server's side of the credit journal (keystore.py): debit, refunds, the charge at delivery, and
what a database outage leaves behind.

    debit    before the request is queued (406 when the key cannot pay)
    refund   when anything fails after the debit; one the database cannot take now stays pending
    charge   the fence (keystore.py), right before the image's bytes go to the connection
             (``ImageResponse``); retried for ``charge_retry_s`` while the database is unavailable,
             then the image is withheld (503 db_unavailable)
    settle   run by the lease thread with every heartbeat: this instance's pending debits that no
             request in progress holds are refunded, and a withheld image's charge, if it landed, is
             given back; so once the database is back, images delivered + balance = credits granted

Requests in progress are known by their id, which is the debit's note.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from fastapi.responses import Response

from sd3trt.server.config import ServerConfig
from sd3trt.server.keystore import CreditStore, InsufficientCredits
from sd3trt.server.metrics import Metrics
from sd3trt.server.outage import RETRY_AFTER_S, StoreUnavailable
from sd3trt.server.pools import Pools, run
from sd3trt.server.schema import ApiError, error_response

log = logging.getLogger("sd3trt.server")


def insufficient(cost: int, balance: int) -> ApiError:
    return ApiError(406, "insufficient_credits", f"not enough credits: this request costs {cost}, the key has "
                    f"{balance}; top the key up")


def db_unavailable(e: StoreUnavailable, what: str = "") -> ApiError:
    return ApiError(503, "db_unavailable", f"{e}{what}; no credits were taken, retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class Credits:
    def __init__(self, cfg: ServerConfig, pools: Pools, metrics: Metrics):
        self.cfg, self.pools, self.metrics = cfg, pools, metrics
        self.store: CreditStore | None = None  # opened at start-up
        self.stopping = lambda: False  # set by the server: no charge retries once it drains
        # Request ids in progress and debits whose image was withheld; read by the lease thread, hence the lock.
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._withheld: set[int] = set()

    # -- requests in progress ---------------------------------------------------------------------
    def begin(self, request_id: str) -> None:
        """Before the request's debit: settle() spares its debit until end()."""
        with self._lock:
            self._live.add(request_id)

    def end(self, request_id: str) -> None:
        with self._lock:
            self._live.discard(request_id)

    def withhold(self, debit_id: int) -> None:
        """The image of this debit was not handed out and its charge may or may not have landed: settle()
        gives the credits back either way."""
        with self._lock:
            self._withheld.add(debit_id)

    # -- the journal ------------------------------------------------------------------------------
    async def balance(self, key_id: str) -> int:
        return await run(self.pools.db, self.store.balance, key_id)

    async def headers(self, state: dict) -> dict[str, str]:
        """x-request-id, and x-remaining-credits when the key is known and the database answers."""
        out = {"x-request-id": state["request_id"]} if "request_id" in state else {}
        if "key_id" in state:
            try:
                out["x-remaining-credits"] = str(await self.balance(state["key_id"]))
            except StoreUnavailable:  # the answer goes out without it
                pass
        return out

    async def debit(self, key_id: str, cost: int, note: str) -> int:
        fut = self.pools.db.submit(self.store.debit, key_id, cost, note)
        try:
            debit_id, _ = await asyncio.wrap_future(fut)
        except InsufficientCredits as e:
            raise insufficient(cost, e.remaining) from None
        except asyncio.CancelledError:
            if not fut.cancel():  # running: undo it once it lands
                fut.add_done_callback(lambda f: f.exception() or self.refund_now(f.result()[0], cost))
            raise
        return debit_id

    def refund_now(self, debit_id: int, cost: int, why: str = "request failed") -> None:
        try:
            if self.store.refund(debit_id, why):
                self.metrics.inc("credits_refunded", cost)
        except StoreUnavailable:  # stays pending; settle() refunds it once the database is back
            pass

    async def refund(self, debit_id: int, cost: int, why: str) -> None:
        """Refund in the db pool; a cancelled wait still lets the refund finish there."""
        fut = self.pools.db.submit(self.refund_now, debit_id, cost, why)
        try:
            await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            pass

    async def charge(self, debit_id: int, state: dict) -> int | None:
        """``store.charge`` in the db pool; one that meets an unavailable database is retried (it is
        idempotent) for up to ``charge_retry_s`` while the client waits, then StoreUnavailable is raised."""
        deadline = time.monotonic() + self.cfg.charge_retry_s
        for attempt in range(64):  # bounded by the deadline long before the count
            fut = self.pools.db.submit(self.store.charge, debit_id)
            try:
                return await asyncio.wrap_future(fut)
            except StoreUnavailable:
                if time.monotonic() + 0.5 > deadline or state.get("client_gone") or self.stopping():
                    raise
            except asyncio.CancelledError:  # shutdown: a charge that lands anyway is undone (no image went out)
                if not fut.cancel():
                    fut.add_done_callback(lambda f: f.exception() or f.result() is None or self._undo(f.result()))
                raise
            await asyncio.sleep(min(0.1 * 2 ** attempt, 1.0))
        raise StoreUnavailable(f"the charge of debit {debit_id} was tried 64 times")

    async def uncharge(self, debit_id: int, why: str) -> None:
        """A charged image that never left the server: the charge is given back (or by settle())."""
        try:
            if await run(self.pools.db, self.store.refund_delivered, debit_id, why):
                self.metrics.inc("credits_refunded", self.cfg.credits_per_image)
        except StoreUnavailable:
            self.withhold(debit_id)

    def _undo(self, debit_id: int) -> None:
        """In a db thread at shutdown: a charge that landed for an image that never went out is given back."""
        try:
            self.store.refund_delivered(debit_id, "server shut down")
        except StoreUnavailable:
            self.withhold(debit_id)

    # -- settling ---------------------------------------------------------------------------------
    def settle(self, store: CreditStore) -> int:
        """In the lease thread (its own store), once per heartbeat: refund this instance's pending debits
        that no request holds any more (a debit or refund whose answer was lost to a database outage), and
        undo the charge of an image withheld because its charge could not be confirmed. Returns how many."""
        rows = store.own_pending()
        with self._lock:  # read after the rows: a request live when its debit was written is seen here
            live, withheld = set(self._live), set(self._withheld)
        n = 0
        for debit_id, amount, note in rows:
            if note not in live and store.refund(debit_id, "no request held it (a key database outage)"):
                self.metrics.inc("credits_refunded", amount)
                n += 1
        for debit_id in withheld:  # pending -> refunded, or committed (the charge did land) -> refunded
            if store.refund(debit_id, "image withheld") or store.refund_delivered(debit_id, "image withheld"):
                self.metrics.inc("credits_refunded", self.cfg.credits_per_image)
                n += 1
            with self._lock:
                self._withheld.discard(debit_id)
        return n

    def refund_own_pending(self) -> int:
        """At shutdown: every debit of this instance still pending is refunded. Returns the credits."""
        total = 0
        for debit_id, _key, amount, owner in self.store.pending():
            if owner == self.store.instance_id and self.store.refund(debit_id, "server shut down"):
                total += amount
        return total


class ImageResponse(Response):
    """The image, handed out only once it is paid for: the charge (the fence) right before the bytes go
    to the connection, and no charge at all when the client has left."""

    def __init__(self, credits: Credits, state: dict, debit_id: int, cost: int, content: bytes, media_type: str,
                 headers: dict[str, str]):
        super().__init__(content, media_type=media_type, headers=headers)
        self.credits, self.state, self.debit_id, self.cost = credits, state, debit_id, cost

    async def __call__(self, scope, receive, send):
        credits, state, rid = self.credits, self.state, self.state["request_id"]
        state["delivering"] = True  # from here a leaving client is seen through the flag, not by cancelling
        if state.get("client_gone"):
            return await credits.refund(self.debit_id, self.cost, "client gone before the image was sent")
        try:
            charged = await credits.charge(self.debit_id, state)
        except StoreUnavailable as e:
            credits.withhold(self.debit_id)
            log.warning("rid=%s: the charge of debit %s could not be confirmed (%s): image withheld, the debit is "
                        "settled as refunded once the database is back", rid, self.debit_id, e)
            err = db_unavailable(e, ", so the image could not be charged and is withheld")
            return await error_response(err.status, err.code, err.message, headers=err.headers)(scope, receive, send)
        if charged is None:
            log.warning("rid=%s: debit %s was refunded by a peer that judged this server gone, and the key cannot "
                        "pay again: image withheld", rid, self.debit_id)
            resp = error_response(503, "payment_lost", "this server was presumed stopped and its charge for the "
                                  "request refunded, and the key has too few credits to charge it again; the image "
                                  "is withheld, retry later", headers={"Retry-After": "5",
                                                                       **await credits.headers(state)})
            return await resp(scope, receive, send)
        if state.get("client_gone"):  # left while the charge was made: the image never leaves the server
            return await credits.uncharge(charged, "client left before the charged image was sent")
        try:
            self.raw_headers.append((b"x-remaining-credits", str(await credits.balance(state["key_id"])).encode()))
        except StoreUnavailable:  # paid for: the image goes out, without the balance the database cannot give now
            pass
        credits.metrics.inc("credits_debited", self.cost)
        credits.metrics.inc("images_generated")
        await super().__call__(scope, receive, send)
