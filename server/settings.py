"""Every setting of the server, written once: its `sd3trt serve` flag, its environment variable (what a Ray
Serve replica reads, from a config's ``runtime_env.env_vars``), its parser and its help. The defaults
are ServerConfig's (config.py). The flags, ``config_from_env`` and server/README.md's settings table
are generated from ``SETTINGS``; both paths end in ``build`` and ``check``, so a value means the same
and is refused with the same sentence whichever way it comes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sd3trt.errors import Sd3trtError
from sd3trt.server.config import ServerConfig

ENV_PREFIX = "SD3TRT_"
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def positive(kind: type) -> Callable[[str], Any]:
    def parse(v: str):
        x = kind(v)
        if x <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return x
    parse.__name__ = kind.__name__
    return parse


def at_least_zero(kind: type) -> Callable[[str], Any]:
    def parse(v: str):
        x = kind(v)
        if x < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return x
    parse.__name__ = kind.__name__
    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(v: str):
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v
    parse.__name__ = "choice"
    return parse


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str):
        x = int(v)
        if not lo <= x <= hi:
            raise ValueError(f"must be {lo}..{hi}, got {v}")
        return x
    parse.__name__ = "int"
    return parse


def input_formats(v: str) -> tuple[str, ...]:
    formats = tuple(f.strip().upper().replace("JPG", "JPEG") for f in v.split(",") if f.strip())
    unknown = [f for f in formats if f not in INPUT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"{','.join(unknown) or v!r} not supported; choose from png, jpeg, webp")
    return formats


def database(v: str):
    from sd3trt.server.keystore import db_target

    return db_target(v)


def _precisions():
    from sd3trt import precision as prec
    from sd3trt.runtime.ov_runner import CPU_PRECISIONS

    return prec.ENGINE, prec.FLOATS + prec.VAE_QUANTIZED, CPU_PRECISIONS


@dataclass(frozen=True)
class Setting:
    flag: str  # "--queue-size"
    path: str  # the ServerConfig field; "fetch.timeout_s" for one of a nested policy
    parse: Callable[[str], Any]  # one value from text (a flag's argument or a variable's value)
    help: str
    many: bool = False  # a repeatable flag; comma-separated in the environment
    switch: Any = None  # a flag without a value, setting this; in the environment 1/true or 0/false
    env_name: str = ""  # default: SD3TRT_ and the flag's name

    @property
    def env(self) -> str:
        return self.env_name or ENV_PREFIX + self.flag[2:].upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """argparse's own name for the flag (`--lora` -> `lora`), as the other commands' flags have."""
        return self.flag[2:].replace("-", "_")

    def default(self) -> Any:
        value = DEFAULTS
        for part in self.path.split("."):
            value = getattr(value, part)
        return value

    def shown_default(self) -> str:
        """The default as the help text and the README say it."""
        d = self.default()
        if self.path == "db":
            return "$SD3TRT_DB or sd3trt-keys.db"
        if self.switch is not None:
            return "off"
        if isinstance(d, tuple):
            return ",".join(d).lower() or "none"
        return "none" if d is None or d == "" else str(d)


DEFAULTS = ServerConfig(bundle=None, db=Path(os.environ.get("SD3TRT_DB", "sd3trt-keys.db")))


def _settings() -> list[Setting]:
    from sd3trt.runtime.runners import BACKENDS

    engine, vae, cpu = _precisions()
    return [
        Setting("--bundle", "bundle", Path, "the exported bundle (required)"),
        Setting("--db", "db", database, "key/credit database: a SQLite file, or postgresql://user@host/dbname "
                "(scale extra)"),
        Setting("--backend", "backend", one_of(*BACKENDS), "inference backend"),
        Setting("--engines", "engine_build", str, "which `sd3trt build` output to use (tensorrt backend)"),
        Setting("--precision", "precision", one_of(*engine), "transformer precision: onnxruntime/openvino run "
                "fp32 graphs or int8/fp8 ones from `sd3trt quantize`; tensorrt uses that engine build"),
        Setting("--vae-precision", "vae_precision", one_of(*vae), "int8: the VAE's int8 convolutions on the CPU "
                "backends; fp16/bf16/fp32 with tensorrt: the engine build whose VAE has it"),
        Setting("--cpu-precision", "cpu_precision", one_of(*cpu), "openvino backend: auto (bf16 where the CPU "
                "has AVX512_BF16 or AMX), fp32 or bf16"),
        Setting("--lora", "loras", str, "a LoRA PATH[:SCALE] merged into the served weights at load time "
                "(ONNX Runtime); repeatable", many=True),
        Setting("--host", "host", str, "address to listen on"),
        Setting("--port", "port", positive(int), "port to listen on"),
        Setting("--low-memory", "low_memory", str, "load each engine only while it is needed", switch=True),
        Setting("--threads", "threads", at_least_zero(int), "ONNX Runtime intra-op threads (0: its default)"),
        Setting("--credits-per-image", "credits_per_image", positive(int), "credits one image costs"),
        Setting("--queue-size", "queue_size", positive(int), "requests that may wait for the worker; more get 429"),
        Setting("--max-image-bytes", "max_image_bytes", positive(int), "input image file size limit, base64 or URL"),
        Setting("--max-body-bytes", "max_body_bytes", positive(int), "request body limit (default: base64 of "
                "--max-image-bytes + 64 KiB)"),
        Setting("--max-pixels", "max_pixels", positive(int), "decompression-bomb limit on input pixels"),
        Setting("--max-prompt-chars", "max_prompt_chars", positive(int), "prompt and negative prompt, each"),
        Setting("--max-steps", "max_steps", positive(int), "largest num_inference_steps accepted"),
        Setting("--input-formats", "input_formats", input_formats, "accepted input image formats, comma-separated"),
        Setting("--no-url-fetch", "fetch.enabled", str, "refuse image URLs (base64 only)", switch=False),
        Setting("--allow-fetch-host", "fetch.allow_hosts", str, "a host name, address or network whose image URLs "
                "may be fetched though loopback/private (repeatable; trusted internal image stores)", many=True,
                env_name="SD3TRT_ALLOW_FETCH_HOSTS"),
        Setting("--fetch-timeout", "fetch.timeout_s", positive(float), "seconds for a whole image URL fetch: "
                "waiting for a fetch thread, connect, headers, body"),
        Setting("--fetch-max-redirects", "fetch.max_redirects", int_in(0, 10), "redirects followed, each vetted "
                "again (0..10)"),
        Setting("--fetch-workers", "fetch_workers", positive(int), "image URL fetches at once; as many more may "
                "wait, beyond that 429"),
        Setting("--graceful-timeout", "graceful_timeout_s", positive(float), "on SIGTERM, seconds to keep working "
                "through the queue; what is left is refunded (503)"),
        Setting("--inflight-grace", "inflight_grace_s", positive(float), "then, seconds the image being generated "
                "may still take before it too is refunded (503)"),
        Setting("--charge-retry", "charge_retry_s", at_least_zero(float), "how long the charge of a finished "
                "image is retried while the key database is unavailable (the client waits); then 503 "
                "db_unavailable, the image withheld, nothing taken"),
        Setting("--limit-concurrency", "limit_concurrency", positive(int), "requests handled at once before 503 "
                "(probes are exempt)"),
        Setting("--max-inflight-per-key", "max_inflight_per_key", positive(int), "requests of one key handled at "
                "once before 429 (per process: per replica under Ray)"),
        Setting("--max-uploads", "max_uploads", positive(int), "request bodies read and decoded at once; more "
                "wait, then 429"),
        Setting("--upload-wait", "upload_wait_s", positive(float), "how long a body waits for an upload slot "
                "(at most half --body-timeout)"),
        Setting("--max-connections", "conn.max_connections", positive(int), "open connections in total; more are "
                "answered 503 and closed"),
        Setting("--max-connections-per-client", "conn.max_per_client", at_least_zero(int), "open connections per "
                "client address; more are answered 429 and closed; 0: no cap, e.g. behind a reverse proxy"),
        Setting("--header-timeout", "conn.header_timeout_s", positive(float), "seconds for a request's line and "
                "headers to arrive; else 408 and close"),
        Setting("--body-timeout", "conn.body_timeout_s", positive(float), "seconds for a request's whole body to "
                "arrive; else 408 and close (under Ray Serve: 408 body_timeout from the replica, counted from "
                "when it starts reading the body)"),
        Setting("--heartbeat", "heartbeat_s", positive(float), "seconds between lease renewals in the key database"),
        Setting("--lease", "stale_after_s", positive(float), "a server silent this long is presumed gone and its "
                "pending debits are refunded by its peers (at least 3 x --heartbeat)"),
    ]


SETTINGS = _settings()


def _error(s: Setting, value: str, why: str) -> Sd3trtError:
    return Sd3trtError(f"{s.flag} / {s.env} = {value!r}: {why}")


def _parse(s: Setting, value: str):
    try:
        return s.parse(value)
    except (ValueError, TypeError) as e:
        raise _error(s, value, str(e) or "not a valid value") from None


def build(values: dict[str, Any]) -> ServerConfig:
    """A ServerConfig from {path: value} (what is not given keeps its default), checked."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for path, value in values.items():
        if "." in path:
            group, name = path.split(".", 1)
            nested.setdefault(group, {})[name] = value
        else:
            top[path] = value
    for group, fields in nested.items():
        top[group] = dataclasses.replace(getattr(DEFAULTS, group), **fields)
    cfg = dataclasses.replace(DEFAULTS, **top)
    check(cfg)
    return cfg


