"""Server building blocks in-process: URL fetch policy (SSRF), image input checks, the worker thread (the
credit journal's tests run on both stores in test_scale_out.py).

No traffic leaves 127.0.0.1: refused URLs are checked with an injected resolver and a connector that
fails the test if it is ever called; the one real fetch goes to a local HTTP server.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from sd3trt.server import fetch as F
from sd3trt.server import inputs


def no_connect(ip, port, timeout):
    raise AssertionError(f"a connection to {ip}:{port} was attempted; the URL should have been refused first")


def fake_dns(table):
    def resolve(host, port):
        if host not in table:
            raise AssertionError(f"unexpected DNS lookup of {host}")
        return table[host]
    return resolve


PRIVATE = {
    "loopback.test": ["127.0.0.1"],
    "loopback6.test": ["::1"],
    "private10.test": ["10.1.2.3"],
    "private192.test": ["192.168.0.10"],
    "private172.test": ["172.16.5.4"],
    "cgnat.test": ["100.64.0.1"],
    "metadata.test": ["169.254.169.254"],
    "linklocal6.test": ["fe80::1"],
    "ula6.test": ["fd00::1"],
    "multicast.test": ["224.0.0.251"],
    "multicast6.test": ["ff02::1"],
    "unspecified.test": ["0.0.0.0"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],  # 169.254.169.254 through NAT64
    "sixtofour.test": ["2002:c0a8:0001::1"],  # 192.168.0.1 through 6to4
    "mixed.test": ["93.184.215.14", "10.0.0.1"],  # one private answer is enough to refuse
    "broadcast.test": ["255.255.255.255"],
    "docs.test": ["192.0.2.1"],
}


@pytest.mark.parametrize("host", sorted(PRIVATE))
def test_fetch_refuses_non_public_addresses_before_connecting(host):
    policy = F.FetchPolicy()
    with pytest.raises(F.FetchError) as e:
        F.fetch(f"http://{host}/cat.png", policy, 10**6, resolve=fake_dns(PRIVATE), connect=no_connect)
    assert e.value.status == 400 and e.value.code == "url_refused"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://[::1]:8080/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/", "http://0.0.0.0:80/", "http://[::ffff:127.0.0.1]/", "http://2130706433/",
])
def test_fetch_refuses_ip_literals_with_the_real_resolver(url):
    # IP literals resolve without DNS; the policy refuses them before any socket is opened.
    with pytest.raises(F.FetchError) as e:
        F.fetch(url, F.FetchPolicy(), 10**6, connect=no_connect)
    assert e.value.code == "url_refused"


@pytest.mark.parametrize("url,code", [
    ("file:///etc/passwd", "url_refused"),
    ("ftp://example.test/x.png", "url_refused"),
    ("gopher://example.test/", "url_refused"),
    ("http://user:pw@example.test/x.png", "url_refused"),
    ("http:///nohost", "bad_image_url"),
    ("http://example.test:99999/", "bad_image_url"),
])
def test_fetch_refuses_bad_urls(url, code):
    with pytest.raises(F.FetchError) as e:
        F.fetch(url, F.FetchPolicy(), 10**6, resolve=fake_dns({}), connect=no_connect)
    assert e.value.code == code


def test_fetch_disabled():
    with pytest.raises(F.FetchError, match="base64"):
        F.fetch("http://example.test/", F.FetchPolicy(enabled=False), 10**6, resolve=fake_dns({}), connect=no_connect)


def test_public_address_is_contacted_at_the_vetted_ip():
    """A public answer is allowed, and the socket goes to that address (no second resolution)."""
    seen = []

    def connect(ip, port, timeout):
        seen.append((ip, port))
        raise OSError("test: stop here")

    with pytest.raises(F.FetchError) as e:
        F.fetch("https://images.example.test/a.png", F.FetchPolicy(), 10**6,
                resolve=fake_dns({"images.example.test": ["93.184.215.14"]}), connect=connect)
    assert e.value.code == "url_unreachable"
    assert seen == [("93.184.215.14", 443)]


def test_allowlist_by_name_and_network():
    policy = F.FetchPolicy(allow_hosts=("imgstore.internal", "10.20.0.0/16"))
    assert F.vet("imgstore.internal", ["10.9.9.9"], policy) == ["10.9.9.9"]
    assert F.vet("other.internal", ["10.20.3.4"], policy) == ["10.20.3.4"]
    with pytest.raises(F.FetchError):
        F.vet("other.internal", ["10.21.3.4"], policy)


# -- a local image server (127.0.0.1 only) for redirects, limits and timeouts ----------------------------

def png_bytes(w=64, h=64, color=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if callable(body):
            body = body()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def image_site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    base = f"http://127.0.0.1:{port}"
    Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png_bytes()),
        "/big.png": (200, {"Content-Type": "image/png"}, b"x" * 5000),
        "/to-ok": (302, {"Location": "/ok.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (301, {"Location": "http://10.0.0.1/x.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/missing": (404, {}, b"nope"),
    }
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield base
    httpd.shutdown()
    httpd.server_close()


def guarded_connect(ip, port, timeout):
    assert ip == "127.0.0.1", f"only 127.0.0.1 may be contacted in tests, not {ip}"
    return F.default_connect(ip, port, timeout)


def local_policy(**kw):
    return F.FetchPolicy(allow_hosts=("127.0.0.1",), **kw)


def test_fetch_from_allowlisted_local_server(image_site):
    data = F.fetch(f"{image_site}/ok.png", local_policy(), 10**6, connect=guarded_connect)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert F.fetch(f"{image_site}/to-ok", local_policy(), 10**6, connect=guarded_connect) == data
    # Without the allowlist the same URL is loopback and refused.
    with pytest.raises(F.FetchError, match="loopback"):
        F.fetch(f"{image_site}/ok.png", F.FetchPolicy(), 10**6, connect=no_connect)


@pytest.mark.parametrize("path,code,status", [
    ("/to-metadata", "url_refused", 400),
    ("/to-private", "url_refused", 400),
    ("/loop", "bad_image_url", 400),
    ("/missing", "url_failed", 400),
    ("/big.png", "image_too_large", 413),
])
def test_fetch_redirects_and_limits(image_site, path, code, status):
    with pytest.raises(F.FetchError) as e:
        F.fetch(f"{image_site}{path}", local_policy(), 1000, connect=guarded_connect)
    assert (e.value.code, e.value.status) == (code, status), str(e.value)


def test_fetch_timeout():
    """A server that accepts and never answers: the fetch gives up after timeout_s."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(F.FetchError) as e:
            F.fetch(f"http://127.0.0.1:{port}/slow.png", local_policy(timeout_s=0.5), 10**6, connect=guarded_connect)
        assert e.value.code == "url_timeout"
        assert time.monotonic() - t0 < 10  # gave up (0.5 s asked); a generous bound for a busy 2-core machine
    finally:
        lsock.close()


