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

        from sd3trt.server.app import serve
        from sd3trt.server.keystore import open_store
    except ImportError as e:
        raise Sd3trtError(f"the server needs its extra ({e.name} is missing); pip install 'sd3trt[server]'") from None
    import logging

    from sd3trt.server import settings

    cfg = settings.from_args(a)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("sd3trt.server")
    bundle = load_bundle(a.bundle, verify_checksums=True)  # every file re-hashed before the server listens
    from sd3trt.server.service import make_pipeline

    # Before listening: the pipeline, built once and handed to the worker (which loads its engines). Its
    # options and the LoRAs (missing, not safetensors, bad scale, a backend that cannot take them) each
    # stop the start with one sentence.
    pipe = make_pipeline(cfg, bundle)
    if cfg.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s: reachable from other machines; put TLS (a reverse proxy) in front", cfg.host)
    open_store(cfg.db).close()  # a database that cannot be opened fails here, with its message
    if not serve(cfg, log_level=a.log_level, pipe=pipe):
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
    from sd3trt.server import settings

    p = sub.add_parser("serve", help="serve the hosted SD3-Large img2img HTTP API over a bundle",
                       description="HTTP server compatible with the hosted SD3-Large img2img API "
                                   "(POST /v1/stable-diffusion-3-large-img2img). Needs the server extra. Every "
                                   "setting is also an SD3TRT_* environment variable (server/README.md).")
    p.add_argument("--ray", metavar="CONFIG", default=None,
                   help="run as a Ray Serve application from this config file (`serve run CONFIG`; scale extra); "
                        "settings then come from the file, see server/ray-serve.yaml")
    settings.add_arguments(p)
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
