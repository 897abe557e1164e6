"""The server's settings (``sd3trt serve`` flags, or SD3TRT_* variables under Ray Serve)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sd3trt.server import inputs
from sd3trt.server.fetch import FetchPolicy


@dataclass(frozen=True)
class ConnLimits:
    """Per-connection limits, enforced by the connection handler (protocol.py)."""
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    max_per_client: int = 64  # 0: no per-address cap (e.g. behind a reverse proxy, every client is the proxy)


@dataclass
class ServerConfig:
    bundle: Path | None
    db: Path | str  # a SQLite file, or a postgresql:// URL
    backend: str = "onnxruntime"
    engine_build: str | None = None  # tensorrt backend: which `sd3trt build` output
    precision: str | None = None  # transformer: fp32 graphs, int8/fp8 from `sd3trt quantize`, or the build's
    vae_precision: str | None = None
    cpu_precision: str | None = None  # openvino backend: auto | fp32 | bf16
    loras: tuple[str, ...] = ()  # 'PATH[:SCALE]' LoRAs named at start, merged into the weights every request runs with
    host: str = "127.0.0.1"
    port: int = 8000
    low_memory: bool = False
    threads: int = 0
    credits_per_image: int = 1
    queue_size: int = 16
    max_image_bytes: int = 10 * 1024 * 1024
    max_body_bytes: int | None = None  # default: base64 of max_image_bytes + 64 KiB
    max_pixels: int = 16_777_216  # 4096 x 4096
    max_prompt_chars: int = 2000
    max_steps: int = 150
    input_formats: tuple[str, ...] = inputs.DEFAULT_INPUT_FORMATS
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    fetch_workers: int = 8  # URL fetches at once; as many more may wait (their deadline runs while they wait)
    graceful_timeout_s: float = 60.0  # after SIGTERM: how long the queue keeps being worked through
    inflight_grace_s: float = 30.0  # then: how long the request being generated may still finish
    charge_retry_s: float = 10.0  # a finished image's charge retried this long while the key database is unavailable
    heartbeat_s: float = 10.0  # lease renewal interval
    stale_after_s: float = 120.0  # a peer refunds the pending debits of an instance silent this long
    limit_concurrency: int = 256  # requests handled at once (probes excluded); more get 503
    max_inflight_per_key: int = 8  # requests of one key handled at once; more get 429
    max_uploads: int = 4  # request bodies read and decoded at once; more wait, then 429
    upload_wait_s: float = 10.0  # that wait, at most (and at most half the body timeout)
    conn: ConnLimits = field(default_factory=ConnLimits)

    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 4 * math.ceil(self.max_image_bytes / 3) + 64 * 1024