# -- image inputs ------------------------------------------------------------------------------------------

def test_base64_variants():
    raw = png_bytes()
    enc = base64.b64encode(raw).decode()
    assert inputs.decode_base64(enc, 10**6) == raw
    assert inputs.decode_base64("data:image/png;base64," + enc, 10**6) == raw
    assert inputs.decode_base64("\n".join(enc[i:i + 76] for i in range(0, len(enc), 76)), 10**6) == raw
    assert inputs.decode_base64(enc.rstrip("="), 10**6) == raw
    for bad in ("not base64!!", "%%%%", "@@@@"):
        with pytest.raises(inputs.InputError) as e:
            inputs.decode_base64(bad, 10**6)
        assert e.value.code == "bad_base64"
    with pytest.raises(inputs.InputError) as e:
        inputs.decode_base64(enc, 100)
    assert e.value.status == 413


def test_image_checks(tmp_path):
    im = inputs.open_image(png_bytes(32, 16), max_pixels=1000)
    assert im.size == (32, 16)
    with pytest.raises(inputs.InputError) as e:
        inputs.open_image(png_bytes(64, 64), max_pixels=1000)
    assert e.value.status == 413
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    with pytest.raises(inputs.InputError, match="GIF images are not accepted") as e:
        inputs.open_image(gif.getvalue(), 10**6)
    assert e.value.status == 400
    with pytest.raises(inputs.InputError, match="not an image"):
        inputs.open_image(b"hello, this is text", 10**6)
    with pytest.raises(inputs.InputError, match="corrupt|truncated"):
        inputs.open_image(png_bytes()[:60], 10**6)


