"""The HTTP server as a real process on 127.0.0.1 with the tiny bundle.

Covers: the hosted API's example client, every status code, credits under concurrency, a server
killed mid-request, graceful shutdown, the bad-input matrix (each a JSON error and no credit taken),
metrics, docs, logs without secrets, and a short latency measurement. Nothing but 127.0.0.1 is
contacted: refused URLs are refused by policy before any connection.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from sd3trt.server.keystore import SqliteCreditStore  # noqa: E402

PATH = "/v1/stable-diffusion-3-large-img2img"
MAX_IMAGE_BYTES = 200_000
MAX_PIXELS = 512 * 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sd3trt.server serve ...` on 127.0.0.1 and a free port, its output in a log file."""

    def __init__(self, bundle: Path, db: Path, log: Path, *args: str):
        self.bundle, self.db, self.log, self.args = bundle, db, log, list(args)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "ServerProcess":
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "sd3trt.server", "serve", "--bundle", str(self.bundle), "--db", str(self.db),
               "--host", "127.0.0.1", "--port", str(self.port), "--threads", "1", *self.args]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url("/readyz"), timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in 120 s:\n{self.log.read_text()[-3000:]}")

    def url(self, path: str = PATH) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else 0

    def metric(self, name: str) -> float:
        for line in requests.get(self.url("/metrics"), timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"metric {name} not found")


def png(w=64, h=64, color=(200, 40, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (w, h), color)
    for x in range(0, w, 8):  # some structure
        im.putpixel((x, x % h), (0, 0, 255))
    im.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels: a valid signature and IHDR, a tiny IDAT (a bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def body(**kw) -> dict:
    d = {"image": b64(png()), "prompt": "a red square, watercolor", "num_inference_steps": 2, "output_format": "png"}
    d.update(kw)
    return d


def post(server: ServerProcess, key: str | None, payload=None, **kw) -> requests.Response:
    headers = {"x-api-key": key} if key is not None else {}
    return requests.post(server.url(), json=payload if payload is not None else body(**kw), headers=headers,
                         timeout=120)


def new_key(server: ServerProcess, credits: int) -> str:
    return SqliteCreditStore(server.db).create_key(credits)


def balance(server: ServerProcess, key: str) -> int:
    return SqliteCreditStore(server.db).balance(key.split("_")[1])


# -- a local image site (127.0.0.1) for URL inputs --------------------------------------------------------

class _Site(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, data = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    _Site.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, png()),
        "/huge.png": (200, {"Content-Type": "image/png"}, b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 10)),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (307, {"Location": "http://10.0.0.1/cat.png"}, b""),
        "/to-loopback": (302, {"Location": "http://127.0.0.2/cat.png"}, b""),
    }
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    s = ServerProcess(tiny_sd3[1], root / "keys.db", root / "server.log",
                      "--queue-size", "16", "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-pixels", str(MAX_PIXELS),
                      "--max-prompt-chars", "500", "--max-steps", "60", "--allow-fetch-host", "127.0.0.1",
                      "--fetch-timeout", "3", "--max-inflight-per-key", "32")
    s.start()
    s.secrets: list[str] = []  # every key handed out, to check the log never shows one
    yield s
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done
    assert s.stop() in (0, -signal.SIGTERM), s.log.read_text()[-3000:]
    assert "Application shutdown complete" in s.log.read_text()


@pytest.fixture
def key(server):
    k = new_key(server, 5)
    server.secrets.append(k)
    return k


# -- the reference's example client -------------------------------------------------------------------------

