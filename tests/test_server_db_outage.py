"""The credit database going away under load: a real `sd3trt serve` process on the tiny bundle,
credits in a real PostgreSQL with its durable defaults (tests/pg_local.py), restarted `fast` (clients
disconnected) and `immediate` (a crash) while 60 requests of one key are in flight.

While the server keeps running, once the database is back and one reconciliation pass has run, every
credit is accounted for: images delivered + balance == credits granted, nothing left pending. During
the outage requests get 503 db_unavailable (never a 500, never a traceback in the log) and /readyz says
not ready; it says ready again once the database is back.
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from needs import need

need("fastapi")
requests = need("requests")
need("psycopg")

from PIL import Image  # noqa: E402

from sd3trt.server.keystore import open_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from pg_local import LocalPostgres, pg_bin  # noqa: E402
from test_server import ServerProcess, post  # noqa: E402
from helpers import wait_until  # noqa: E402

CREDITS, REQUESTS, DOWN_S = 40, 60, 3.0
HEARTBEAT = 0.5


@pytest.fixture(scope="module")
def durable_pg():
    if pg_bin() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    server = LocalPostgres(durable=True).start()
    yield server
    server.stop()


def _readyz(srv: ServerProcess) -> int:
    try:
        return requests.get(srv.url("/readyz"), timeout=5).status_code
    except requests.RequestException:
        return 0


def _balance_or_none(store, key_id):
    from sd3trt.server.keystore import StoreUnavailable

    try:
        return store.balance(key_id)
    except StoreUnavailable:
        return None


def _is_image(r: requests.Response) -> bool:
    if r.status_code != 200:
        return False
    return Image.open(io.BytesIO(r.content)).size == (64, 64)


@pytest.mark.parametrize("mode,charge_retry", [("fast", 10), ("immediate", 10), ("fast", 0)])
def test_postgres_restart_under_load_settles_every_credit_while_the_server_runs(durable_pg, tiny_sd3, tmp_path, mode,
                                                                                charge_retry):
    """With the default --charge-retry the charges of images finished during the outage wait for the database
    and the images are delivered; with 0 they are withheld (503) and their debits settled afterwards."""
    url = durable_pg.fresh_database(f"outage_{mode}_{charge_retry}")
    log = tmp_path / "server.log"
    srv = ServerProcess(tiny_sd3[1], url, log, "--max-inflight-per-key", "64", "--heartbeat", str(HEARTBEAT),
                        "--lease", "6", "--graceful-timeout", "2", "--inflight-grace", "2",
                        "--charge-retry", str(charge_retry)).start()
    store = open_store(url)
    key = store.create_key(CREDITS)
    key_id = key.split("_")[1]
    pool = ThreadPoolExecutor(REQUESTS)
    try:
        load = [pool.submit(post, srv, key, num_inference_steps=24) for _ in range(REQUESTS)]
        time.sleep(1.0)
        durable_pg.pause(mode)
        back_at = time.monotonic() + DOWN_S
        during = post(srv, key)
        probes = []
        while time.monotonic() < back_at:  # bounded by the outage's length
            probes.append(_readyz(srv))
            time.sleep(0.2)
        durable_pg.resume()
        results = [f.result(timeout=120) for f in load]
        wait_until(lambda: _readyz(srv) == 200, 20, "/readyz to say ready again after the database came back")
        # One reconciliation pass (a heartbeat) after the last request finished: nothing of ours stays pending.
        wait_until(lambda: not store.pending(), 10 + 4 * HEARTBEAT, "the server to settle its pending debits")
        images = sum(_is_image(r) for r in results)
        balance = store.balance(key_id)
        codes = sorted(r.status_code for r in results)
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        print(f"\n[figures] PostgreSQL restarted -m {mode}, {DOWN_S:g} s down, durable settings, --charge-retry "
              f"{charge_retry}: {counts}; "
              f"request during the outage {during.status_code} {during.json().get('code')}; images {images}, "
              f"balance while the server lives {balance}, images + balance {images + balance} of {CREDITS}; "
              f"/readyz during the outage {sorted(set(probes))} ({len(probes)} probes)")
        assert images + balance == CREDITS, counts
        # 406: while many debits run at once, ones beyond the balance are refused (the queue-full ones are refunded).
        assert set(codes) <= {200, 406, 429, 503}, counts
        assert all(r.json()["code"] == "db_unavailable" for r in results if r.status_code == 503)
        if charge_retry == 0:  # the requests in flight met the outage at their charge: withheld, then settled
            assert 503 in codes and "image withheld" in log.read_text(), counts
        assert during.status_code == 503 and during.json()["code"] == "db_unavailable", during.text
        assert during.headers["retry-after"] == "5"
        assert 503 in probes and 200 not in probes, probes
        text = log.read_text()
        assert "Traceback" not in text and "unhandled" not in text, text[-3000:]
        assert text.count("until it is back") == 1 and text.count("available again") == 1, text[-3000:]  # per outage
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        srv.stop()
    committed = store._read("SELECT COALESCE(SUM(amount), 0) FROM debits WHERE key_id = ? AND state = 'committed'",
                            (key_id,))[0][0]
    assert committed == images and store.balance(key_id) == balance  # SIGTERM had nothing left to refund


def test_postgres_store_fails_fast_during_an_outage_and_reconnects_once_it_is_back(durable_pg, caplog):
    from sd3trt.server.keystore import StoreUnavailable

    url = durable_pg.fresh_database("reconnect")
    store, idle = open_store(url), open_store(url)
    key_id = store.create_key(5).split("_")[1]
    assert idle.balance(key_id) == 5
    durable_pg.pause("fast")
    try:
        t0 = time.monotonic()
        for _ in range(20):  # at most one connection attempt per second; the others fail at once
            with pytest.raises(StoreUnavailable, match="is unavailable"):
                store.debit(key_id, 1)
        took = time.monotonic() - t0
    finally:
        durable_pg.resume()
    assert took < 2.0, took
    # A connection the restart dropped while it sat idle is noticed at BEGIN and replaced: its first call works.
    debit_id, left = idle.debit(key_id, 1)
    assert left == 4 and idle.charge(debit_id) == debit_id
    # The store that met the outage connects again at its next attempt (within a second).
    wait_until(lambda: _balance_or_none(store, key_id) == 4, 3, "the store to reconnect")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("until it is back" in m for m in messages) == 1 and sum("available again" in m for m in messages) == 1