# -- the worker thread ------------------------------------------------------------------------------------

def test_worker_closes_the_pipeline_in_its_own_thread_when_stopped():
    """Engines are released (TensorRT saves its runtime cache) by the thread that ran them, at stop."""
    import threading

    from sd3trt.server.worker import Worker

    closed = []

    class Pipe:
        def close(self):
            closed.append(threading.current_thread().name)

    w = Worker(Pipe, lambda pipe, job: None, queue_size=1, name="w-test")
    w.start()
    assert w.ready.wait(10)
    assert w.stop(timeout=5) == [] and closed == ["sd3trt-w-test"]


def test_engines_loaded_waits_for_the_load_and_names_a_failure(tmp_path):
    """A Ray Serve replica's health check: it waits while the engines load, then says whether they did."""
    import asyncio

    from sd3trt.server.config import ServerConfig
    from sd3trt.server.service import Server
    from sd3trt.server.worker import Worker

    go = threading.Event()

    def slow():
        assert go.wait(10)
        return object()

    def broken():
        raise FileNotFoundError("no manifest.json in /nowhere")

    srv = Server(ServerConfig(bundle=None, db=tmp_path / "k.db"))
    try:
        srv.worker = Worker(slow, lambda pipe, job: None, queue_size=1)
        srv.worker.start()
        assert asyncio.run(srv.engines_loaded(0.2)) == "the engines were still loading after 0.2 s"
        go.set()
        assert asyncio.run(srv.engines_loaded(10)) is None
        srv.worker.stop(timeout=5)
        srv.worker = Worker(broken, lambda pipe, job: None, queue_size=1)
        srv.worker.start()
        why = asyncio.run(srv.engines_loaded(10))
        assert why == "the engines failed to load: FileNotFoundError: no manifest.json in /nowhere"
    finally:
        srv.pools.close()


# -- IPv6 spellings of internal addresses ------------------------------------------------------------------

IPV6_REFUSED = [
    "::169.254.169.254",  # IPv4-compatible metadata
    "::127.0.0.1",  # IPv4-compatible loopback
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64, /96 layout
    "64:ff9b:1:7f00:0:100::",  # local-use NAT64, /48 layout of 127.0.0.1
    "64:ff9b::7f00:1",  # well-known NAT64 of loopback
    "fec0::1",  # site-local
    "::ffff:0:7f00:1",  # IPv4-translated loopback
    "::ffff:a9fe:a9fe",  # IPv4-mapped metadata
    "2002:a9fe:a9fe::1",  # 6to4 of metadata
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45 (documentation)
    "2001:db8::1",  # documentation
    "100::1",  # discard-only
    "5f00::1",  # outside 2000::/3
    "::",
    "fc00::1",
]


def recording_connect(calls):
    def connect(ip, port, timeout):
        calls.append((ip, port))
        raise OSError("test: no connection is ever made")
    return connect


@pytest.mark.parametrize("addr", IPV6_REFUSED)
def test_ipv6_spellings_refused_before_any_connect(addr):
    calls = []
    for url, resolve in ((f"http://[{addr}]/x.png", F.default_resolve),  # a literal: no DNS
                         ("http://internal.test/x.png", fake_dns({"internal.test": [addr]}))):
        with pytest.raises(F.FetchError) as e:
            F.fetch(url, F.FetchPolicy(), 10**6, resolve=resolve, connect=recording_connect(calls))
        assert e.value.code == "url_refused", (url, str(e.value))
    assert calls == []


@pytest.mark.parametrize("addr", ["2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"])
def test_public_ipv6_and_public_embedded_ipv4_are_allowed(addr):
    calls = []
    with pytest.raises(F.FetchError) as e:
        F.fetch(f"http://[{addr}]/x.png", F.FetchPolicy(), 10**6, connect=recording_connect(calls))
    assert e.value.code == "url_unreachable" and calls == [(addr, 80)]