def test_reference_example_client_unchanged_but_the_url(server, tmp_path):
    api_key = new_key(server, 2)
    server.secrets.append(api_key)
    (tmp_path / "input.jpg").write_bytes(png(fmt="JPEG"))
    image_path = str(tmp_path / "input.jpg")

    # --- the hosted API's example, verbatim except the URL (and a local file for the input) ---
    import requests
    import base64

    # Use this function to convert an image file from the filesystem to base64
    def image_file_to_base64(image_path):
        with open(image_path, 'rb') as f:
            image_data = f.read()
        return base64.b64encode(image_data).decode('utf-8')

    url = server.url("/v1/stable-diffusion-3-large-img2img")

    # Request payload
    data = {
        "mode": "image-to-image",
        "image": image_file_to_base64(image_path),
        "prompt": "cyberpunk style panda, dark colors",
        "strength": 1,
        "output_format": "jpeg",
        "base64": False,
        "negative_prompt": "ugly, blurry, bad anatomy"
    }

    headers = {'x-api-key': api_key}

    response = requests.post(url, json=data, headers=headers)
    print(response.content)  # The response is the generated image
    # --- end of the example ---

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-remaining-credits"] == "1"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert int(response.headers["x-seed"]) >= 0


def test_formats_base64_and_seeds(server, key):
    a = post(server, key, seed=7, output_format="png")
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    b = post(server, key, seed=7, output_format="png", base64=True)
    assert b.status_code == 200 and b.headers["content-type"].startswith("text/plain")
    assert base64.b64decode(b.text) == a.content  # a seeded request is reproducible
    c = post(server, key, seed=8, output_format="webp")
    assert c.status_code == 200 and c.headers["content-type"] == "image/webp" and c.headers["x-seed"] == "8"
    assert Image.open(io.BytesIO(c.content)).format == "WEBP"
    assert c.headers["x-remaining-credits"] == "2"
    assert balance(server, key) == 2


def test_image_url_from_allowlisted_host(server, key, site):
    r = post(server, key, image=f"{site}/cat.png")
    assert r.status_code == 200, r.text
    assert r.headers["x-remaining-credits"] == "4"


# -- status codes and the bad-input matrix ------------------------------------------------------------------

def test_401_404_405(server, key):
    for k in (None, "", "sd3_000000000000_nope", key[:-2] + "xx", "Bearer " + key):
        r = post(server, k)
        assert r.status_code == 401, (k, r.text)
        assert r.json()["code"] == "unauthorized" and "x-remaining-credits" not in r.headers
    r = requests.get(server.url(), timeout=10)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed" and "x-remaining-credits" not in r.headers
    r = requests.get(server.url("/v1/nope"), timeout=10)
    assert r.status_code == 404 and r.json()["error"].startswith("no such URL")
    # With a valid key, 404 and 405 carry the balance like every other answer (README: every response).
    r = requests.post(server.url("/v1/stable-diffusion-3-large-txt2img"), json=body(), headers={"x-api-key": key})
    assert r.status_code == 404 and r.headers["x-remaining-credits"] == "5"
    r = requests.get(server.url(), headers={"x-api-key": key}, timeout=10)
    assert r.status_code == 405 and r.headers["x-remaining-credits"] == "5"
    r = requests.put(server.url("/healthz"), headers={"x-api-key": "sd3_000000000000_nope"}, timeout=10)
    assert r.status_code == 405 and "x-remaining-credits" not in r.headers
    SqliteCreditStore(server.db).set_disabled(key.split("_")[1], True)
    assert post(server, key).status_code == 401
    assert balance(server, key) == 5


def test_406_when_out_of_credits(server):
    k = new_key(server, 0)
    server.secrets.append(k)
    r = post(server, k)
    assert r.status_code == 406
    assert r.json()["code"] == "insufficient_credits" and r.headers["x-remaining-credits"] == "0"


