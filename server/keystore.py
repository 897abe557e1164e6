"""API keys and credits with a debit journal so no credit is lost or spent twice.

``CreditStore`` is the one interface and holds the logic; ``SqliteCreditStore`` stores it in SQLite (WAL mode,
one host, the default) and ``pgstore.PostgresCreditStore`` in PostgreSQL (many hosts), with the same semantics.
``open_store(--db)`` picks by the value: a ``postgresql://`` URL or a file path.

Keys look like ``sd3_<id>_<secret>``. Only ``sha256(secret)`` is stored; ``<id>`` is not secret
(it is what ``sd3trt keys list`` shows and what logs name) and selects the row, then the secret's
hash is compared with ``hmac.compare_digest``.

A request's credits move through the ``debits`` journal:

    debit()   one IMMEDIATE transaction: ``credits -= n WHERE credits >= n`` and a 'pending' row
    commit()  pending -> committed (the image was produced)
    refund()  pending -> refunded and ``credits += n``, in one transaction

Every transition is guarded by ``WHERE state = 'pending'``, so a debit is settled exactly once. Each
server process registers an ``instances`` row and heartbeats it (its lease); pending debits of an
instance that is gone (its pid is dead on this host, it stopped, or its heartbeat is stale) are
refunded by ``recover()``, which a server runs at start-up and then periodically. A server killed
mid-request therefore leaves the balance consistent once any server on the database starts again.

The fence: a server whose heartbeat stalled may still be alive, and a peer may have refunded its
pending debit. ``charge()`` (commit, or when the debit was refunded meanwhile, a new debit in the same
transaction) is what a server calls before handing out an image, so no image is ever free: when the
key can no longer pay, the server withholds the image. ``refund_delivered()`` undoes a charge whose
image never left the server (the client had gone).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.server.outage import OUTAGES, StoreUnavailable

__all__ = ["CreditStore", "InsufficientCredits", "SqliteCreditStore", "StoreUnavailable", "open_store"]

KEY_PREFIX = "sd3"
SCHEMA_VERSION = 1

# The one schema of both stores, in each database's column types (SQLite here, PostgreSQL in pgstore.py).
_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    credits {money} NOT NULL CHECK (credits >= 0),
    created_at {time} NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS debits (
    id {serial},
    key_id TEXT NOT NULL REFERENCES keys(id),
    amount {money} NOT NULL CHECK (amount > 0),
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed', 'refunded')),
    owner TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_at {time} NOT NULL,
    settled_at {time}
);
CREATE INDEX IF NOT EXISTS debits_pending ON debits(owner) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS grants (
    id {serial},
    key_id TEXT NOT NULL REFERENCES keys(id),
    amount {money} NOT NULL,
    at {time} NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at {time} NOT NULL,
    heartbeat_at {time} NOT NULL,
    stopped_at {time}
);
"""


def schema_sql(money: str, time: str, serial: str) -> str:
    """The schema's statements with the database's types: `money` for credits and amounts, `time` for
    seconds since the epoch, `serial` for an auto-numbered primary key."""
    return _SCHEMA_TEMPLATE.format(money=money, time=time, serial=serial)


_SCHEMA = schema_sql(money="INTEGER", time="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT")

# Instances registered by this process (a restarted server can get its predecessor's pid, e.g. pid 1).
_LIVE_HERE: set[str] = set()

# A dummy hash compared against when the key id is unknown, so both paths do the same work.
_DUMMY_HASH = hashlib.sha256(b"sd3trt-no-such-key").hexdigest()


class InsufficientCredits(Exception):
    def __init__(self, remaining: int, needed: int):
        super().__init__(f"not enough credits: {remaining} left, this request needs {needed}")
        self.remaining = remaining
        self.needed = needed


@dataclass
class KeyInfo:
    id: str
    name: str
    credits: int
    created_at: float
    disabled: bool
    pending: int = 0
    spent: int = 0


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """``sd3_<id>_<secret>`` -> (id, secret); None for anything else."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _journal_wal(db: sqlite3.Connection, wait_s: float = 10.0) -> str:
    """PRAGMA journal_mode = WAL, returning the mode. While another connection switches a new file to WAL
    (replicas starting together), SQLite answers "database is locked" at once, without its busy handler,
    so this retries for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def is_database_url(target) -> bool:
    """A PostgreSQL URL (``postgresql://...`` or ``postgres://...``) rather than a SQLite file path."""
    return isinstance(target, str) and target.split("://", 1)[0] in ("postgresql", "postgres")