def test_the_server_refuses_the_ipv6_list_before_any_connect(tmp_path):
    """The server's own fetch path (fetch pool, deadline, error mapping) with its connect hook recording."""
    import asyncio

    from sd3trt.server.app import Server, ServerConfig
    from sd3trt.server.schema import ApiError

    srv = Server(ServerConfig(bundle=None, db=tmp_path / "k.db"))
    calls = []
    srv.fetch_connect = recording_connect(calls)

    async def one(addr):
        with pytest.raises(ApiError) as e:
            await srv._fetched(f"http://[{addr}]/x.png")
        return e.value

    try:
        for addr in IPV6_REFUSED:
            err = asyncio.run(one(addr))
            assert (err.status, err.code, err.field) == (400, "url_refused", "image"), addr
    finally:
        srv.pools.close()
    assert calls == []


# -- one deadline for the whole fetch, enforced on the socket ----------------------------------------------

class Dripper:
    """127.0.0.1: answers one connection by dripping its response header, or its body, a byte per 0.2 s."""

    def __init__(self, what):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.stop = threading.Event()
        self.what = what
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.lsock.settimeout(10)
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        data = png_bytes()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        out, start = head + data, (0 if self.what == "header" else len(head))
        try:
            conn.sendall(out[:start])
            for i in range(start, len(out)):  # bounded by the response and by stop
                if self.stop.wait(0.2):
                    break
                conn.sendall(out[i:i + 1])
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.lsock.close()
        self.thread.join(10)


@pytest.mark.parametrize("what", ["header", "body"])
def test_fetch_deadline_holds_against_a_dripping_host(what):
    host = Dripper(what)
    try:
        t0 = time.monotonic()
        with pytest.raises(F.FetchError) as e:
            F.fetch(f"http://127.0.0.1:{host.port}/x.png", local_policy(timeout_s=1.0), 10**6, connect=guarded_connect)
        took = time.monotonic() - t0
    finally:
        host.close()
    assert e.value.code == "url_timeout", str(e.value)
    assert 0.9 < took < 2.5, took  # every byte arrives within the socket timeout; only the deadline stops it


def test_fetch_deadline_cancel_cuts_a_running_fetch():
    host = Dripper("header")
    deadline = F.Deadline(30)
    threading.Timer(0.5, deadline.cancel).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(F.FetchError) as e:
            F.fetch(f"http://127.0.0.1:{host.port}/x.png", local_policy(), 10**6, connect=guarded_connect,
                    deadline=deadline)
    finally:
        host.close()
    assert (e.value.status, e.value.code) == (503, "shutting_down")
    assert time.monotonic() - t0 < 2


def test_fetch_deadline_counts_time_spent_waiting():
    deadline = F.Deadline(0.05)
    time.sleep(0.1)  # e.g. queued behind other fetches
    with pytest.raises(F.FetchError) as e:
        F.fetch("http://127.0.0.1:9/x.png", local_policy(), 10**6, connect=no_connect, deadline=deadline)
    assert e.value.code == "url_timeout"


# -- the ASGI gate: generic 500, 499, 503 at shutdown ------------------------------------------------------

class _Hooks:
    def __init__(self, draining=False):
        self.draining, self.released = draining, []

    def stopping(self):
        return self.draining

    async def credit_headers(self, state):
        return {"x-request-id": state.get("request_id", "-"), "x-remaining-credits": "7"} if "key_id" in state else {}

    def finished(self, state):
        self.released.append(dict(state))


def _gate_call(app, hooks, method="POST", path="/v1/x"):
    import asyncio

    from sd3trt.server.metrics import Metrics
    from sd3trt.server.middleware import Gate

    metrics = Metrics()
    gate = Gate(app, limit=1000, concurrency=4, metrics=metrics, routes={"/v1/x"}, hooks=hooks)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "state": {}}
    asyncio.run(gate(scope, receive, send))
    return sent, metrics.render()