BAD = {
    # name: (payload changes, status, code)
    "bad base64": (dict(image="this is not base64!"), 400, "bad_base64"),
    "non-image bytes": (dict(image=b64(b"just some text, not a picture" * 10)), 400, "not_an_image"),
    "disallowed format (gif)": (dict(image=b64(png(fmt="GIF"))), 400, "unsupported_image"),
    "truncated png": (dict(image=b64(png()[:80])), 400, "bad_image"),
    "decompression bomb": (dict(image=b64(png(2048, 2048, (0, 0, 0)))), 413, "image_too_large"),
    "huge dimensions": (dict(image=b64(png_header_only(100_000, 100_000))), 413, "image_too_large"),
    "image smaller than 16 px": (dict(image=b64(png(8, 8))), 422, "invalid_field"),
    "image side over the model's limit": (dict(image=b64(png(1024, 32))), 422, "invalid_field"),  # tiny: 512
    "image bytes over the limit": (dict(image=b64(os.urandom(MAX_IMAGE_BYTES + 100))), 413, "image_too_large"),
    "ssrf metadata": (dict(image="http://169.254.169.254/latest/meta-data/"), 400, "url_refused"),
    "ssrf private": (dict(image="http://10.0.0.1/cat.png"), 400, "url_refused"),
    "ssrf loopback not allowlisted": (dict(image="http://127.0.0.2:9/cat.png"), 400, "url_refused"),
    "ssrf ipv6 loopback": (dict(image="http://[::1]/cat.png"), 400, "url_refused"),
    "ssrf unspecified": (dict(image="http://0.0.0.0/cat.png"), 400, "url_refused"),
    "ssrf file scheme": (dict(image="file:///etc/passwd"), 400, "url_refused"),
    "ssrf redirect to metadata": ("{site}/to-metadata", 400, "url_refused"),
    "ssrf redirect to private": ("{site}/to-private", 400, "url_refused"),
    "ssrf redirect to loopback": ("{site}/to-loopback", 400, "url_refused"),
    "url image too large": ("{site}/huge.png", 413, "image_too_large"),
    "url 404": ("{site}/missing.png", 400, "url_failed"),
    "strength above 1": (dict(strength=1.5), 422, "invalid_field"),
    "strength below 0": (dict(strength=-0.1), 422, "invalid_field"),
    "strength not a number": (dict(strength="lots"), 422, "invalid_field"),
    "strength 0 (no step)": (dict(strength=0), 422, "invalid_field"),
    "unknown output format": (dict(output_format="gif"), 422, "invalid_field"),
    "other mode": (dict(mode="text-to-image"), 422, "invalid_field"),
    "unknown field": (dict(streangth=0.5), 422, "invalid_field"),
    "missing prompt": (dict(prompt=None), 422, "invalid_field"),
    "prompt too long": (dict(prompt="x" * 501), 422, "invalid_field"),
    "negative prompt too long": (dict(negative_prompt="x" * 501), 422, "invalid_field"),
    "steps 0": (dict(num_inference_steps=0), 422, "invalid_field"),
    "steps over the limit": (dict(num_inference_steps=61), 422, "invalid_field"),
    "guidance negative": (dict(guidance_scale=-1), 422, "invalid_field"),
    "seed negative": (dict(seed=-1), 422, "invalid_field"),
    "base64 not a bool": (dict(base64="maybe"), 422, "invalid_field"),
    # Strict types: nothing is converted from another JSON type.
    "strength as a string": (dict(strength="0.5"), 422, "invalid_field"),
    "strength true": (dict(strength=True), 422, "invalid_field"),
    "steps as a string": (dict(num_inference_steps="10"), 422, "invalid_field"),
    "steps as a float": (dict(num_inference_steps=10.0), 422, "invalid_field"),
    "seed as a string": (dict(seed="7"), 422, "invalid_field"),
    "base64 as 1": (dict(base64=1), 422, "invalid_field"),
    "guidance as a string": (dict(guidance_scale="7"), 422, "invalid_field"),
    "prompt a number": (dict(prompt=5), 422, "invalid_field"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_json_error_and_costs_nothing(server, key, site, name):
    change, status, code = BAD[name]
    if isinstance(change, str):
        change = dict(image=change.format(site=site))
    payload = body(**change)
    payload = {k: v for k, v in payload.items() if v is not None}
    r = post(server, key, payload)
    assert r.status_code == status, (name, r.text)
    err = r.json()
    assert err["code"] == code and err["status"] == status, err
    assert isinstance(err["error"], str) and 10 < len(err["error"]) < 300 and "\n" not in err["error"]
    assert r.headers["x-remaining-credits"] == "5"
    assert balance(server, key) == 5


def test_small_strength_runs_one_step(server, key):
    """README: strength 0 is refused; any strength above 0 runs at least one step (about steps x strength)."""
    r = post(server, key, strength=0.01, num_inference_steps=2)
    assert r.status_code == 200, r.text
    r = post(server, key, strength=1, num_inference_steps=2)  # an integer JSON number is a number
    assert r.status_code == 200, r.text
    assert balance(server, key) == 3


def test_malformed_bodies(server, key):
    h = {"x-api-key": key, "content-type": "application/json"}
    deep = b"[" * 50_000 + b"]" * 50_000
    for raw, status in ((b"{not json", 400), (b"[1, 2]", 422), (b'{"prompt": NaN}', 400), (b"\xff\xfe", 400),
                        (b'{"guidance_scale": Infinity}', 400), (deep, 400)):
        r = requests.post(server.url(), data=raw, headers=h, timeout=10)
        assert r.status_code == status, (raw, r.text)
        assert r.json()["error"] and r.headers["x-remaining-credits"] == "5"
    # Oversized bodies: by Content-Length, and streamed (chunked, no Content-Length).
    big = json.dumps(body(prompt="y" * 400_000)).encode()
    r = requests.post(server.url(), data=big, headers=h, timeout=10)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    r = requests.post(server.url(), data=(big[i:i + 65536] for i in range(0, len(big), 65536)), headers=h, timeout=10)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    assert r.headers["x-remaining-credits"] == "5"  # streamed: found after the key was checked
    assert balance(server, key) == 5


# -- credits under concurrency ------------------------------------------------------------------------------

def test_32_concurrent_requests_against_10_credits(server):
    k = new_key(server, 10)
    server.secrets.append(k)
    gate = threading.Barrier(32)

    def one(_):
        gate.wait()
        return post(server, k)

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(32)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 10 and codes.count(406) == 22, codes
    assert all(r.headers.get("x-remaining-credits") is not None for r in results)
    assert all(Image.open(io.BytesIO(r.content)).size == (64, 64) for r in results if r.status_code == 200)
    assert balance(server, k) == 0
    assert not SqliteCreditStore(server.db).pending()


def test_keys_cli(server):
    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "sd3trt.server", "keys", *args, "--db", str(server.db)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    k = cli("add", "--credits", "1", "--name", "cli-test").strip()
    server.secrets.append(k)
    key_id = k.split("_")[1]
    listing = cli("list")
    assert key_id in listing and "cli-test" in listing and k.split("_", 2)[2] not in listing
    assert post(server, k).headers["x-remaining-credits"] == "0"
    assert "3 credits" in cli("topup", key_id, "--credits", "3")
    r = post(server, k)
    assert r.status_code == 200 and r.headers["x-remaining-credits"] == "2"


# -- operations ---------------------------------------------------------------------------------------------

def test_health_ready_docs_metrics(server):
    assert requests.get(server.url("/healthz"), timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url("/readyz"), timeout=5).json()["status"] == "ready"
    assert "swagger" in requests.get(server.url("/docs"), timeout=5).text.lower()
    spec = requests.get(server.url("/openapi.json"), timeout=5).json()
    op = spec["paths"][PATH]["post"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"mode", "image", "prompt", "negative_prompt", "strength", "output_format", "base64", "seed",
            "num_inference_steps", "guidance_scale"} == set(props)
    assert props["strength"]["default"] == 1 and props["output_format"]["default"] == "jpeg"
    text = requests.get(server.url("/metrics"), timeout=5).text
    for needle in ('sd3trt_http_requests_total{method="POST",route="%s",status="200"}' % PATH,
                   'status="406"', 'status="422"', "sd3trt_http_request_duration_seconds_bucket",
                   "sd3trt_queue_depth 0", "sd3trt_images_generated_total", "sd3trt_credits_debited_total",
                   "sd3trt_credits_refunded_total", "sd3trt_ready 1"):
        assert needle in text, needle
    assert server.metric("sd3trt_images_generated_total") >= 10
    assert server.metric("sd3trt_credits_debited_total") == server.metric("sd3trt_images_generated_total")


def test_load_latency_percentiles(server, capsys):
    """A short bounded load (localhost, 64x64, 4 steps): 8 requests one at a time, then 24 with 3 in flight."""
    k = new_key(server, 32)
    server.secrets.append(k)

    def one(_):
        t0 = time.perf_counter()
        r = post(server, k, num_inference_steps=4)
        return r.status_code, time.perf_counter() - t0

    for n, conc in ((8, 1), (24, 3)):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(conc) as ex:
            results = list(ex.map(one, range(n)))
        wall = time.perf_counter() - t0
        assert [c for c, _ in results] == [200] * n
        lat = sorted(dt * 1000 for _, dt in results)
        pct = {p: lat[min(n - 1, int(round(p / 100 * (n - 1))))] for p in (50, 90, 99)}
        with capsys.disabled():
            print(f"\n[server load] {n} requests, concurrency {conc}, 64x64, 4 steps, tiny bundle, CPU: p50 "
                  f"{pct[50]:.0f} ms, p90 {pct[90]:.0f} ms, p99 {pct[99]:.0f} ms, max {lat[-1]:.0f} ms, "
                  f"{n / wall:.1f} images/s")
    assert balance(server, k) == 0


def test_logs_hold_no_keys_or_image_data(server):
    log = server.log.read_text()
    assert "POST " + PATH + " 200" in log  # requests are logged ...
    for k in server.secrets:
        assert k.split("_", 2)[2] not in log  # ... but never a key
    assert b64(png())[20:60] not in log
    assert "iVBORw0KGgo" not in log and "/9j/" not in log  # no base64 PNG / JPEG anywhere


# -- a worker killed mid-request, engine failure, backpressure, graceful shutdown ---------------------------

def _debits(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT key_id, amount, state FROM debits ORDER BY id").fetchall()


def _wait(cond, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_engine_failure_backpressure_and_shutdown(tiny_sd3, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3[1], bundle)
    db = tmp_path / "keys.db"
    args = ("--low-memory", "--queue-size", "1", "--max-steps", "5000", "--graceful-timeout", "0.5")
    srv = ServerProcess(bundle, db, tmp_path / "server.log", *args).start()
    k = new_key(srv, 10)
    pool = ThreadPoolExecutor(4)
    try:
        # 1. SIGKILL while a request is being generated: its debit stays pending ...
        slow = pool.submit(post, srv, k, num_inference_steps=3000)
        _wait(lambda: len(SqliteCreditStore(db).pending()) == 1, what="the debit")
        srv.stop(signal.SIGKILL)
        with pytest.raises(requests.ConnectionError):
            slow.result(timeout=30)
        assert balance(srv, k) == 9 and _debits(db)[-1][2] == "pending"
        # ... and the next start refunds it.
        srv.start()
        assert balance(srv, k) == 10 and _debits(db)[-1][2] == "refunded"
        assert "refunded 1 pending debit" in srv.log.read_text()

        # 2. An engine that fails (its file vanished; --low-memory reloads per request): 500 and a refund.
        assert post(srv, k).status_code == 200
        onnx = bundle / "onnx" / "transformer.onnx"
        onnx.rename(onnx.with_suffix(".moved"))
        r = post(srv, k)
        assert r.status_code == 500 and r.json()["code"] == "generation_failed", r.text
        assert r.headers["x-remaining-credits"] == "9" and balance(srv, k) == 9
        onnx.with_suffix(".moved").rename(onnx)

        # 3. Backpressure: one request generating, one queued (queue size 1), the third gets 429.
        first = pool.submit(post, srv, k, num_inference_steps=1000)  # ~2.5 s here: long enough to queue behind
        _wait(lambda: srv.metric("sd3trt_inflight") == 1, what="the first request to start")
        second = pool.submit(post, srv, k)
        _wait(lambda: srv.metric("sd3trt_queue_depth") == 1, what="the second request to queue")
        r = post(srv, k)
        assert r.status_code == 429 and r.json()["code"] == "queue_full" and "retry-after" in r.headers
        assert r.headers["x-remaining-credits"] == "7"  # the two accepted requests are charged

        # 4. SIGTERM now: the running request finishes (200), the queued one is answered 503 and refunded.
        srv.proc.send_signal(signal.SIGTERM)
        r2 = second.result(timeout=60)
        assert r2.status_code == 503 and r2.json()["code"] == "shutting_down", r2.text
        r1 = first.result(timeout=60)
        assert r1.status_code == 200, r1.text
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in srv.log.read_text()
        assert balance(srv, k) == 8 and not SqliteCreditStore(db).pending()
        states = [s for _, _, s in _debits(db)]
        assert states.count("pending") == 0 and states.count("committed") == 2

        # 5. A generation that outlasts the in-flight grace is cancelled at shutdown: 503, refunded.
        srv.args += ["--inflight-grace", "0.5"]
        srv.start()
        slow = pool.submit(post, srv, k, num_inference_steps=3000)
        _wait(lambda: srv.metric("sd3trt_inflight") == 1, what="the request to start")
        srv.proc.send_signal(signal.SIGTERM)
        r = slow.result(timeout=60)
        assert r.status_code == 503 and r.json()["code"] == "shutting_down", r.text
        assert r.headers["x-remaining-credits"] == "8"
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        assert balance(srv, k) == 8 and not SqliteCreditStore(db).pending()
    finally:
        srv.stop(signal.SIGKILL)
        pool.shutdown(wait=False, cancel_futures=True)


# -- scaling out: the Ray Serve replica contract, without Ray ------------------------------------------------

def test_ray_serve_builder_runs_like_a_replica(tiny_sd3, tmp_path, monkeypatch):
    """server/ray_serve.py: Ray calls build_app() on a replica, runs the ASGI lifespan with uvicorn's
    LifespanOn and then feeds ASGI requests; do the same here (Ray itself is too heavy to install)."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.lifespan.on import LifespanOn

    from sd3trt.server import ray_serve

    db = tmp_path / "keys.db"
    monkeypatch.setenv("SD3TRT_BUNDLE", str(tiny_sd3[1]))
    monkeypatch.setenv("SD3TRT_DB", str(db))
    k = SqliteCreditStore(db).create_key(1)
    app = ray_serve.build_app()
    payload = json.dumps(body()).encode()

    async def asgi_post():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"x-api-key", k.encode()), (b"content-type", b"application/json"),
                             (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        sent = {"done": False}
        out = {"body": b""}

        async def receive():
            if not sent["done"]:
                sent["done"] = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"], out["headers"] = message["status"], dict(message["headers"])
            elif message["type"] == "http.response.body":
                out["body"] += message.get("body", b"")

        await app(scope, receive, send)
        return out

    async def replica():
        life = LifespanOn(Config(app, lifespan="on", log_config=None))
        await life.startup()
        assert not life.should_exit
        try:
            deadline = time.monotonic() + 60
            while not app.state.server.ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return await asgi_post()
        finally:
            await life.shutdown()

    out = asyncio.run(replica())
    assert out["status"] == 200, out["body"][:300]
    assert out["headers"][b"x-remaining-credits"] == b"0"
    assert Image.open(io.BytesIO(out["body"])).size == (64, 64)