def open_store(target, stale_after_s: float = 120.0) -> "CreditStore":
    """The credit store for ``--db``: PostgreSQL for a ``postgresql://`` URL, else a SQLite file."""
    if is_database_url(target):
        from sd3trt.server.pgstore import PostgresCreditStore

        return PostgresCreditStore(target, stale_after_s=stale_after_s)
    return SqliteCreditStore(target, stale_after_s=stale_after_s)


def db_target(value: str):
    """``--db`` as given: a URL stays a string, anything else is a path."""
    return value if is_database_url(value) else Path(value)


class CreditStore:
    """Keys and the credit journal, whatever the database. Subclasses provide ``_tx()`` (a write
    transaction yielding an object with ``execute(sql, args)`` that takes ``?`` placeholders),
    ``_read()``, ``close()`` and ``where`` (how messages name the database). Every operation is one
    short transaction; every state change is guarded so that it happens once under concurrency."""

    where = "the key database"
    instance_id: str | None = None
    stale_after_s: float = 120.0

    @contextmanager
    def _tx(self):
        raise NotImplementedError

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        """Raises StoreUnavailable when the database cannot be read now (the readiness check)."""
        self._read("SELECT value FROM meta WHERE name = 'schema_version'")

    def schema_version(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE name = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    def _check_version(self, found: str | None) -> None:
        if found is not None and int(found) > SCHEMA_VERSION:
            raise Sd3trtError(f"{self.where} has schema version {found}, newer than this sd3trt ({SCHEMA_VERSION}); "
                              "upgrade sd3trt")

    # -- keys -----------------------------------------------------------------------------------
    def create_key(self, credits: int, name: str = "") -> str:
        if credits < 0:
            raise Sd3trtError(f"credits must be >= 0, got {credits}")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO keys (id, secret_sha256, name, credits, created_at) VALUES (?, ?, ?, ?, ?)",
                       (key_id, _hash(secret), name, credits, now))
            db.execute("INSERT INTO grants (key_id, amount, at) VALUES (?, ?, ?)", (key_id, credits, now))
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def resolve_id(self, key_or_id: str) -> str:
        """A key id, or a full key (its id part), -> an existing key id."""
        parts = split_key(key_or_id)
        key_id = parts[0] if parts else key_or_id
        if not self._read("SELECT 1 FROM keys WHERE id = ?", (key_id,)):
            raise Sd3trtError(f"no key with id {key_id!r} in {self.where}; `sd3trt keys list` shows the ids")
        return key_id

    def topup(self, key_or_id: str, amount: int) -> int:
        if amount <= 0:
            raise Sd3trtError(f"--credits must be a positive number for a top-up, got {amount}")
        key_id = self.resolve_id(key_or_id)
        with self._tx() as db:
            (credits,) = db.execute("UPDATE keys SET credits = credits + ? WHERE id = ? RETURNING credits",
                                    (amount, key_id)).fetchone()
            db.execute("INSERT INTO grants (key_id, amount, at) VALUES (?, ?, ?)", (key_id, amount, time.time()))
        return credits

    def set_disabled(self, key_or_id: str, disabled: bool) -> None:
        key_id = self.resolve_id(key_or_id)
        with self._tx() as db:
            db.execute("UPDATE keys SET disabled = ? WHERE id = ?", (int(disabled), key_id))

    def list_keys(self) -> list[KeyInfo]:
        rows = self._read(
            "SELECT k.id, k.name, k.credits, k.created_at, k.disabled, "
            " CAST(COALESCE(SUM(CASE WHEN d.state = 'pending' THEN d.amount END), 0) AS BIGINT), "
            " CAST(COALESCE(SUM(CASE WHEN d.state = 'committed' THEN d.amount END), 0) AS BIGINT) "
            "FROM keys k LEFT JOIN debits d ON d.key_id = k.id GROUP BY k.id ORDER BY k.created_at")
        return [KeyInfo(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def authenticate(self, key: str | None) -> str | None:
        """The key's id when ``key`` is a valid enabled key, else None. Constant-time in the secret."""
        if not key or len(key) > 200:
            return None
        parts = split_key(key)
        key_id, secret = parts if parts else ("", key)
        rows = self._read("SELECT secret_sha256, disabled FROM keys WHERE id = ?", (key_id,)) if parts else []
        stored, disabled = rows[0] if rows else (_DUMMY_HASH, 1)
        ok = hmac.compare_digest(_hash(secret).encode(), stored.encode())
        return key_id if ok and rows and not disabled else None

    def balance(self, key_id: str) -> int:
        rows = self._read("SELECT credits FROM keys WHERE id = ?", (key_id,))
        return rows[0][0] if rows else 0

    # -- the journal ----------------------------------------------------------------------------
    def debit(self, key_id: str, amount: int, note: str = "") -> tuple[int, int]:
        """Take ``amount`` credits atomically. Returns (debit id, credits left); raises InsufficientCredits."""
        owner = self.instance_id or f"cli-{os.getpid()}"
        with self._tx() as db:
            row = db.execute("UPDATE keys SET credits = credits - ? WHERE id = ? AND credits >= ? AND disabled = 0 "
                             "RETURNING credits", (amount, key_id, amount)).fetchone()
            if row is None:
                left = db.execute("SELECT credits FROM keys WHERE id = ?", (key_id,)).fetchone()
                raise InsufficientCredits(left[0] if left else 0, amount)
            (debit_id,) = db.execute("INSERT INTO debits (key_id, amount, state, owner, note, created_at) "
                                     "VALUES (?, ?, 'pending', ?, ?, ?) RETURNING id",
                                     (key_id, amount, owner, note, time.time())).fetchone()
            return debit_id, row[0]

    def commit(self, debit_id: int) -> bool:
        """pending -> committed. False when the debit was already settled (e.g. refunded by recovery)."""
        with self._tx() as db:
            cur = db.execute("UPDATE debits SET state = 'committed', settled_at = ? WHERE id = ? AND state = 'pending'",
                             (time.time(), debit_id))
            return cur.rowcount == 1

    def charge(self, debit_id: int) -> int | None:
        """Make the debit final before its image is handed out: pending -> committed, or, when recovery
        refunded it meanwhile, take the amount again as a new committed debit. Returns the id of the
        committed debit, or None when the key can no longer pay (the image must not be handed out).
        Idempotent: called again (its answer lost to an outage), it returns the same committed debit."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("UPDATE debits SET state = 'committed', settled_at = ? WHERE id = ? AND state = 'pending' "
                             "RETURNING id", (now, debit_id)).fetchone()
            if row is not None:
                return debit_id
            key_id, amount, state, owner = db.execute("SELECT key_id, amount, state, owner FROM debits WHERE id = ?",
                                                      (debit_id,)).fetchone()
            if state == "committed":
                return debit_id
            note = f"charged again: debit {debit_id} was refunded by recovery"
            again = db.execute("SELECT id FROM debits WHERE key_id = ? AND note = ? AND state = 'committed'",
                               (key_id, note)).fetchone()
            if again is not None:  # an earlier call charged it again and its answer was lost (an outage)
                return again[0]
            if db.execute("UPDATE keys SET credits = credits - ? WHERE id = ? AND credits >= ? AND disabled = 0 "
                          "RETURNING credits", (amount, key_id, amount)).fetchone() is None:
                return None
            (new_id,) = db.execute("INSERT INTO debits (key_id, amount, state, owner, note, created_at, settled_at) "
                                   "VALUES (?, ?, 'committed', ?, ?, ?, ?) RETURNING id",
                                   (key_id, amount, owner, note, now, now)).fetchone()
            return new_id

    def refund_delivered(self, debit_id: int, note: str = "") -> bool:
        """committed -> refunded, credits given back: the image of a charged request never left the server."""
        with self._tx() as db:
            return self._refund_in_tx(db, debit_id, note, state="committed")

    def refund(self, debit_id: int, note: str = "") -> bool:
        """pending -> refunded, credits given back. False when already settled (refunds happen once)."""
        with self._tx() as db:
            return self._refund_in_tx(db, debit_id, note)

    @staticmethod
    def _refund_in_tx(db, debit_id: int, note: str, state: str = "pending") -> bool:
        """`state` -> refunded, in the caller's transaction; False when the debit is not in `state`."""
        row = db.execute("UPDATE debits SET state = 'refunded', settled_at = ?, note = note || ? "
                         "WHERE id = ? AND state = ? RETURNING key_id, amount",
                         (time.time(), f" refund: {note}" if note else " refund", debit_id, state)).fetchone()
        if row is None:
            return False
        db.execute("UPDATE keys SET credits = credits + ? WHERE id = ?", (row[1], row[0]))
        return True

    def pending(self) -> list[tuple[int, str, int, str]]:
        return self._read("SELECT id, key_id, amount, owner FROM debits WHERE state = 'pending' ORDER BY id")

    def own_pending(self) -> list[tuple[int, int, str]]:
        """(debit id, amount, note) of this instance's pending debits; a server's note is the request id."""
        return self._read("SELECT id, amount, note FROM debits WHERE state = 'pending' AND owner = ? ORDER BY id",
                          (self.instance_id or "",))

    # -- server instances and recovery ----------------------------------------------------------
    def register_instance(self) -> str:
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        _LIVE_HERE.add(self.instance_id)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO instances (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                       (self.instance_id, socket.gethostname(), os.getpid(), now, now))
        return self.instance_id

    def heartbeat(self) -> None:
        if self.instance_id:
            with self._tx() as db:
                db.execute("UPDATE instances SET heartbeat_at = ? WHERE id = ?", (time.time(), self.instance_id))

    def unregister_instance(self) -> None:
        if self.instance_id:
            _LIVE_HERE.discard(self.instance_id)
            with self._tx() as db:
                db.execute("UPDATE instances SET stopped_at = ? WHERE id = ?", (time.time(), self.instance_id))

    def _owner_gone(self, owner: str, inst: dict, now: float) -> bool:
        if owner == self.instance_id:
            return False
        row = inst.get(owner)
        if row is None:  # a CLI debit or an instance row that no longer exists
            return True
        host, pid, heartbeat_at, stopped_at = row
        if stopped_at is not None:
            return True
        if host == socket.gethostname():
            if pid == os.getpid():  # our pid, not one of our instances: a restart that got the same pid
                return owner not in _LIVE_HERE
            if not _pid_alive(pid):
                return True
        return now - heartbeat_at > self.stale_after_s

    def recover(self) -> int:
        """Refund pending debits whose server is gone. Returns how many were refunded.

        One transaction per debit, re-judging its owner inside it: each takes the debit's row, then the
        key's, the order every other transition uses, so replicas recovering at once never deadlock
        (PostgreSQL), and an owner that renewed its lease meanwhile keeps its debit."""
        now = time.time()
        inst = {r[0]: r[1:] for r in self._read("SELECT id, host, pid, heartbeat_at, stopped_at FROM instances")}
        pend = self._read("SELECT id, owner FROM debits WHERE state = 'pending' ORDER BY id")
        n = 0
        for debit_id, owner in pend:
            if not self._owner_gone(owner, inst, now):
                continue
            with self._tx() as db:
                row = db.execute("SELECT id, host, pid, heartbeat_at, stopped_at FROM instances WHERE id = ?",
                                 (owner,)).fetchone()
                if self._owner_gone(owner, {row[0]: row[1:]} if row else {}, time.time()):
                    n += self._refund_in_tx(db, debit_id, "server stopped before finishing")
        # Forget instances that stopped long ago and own nothing pending.
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE id != ? AND (stopped_at IS NOT NULL OR heartbeat_at < ?) "
                       "AND id NOT IN (SELECT owner FROM debits WHERE state = 'pending')",
                       (self.instance_id or "", now - 7 * 86400))
        return n


# sqlite3.OperationalError messages that mean the file cannot be used now, not that the SQL is wrong.
_SQLITE_UNAVAILABLE = ("database is locked", "readonly database", "database or disk is full", "disk I/O error",
                       "unable to open database file")


class SqliteCreditStore(CreditStore):
    """SQLite (WAL mode), one host. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: str | Path, stale_after_s: float = 120.0, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Sd3trtError(f"cannot create the directory of the key database {self.path} ({e.strerror}); "
                              "pass a writable --db path") from None
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = _journal_wal(self._db)
            self._db.execute("PRAGMA synchronous = FULL")  # money: a committed debit survives power loss
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._tx():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(stmt)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                found = self._db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            self._check_version(found[0] if found else None)
        except (sqlite3.DatabaseError, StoreUnavailable) as e:
            raise Sd3trtError(f"cannot open the key database {self.path} ({e}); pass a writable --db path") from None
        if mode.lower() != "wal":
            raise Sd3trtError(f"the key database {self.path} cannot use WAL mode (got {mode}); put it on a local disk")
        self.instance_id: str | None = None

    # -- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def _available(self):
        """SQLite's errors about the file (locked past the busy timeout, read-only, full, I/O) as
        StoreUnavailable; errors about the SQL stay what they are."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if not any(w in str(e) for w in _SQLITE_UNAVAILABLE):
                raise
            raise OUTAGES.failed(self.where, str(e)) from None
        OUTAGES.succeeded(self.where)

    @contextmanager
    def _tx(self):
        """A write transaction; BEGIN IMMEDIATE takes SQLite's write lock at once (no upgrade deadlocks)."""
        with self._lock, self._available():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also after a COMMIT that failed (a full disk)
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, self._available():
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
