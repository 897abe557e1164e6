"""Two server processes on one key database: images delivered == credits spent.

1. A busy instance keeps its lease: its heartbeat runs in a thread of its own, so a generation longer
   than the lease plus a full fetch pool on A do not let B refund A's pending debits.
2. A stalled instance (SIGSTOP, longer than the lease) does lose its pending debits to B's recovery;
   when it resumes, the fence charges again (the key still has credits) or withholds the image (503,
   it has none). No image is free, none is charged twice.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("requests")

from test_server import ServerProcess, _wait, balance, new_key, post  # noqa: E402
from test_server_abuse import DripHost  # noqa: E402

from sd3trt.server.keystore import SqliteCreditStore  # noqa: E402

HEARTBEAT, LEASE = 0.5, 3.0


def debits(db, key: str) -> dict[str, int]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT state, SUM(amount) FROM debits WHERE key_id = ? GROUP BY state",
                         (key.split("_")[1],)).fetchall()
    return dict(rows)


def instance_of(db, pid: int) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT id FROM instances WHERE pid = ? AND stopped_at IS NULL", (pid,)).fetchone()[0]


@pytest.fixture(scope="module")
def pair(tiny_sd3, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("instances")
    args = ("--heartbeat", str(HEARTBEAT), "--lease", str(LEASE), "--max-steps", "6000", "--fetch-workers", "2",
            "--fetch-timeout", "8", "--allow-fetch-host", "127.0.0.1", "--graceful-timeout", "1",
            "--inflight-grace", "1")
    a = ServerProcess(tiny_sd3[1], tmp_path / "keys.db", tmp_path / "a.log", *args).start()
    b = ServerProcess(tiny_sd3[1], tmp_path / "keys.db", tmp_path / "b.log", *args).start()
    yield a, b
    for s in (a, b):
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGCONT)
        s.stop(signal.SIGKILL)


def test_busy_instance_keeps_its_lease(pair):
    a, b = pair
    k = new_key(a, 1)
    host = DripHost("header", every_s=1.0)
    pool = ThreadPoolExecutor(6)
    try:
        k2 = new_key(a, 4)
        stuck = [pool.submit(post, a, k2, image=host.url()) for _ in range(4)]  # A's fetch pool full
        t0 = time.monotonic()
        r = post(a, k, num_inference_steps=3000)
        took = time.monotonic() - t0
        assert took > LEASE + 2 * HEARTBEAT, f"the generation ({took:.1f} s) must outlast the lease to prove anything"
        assert r.status_code == 200, r.text
        assert debits(a.db, k) == {"committed": 1} and balance(a, k) == 0
        assert "refunded" not in b.log.read_text()
        assert all(f.result(timeout=60).json()["code"] in ("url_timeout", "busy") for f in stuck)
    finally:
        host.close()
        pool.shutdown(wait=False, cancel_futures=True)


def test_stalled_instance_loses_its_debits_and_the_fence_holds(pair, capsys):
    a, b = pair
    k = new_key(a, 5)
    pool = ThreadPoolExecutor(2)
    try:
        on_a = [pool.submit(post, a, k, num_inference_steps=800) for _ in range(2)]  # one generating, one queued
        a_id = instance_of(a.db, a.proc.pid)
        _wait(lambda: sum(1 for p in SqliteCreditStore(a.db).pending() if p[3] == a_id) == 2, what="A's two debits")
        a.proc.send_signal(signal.SIGSTOP)  # A's heartbeat stalls with the rest of it
        _wait(lambda: balance(b, k) == 5, timeout=LEASE + 20, what="B to refund A's pending debits")
        on_b = [post(b, k) for _ in range(4)]  # B spends the refunded credits
        assert [r.status_code for r in on_b] == [200] * 4 and balance(b, k) == 1
        a.proc.send_signal(signal.SIGCONT)
        from_a = [f.result(timeout=120) for f in on_a]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    codes = sorted(r.status_code for r in from_a)
    assert codes == [200, 503], [(r.status_code, r.text[:200]) for r in from_a]
    withheld = next(r for r in from_a if r.status_code == 503)
    assert withheld.json()["code"] == "payment_lost" and withheld.headers["x-remaining-credits"] == "0"
    assert not withheld.content.startswith(b"\x89PNG")
    images = 4 + codes.count(200)
    spent = 5 - balance(a, k)
    state = debits(a.db, k)
    with capsys.disabled():
        print(f"\n[instances] A stalled past its lease: {images} images delivered, {spent} credits spent "
              f"(journal {state})")
    assert images == spent == state["committed"] == 5
    assert not SqliteCreditStore(a.db).pending()
    with sqlite3.connect(a.db) as c:
        notes = [n for (n,) in c.execute("SELECT note FROM debits WHERE key_id = ?", (k.split("_")[1],))]
    assert sum("charged again" in n for n in notes) == 1
    assert "image withheld" in a.log.read_text()


def test_readyz_reports_a_wedged_instance(pair):
    """The key database locked by another process: the lease cannot be renewed and the database threads
    are stuck, so /readyz says not ready (with the reason) while /healthz still answers; then it recovers."""
    import requests

    a, _ = pair
    k = new_key(a, 3)
    db = sqlite3.connect(a.db, timeout=30, isolation_level=None)
    pool = ThreadPoolExecutor(3)
    try:
        db.execute("BEGIN IMMEDIATE")
        stuck = [pool.submit(post, a, k) for _ in range(3)]  # their debits wait for the lock
        reasons = []
        deadline = time.monotonic() + LEASE + 5
        while time.monotonic() < deadline and not reasons:
            r = requests.get(a.url("/readyz"), timeout=10)
            if r.status_code == 503:
                reasons.append(r.json()["reason"])
            time.sleep(0.2)
        t0 = time.monotonic()
        assert requests.get(a.url("/healthz"), timeout=5).status_code == 200 and time.monotonic() - t0 < 1
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert reasons and "database" in reasons[0], reasons
    _wait(lambda: requests.get(a.url("/readyz"), timeout=10).status_code == 200, timeout=LEASE + 10,
          what="ready again")
    answers = [f.result(timeout=60) for f in stuck]
    # Those that reached the debit before the lease ran short were served; the others found the server
    # not ready (it takes no new work on a stale lease). Either way nothing is charged without an image.
    assert all(r.status_code == 200 or (r.status_code == 503 and r.json()["code"] == "not_ready") for r in answers)
    assert balance(a, k) == 3 - sum(r.status_code == 200 for r in answers) and not SqliteCreditStore(a.db).pending()
    pool.shutdown()
