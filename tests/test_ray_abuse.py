"""tests/test_server_abuse.py's probes against `sd3trt serve --ray CONFIG`: 2 CPU replicas of the tiny bundle
behind Ray Serve's HTTP proxy, credits in PostgreSQL.

Where Ray's proxy (or the replica behind it) protects, the test asserts the protection; where it does not
(no header timeout, no connection caps, a request timeout any client can turn off with a header), the
test measures and asserts today's behaviour exactly, as server/README.md ("What Ray's proxy does not do")
states it: if Ray adds the protection, the test fails and the README's advice needs updating. The
replica's own body timeout (the app's, SD3TRT_BODY_TIMEOUT) is asserted too.

Everything listens on 127.0.0.1; PostgreSQL on a unix socket (tests/pg_local.py). Every loop is bounded
in count and time; the command, Serve and the cluster are stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from needs import need

need("fastapi")
requests = need("requests")
need("psycopg")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import restore_env, wait_until  # noqa: E402
from test_scale_out import PATH, body, free_port, pg  # noqa: E402,F401  (pg: the PostgreSQL fixture)
from test_server_abuse import DripHost, connect_from, drip_body, read_all  # noqa: E402

from sd3trt.server.keystore import open_store  # noqa: E402

REPLICAS = 2
PER_KEY = 2  # SD3TRT_MAX_INFLIGHT_PER_KEY of each replica
KEEP_ALIVE = 5  # http_options.keep_alive_timeout_s, as server/ray-serve.yaml
REQUEST_TIMEOUT = 12.0  # http_options.request_timeout_s
BODY_TIMEOUT = 20.0  # SD3TRT_BODY_TIMEOUT: the replica's own body timeout
FETCH_TIMEOUT = 3.0
HEADER_TIMEOUT = 10.0  # `sd3trt serve`'s default --header-timeout: what Ray's proxy is measured against


class RayServe:
    """The running `sd3trt serve --ray CONFIG` command, its cluster and its credit database."""

    def __init__(self, port: int, db: str, proc: subprocess.Popen, log: Path):
        self.port, self.db, self.proc, self.log = port, db, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def store(self):
        return open_store(self.db)

    def key(self, credits: int) -> str:
        return self.store().create_key(credits)

    def balance(self, key: str) -> int:
        return self.store().balance(key.split("_")[1])

    def post(self, key, timeout=60, **kw):
        return requests.post(self.url + PATH, json=body(**kw), headers={"x-api-key": key}, timeout=timeout)

    def live_instances(self) -> list[tuple[str, int]]:
        return self.store()._read("SELECT id, pid FROM instances WHERE stopped_at IS NULL ORDER BY started_at")

    def pending_by_owner(self, key: str) -> dict[str, int]:
        key_id = key.split("_")[1]
        out: dict[str, int] = {}
        for p in self.store().pending():
            if p[1] == key_id:
                out[p[3]] = out.get(p[3], 0) + 1
        return out


@pytest.fixture(scope="module")
def ray_serve(pg, tiny_sd3, tmp_path_factory):
    """`sd3trt serve --ray CONFIG` (= `serve run CONFIG`) deploying on a local Ray cluster this process
    started with bounded resources (RAY_ADDRESS points the command to it)."""
    ray = need("ray")
    from ray import serve
    from ray._private import ray_constants

    root = tmp_path_factory.mktemp("ray-abuse")
    db = pg.fresh_database("rayabuse")
    port = free_port()
    cfg = root / "serve.yaml"
    env_vars = {"SD3TRT_BUNDLE": str(tiny_sd3[1]), "SD3TRT_DB": db, "SD3TRT_THREADS": "1",
                "SD3TRT_HEARTBEAT": "1", "SD3TRT_LEASE": "6", "SD3TRT_MAX_STEPS": "5000",
                "SD3TRT_MAX_INFLIGHT_PER_KEY": str(PER_KEY), "SD3TRT_QUEUE_SIZE": "8",
                "SD3TRT_ALLOW_FETCH_HOSTS": "127.0.0.1", "SD3TRT_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
                "SD3TRT_FETCH_WORKERS": "2", "SD3TRT_BODY_TIMEOUT": str(BODY_TIMEOUT),
                "OMP_NUM_THREADS": "1"}
    cfg.write_text(json.dumps({  # JSON is YAML
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": KEEP_ALIVE,
                         "request_timeout_s": REQUEST_TIMEOUT},
        "applications": [{"name": "sd3trt", "route_prefix": "/", "import_path": "sd3trt.server.ray_serve:app",
                          "runtime_env": {"env_vars": env_vars},
                          "deployments": [{"name": "Sd3trtReplica", "num_replicas": REPLICAS,
                                           "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}}]}]}))
    settings = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=REPLICAS, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=150 * 1024 * 1024, log_to_driver=False, configure_logging=False)
    proc = None
    log = open(root / "serve.log", "wb")
    try:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "sd3trt.server", "serve", "--ray", str(cfg)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        rs = RayServe(port, db, proc, root / "serve.log")

        def up():
            assert proc.poll() is None, rs.log.read_text()[-3000:]
            return len(rs.live_instances()) == REPLICAS
        wait_until(up, timeout=240, every=0.5, what=f"{REPLICAS} replicas registered in the database")
        streak = {"n": 0}

        def ready():
            try:
                ok = requests.get(rs.url + "/readyz", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            streak["n"] = streak["n"] + 1 if ok else 0
            return streak["n"] >= 8
        wait_until(ready, timeout=180, every=0.25, what="the replicas to load the bundle")
        rs.startup_s = time.monotonic() - t0
        yield rs
    finally:
        try:
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # `serve run` shuts Serve down on Ctrl-C
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - already shut down by the command
                pass
        finally:
            log.close()
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
            restore_env(saved)


def still_open(s: socket.socket) -> bool:
    """True when the peer has neither closed nor answered on ``s`` (nothing to read, no EOF)."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)  # data (an answer) or b"" (closed)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def raw_post(port: int, key: str, source: str, headers: str = "", **fields) -> socket.socket:
    """A POST sent on a socket of its own (``headers``: more header lines, each ending in CRLF)."""
    raw = json.dumps(body(**fields)).encode()
    s = connect_from(source, port)
    s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\n"
              f"{headers}content-length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


