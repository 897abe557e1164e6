"""This server instance's lease on its pending debits, renewed by a thread of its own.

Peers sharing the key database refund the pending debits of an instance whose heartbeat is older
than ``stale_after_s`` (``SqliteCreditStore.recover``). The heartbeat therefore runs in a dedicated thread on
its own database connection: a busy event loop, exhausted request pools or a slow fetch cannot stall
it. The same thread runs ``recover()`` for the peers. ``fresh()`` turns false well before peers would
judge this instance gone, and the server then reports not-ready and takes no new work; the fence in
``SqliteCreditStore.charge`` covers the rest (a debit refunded anyway is charged again or the image withheld).

After each renewal the thread also calls ``settle(store)``: the server settles its own pending debits
that no request holds any more (left by a database outage), within one interval of the database
being back. A renewal that fails is logged once (the outage itself is logged by the store), retried
every RETRY_S, and ``error`` says why until one succeeds; readiness reports it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from sd3trt.server.keystore import CreditStore, open_store

log = logging.getLogger("sd3trt.server")

RETRY_S = 1.0


class Lease:
    def __init__(self, db: Path | str, instance_id: str, interval_s: float, stale_after_s: float,
                 settle: Callable[[CreditStore], int] | None = None):
        self.db, self.instance_id = db, instance_id
        self.interval_s, self.stale_after_s = interval_s, stale_after_s
        self.settle = settle
        self.renewed_at = time.monotonic()  # register_instance() wrote the first heartbeat
        self.error: str | None = None  # why the last renewal failed; None once one succeeds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd3trt-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def age(self) -> float:
        return time.monotonic() - self.renewed_at

    def fresh(self) -> bool:
        """Renewed recently enough that no peer can have judged this instance gone."""
        return self._thread.is_alive() and self.age() < self.stale_after_s / 2

    def _run(self) -> None:
        store = open_store(self.db, stale_after_s=self.stale_after_s)
        store.instance_id = self.instance_id
        try:
            # While renewals fail, retry every second at most: readiness and settlement follow the database back.
            while not self._stop.wait(self.interval_s if self.error is None else min(RETRY_S, self.interval_s)):
                try:
                    store.heartbeat()
                    self.renewed_at = time.monotonic()
                    self.error = None
                    n = store.recover()
                    settled = self.settle(store) if self.settle else 0
                except Exception as e:  # noqa: BLE001 - keep renewing; fresh() reports a lease running out
                    if self.error is None:
                        log.error("heartbeat failed (%s); retrying every %g s", e, min(RETRY_S, self.interval_s))
                    self.error = str(e)
                    continue
                if n:
                    log.warning("refunded %d pending debit(s) of a server that is gone", n)
                if settled:
                    log.warning("settled %d debit(s) of this server that no request held (left by a key "
                                "database outage)", settled)
        finally:
            store.close()
