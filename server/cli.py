"""`sd3trt serve` and `sd3trt keys add|list|topup|disable|enable`.

core/cli.py calls ``add_server_commands(sub)``; ``python -m sd3trt.server`` runs the same commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle

DEFAULT_DB = os.environ.get("SD3TRT_DB", "sd3trt-keys.db")
DB_HELP = ("key/credit database: a SQLite file, or postgresql://user@host/dbname (scale extra) "
           "(default: $SD3TRT_DB or %(default)s)")


def _positive(kind):
    def parse(v: str):
        x = kind(v)
        if x <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
        return x
    return parse


def _serve_ray(config: str) -> None:
    """``sd3trt serve --ray CONFIG`` is ``serve run CONFIG``: Ray Serve deploys the application the config
    file names (server/ray-serve.yaml) on the local Ray cluster, or the one RAY_ADDRESS points to."""
    if not Path(config).is_file():
        raise Sd3trtError(f"--ray {config}: no such config file (see server/ray-serve.yaml)")
    try:
        import ray.serve.scripts  # noqa: F401
    except ImportError as e:
        raise Sd3trtError(f"--ray needs the scale extra ({e.name} is missing); pip install 'sd3trt[scale]'") from None
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; "
                              "sys.argv[0] = 'serve'; cli()", "run", config])


def _serve(a) -> None:
    if a.ray:
        return _serve_ray(a.ray)
    if a.bundle is None:
        raise Sd3trtError("sd3trt serve needs --bundle (or --ray CONFIG)")
    try:
        import uvicorn  # noqa: F401

        from sd3trt.server.app import ServerConfig, serve
        from sd3trt.server.fetch import FetchPolicy
        from sd3trt.server.keystore import db_target, open_store
        from sd3trt.server.protocol import ConnLimits
    except ImportError as e:
        raise Sd3trtError(f"the server needs its extra ({e.name} is missing); pip install 'sd3trt[server]'") from None
    import logging

    formats = tuple(f.strip().upper().replace("JPG", "JPEG") for f in a.input_formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in ("PNG", "JPEG", "WEBP")]
    if unknown:
        raise Sd3trtError(f"--input-formats {','.join(unknown)} not supported; choose from png, jpeg, webp")
    cfg = ServerConfig(
        bundle=Path(a.bundle), db=db_target(a.db), backend=a.backend, engine_build=a.engines, host=a.host, port=a.port,
        loras=tuple(a.lora), precision=a.precision, vae_precision=a.vae_precision, cpu_precision=a.cpu_precision,
        low_memory=a.low_memory, threads=a.threads, credits_per_image=a.credits_per_image,
        queue_size=a.queue_size, max_image_bytes=a.max_image_bytes, max_body_bytes=a.max_body_bytes,
        max_pixels=a.max_pixels, max_prompt_chars=a.max_prompt_chars, max_steps=a.max_steps,
        input_formats=formats,
        fetch=FetchPolicy(enabled=not a.no_url_fetch, timeout_s=a.fetch_timeout, max_redirects=a.fetch_max_redirects,
                          allow_hosts=tuple(a.allow_fetch_host)),
        fetch_workers=a.fetch_workers, graceful_timeout_s=a.graceful_timeout, inflight_grace_s=a.inflight_grace,
        charge_retry_s=a.charge_retry,
        heartbeat_s=a.heartbeat, stale_after_s=a.lease, limit_concurrency=a.limit_concurrency,
        max_inflight_per_key=a.max_inflight_per_key, max_uploads=a.max_uploads,
        conn=ConnLimits(header_timeout_s=a.header_timeout, body_timeout_s=a.body_timeout,
                        max_connections=a.max_connections, max_per_client=a.max_connections_per_client),
    )
    if a.charge_retry < 0:
        raise Sd3trtError(f"--charge-retry must be >= 0 seconds (0: no retry), got {a.charge_retry:g}")
    if a.max_connections_per_client < 0:
        raise Sd3trtError(f"--max-connections-per-client must be >= 0 (0: no cap), got {a.max_connections_per_client}")
    if a.heartbeat * 3 > a.lease:
        raise Sd3trtError(f"--lease {a.lease:g} must be at least 3 x --heartbeat ({a.heartbeat:g}), so one late "
                          "heartbeat does not let a peer refund this server's work")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("sd3trt.server")
    bundle = load_bundle(a.bundle, verify_checksums=True)  # every file re-hashed before the server listens
    from sd3trt.runtime import lora as lora_runtime
    from sd3trt.runtime.pipeline import Img2Img

    # Before listening: the options (no engine loads) and the LoRAs (missing, not safetensors, bad scale,
    # a backend that cannot take them) each stop the start with one sentence.
    Img2Img(bundle, backend=a.backend, engine_build=a.engines, transformer_precision=a.precision,
            vae_precision=a.vae_precision, cpu_precision=a.cpu_precision)
    lora_runtime.read_for(bundle, a.backend, a.lora, a.precision, {})
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s: reachable from other machines; put TLS (a reverse proxy) in front", a.host)
    open_store(cfg.db).close()  # a database that cannot be opened fails here, with its message
    if not serve(cfg, log_level=a.log_level):
        raise Sd3trtError("the server did not start; the log above says why")


def _store(a):
    from sd3trt.server.keystore import open_store

    return open_store(a.db)


def _keys_add(a) -> None:
    store = _store(a)
    key = store.create_key(a.credits, name=a.name)
    print(key)
    print(f"key {key.split('_')[1]} created with {a.credits} credits; the key is shown only once, store it now",
          file=sys.stderr)


def _keys_list(a) -> None:
    rows = _store(a).list_keys()
    if not rows:
        print(f"no keys in {a.db}; add one with `sd3trt keys add --credits N --db {a.db}`")
        return
    print(f"{'id':<14}{'name':<20}{'credits':>9}{'pending':>9}{'spent':>9}  {'created (UTC)':<20}status")
    for k in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
        print(f"{k.id:<14}{k.name[:19]:<20}{k.credits:>9}{k.pending:>9}{k.spent:>9}  {created:<20}"
              f"{'disabled' if k.disabled else 'active'}")


def _keys_topup(a) -> None:
    store = _store(a)
    left = store.topup(a.key, a.credits)
    print(f"key {store.resolve_id(a.key)}: {left} credits")


def _keys_enable(a, disabled: bool) -> None:
    store = _store(a)
    store.set_disabled(a.key, disabled)
    print(f"key {store.resolve_id(a.key)} {'disabled' if disabled else 'enabled'}")


def add_server_commands(sub) -> None:
    from sd3trt.runtime.cli import add_precisions
    from sd3trt.runtime.runners import BACKENDS

    p = sub.add_parser("serve", help="serve the hosted SD3-Large img2img HTTP API over a bundle",
                       description="HTTP server compatible with the hosted SD3-Large img2img API "
                                   "(POST /v1/stable-diffusion-3-large-img2img). Needs the server extra.")
    p.add_argument("--bundle", type=Path, default=None, help="the exported bundle (required without --ray)")
    p.add_argument("--ray", metavar="CONFIG", default=None,
                   help="run as a Ray Serve application from this config file (`serve run CONFIG`; scale extra); "
                        "settings then come from the file, see server/ray-serve.yaml")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--engines", default=None, help="which `sd3trt build` output to use (tensorrt backend)")
    add_precisions(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA allowed at start: merged into the served weights at load time (ONNX Runtime); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=DEFAULT_DB, help=DB_HELP)
    p.add_argument("--credits-per-image", type=_positive(int), default=1)
    p.add_argument("--queue-size", type=_positive(int), default=16,
                   help="requests that may wait for the worker; more get 429 (default %(default)s)")
    p.add_argument("--max-image-bytes", type=_positive(int), default=10 * 1024 * 1024,
                   help="input image file size limit, base64 or URL (default 10 MiB)")
    p.add_argument("--max-body-bytes", type=_positive(int), default=None,
                   help="request body limit (default: base64 of --max-image-bytes + 64 KiB)")
    p.add_argument("--max-pixels", type=_positive(int), default=16_777_216,
                   help="decompression-bomb limit on input pixels (default 4096x4096)")
    p.add_argument("--max-prompt-chars", type=_positive(int), default=2000)
    p.add_argument("--max-steps", type=_positive(int), default=150)
    p.add_argument("--input-formats", default="png,jpeg,webp",
                   help="accepted input image formats (default %(default)s)")
    p.add_argument("--allow-fetch-host", action="append", default=[], metavar="HOST_OR_CIDR",
                   help="a host name, address or network whose image URLs may be fetched even though it is "
                        "loopback/private (repeatable; for trusted internal image stores)")
    p.add_argument("--no-url-fetch", action="store_true", help="refuse image URLs (base64 only)")
    p.add_argument("--fetch-timeout", type=_positive(float), default=10.0,
                   help="seconds for a whole image URL fetch: waiting for a fetch thread, connect, headers, body")
    p.add_argument("--fetch-workers", type=_positive(int), default=8,
                   help="image URL fetches at once; as many more may wait, beyond that 429 (default %(default)s)")
    p.add_argument("--fetch-max-redirects", type=int, default=3, choices=range(0, 11), metavar="0..10")
    p.add_argument("--graceful-timeout", type=_positive(float), default=60.0,
                   help="on SIGTERM, seconds to keep working through the queue; what is left is refunded (503)")
    p.add_argument("--inflight-grace", type=_positive(float), default=30.0,
                   help="then, seconds the image being generated may still take before it too is refunded (503)")
    p.add_argument("--charge-retry", type=float, default=10.0, metavar="SECONDS",
                   help="how long the charge of a finished image is retried while the key database is unavailable "
                        "(the client waits); then 503 db_unavailable, the image withheld, nothing taken "
                        "(default %(default)s)")
    p.add_argument("--limit-concurrency", type=_positive(int), default=256,
                   help="requests handled at once before 503 (probes are exempt; default %(default)s)")
    p.add_argument("--max-inflight-per-key", type=_positive(int), default=8,
                   help="requests of one key handled at once before 429 (default %(default)s)")
    p.add_argument("--max-uploads", type=_positive(int), default=4,
                   help="request bodies read and decoded at once; more wait up to 10 s, then 429 (default %(default)s)")
    p.add_argument("--max-connections", type=_positive(int), default=1024,
                   help="open connections in total; more are answered 503 and closed (default %(default)s)")
    p.add_argument("--max-connections-per-client", type=int, default=64, metavar="N",
                   help="open connections per client address; more are answered 429 and closed; 0: no cap, e.g. "
                        "behind a reverse proxy (default %(default)s)")
    p.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="seconds for a request's line and headers to arrive; else 408 and close (default %(default)s)")
    p.add_argument("--body-timeout", type=_positive(float), default=60.0,
                   help="seconds for a request's whole body to arrive; else 408 and close (default %(default)s)")
    p.add_argument("--heartbeat", type=_positive(float), default=10.0,
                   help="seconds between lease renewals in the key database (default %(default)s)")
    p.add_argument("--lease", type=_positive(float), default=120.0,
                   help="a server silent this long is presumed gone and its pending debits are refunded by its "
                        "peers (default %(default)s)")
    p.add_argument("--low-memory", action="store_true", help="load each engine only while it is needed")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve)

    k = sub.add_parser("keys", help="manage the server's API keys and credits")
    ks = k.add_subparsers(dest="keys_command", required=True)
    add = ks.add_parser("add", help="create a key (printed once) with some credits")
    add.add_argument("--credits", type=int, required=True)
    add.add_argument("--name", default="", help="a label for `keys list`")
    add.set_defaults(func=_keys_add)
    ls = ks.add_parser("list", help="list keys (ids, credits; never the keys themselves)")
    ls.set_defaults(func=_keys_list)
    top = ks.add_parser("topup", help="add credits to a key")
    top.add_argument("key", help="key id from `keys list` (or the key itself)")
    top.add_argument("--credits", type=_positive(int), required=True)
    top.set_defaults(func=_keys_topup)
    dis = ks.add_parser("disable", help="refuse a key (401) without deleting it")
    dis.add_argument("key")
    dis.set_defaults(func=lambda a: _keys_enable(a, True))
    en = ks.add_parser("enable", help="accept a disabled key again")
    en.add_argument("key")
    en.set_defaults(func=lambda a: _keys_enable(a, False))
    for q in (add, ls, top, dis, en):
        q.add_argument("--db", default=DEFAULT_DB, help=DB_HELP)