def check(cfg: ServerConfig) -> None:
    """What involves two settings."""
    if cfg.heartbeat_s * 3 > cfg.stale_after_s:
        raise Sd3trtError(f"--lease {cfg.stale_after_s:g} must be at least 3 x --heartbeat ({cfg.heartbeat_s:g}), so "
                          "one late heartbeat does not let a peer refund this server's work")


# -- the command line ---------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """The `sd3trt serve` flags, one per setting, with ServerConfig's defaults."""
    import argparse

    def arg_type(s: Setting):
        def parse(v: str):
            try:
                return s.parse(v)
            except (ValueError, TypeError) as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        parse.__name__ = getattr(s.parse, "__name__", "value")
        return parse

    for s in SETTINGS:  # default None: what is not given keeps ServerConfig's default (build)
        text = s.help.replace("%", "%%")
        if s.switch is not None:
            p.add_argument(s.flag, dest=s.dest, action="store_const", const=s.switch, default=None, help=text)
        elif s.many:
            p.add_argument(s.flag, dest=s.dest, action="append", type=arg_type(s), default=None, help=text,
                           metavar=s.flag[2:].upper().replace("-", "_"))
        else:
            p.add_argument(s.flag, dest=s.dest, type=arg_type(s), default=None,
                           help=f"{text} (default {s.shown_default()})",
                           metavar=s.flag[2:].upper().replace("-", "_"))