# -- what Ray's proxy does not do: measured, as the README says ----------------------------------------------

def test_idle_connections_stay_open_past_the_keep_alive_and_header_timeouts(ray_serve, capsys):
    """50 connections that send nothing: requests are still served, and every one of them is still open
    after the header timeout `sd3trt serve` would have applied (and twice Ray's keep-alive timeout). Ray's
    proxy neither times out a connection that never sent a request nor caps connections: the fronting
    proxy's job (client_header_timeout, limit_conn)."""
    rs = ray_serve
    socks = []
    try:
        t0 = time.monotonic()
        for i in range(50):
            socks.append(connect_from(f"127.0.0.{2 + i % 5}", rs.port))  # 10 per address
        k = rs.key(1)
        r = rs.post(k)
        assert r.status_code == 200, r.text[:300]
        assert requests.get(rs.url + "/healthz", timeout=5).status_code == 200
        time.sleep(max(0.0, HEADER_TIMEOUT + 2 - (time.monotonic() - t0)))
        held = time.monotonic() - t0
        open_now = sum(still_open(s) for s in socks)
        with capsys.disabled():
            print(f"\n[ray abuse] 50 idle connections: {open_now} still open after {held:.1f} s "
                  f"(keep-alive {KEEP_ALIVE} s, request timeout {REQUEST_TIMEOUT:g} s)")
        assert open_now == 50
    finally:
        for s in socks:
            s.close()


def test_header_dripped_one_byte_per_0_4_s_is_not_cut_off(ray_serve):
    """A request line and headers dripped 1 byte every 0.4 s: never answered and still open after the
    header timeout of `sd3trt serve` and after Ray's request_timeout_s (which starts only once the headers
    are complete)."""
    rs = ray_serve
    request = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 200}\r\n\r\n".encode()
    s = connect_from("127.0.0.30", rs.port)
    t0 = time.monotonic()
    sent = 0
    try:
        limit = max(HEADER_TIMEOUT, REQUEST_TIMEOUT) + 3
        while time.monotonic() - t0 < limit and sent < len(request) - 4:  # bounded: ~15 s, never the full header
            s.sendall(request[sent:sent + 1])
            sent += 1
            time.sleep(0.4)
            assert still_open(s), f"cut off after {time.monotonic() - t0:.1f} s ({sent} bytes)"
        assert time.monotonic() - t0 >= limit
        s.sendall(request[sent:])  # the rest: the request is then answered as usual
        assert read_all(s, 10).startswith(b"HTTP/1.1 200")
    finally:
        s.close()


def test_body_dripped_is_cut_by_request_timeout_or_else_by_the_replica(ray_serve, capsys):
    """A POST whose body is dripped: Ray's request_timeout_s (the whole request, from its headers) answers
    408. A client that sends `x-request-timeout-seconds: 0` turns that timeout off for its request (the
    fronting proxy should drop the header); then the replica's own body timeout (SD3TRT_BODY_TIMEOUT)
    answers 408 `body_timeout`. No credit moves either way (the replica debits only after the body)."""
    rs = ray_serve
    k = rs.key(2)
    results = {}
    for name, extra in (("ray", ""), ("replica", "x-request-timeout-seconds: 0\r\n")):
        s = connect_from("127.0.0.31", rs.port)
        t0 = time.monotonic()
        try:
            answer = drip_body(s, k, BODY_TIMEOUT + 10, extra)  # a byte every 0.5 s, bounded
            took = time.monotonic() - t0
            answer += read_all(s, KEEP_ALIVE + 5)  # the rest, until the proxy closes the connection
            closed = time.monotonic() - t0 - took
        finally:
            s.close()
        results[name] = (answer, took, closed)
    with capsys.disabled():
        print("\n[ray abuse] dripped body: " + "; ".join(f"{n}: {a[:12]!r} after {t:.1f} s, closed {c:.1f} s later"
                                                        for n, (a, t, c) in results.items()))
    answer, took, _ = results["ray"]
    assert answer.startswith(b"HTTP/1.1 408") and b"timed out" in answer, answer[:300]
    assert REQUEST_TIMEOUT - 1 < took < REQUEST_TIMEOUT + 4, took
    answer, took, _ = results["replica"]
    assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer, answer[:300]
    assert BODY_TIMEOUT - 1 < took < BODY_TIMEOUT + 4, took
    wait_until(lambda: rs.balance(k) == 2 and not rs.pending_by_owner(k), timeout=20, what="nothing taken")