def test_gate_answers_a_bug_with_a_json_500_and_the_credit_header(caplog):
    async def app(scope, receive, send):
        scope["state"].update(request_id="r1", key_id="k1")
        raise RuntimeError("boom")

    sent, metrics = _gate_call(app, _Hooks())
    start = sent[0]
    assert start["status"] == 500
    headers = dict(start["headers"])
    assert headers[b"x-remaining-credits"] == b"7" and headers[b"content-type"] == b"application/json"
    assert b'"code":"internal_error"' in sent[1]["body"]
    assert 'status="500"' in metrics
    assert sum("unhandled RuntimeError" in r.message for r in caplog.records) == 1


def test_gate_logs_a_client_that_left_as_499_without_answering(caplog):
    from starlette.requests import ClientDisconnect

    async def app(scope, receive, send):
        raise ClientDisconnect()

    sent, metrics = _gate_call(app, _Hooks())
    assert sent == [] and 'status="499"' in metrics
    assert not any(r.exc_info for r in caplog.records)


def test_gate_answers_503_for_a_request_cancelled_at_shutdown():
    import asyncio

    async def app(scope, receive, send):
        scope["state"].update(request_id="r2", key_id="k2")
        raise asyncio.CancelledError()

    sent, metrics = _gate_call(app, _Hooks(draining=True))
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"x-remaining-credits"] == b"7"
    assert b"shutting_down" in sent[1]["body"] and 'status="503"' in metrics


def test_gate_collapses_unknown_methods_and_paths():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    _, metrics = _gate_call(app, _Hooks(), method="BREW", path="/coffee")
    assert 'method="other",route="other",status="404"' in metrics and "BREW" not in metrics


def test_gate_limits_requests_but_never_probes():
    """--limit-concurrency: with every request slot taken, a request gets 503 busy, the probes still answer."""
    import asyncio

    from sd3trt.server.metrics import Metrics
    from sd3trt.server.middleware import Gate

    async def main():
        release = asyncio.Event()

        async def app(scope, receive, send):
            if scope["path"] == "/v1/x":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        gate = Gate(app, limit=1000, concurrency=2, metrics=Metrics(), routes={"/v1/x", "/healthz", "/readyz"},
                    hooks=_Hooks())

        async def call(path):
            sent = []

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message):
                sent.append(message)

            await gate({"type": "http", "method": "GET", "path": path, "headers": [], "state": {}}, receive, send)
            return sent[0]["status"], sent[1]["body"]

        held = [asyncio.create_task(call("/v1/x")) for _ in range(2)]
        await asyncio.sleep(0.05)
        status, body = await call("/v1/x")
        assert status == 503 and b'"code":"busy"' in body
        assert (await call("/healthz"))[0] == 200 and (await call("/readyz"))[0] == 200
        release.set()
        assert [(await t)[0] for t in held] == [200, 200]
        assert (await call("/v1/x"))[0] == 200  # the slots are given back

    asyncio.run(main())


# -- the SQLite credit store when its file cannot be used ------------------------------------------------

def _outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "until it is back" in r.getMessage()
            or "available again" in r.getMessage()]


def test_sqlite_store_locked_past_its_busy_timeout_is_unavailable_not_an_error(tmp_path, caplog):
    import sqlite3

    from sd3trt.server.keystore import SqliteCreditStore, StoreUnavailable

    store = SqliteCreditStore(tmp_path / "k.db", busy_timeout_s=0.2)
    key_id = store.create_key(3).split("_")[1]
    other = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    try:
        for _ in range(3):  # each call fails with the one error; the outage is logged once
            with pytest.raises(StoreUnavailable, match="database is locked"):
                store.debit(key_id, 1)
        assert store.balance(key_id) == 3  # WAL: reads go on
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.debit(key_id, 1)
    assert store.balance(key_id) == 2
    lines = _outage_lines(caplog)
    assert len(lines) == 2 and "until it is back" in lines[0] and "available again" in lines[1], lines


