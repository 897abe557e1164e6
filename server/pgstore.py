"""Keys and credits in PostgreSQL: the same journal, leases and fence as the SQLite store (keystore.py),
for many hosts sharing one database (`--db postgresql://user@host/dbname`).

The SQL is the shared ``CreditStore``'s; what differs is the connection and the transactions:

    debit    ``UPDATE keys SET credits = credits - n WHERE id = $1 AND credits >= n RETURNING credits``
             and the pending row, in one transaction. Concurrent debits of one key queue on the key's
             row lock; READ COMMITTED re-checks ``credits >= n`` on the row each one finally sees, so
             the balance can never go below zero, whatever the number of replicas or hosts.
    settle   every transition is ``... WHERE state = 'pending'`` (row-locked), so it happens once.
    recover  a replica refunds the pending debits of an instance that is gone (its pid dead on this
             host, stopped, or its lease older than ``stale_after_s``), exactly as with SQLite.

The schema is created on first use under an advisory lock (replicas starting together do not race)
and carries its version in ``meta``. Needs the ``scale`` extra (psycopg 3).
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import ExitStack, contextmanager

from sd3trt.errors import Sd3trtError
from sd3trt.server.keystore import SCHEMA_VERSION, CreditStore, schema_sql
from sd3trt.server.outage import OUTAGES, StoreUnavailable

_SCHEMA = schema_sql(money="BIGINT", time="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY")

_SCHEMA_LOCK = 0x5D37_C0DE  # pg_advisory_xact_lock key: one schema creator at a time
RECONNECT_EVERY_S = 1.0  # during an outage, at most one connection attempt per this long; other calls fail at once


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", url)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


class _Tx:
    """``execute`` with the shared SQL's ``?`` placeholders (the SQL has no literal ``?`` or ``%``)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args: tuple = ()):
        return self.conn.execute(sql.replace("?", "%s"), args)


class PostgresCreditStore(CreditStore):
    """PostgreSQL. Thread-safe: one connection guarded by a lock, reopened if the server dropped it.

    A lost connection (the server restarted, a network cut) fails the call in progress with
    StoreUnavailable; the next call reconnects, at most once per RECONNECT_EVERY_S, each attempt bounded
    by ``connect_timeout_s``, so an outage costs each call at most one short wait, never a queue of them."""

    def __init__(self, url: str, stale_after_s: float = 120.0, connect_timeout_s: float = 5.0):
        try:
            import psycopg
        except ImportError as e:
            raise Sd3trtError(f"a postgresql:// --db needs the scale extra ({e.name} is missing); "
                              "pip install 'sd3trt[scale]'") from None
        self._psycopg = psycopg
        self.url, self.where = url, redact(url)
        self.stale_after_s = stale_after_s
        self.connect_timeout_s = connect_timeout_s
        self.instance_id = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._conn = self._connect()
        with self._tx() as db:
            db.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (name) DO NOTHING",
                       (str(SCHEMA_VERSION),))
            found = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        self._check_version(found[0] if found else None)

    def _open(self):
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                                     application_name="sd3trt")

    def _connect(self):
        try:
            return self._open()
        except self._psycopg.Error as e:
            raise Sd3trtError(f"cannot open the key database {self.where} ({str(e).strip()}); "
                              "check the postgresql:// URL and that the server is reachable") from None

    @contextmanager
    def _tx(self):
        """A READ COMMITTED transaction; the guarded UPDATEs make every change safe under concurrency.
        Connection errors raise StoreUnavailable. A transaction cut off mid-way is rolled back by the
        server; one cut off at its COMMIT may have committed: charge() is idempotent, and the server
        settles a pending debit that no request holds any more (service.py)."""
        pg = self._psycopg
        with self._lock:
            try:
                with ExitStack() as stack:
                    self._begin(stack)
                    yield _Tx(self._conn)
            except pg.errors.TransactionRollback:  # deadlock or serialization: not an outage
                raise
            except (pg.OperationalError, pg.InterfaceError) as e:
                raise OUTAGES.failed(self.where, _first_line(e)) from None
        OUTAGES.succeeded(self.where)

    def _begin(self, stack: ExitStack) -> None:
        """BEGIN on a live connection. One the server dropped while it sat idle (a restart) is noticed
        here, before anything ran on it, and replaced once."""
        pg = self._psycopg
        for attempt in range(2):
            if self._conn.closed or self._conn.broken:
                self._reconnect()
            try:
                stack.enter_context(self._conn.transaction())
                return
            except (pg.OperationalError, pg.InterfaceError):
                if attempt or not self._conn.broken:
                    raise

    def _reconnect(self) -> None:
        if time.monotonic() < self._retry_at:  # this store's last attempt failed a moment ago: no new outage
            raise StoreUnavailable(f"the key database {self.where} is unavailable (reconnecting)")
        try:
            self._conn = self._open()
        except self._psycopg.Error as e:
            self._retry_at = time.monotonic() + RECONNECT_EVERY_S
            raise OUTAGES.failed(self.where, _first_line(e)) from None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._tx() as db:
            return db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