# -- what holds behind Ray's proxy: asserted -----------------------------------------------------------------

def test_keep_alive_connection_closed_after_keep_alive_timeout(ray_serve):
    rs = ray_serve
    s = connect_from("127.0.0.32", rs.port)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:80]
        t0 = time.monotonic()
        rest = read_all(s, KEEP_ALIVE + 10)  # until the proxy closes it
        took = time.monotonic() - t0
    finally:
        s.close()
    assert rest == b"" or rest.endswith(b"}")  # only the tail of the first answer, if any
    assert KEEP_ALIVE - 1 < took < KEEP_ALIVE + 3, took


def test_slow_image_url_with_0_credits_is_refused_without_a_connection(ray_serve):
    rs = ray_serve
    host = DripHost("header")
    try:
        k = rs.key(0)
        t0 = time.monotonic()
        rs_ = [rs.post(k, image=host.url()) for _ in range(10)]
        took = time.monotonic() - t0
        assert {(r.status_code, r.json()["code"]) for r in rs_} == {(406, "insufficient_credits")}
        assert took < 10
        assert host.accepted == 0  # the balance was checked before any fetch
        # A funded key's slow URL is fetched and cut at the fetch timeout; nothing is taken.
        funded = rs.key(1)
        t0 = time.monotonic()
        r = rs.post(funded, image=host.url())
        took = time.monotonic() - t0
        assert (r.status_code, r.json()["code"]) == (400, "url_timeout") and took < FETCH_TIMEOUT + 4
        assert host.accepted == 1 and rs.balance(funded) == 1
    finally:
        host.close()


def test_junk_methods_leave_metrics_bounded(ray_serve):
    rs = ray_serve
    before = max(requests.get(rs.url + "/metrics", timeout=10).text.count("\n") for _ in range(4))
    answers = set()
    for i in range(50):
        s = connect_from("127.0.0.40", rs.port)
        try:
            s.sendall(f"JUNK{i} /x{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answers.add(read_all(s, 10)[:12])
        finally:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 ") for a in answers), answers
    for _ in range(4):  # each answered by the replica the proxy picks
        text = requests.get(rs.url + "/metrics", timeout=10).text
        assert "JUNK" not in text and "/x1" not in text
        assert text.count("\n") - before < 40


# -- the per-key limit with 2 replicas -----------------------------------------------------------------------

def test_per_key_limit_is_per_replica(ray_serve, capsys):
    """SD3TRT_MAX_INFLIGHT_PER_KEY=2 on each of 2 replicas: one key gets up to 2 x 2 requests in progress,
    each replica holding at most 2; then every further request is refused 429 too_many_requests. The
    clients then leave: their generations stop and every debit is refunded."""
    rs = ray_serve
    k = rs.key(20)
    slow: list[socket.socket] = []
    refused = []
    try:
        for i in range(10):  # bounded; stops once the key is at its limit on both replicas
            # Its own request timeout (Ray's per-request header), so that the slow ones outlast the loop.
            s = raw_post(rs.port, k, "127.0.0.50", "connection: close\r\nx-request-timeout-seconds: 120\r\n",
                         num_inference_steps=4000)
            got = wait_until(lambda: sum(rs.pending_by_owner(k).values()) > len(slow) or not still_open(s),
                             timeout=30, every=0.05, what="the request to be in progress or answered")
            if still_open(s) and sum(rs.pending_by_owner(k).values()) > len(slow):
                slow.append(s)
            else:
                refused.append(read_all(s, 10))
                s.close()
            assert got
            if len(refused) >= 3 and len(slow) >= REPLICAS * PER_KEY:
                break
        by_owner = rs.pending_by_owner(k)
        with capsys.disabled():
            print(f"\n[ray abuse] one key, limit {PER_KEY} per replica, {REPLICAS} replicas: in progress "
                  f"{sorted(by_owner.values())}, refused {len(refused)} of {len(slow) + len(refused)}")
        assert sorted(by_owner.values()) == [PER_KEY] * REPLICAS, by_owner
        assert len(slow) == PER_KEY * REPLICAS
        assert refused and all(a.startswith(b"HTTP/1.1 429") and b"too_many_requests" in a for a in refused), refused
    finally:
        for s in slow:
            s.close()  # the clients leave
    wait_until(lambda: rs.balance(k) == 20 and not rs.pending_by_owner(k), timeout=30,
               what="the debits of the clients that left to be refunded")
