"""The server as a Ray Serve application: the same HTTP API, replicas on as many nodes as Ray has.

    serve run server/ray-serve.yaml          # or: sd3trt serve --ray server/ray-serve.yaml

Each replica is one Ray actor that builds the FastAPI app (``build_app``) and runs its lifespan exactly
as ``sd3trt serve`` does: the bundle is loaded once per replica, the replica registers in the credit
database and renews its lease, and pending debits of dead replicas are refunded. Ray's proxy does the
HTTP, so the path, fields, status codes and headers are the same; ``/healthz``, ``/readyz`` and
``/metrics`` answer from whichever replica the proxy picks, and Ray's own metrics (``ray_serve_*``)
cover every replica. Credits live in one database all replicas share: SQLite on one node, PostgreSQL
(``SD3TRT_DB=postgresql://...``) for more than one. A new replica joins the routing once its engines have
loaded (its health check waits for them).

Settings come from environment variables (``config_from_env``; ``runtime_env.env_vars`` in the config
file); replicas, autoscaling and resources from the config file's ``deployments`` section, or
SD3TRT_REPLICAS, SD3TRT_MIN_REPLICAS/SD3TRT_MAX_REPLICAS (autoscaling), SD3TRT_CPUS_PER_REPLICA and
SD3TRT_GPUS_PER_REPLICA. Importing this module without Ray installed gives ``build_app`` and
``config_from_env`` only.
"""

from __future__ import annotations

import os

from sd3trt.server import settings
from sd3trt.server.app import ServerConfig, create_app

DEPLOYMENT = "Sd3trtReplica"
LOAD_WAIT_S = 3600.0  # how long a new replica may take to load its engines (a first TensorRT build included)


def config_from_env(env=os.environ) -> ServerConfig:
    """Every setting from its SD3TRT_* variable (server/settings.py; the table in server/README.md), as the
    flags of `sd3trt serve` give them: SD3TRT_BUNDLE is required."""
    return settings.from_env(env)


def build_app():
    """The ASGI app for one replica (Ray calls this on the replica, after placing it on its resources)."""
    return create_app(config_from_env())


def deployment_options(env=os.environ) -> dict:
    """The deployment's defaults; a config file's ``deployments`` entry overrides any of them."""
    opts = {
        "ray_actor_options": {"num_cpus": float(env.get("SD3TRT_CPUS_PER_REPLICA", "1")),
                              "num_gpus": float(env.get("SD3TRT_GPUS_PER_REPLICA", "1"))},
        # Above the worker's queue (default 16) so the replica's own 429 answers, not Ray's.
        "max_ongoing_requests": 64,
        "graceful_shutdown_timeout_s": 60,
        "health_check_period_s": 10,
    }
    if env.get("SD3TRT_MAX_REPLICAS"):
        opts["autoscaling_config"] = {"min_replicas": int(env.get("SD3TRT_MIN_REPLICAS", "1")),
                                      "max_replicas": int(env["SD3TRT_MAX_REPLICAS"]),
                                      "target_ongoing_requests": 4}
    else:
        opts["num_replicas"] = int(env.get("SD3TRT_REPLICAS", "1"))
    return opts


try:
    from ray import serve
except ImportError:  # Ray is optional: without it this module only offers build_app()
    serve = None

if serve is not None:
    @serve.ingress(build_app)
    class Sd3trtReplica:
        """One replica: the whole FastAPI app (its worker owns one pipeline)."""

        async def check_health(self):
            """Serve's health check. Serve runs it once before it routes to a new replica, so that first call
            waits for the engines: the proxy never sends a request to a replica still loading them. A replica
            whose engines failed to load is unhealthy, and Serve replaces it."""
            why = await self.app.state.server.engines_loaded(LOAD_WAIT_S)
            if why is not None:
                raise RuntimeError(why)

    deployment = serve.deployment(Sd3trtReplica, name=DEPLOYMENT, **deployment_options())
    app = deployment.bind()
