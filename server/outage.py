"""The credit database being unreachable: the one error every store raises for it, and its log.

A store turns a database error that is about the database's availability (PostgreSQL's connection
lost or refused, the server shutting down; SQLite's file locked past the busy timeout, read-only, full
or failing I/O) into ``StoreUnavailable``; the server answers it with 503 ``db_unavailable`` and a
``Retry-After``, never a 500. Errors about the request itself stay what they are.

``Outages`` logs the first failure of an outage and the recovery once per database, whatever the
number of store objects (the request store and the lease's) or failing requests.
"""

from __future__ import annotations

import logging
import threading
import time

from sd3trt.errors import Sd3trtError

log = logging.getLogger("sd3trt.server")

RETRY_AFTER_S = 5  # what a 503 db_unavailable tells the client


class StoreUnavailable(Sd3trtError):
    """The credit database cannot be reached or written now; retrying later may succeed."""


class Outages:
    def __init__(self):
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def failed(self, where: str, detail: str) -> StoreUnavailable:
        """Record a failure of ``where`` (logged once per outage); the error to raise."""
        with self._lock:
            first = where not in self._since
            if first:
                self._since[where] = time.monotonic()
        if first:
            log.warning("the key database %s is unavailable (%s); requests get 503 db_unavailable until it is back",
                        where, detail)
        return StoreUnavailable(f"the key database {where} is unavailable ({detail})")

    def succeeded(self, where: str) -> None:
        if where not in self._since:  # the common case, without the lock
            return
        with self._lock:
            since = self._since.pop(where, None)
        if since is not None:
            log.warning("the key database %s is available again after %.1f s", where, time.monotonic() - since)

    def down(self, where: str) -> bool:
        return where in self._since


OUTAGES = Outages()
