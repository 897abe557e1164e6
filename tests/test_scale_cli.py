"""`sd3trt serve --ray CONFIG`: the documented way to run the Ray Serve application from a config file,
end to end on a local Ray cluster (127.0.0.1) with one CPU replica of the tiny bundle and SQLite credits.

The command starts its own local cluster (as `serve run` does); the test stops it with SIGINT, and kills
what is left of its process group after a bounded wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from needs import need

need("fastapi")
requests = need("requests")

from sd3trt.server.keystore import SqliteCreditStore  # noqa: E402

PATH = "/v1/stable-diffusion-3-large-img2img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sd3trt_serve_ray_config(tiny_sd3, tmp_path):
    need("ray")
    import base64
    import io

    from PIL import Image

    db = tmp_path / "keys.db"
    key = SqliteCreditStore(db).create_key(2)
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: sd3trt
    route_prefix: /
    import_path: sd3trt.server.ray_serve:app
    runtime_env:
      env_vars: {{SD3TRT_BUNDLE: "{tiny_sd3[1]}", SD3TRT_DB: "{db}", SD3TRT_THREADS: "1", SD3TRT_NO_URL_FETCH: "1"}}
    deployments:
      - name: Sd3trtReplica
        num_replicas: 1
        ray_actor_options: {{num_cpus: 1, num_gpus: 0}}
""")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's servers on 127.0.0.1
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sd3trt.server", "serve", "--ray", str(cfg)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready after 180 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (20, 120, 200)).save(buf, "PNG")
        r = requests.post(url + PATH, headers={"x-api-key": key}, timeout=120,
                          json={"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "a blue square",
                                "num_inference_steps": 2, "output_format": "png"})
        assert r.status_code == 200, r.text[:300]
        assert r.headers["x-remaining-credits"] == "1"
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)
        assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this command's process group is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()
    assert not SqliteCreditStore(db).pending()


def test_serve_ray_refuses_a_missing_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sd3trt.server", "serve", "--ray", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no such config file" in out.stderr


def test_serve_needs_a_bundle_without_ray(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sd3trt.server", "serve", "--db", str(tmp_path / "k.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--bundle" in out.stderr