def from_args(a) -> ServerConfig:
    values = {}
    for s in SETTINGS:
        v = getattr(a, s.dest)
        if v is not None:
            values[s.path] = tuple(v) if s.many else v
    return build(values)


# -- the environment (Ray Serve replicas) ----------------------------------------------------------------

def from_env(env=os.environ) -> ServerConfig:
    values = {}
    for s in SETTINGS:
        raw = env.get(s.env, "")
        if not raw.strip():  # unset or empty: the default
            continue
        if s.switch is not None:
            if raw.strip().lower() not in ("1", "true", "0", "false"):
                raise _error(s, raw, "use 1 or 0")
            if raw.strip().lower() in ("1", "true"):
                values[s.path] = s.switch
        elif s.many:
            values[s.path] = tuple(_parse(s, v.strip()) for v in raw.split(",") if v.strip())
        else:
            values[s.path] = _parse(s, raw)
    if values.get("bundle") is None:
        raise Sd3trtError(f"{ENV_PREFIX}BUNDLE is not set; set it to the exported bundle's path (every replica "
                          "must see it there)")
    return build(values)


# -- server/README.md ----------------------------------------------------------------------------------------

def markdown_table() -> str:
    """The settings table of server/README.md (tests/test_server_units.py checks that it is there as is)."""
    rows = ["| flag | environment (Ray) | default | |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.flag}` | `{s.env}` | {s.shown_default()} | {s.help} |")
    return "\n".join(rows)
