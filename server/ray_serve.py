"""Running the server as Ray Serve replicas: one replica per GPU, each with its own inference worker.

    SD3TRT_BUNDLE=/models/sd3-bundle SD3TRT_DB=/var/lib/sd3trt/keys.db \\
        serve run sd3trt.server.ray_serve:app

Ray evaluates ``build_app`` on each replica and runs the app's lifespan (engines load, pending debits
of dead replicas are refunded) exactly as ``sd3trt serve`` does; Ray's proxy does the HTTP, so the
path, fields, status codes and headers are the same. Settings come from environment variables
(see ``config_from_env``). Every replica must see the same SQLite file on a local disk, i.e. all
replicas on one node; see server/README.md for more than one node.

Importing this module without Ray installed gives ``build_app`` only (tests use it that way).
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3trt.server.app import ServerConfig, create_app
from sd3trt.server.fetch import FetchPolicy


def config_from_env(env=os.environ) -> ServerConfig:
    """SD3TRT_BUNDLE (required), SD3TRT_DB, SD3TRT_BACKEND, SD3TRT_ENGINES, SD3TRT_QUEUE_SIZE, SD3TRT_CREDITS_PER_IMAGE,
    SD3TRT_MAX_PIXELS, SD3TRT_MAX_IMAGE_BYTES, SD3TRT_ALLOW_FETCH_HOSTS (comma-separated), SD3TRT_NO_URL_FETCH=1."""
    defaults = ServerConfig(bundle=None, db=Path("sd3trt-keys.db"))
    allow = tuple(h.strip() for h in env.get("SD3TRT_ALLOW_FETCH_HOSTS", "").split(",") if h.strip())
    return ServerConfig(
        bundle=Path(env["SD3TRT_BUNDLE"]),
        db=Path(env.get("SD3TRT_DB", str(defaults.db))),
        backend=env.get("SD3TRT_BACKEND", defaults.backend),
        engine_build=env.get("SD3TRT_ENGINES") or None,
        queue_size=int(env.get("SD3TRT_QUEUE_SIZE", defaults.queue_size)),
        credits_per_image=int(env.get("SD3TRT_CREDITS_PER_IMAGE", defaults.credits_per_image)),
        max_pixels=int(env.get("SD3TRT_MAX_PIXELS", defaults.max_pixels)),
        max_image_bytes=int(env.get("SD3TRT_MAX_IMAGE_BYTES", defaults.max_image_bytes)),
        fetch=FetchPolicy(enabled=env.get("SD3TRT_NO_URL_FETCH", "") != "1", allow_hosts=allow),
    )


def build_app():
    """The ASGI app for one replica (Ray calls this on the replica, after placing it on its GPU)."""
    return create_app(config_from_env())


try:
    from ray import serve
except ImportError:  # Ray is optional: without it this module only offers build_app()
    serve = None

if serve is not None:
    @serve.deployment(
        ray_actor_options={"num_gpus": float(os.environ.get("SD3TRT_GPUS_PER_REPLICA", "1"))},
        # Above the worker's queue (default 16) so the replica's own 429 answers, not Ray's.
        max_ongoing_requests=64,
        autoscaling_config={"min_replicas": 1, "max_replicas": int(os.environ.get("SD3TRT_MAX_REPLICAS", "1")),
                            "target_ongoing_requests": 4},
        graceful_shutdown_timeout_s=60,
        health_check_period_s=10,
    )
    @serve.ingress(build_app)
    class Sd3trtReplica:
        pass

    app = Sd3trtReplica.bind()