def test_sqlite_store_full_or_read_only_is_unavailable_and_rolls_back(tmp_path):
    from sd3trt.server.keystore import SqliteCreditStore, StoreUnavailable

    store = SqliteCreditStore(tmp_path / "k.db")
    key_id = store.create_key(10_000).split("_")[1]
    (pages,) = store._read("PRAGMA page_count")[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the file cannot grow: SQLite's "disk is full"
    taken = 0
    with pytest.raises(StoreUnavailable, match="database or disk is full"):
        for _ in range(10_000):  # bounded: a page of journal rows fills long before
            store.debit(key_id, 1)
            taken += 1
    assert store.balance(key_id) == 10_000 - taken  # the failed debit took nothing
    assert not store._db.in_transaction
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store._db.execute("PRAGMA query_only = ON")  # as a read-only file answers writes
    with pytest.raises(StoreUnavailable, match="readonly"):
        store.debit(key_id, 1)
    store.ping()  # reads still work
    store._db.execute("PRAGMA query_only = OFF")
    store.debit(key_id, 1)
    assert store.balance(key_id) == 10_000 - taken - 1


def test_settle_refunds_only_what_no_request_holds_and_undoes_withheld_charges(tmp_path):
    """What a database outage leaves behind under a live server: its own pending debits of requests that
    are over (a debit or refund whose answer was lost) are refunded, those of requests still in progress
    are not, and a withheld image's charge that did land is given back; a peer's debits are left alone."""
    from sd3trt.server.config import ServerConfig
    from sd3trt.server.keystore import SqliteCreditStore
    from sd3trt.server.service import Server

    store = SqliteCreditStore(tmp_path / "k.db")
    store.register_instance()
    peer = SqliteCreditStore(tmp_path / "k.db")
    peer.register_instance()
    key_id = store.create_key(10).split("_")[1]
    srv = Server(ServerConfig(bundle=None, db=tmp_path / "k.db"))
    try:
        live, _ = store.debit(key_id, 1, "rid-live")
        gone, _ = store.debit(key_id, 1, "rid-gone")
        withheld, _ = store.debit(key_id, 1, "rid-withheld")
        assert store.charge(withheld) == withheld  # the charge landed, but its answer was lost: image withheld
        theirs, _ = peer.debit(key_id, 1, "rid-gone")  # the same note on a peer: not ours to settle
        srv.credits.begin("rid-live")
        srv.credits.withhold(withheld)
        assert store.balance(key_id) == 6
        assert srv.credits.settle(store) == 2
        assert store.balance(key_id) == 8
        assert sorted(p[0] for p in store.pending()) == sorted([live, theirs])
        assert srv.credits.settle(store) == 0  # once
        srv.credits.end("rid-live")
        assert srv.credits.settle(store) == 1 and [p[0] for p in store.pending()] == [theirs]
        assert srv.metrics.counter("credits_refunded") == 3
    finally:
        srv.pools.close()


def test_uvicorn_calls_every_hook_of_the_guarded_protocol():
    """server/protocol.py overrides hooks of uvicorn's private H11Protocol; a uvicorn release that renames
    or stops calling one would leave the server silently without its header/body timeouts. A real
    uvicorn protocol on a loopback socket: each hook is called, and the header timer is armed, disarmed
    when the headers arrive and armed again for the next request."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from sd3trt.server.config import ConnLimits
    from sd3trt.server.protocol import protocol_class

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    calls, timers = [], []
    guarded = protocol_class(ConnLimits(header_timeout_s=30, body_timeout_s=30))

    class Recording(guarded):
        def connection_made(self, transport):
            super().connection_made(transport)
            calls.append("connection_made")
            timers.append(self._timer is not None)

        def handle_events(self):
            super().handle_events()
            calls.append("handle_events")
            timers.append(self._timer is not None)

        def on_response_complete(self):
            super().on_response_complete()
            calls.append("on_response_complete")
            timers.append(self._timer is not None)

        def connection_lost(self, exc):
            super().connection_lost(exc)
            calls.append("connection_lost")

    async def main():
        config = Config(app, lifespan="off", log_level="warning")
        config.load()
        state = ServerState()
        server = await asyncio.get_running_loop().create_server(lambda: Recording(config, state, {}), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        writer.close()
        for _ in range(100):  # bounded: the server side sees the close within a few loop turns
            if "connection_lost" in calls:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return head

    head = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 200"), head
    assert calls[0] == "connection_made" and "handle_events" in calls and "on_response_complete" in calls
    assert calls[-1] == "connection_lost", calls
    assert timers[0] is True  # armed at connection
    assert timers[calls.index("handle_events")] is False  # the headers arrived: disarmed
    assert timers[calls.index("on_response_complete")] is True  # armed again for the next request's headers


# -- one settings model: flags, environment, Ray config -----------------------------------------------------

# A value other than the default for every setting, as text (what a flag or a variable carries).
SETTING_SAMPLES = {
    "--bundle": "/models/b", "--db": "postgresql://u@db.internal/keys", "--backend": "openvino",
    "--engines": "fp16-build", "--precision": "int8", "--vae-precision": "int8", "--cpu-precision": "bf16",
    "--lora": ["a.safetensors:0.5", "b.safetensors"], "--host": "0.0.0.0", "--port": "9001", "--low-memory": True,
    "--threads": "3", "--credits-per-image": "2", "--queue-size": "5", "--max-image-bytes": "12345",
    "--max-body-bytes": "23456", "--max-pixels": "1000000", "--max-prompt-chars": "77", "--max-steps": "40",
    "--input-formats": "png,jpg", "--no-url-fetch": True, "--allow-fetch-host": ["10.0.0.0/8", "img.internal"],
    "--fetch-timeout": "4.5", "--fetch-max-redirects": "1", "--fetch-workers": "3", "--graceful-timeout": "7",
    "--inflight-grace": "8", "--charge-retry": "0", "--limit-concurrency": "99", "--max-inflight-per-key": "3",
    "--max-uploads": "2", "--upload-wait": "4", "--max-connections": "500", "--max-connections-per-client": "0",
    "--header-timeout": "6", "--body-timeout": "30", "--heartbeat": "2", "--lease": "9",
}


def _serve_parser():
    import argparse

    from sd3trt.server.cli import add_server_commands

    parser = argparse.ArgumentParser(prog="sd3trt")
    add_server_commands(parser.add_subparsers(dest="command"))
    return parser


def test_every_setting_round_trips_through_a_flag_a_variable_and_a_ray_config():
    from sd3trt.server import settings

    assert sorted(SETTING_SAMPLES) == sorted(s.flag for s in settings.SETTINGS)  # a new setting needs a sample
    argv, env = ["serve"], {}
    for s in settings.SETTINGS:
        v = SETTING_SAMPLES[s.flag]
        if v is True:
            argv.append(s.flag)
            env[s.env] = "1"
        elif isinstance(v, list):
            argv += [x for item in v for x in (s.flag, item)]
            env[s.env] = ",".join(v)
        else:
            argv += [s.flag, v]
            env[s.env] = v
    from_flags = settings.from_args(_serve_parser().parse_args(argv))
    from_env = settings.from_env(env)
    ray_config = {"applications": [{"name": "sd3trt", "import_path": "sd3trt.server.ray_serve:app",
                                    "runtime_env": {"env_vars": env}}]}
    try:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(ray_config)  # the variables are a valid Ray Serve config
    except ImportError:
        pass
    from sd3trt.server.ray_serve import config_from_env

    from_ray = config_from_env(ray_config["applications"][0]["runtime_env"]["env_vars"])
    assert from_flags == from_env == from_ray
    for s in settings.SETTINGS:  # every setting took effect, none kept its default
        assert s.default() != _at(from_flags, s.path), s.flag
    assert from_flags.fetch.allow_hosts == ("10.0.0.0/8", "img.internal") and from_flags.input_formats == ("PNG", "JPEG")
    assert from_flags.conn.header_timeout_s == 6.0 and not from_flags.fetch.enabled


def _at(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_settings_refuse_bad_values_with_one_sentence_and_keep_defaults():
    from sd3trt.errors import Sd3trtError
    from sd3trt.server import settings

    cfg = settings.from_env({"SD3TRT_BUNDLE": "/b"})
    flags = settings.from_args(_serve_parser().parse_args(["serve", "--bundle", "/b"]))
    assert cfg == flags and cfg.queue_size == settings.DEFAULTS.queue_size and str(cfg.bundle) == "/b"
    for env, needle in ((("SD3TRT_QUEUE_SIZE", "0"), "must be > 0"), (("SD3TRT_BACKEND", "cuda"), "not one of"),
                        (("SD3TRT_INPUT_FORMATS", "gif"), "not supported"), (("SD3TRT_NO_URL_FETCH", "yes"), "1 or 0"),
                        (("SD3TRT_LEASE", "1"), "at least 3 x --heartbeat")):
        with pytest.raises(Sd3trtError, match=needle) as e:
            settings.from_env({"SD3TRT_BUNDLE": "/b", env[0]: env[1]})
        assert "\n" not in str(e.value)
    with pytest.raises(Sd3trtError, match="SD3TRT_BUNDLE is not set"):
        settings.from_env({})
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["serve", "--queue-size", "0"])


def test_the_readme_settings_table_is_the_generated_one():
    from pathlib import Path

    from sd3trt.server import settings

    readme = (Path(__file__).resolve().parents[1] / "server" / "README.md").read_text()
    assert settings.markdown_table() in readme


def test_serve_reads_the_bundle_once_and_hands_its_pipeline_to_the_worker(tiny_sd3, tmp_path, monkeypatch):
    """`sd3trt serve`: the pipeline built to check the options before listening is the one the worker loads
    (the bundle is read, and its files hashed, once)."""
    pytest.importorskip("uvicorn")
    import sd3trt.manifest as manifest
    from sd3trt.cli import main as cli_main
    from sd3trt.runtime import pipeline
    from sd3trt.server import app as app_module
    from sd3trt.server import cli as server_cli

    reads, built, served = [], [], {}
    real_read, real_init = manifest.load_bundle, pipeline.Img2Img.__init__

    def read(*a, **kw):
        reads.append(kw.get("verify_checksums", False))
        return real_read(*a, **kw)

    def init(self, *a, **kw):
        built.append(self)
        real_init(self, *a, **kw)

    for module in (manifest, pipeline, server_cli):
        monkeypatch.setattr(module, "load_bundle", read)
    monkeypatch.setattr(pipeline.Img2Img, "__init__", init)

    def fake_serve(cfg, log_level="info", pipe=None):  # what serve() runs at start, without listening
        srv = app_module.create_app(cfg, pipe).state.server
        served["pipe"] = srv._load()  # the worker thread's first step
        return True
    monkeypatch.setattr(app_module, "serve", fake_serve)
    assert cli_main(["serve", "--bundle", str(tiny_sd3[1]), "--db", str(tmp_path / "keys.db")]) == 0
    assert reads == [True] and len(built) == 1 and served["pipe"] is built[0]


def test_a_body_slower_than_the_body_timeout_is_answered_408_by_the_app(tmp_path):
    """Behind an HTTP server without a body timeout (Ray Serve's proxy) the app times the body out itself,
    and gives its upload slot back."""
    pytest.importorskip("fastapi")
    import asyncio
    import dataclasses

    from sd3trt.server.config import ConnLimits, ServerConfig
    from sd3trt.server.schema import ApiError
    from sd3trt.server.service import Server

    srv = Server(ServerConfig(None, tmp_path / "k.db", max_uploads=1, conn=dataclasses.replace(
        ConnLimits(), body_timeout_s=0.5)))

    class Dripping:
        async def stream(self):
            yield b"{"
            await asyncio.sleep(30)
            yield b"}"

    async def main():
        t0 = time.monotonic()
        with pytest.raises(ApiError) as e:
            await srv._read_input(Dripping(), {})
        return e.value, time.monotonic() - t0

    try:
        err, took = asyncio.run(main())
    finally:
        srv.pools.close()
    assert (err.status, err.code) == (408, "body_timeout") and 0.4 < took < 3, (err.status, took)
    assert srv.uploads == 0 and not srv.upload_slots.locked() and srv.metrics.counter("request_timeouts") == 1
